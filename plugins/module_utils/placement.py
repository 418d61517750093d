# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Where the instances of one app go: N replicas on N different VMM hosts.

    place(name, vmms, replicas, pinned) -> (placed, surplus)

vmms: [{host, url, cvms, capacity}] in inventory order, cvms each VMM's Status list (with
configurations), capacity its GetMeta max_cvm_number (None: unknown). An instance is a CVM named
after the app. Rules, so that a second run places nothing anew:
  - the candidates are the pinned hosts (app.yml `hosts`), else every VMM host;
  - a candidate that runs an instance keeps it (inventory order), up to `replicas`;
  - the rest go to candidates without one and with a free CVM slot: the most free slots first
    (unknown capacity: unlimited), then the fewest CVMs, the least memory given to CVMs,
    inventory order;
  - every other instance, on any VMM host, is surplus (removed when the app shrinks).
placed is in inventory order (the order a rolling upgrade takes), each {host, url, existing (the
CVM or None)}; surplus each {host, url, existing}.
"""

import math

from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError

MAX_REPLICAS = 1000


def check_replicas(value, field="replicas"):
    """A replica count, 1 to MAX_REPLICAS; DstackError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_REPLICAS:
        raise DstackError(field, f"must be a whole number from 1 to {MAX_REPLICAS} (got {value!r})")
    return value


def check_hosts(value, field="hosts"):
    """A list of inventory host names (pinned placement); DstackError otherwise."""
    if not isinstance(value, list) or not value or not all(isinstance(h, str) and h.strip() for h in value):
        raise DstackError(field, "must be a non-empty list of inventory host names (of the group dstack_vmm)")
    if len(set(value)) != len(value):
        raise DstackError(field, "names a host twice (each instance goes to a different host)")
    return value


def instance_on(vmm, name):
    """The app's CVM on one VMM (by name), or None."""
    return next((vm for vm in vmm.get("cvms") or [] if vm.get("name") == name), None)


def place(name, vmms, replicas, pinned=None, field="replicas"):
    replicas = check_replicas(replicas, field)
    known = [vmm["host"] for vmm in vmms]
    if pinned:
        unknown = [host for host in pinned if host not in known]
        if unknown:
            raise DstackError("hosts", f"{unknown[0]} is not a VMM host of the inventory (dstack_vmm: "
                                       f"{', '.join(known) or 'none'})")
        candidates = [vmm for vmm in vmms if vmm["host"] in pinned]
    else:
        candidates = list(vmms)
    if replicas > len(candidates):
        where = "the pinned hosts" if pinned else "the VMM hosts (inventory group dstack_vmm)"
        raise DstackError(field, f"{replicas} instances need {replicas} different VMM hosts, and {where} are "
                                 f"{len(candidates)}: {', '.join(v['host'] for v in candidates) or 'none'}")
    keep = [vmm for vmm in candidates if instance_on(vmm, name)][:replicas]
    free = sorted((vmm for vmm in candidates if vmm not in keep and not instance_on(vmm, name) and _slots(vmm) > 0),
                  key=lambda vmm: (-_slots(vmm), len(vmm.get("cvms") or []), _memory(vmm), known.index(vmm["host"])))
    chosen = keep + free[:replicas - len(keep)]
    if len(chosen) < replicas:
        full = [vmm["host"] for vmm in candidates if vmm not in chosen and _slots(vmm) <= 0]
        raise DstackError(field, f"{replicas} instances need {replicas} VMM hosts with room, and "
                                 f"{', '.join(full)} hold{'s' if len(full) == 1 else ''} as many CVMs as "
                                 "they allow (GetMeta max_cvm_number)")
    placed = [{"host": vmm["host"], "url": vmm["url"], "existing": instance_on(vmm, name)}
              for vmm in vmms if vmm in chosen]
    surplus = [{"host": vmm["host"], "url": vmm["url"], "existing": instance_on(vmm, name)}
               for vmm in vmms if vmm not in chosen and instance_on(vmm, name)]
    return placed, surplus


def _slots(vmm):
    """Free CVM slots of a VMM; unknown capacity counts as unlimited (then the fewest CVMs come first)."""
    capacity = vmm.get("capacity")
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        return math.inf
    return capacity - len(vmm.get("cvms") or [])


def _memory(vmm):
    """Memory (MB) given to the VMM's CVMs, from their configurations."""
    return sum(int((vm.get("configuration") or {}).get("memory") or 0) for vm in vmm.get("cvms") or [])
