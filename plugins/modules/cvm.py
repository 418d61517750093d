#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
---
module: cvm
short_description: Manage a confidential VM (CVM) on a dstack.tee VMM
version_added: 0.1.0
description:
  - Makes a CVM, found by O(name), be V(present), V(running), V(stopped) or V(absent) on a VMM
    (C(dstack-vmm), its JSON API at C(/prpc/Vmm.*)).
  - A CVM whose app-compose, encrypted env or ports differ from the options is updated in place
    (UpdateVm), which keeps the instance's data; the new compose_hash must be authorized first.
  - The VMM cannot change O(vcpu), O(memory), O(disk_size), O(image), O(no_tee) or O(app_id) of an
    existing CVM. When one of them differs, the task fails naming them and changes nothing, unless
    O(recreate=true) (see there). Check mode and the diff show every field that differs.
  - With O(wait=true) the task waits until the guest reports its boot finished, and fails with
    the guest's boot error otherwise.
author:
  - dstack.tee contributors (@dstack-tee)
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
    details: >-
      The diff shows the CVM's name, app_id, compose_hash, encrypted env digest, ports, vcpu,
      memory, disk_size, image, no_tee and state, before and after; when the app-compose changes, a
      second diff shows it as YAML lines, the docker-compose text line by line.
  idempotent:
    support: full
options:
  vmm_url:
    description: The VMM's URL.
    type: str
    default: http://127.0.0.1:9080
  vmm_token:
    description: The VMM API token, when the VMM requires one.
    type: str
  name:
    description: The CVM's name (letters, digits, spaces and C(-_.@~!$^())), unique on the VMM.
    type: str
    required: true
  state:
    description: The desired state.
    type: str
    choices: [present, running, stopped, absent]
    default: running
  app_compose_file:
    description:
      - Path of the app-compose.json to run (its exact bytes are sent).
      - One of O(app_compose_file) and O(app_compose) is needed unless O(state=absent).
    type: path
  app_compose:
    description:
      - The app-compose content as a dict (RV(dstack.tee.app_compose#module:app_compose) of
        M(dstack.tee.app_compose)); rendered to the same bytes that module writes. Useful in check
        mode, before the file exists.
    type: dict
  encrypted_env_file:
    description: Path of the encrypted env (raw bytes, as M(dstack.tee.env_encrypt) writes it).
    type: path
  encrypted_env:
    description: The encrypted env as hex (RV(dstack.tee.env_encrypt#module:encrypted_env)).
    type: str
  app_id:
    description:
      - The app id when it is not compose_hash[0:20] (an on-chain app), hex.
      - An existing CVM keeps its app id across updates; when given, it is compared with the
        CVM's (a different one needs O(recreate=true)).
    type: str
  ports:
    description: Ports forwarded from the host to the CVM.
    type: list
    elements: dict
    default: []
    suboptions:
      protocol:
        description: tcp or udp.
        type: str
        default: tcp
      host_port:
        description: The host port.
        type: int
        required: true
      vm_port:
        description: The CVM port.
        type: int
        required: true
      host_address:
        description: The host address to listen on.
        type: str
        default: 127.0.0.1
  vcpu:
    description: Virtual CPUs.
    type: int
    default: 1
  memory:
    description: Memory in MiB.
    type: int
    default: 1024
  disk_size:
    description: Data disk size in GiB.
    type: int
    default: 10
  image:
    description:
      - The guest image the CVM boots, a folder name in the VMM's image path (C(dstack-vmm serve
        --image-path), vmm.toml C(image_path)). The libvirt backend needs one; the process backend
        runs no image and ignores it.
    type: str
    default: ""
  no_tee:
    description:
      - Run the CVM as a plain VM without TDX (libvirt backend); its quotes come from the VMM's
        simulated TDX platform, which only a KMS in simulation mode trusts. For hosts without TDX.
      - The process backend's CVMs are simulated either way.
    type: bool
    default: false
  recreate:
    description:
      - What to do when O(vcpu), O(memory), O(disk_size), O(image), O(no_tee) or O(app_id) differ from those of
        the existing CVM, which the VMM cannot change in place (its UpdateVm changes only the
        app-compose, the encrypted env and the ports).
      - V(false) fails, naming the fields, and leaves the CVM as it is.
      - V(true) removes the CVM and creates it anew with the options. This loses the instance, for
        good - its VMM id; its instance id (a new one is drawn at the first boot); its data (the
        work folder and data disk); and the keys the KMS derives from the instance id (the disk
        encryption key). The app id stays, and so the app's own keys, unless O(app_id) is what
        changes. A CVM that was running is running again afterwards (for O(state=present) too).
    type: bool
    default: false
  wait:
    description: Wait until the guest reports its boot finished (state running).
    type: bool
    default: true
  wait_timeout:
    description: Seconds to wait for the boot (and then, with O(wait_app), as long again for the app's first answer).
    type: int
    default: 300
  wait_app:
    description:
      - With O(wait), also wait after the boot until the app answers HTTP at RV(app_url) (any status below 500),
        polling every 0.1 s, and return its first answer as RV(app_answer). Nothing to wait for when the CVM
        has no RV(app_url) (no port forwarded).
    type: bool
    default: false
  app_compose_dest:
    description:
      - Also keep the app-compose.json the CVM is given (the exact bytes sent to the VMM) in this file, written
        atomically with mode 0644 when they differ, once the VMM took them (not in check mode). Its folder must
        exist.
      - An app-compose holds no secret (its hash is measured and public).
    type: path
extends_documentation_fragment:
  - dstack.tee.attributes
seealso:
  - module: dstack.tee.app_compose
  - module: dstack.tee.env_encrypt
  - module: dstack.tee.verify_app
"""

EXAMPLES = r"""
- name: Run the hello app
  dstack.tee.cvm:
    name: hello
    app_compose_file: build/hello/app-compose.json
    encrypted_env_file: build/hello/encrypted-env
    ports:
      - {host_port: 8080, vm_port: 8080}
  register: cvm

- name: Run it in a VM of the guest image dstack-guest, without TDX (libvirt backend on a host without TDX)
  dstack.tee.cvm:
    name: hello-vm
    app_compose_file: build/hello/app-compose.json
    image: dstack-guest
    no_tee: true
    wait: false

- name: Remove it
  dstack.tee.cvm:
    name: hello
    state: absent
"""

RETURN = r"""
id:
  description: The CVM's VMM id.
  returned: when the CVM exists
  type: str
app_id:
  description: The app id (hex).
  returned: when the CVM exists
  type: str
instance_id:
  description: The instance id the guest reported (hex), empty before its first boot.
  returned: when the CVM exists
  type: str
status:
  description: The CVM's status (running, stopped, exited).
  returned: when the CVM exists
  type: str
compose_hash:
  description: SHA-256 of the app-compose.json the CVM runs.
  returned: when the CVM exists
  type: str
app_url:
  description: Where the app answers.
  returned: when the CVM exists
  type: str
recreated:
  description: Whether the CVM was (or, in check mode, would be) removed and created anew.
  returned: always
  type: bool
app_answer:
  description: The app's first answer at RV(app_url) (O(wait_app)).
  returned: when O(wait_app) waited for it
  type: dict
  contains:
    status:
      description: Its HTTP status.
      type: int
    content:
      description: The first 4 KiB of its body, as text (undecodable bytes replaced).
      type: str
"""

import hashlib
import os
import time

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.dstack.tee.plugins.module_utils import app_compose
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError, parse_hex
from ansible_collections.dstack.tee.plugins.module_utils.module_support import read_bytes, write_file
from ansible_collections.dstack.tee.plugins.module_utils.vmm_client import VmmClient


# What the VMM's UpdateVm changes in place (agents/vmm/service.py update_vm), keeping the
# instance and its data; and what only a new CVM can have.
IN_PLACE = ("compose_hash", "encrypted_env_sha256", "ports")
NOT_IN_PLACE = ("vcpu", "memory", "disk_size", "image", "no_tee", "app_id")


def _ports(ports):
    return sorted(({"protocol": p.get("protocol") or "tcp", "host_port": p["host_port"], "vm_port": p["vm_port"],
                    "host_address": p.get("host_address") or "127.0.0.1"} for p in ports or []),
                  key=lambda p: (p["protocol"], p["host_port"]))


def _view(info):
    if not info:
        return {}
    cfg = info.get("configuration") or {}
    return {"name": info.get("name"), "app_id": info.get("app_id", ""), "compose_hash": info.get("compose_hash"),
            "encrypted_env_sha256": info.get("encrypted_env_sha256", ""), "ports": _ports(cfg.get("ports")),
            "vcpu": cfg.get("vcpu"), "memory": cfg.get("memory"), "disk_size": cfg.get("disk_size"),
            "image": cfg.get("image") or "", "no_tee": bool(cfg.get("no_tee")), "status": info.get("status")}


def _result(info):
    return {k: info.get(k, "") for k in ("id", "app_id", "instance_id", "status", "compose_hash", "app_url")}


def main():
    module = AnsibleModule(
        argument_spec=dict(
            vmm_url=dict(type="str", default="http://127.0.0.1:9080"),
            vmm_token=dict(type="str", no_log=True),
            name=dict(type="str", required=True),
            state=dict(type="str", default="running", choices=["present", "running", "stopped", "absent"]),
            app_compose_file=dict(type="path"),
            app_compose=dict(type="dict"),
            encrypted_env_file=dict(type="path"),
            encrypted_env=dict(type="str", no_log=False),
            app_id=dict(type="str"),
            ports=dict(type="list", elements="dict", default=[], options=dict(
                protocol=dict(type="str", default="tcp"), host_port=dict(type="int", required=True),
                vm_port=dict(type="int", required=True), host_address=dict(type="str", default="127.0.0.1"))),
            vcpu=dict(type="int", default=1),
            memory=dict(type="int", default=1024),
            disk_size=dict(type="int", default=10),
            image=dict(type="str", default=""),
            no_tee=dict(type="bool", default=False),
            recreate=dict(type="bool", default=False),
            wait=dict(type="bool", default=True),
            wait_timeout=dict(type="int", default=300),
            wait_app=dict(type="bool", default=False),
            app_compose_dest=dict(type="path"),
        ),
        mutually_exclusive=[("app_compose_file", "app_compose"), ("encrypted_env_file", "encrypted_env")],
        required_if=[("state", "present", ("app_compose_file", "app_compose"), True),
                     ("state", "running", ("app_compose_file", "app_compose"), True)],
        supports_check_mode=True,
    )
    p = module.params
    client = VmmClient(p["vmm_url"], token=p["vmm_token"])
    try:
        current = client.find(p["name"])
        result = _apply(module, client, current)
        if p["state"] != "absent":
            result["changed"] |= _keep_compose(module)
        if p["wait_app"] and p["wait"] and p["state"] == "running" and result.get("app_url") and not module.check_mode:
            result["app_answer"] = _wait_answer(module, result["app_url"], p["wait_timeout"])
    except DstackError as exc:
        module.fail_json(msg=str(exc), field=exc.field)
    module.exit_json(**result)


def _desired(module):
    p = module.params
    if p["app_compose"] is not None:
        compose = app_compose.render(app_compose.validate(p["app_compose"]))
    else:
        compose = read_bytes(p["app_compose_file"])
        if compose is None:
            raise DstackError("app_compose_file", f"{p['app_compose_file']} does not exist")
    env = b""
    if p["encrypted_env"]:
        env = parse_hex(p["encrypted_env"], "encrypted_env")
    elif p["encrypted_env_file"]:
        env = read_bytes(p["encrypted_env_file"])
        if env is None:
            raise DstackError("encrypted_env_file", f"{p['encrypted_env_file']} does not exist")
    return compose, env


def _apply(module, client, current):
    p = module.params
    state = p["state"]
    before = _view(current)
    if state == "absent":
        if current and not module.check_mode:
            client.call("RemoveVm", {"id": current["id"]})
        return dict(changed=bool(current), recreated=False, diff=dict(before=before, after={}))
    compose, env = _desired(module)
    previous = current
    compose_hash = hashlib.sha256(compose).hexdigest()
    # An existing CVM keeps its app id across updates; a given one is compared with it.
    app_id = app_compose.app_id_for(compose_hash, p["app_id"]) if p["app_id"] or not current else before["app_id"]
    wanted = {"name": p["name"], "app_id": app_id, "compose_hash": compose_hash,
              "encrypted_env_sha256": hashlib.sha256(env).hexdigest() if env else "", "ports": _ports(p["ports"]),
              "vcpu": p["vcpu"], "memory": p["memory"], "disk_size": p["disk_size"], "image": p["image"],
              "no_tee": p["no_tee"]}
    config = {"name": p["name"], "compose_file": compose.decode("utf-8"), "encrypted_env": env.hex(),
              "ports": wanted["ports"], "vcpu": p["vcpu"], "memory": p["memory"], "disk_size": p["disk_size"],
              "image": p["image"], "no_tee": p["no_tee"], "app_id": app_id}
    changed = recreated = start = False
    fixed = [k for k in NOT_IN_PLACE if current and before[k] != wanted[k]]
    if fixed and not p["recreate"]:
        reason = (f"cannot change on the existing CVM {p['name']!r} (" + ", ".join(
            f"{k} {before[k]!r} -> {wanted[k]!r}" for k in fixed) + "): the VMM changes only its app-compose, "
            "encrypted env and ports in place. recreate=true removes the CVM and creates it anew, losing its "
            "instance id, its data and the keys derived from the instance id")
        if not module.check_mode:
            raise DstackError(", ".join(fixed), reason)
        # Check mode shows the drift (changed, with the diff) and says what the run would do.
        module.warn(f"{', '.join(fixed)}: {reason}")
        changed = True
    if current is None or (fixed and p["recreate"]):
        recreated = current is not None
        changed = True
        # A recreated CVM runs again when it ran before (state=present keeps what it was).
        start = state == "running" or (state == "present" and recreated and before["status"] == "running")
        if not module.check_mode:
            if recreated:
                _check_resources(client, p)
                client.call("RemoveVm", {"id": current["id"]})
            vm_id = _create(client, dict(config, stopped=not start), recreated)
            current = client.call("GetInfo", {"id": vm_id})["info"]
    else:
        if any(before[k] != wanted[k] for k in IN_PLACE):
            changed = True
            if not module.check_mode:
                client.call("UpdateVm", {"id": current["id"], "compose_file": config["compose_file"],
                                         "encrypted_env": config["encrypted_env"], "update_ports": True,
                                         "ports": config["ports"], "start": state == "running"})
        if state == "running" and current.get("status") != "running":
            changed = True
            if not module.check_mode:
                client.call("StartVm", {"id": current["id"]})
        if state == "stopped" and current.get("status") == "running":
            changed = True
            if not module.check_mode:
                client.call("StopVm", {"id": current["id"]})
    if state != "present":
        status = state
    elif recreated:
        status = "running" if start else "stopped"
    else:
        status = (current or {}).get("status", "stopped")
    after = dict(wanted, status=status)
    if current and not module.check_mode:
        if state == "running" and p["wait"] and (changed or current.get("boot_progress") != "running"):
            client.wait_running(current["id"], p["wait_timeout"])
        current = client.call("GetInfo", {"id": current["id"]})["info"]
    out = dict(changed=changed, recreated=recreated, diff=_diff(before, after, previous, compose, p["name"]))
    out.update(_result(current or {}))
    return out


def _diff(before, after, previous, compose, name):
    """The CVM's settings before and after; with a new app-compose, also the app-compose itself as
    YAML lines (the docker-compose text line by line), so that a change shows what changed in it."""
    diff = dict(before=before, after=after)
    old = ((previous or {}).get("configuration") or {}).get("compose_file") or ""
    if old.encode("utf-8") == compose:
        return diff
    return [diff, dict(before_header=f"app-compose of the CVM {name} (on the VMM)",
                       after_header=f"app-compose of the CVM {name} (this run's)",
                       before=app_compose.diff_text(old), after=app_compose.diff_text(compose))]


def _keep_compose(module):
    """app_compose_dest: the bytes the VMM now has, kept beside the build; whether they changed."""
    dest = module.params["app_compose_dest"]
    if not dest:
        return False
    compose, _env = _desired(module)
    changed = write_file(module, dest, compose, "app_compose_dest")
    if changed and not module.check_mode:
        os.chmod(dest, 0o644)
    return changed


def _wait_answer(module, url, timeout):
    """The app's first HTTP answer below 500 at url (its containers are up and serving)."""
    # Here, not at the top: urls is compiled afresh at every module run (~0.1 s), and most runs
    # (through a gateway, or state absent) never wait here.
    from ansible.module_utils.urls import fetch_url  # pylint: disable=import-outside-toplevel
    deadline = time.monotonic() + timeout
    info = {}
    while time.monotonic() < deadline:
        # The app is on this host (the port map): no proxy between.
        response, info = fetch_url(module, url, timeout=5, use_proxy=False)
        if 0 < info.get("status", -1) < 500:
            body = response.read(4096) if response else info.get("body", b"")
            return {"status": info["status"], "content": (body or b"")[:4096].decode("utf-8", "replace")}
        time.sleep(0.1)
    raise DstackError("wait_app", f"{url} did not answer in {timeout} s "
                                  f"(last: {info.get('status', -1)} {str(info.get('msg', ''))[:200]})")


def _check_resources(client, p):
    """Before a CVM is removed to be recreated: what the VMM would refuse in CreateVm, as far as it says."""
    limits = client.call("GetMeta").get("resources") or {}
    for field, limit in (("vcpu", limits.get("max_allocable_vcpu")), ("memory", limits.get("max_allocable_memory_in_mb")),
                         ("disk_size", None)):
        if p[field] < 1 or (limit and p[field] > limit):
            allowed = f"1 to {limit}, the VMM's limit (GetMeta)" if limit else "a positive number"
            raise DstackError(field, f"must be {allowed}, got {p[field]}; the CVM was not removed")


def _create(client, config, recreated):
    try:
        return client.call("CreateVm", config)["id"]
    except DstackError as exc:
        if not recreated:
            raise
        raise DstackError(exc.field, f"{exc.reason} (recreate: the old CVM {config['name']!r} was removed first; "
                                     "a next run with valid options creates it)") from None


if __name__ == "__main__":
    main()
