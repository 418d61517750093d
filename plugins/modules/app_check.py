#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
---
module: app_check
short_description: Check an app folder, the KMS and the VMM before a deployment changes anything
version_added: 0.1.0
description:
  - Everything a deployment of an app folder needs, checked before anything is authorized,
    written or created, so that a mistake stops the run with nothing changed. M(dstack.tee.app)
    (C(deploy-app.yml)) runs it first.
  - The app folder (O(app_dir)) - C(docker-compose.yaml) parses as YAML and has services,
    C(app.yml) (optional) parses and holds only app-compose fields, C(name) and C(ports), the
    app-compose they make is valid (its compose_hash is returned), the port map is well formed,
    and C(secrets.env) (optional) parses as C(dotenv) text. Errors name the file and, for YAML and
    C(.env) text, the line.
  - The KMS (O(kms_url), HTTPS only) answers C(GetMeta) under its root CA; its k256 key is returned.
  - The VMM (O(vmm_url)) answers C(Status) with the token. The app's CVM there (by name) is
    returned; a host port of the app that another CVM holds is refused, naming that CVM; and, with
    O(check_host_ports), a host port that another program holds on this host is refused, naming
    that program (the VMM would refuse it only when it creates the CVM).
  - Reads only; never changes anything. No secret value leaves the module (only names).
author:
  - dstack.tee contributors (@dstack-tee)
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  idempotent:
    support: full
options:
  app_dir:
    description:
      - The app folder - C(docker-compose.yaml), and optionally C(app.yml) and C(secrets.env).
        A relative path is taken from the module's working folder; give an absolute one.
    type: path
    required: true
  host_port:
    description: Replaces the host port of C(app.yml)'s one port mapping (which must then map exactly one); 0 keeps it.
    type: int
    default: 0
  kms_url:
    description: The KMS (C(https://host:port)). When unset the KMS is not asked.
    type: str
  kms_ca_cert:
    description: The KMS root CA certificate its HTTPS certificate must chain to (the system's trust store when unset).
    type: path
  vmm_url:
    description: The VMM (C(http://host:port)). When unset the VMM is not asked.
    type: str
  vmm_token:
    description: The VMM API token, when it needs one.
    type: str
  check_host_ports:
    description:
      - Whether the VMM runs on this host, so that the app's host ports are tried here - a port
        another program holds is refused, naming it. A port the app's own CVM holds is not tried.
      - With O(vmms), only for the VMMs marked C(local).
    type: bool
    default: true
  vmms:
    description:
      - The VMM hosts of a fleet (C(deploy-app.yml) passes the inventory group C(dstack_vmm)), in
        inventory order, instead of O(vmm_url). Each answers C(Status) and C(GetMeta); the app's
        instances (its CVMs, by name) are placed on them (RV(placement)) - O(replicas) different
        hosts, those that already run one first, then those with the most free CVM slots
        (C(max_cvm_number)) and the least memory given to CVMs, within C(app.yml)'s C(hosts) when
        it pins some. The host ports are checked on each chosen host.
    type: list
    elements: dict
    suboptions:
      host:
        description: The inventory host name.
        type: str
        required: true
      url:
        description: Its VMM (C(http://host:port)).
        type: str
        required: true
      token:
        description: Its VMM API token, when it needs one.
        type: str
      local:
        description: Whether the VMM runs on this host (its host ports are tried here, as O(check_host_ports)).
        type: bool
        default: false
  replicas:
    description:
      - How many instances of the app, each on another host of O(vmms). 0 takes C(app.yml)'s
        C(replicas), else 1.
    type: int
    default: 0
  image:
    description:
      - The guest image the app's CVMs boot (a VMM of the libvirt backend). Each VMM that gets an
        instance must serve an image of that name whose os_image_hash (C(Vmm.ListImages)) is
        O(os_image_hash); else the check fails, naming both hashes. Empty (the process backend)
        checks nothing.
    type: str
    default: ""
  os_image_hash:
    description:
      - The os_image_hash the deployer allows (the image's C(digest.txt) from its reproducible
        build), with or without C(0x). The KMS releases the app's keys only to it; the VMM's host
        is not trusted to name it, only checked against it. Required with O(image).
    type: str
    default: ""
extends_documentation_fragment:
  - dstack.tee.attributes
seealso:
  - module: dstack.tee.app_compose
  - module: dstack.tee.env_encrypt
  - module: dstack.tee.cvm
"""

EXAMPLES = r"""
- name: Check the app folder, the KMS and the VMM before anything is made
  dstack.tee.app_check:
    app_dir: "{{ app_dir | realpath }}"
    kms_url: https://127.0.0.1:9201
    kms_ca_cert: .demo/kms/root-ca.crt
    vmm_url: http://127.0.0.1:9080
    vmm_token: "{{ vmm_token }}"
  register: checked

- name: Show what would be deployed
  ansible.builtin.debug:
    msg: "{{ checked.name }}: compose_hash {{ checked.compose_hash }}, secrets {{ checked.env_keys }}"
"""

RETURN = r"""
app_dir:
  description: The app folder, as an absolute path.
  returned: always
  type: str
name:
  description: The app's name (C(app.yml)'s, else the folder's).
  returned: always
  type: str
app_compose:
  description: The app-compose the folder makes (what M(dstack.tee.app_compose) renders from it).
  returned: always
  type: dict
compose_hash:
  description: SHA-256 of the app-compose.json bytes (hex).
  returned: always
  type: str
app_id:
  description:
    - C(app.yml)'s C(app_id) when it names one (kept across changes of the compose, and after the app
      is removed, so that a later deploy gets the same keys), else compose_hash[0:20] (hex). A CVM or
      a contract may give the app another.
  returned: always
  type: str
ports:
  description: The app's port map (C(app.yml)'s C(ports), defaults filled in, O(host_port) applied).
  returned: always
  type: list
  elements: dict
secrets_file:
  description: The folder's C(secrets.env), or an empty string when it has none.
  returned: always
  type: str
env_keys:
  description: The names in C(secrets.env) that C(allowed_envs) lets through.
  returned: always
  type: list
  elements: str
dropped_envs:
  description: The names in C(secrets.env) that are not in C(allowed_envs) (not encrypted, never sent).
  returned: always
  type: list
  elements: str
kms_k256_pubkey:
  description: The KMS's k256 public key from its GetMeta (hex), empty without O(kms_url).
  returned: always
  type: str
existing:
  description:
    - The app's CVM on the VMM (C(id), C(app_id), C(status), C(ports)), empty when there is none.
    - With O(vmms), the first instance found (the app keeps its app_id across its instances).
  returned: always
  type: dict
replicas:
  description: The number of instances placed (O(replicas), else C(app.yml)'s, else 1).
  returned: always
  type: int
placement:
  description:
    - Where the instances go, in inventory order (the order a rolling upgrade takes) - each
      C(host), C(url) and C(existing) (as RV(existing), empty for a new instance). With
      O(vmm_url), that one VMM (host C(""))); without a VMM, empty.
  returned: always
  type: list
  elements: dict
surplus:
  description: The app's instances on VMM hosts beyond the placement (C(host), C(url), C(existing)), to remove.
  returned: always
  type: list
  elements: dict
"""

import errno

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.dstack.tee.plugins.module_utils import app_compose, app_folder, host_ports, placement
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError, parse_hex
from ansible_collections.dstack.tee.plugins.module_utils.kms_client import KmsClient
from ansible_collections.dstack.tee.plugins.module_utils.prpc import Unauthorized
from ansible_collections.dstack.tee.plugins.module_utils.vmm_client import VmmClient

# A pre-check waits less than a deployment's calls do: an unreachable party is reported at once.
TIMEOUT = 15.0


def _kms_meta(url, ca_cert):
    if not url.lower().startswith("https://"):
        raise DstackError("kms_url", f"must be an https:// URL, not {url[:80]!r}: the KMS serves HTTPS only")
    return KmsClient(url, ca_cert, timeout=TIMEOUT).get_meta()


def _vmm_cvms(url, token):
    try:
        return VmmClient(url, token=token, timeout=TIMEOUT).call("Status", {"brief": False}).get("vms") or []
    except Unauthorized:
        raise DstackError("vmm_token", f"the VMM at {url} refused it (HTTP 401): give the VMM's API token") from None


def _brief(vm):
    """What the role uses of a CVM the VMM lists: {} for none."""
    return {k: vm.get(k) for k in ("id", "app_id", "status")} | {
        "ports": (vm.get("configuration") or {}).get("ports") or []} if vm else {}


def _place(app, p):
    """(placement, surplus, replicas) over p['vmms'], the host ports checked on each chosen host."""
    vmms, local = [], {}
    # With several VMM hosts, a message names the one it is about.
    several = len(p["vmms"]) > 1
    for vmm in p["vmms"]:
        try:
            cvms = _vmm_cvms(vmm["url"], vmm["token"])
            # Its capacity chooses among hosts; one VMM's CreateVm says itself when it is full.
            meta = VmmClient(vmm["url"], token=vmm["token"], timeout=TIMEOUT).call("GetMeta", {}) if several else {}
        except DstackError as exc:
            if not several:
                raise
            raise DstackError(exc.field, f"VMM host {vmm['host']}: {exc.reason}") from None
        capacity = (meta.get("resources") or {}).get("max_cvm_number")
        vmms.append({"host": vmm["host"], "url": vmm["url"], "cvms": cvms, "capacity": capacity})
        local[vmm["host"]] = vmm["local"]
    replicas = p["replicas"] or app.replicas or 1
    placed, surplus = placement.place(app.name, vmms, replicas, app.hosts,
                                      field="replicas" if p["replicas"] else f"{app.path}/{app_folder.APP_YML}: replicas")
    for where in placed:
        cvms = next(v["cvms"] for v in vmms if v["host"] == where["host"])
        try:
            _check_ports(app, cvms, where["existing"], p["check_host_ports"] and local[where["host"]])
        except DstackError as exc:
            if not several:
                raise
            raise DstackError(exc.field, f"{exc.reason} (VMM host {where['host']})") from None
    brief = [dict(w, existing=_brief(w["existing"])) for w in placed]
    return brief, [dict(w, existing=_brief(w["existing"])) for w in surplus], replicas


def _check_image(where, token, image, os_image_hash):
    """The image `image` of the VMM at where['url'] must have the pinned os_image_hash: a wrong image,
    or a wrong pin, stops here, before anything is made, not at the CVM's key release."""
    images = VmmClient(where["url"], token=token, timeout=TIMEOUT).call("ListImages", {}).get("images") or []
    served = next((str(i.get("os_image_hash") or "").lower() for i in images if i.get("name") == image), "")
    if served == os_image_hash.lower().removeprefix("0x"):
        return
    vmm = f"the VMM on {where['host']}" if where["host"] else f"the VMM at {where['url']}"
    raise DstackError("os_image_hash", f"is {os_image_hash}, but {vmm} " + (
        f"boots the image {image} with os_image_hash {served}" if served
        else f"names no image {image} (Vmm.ListImages)"))


def _key(port):
    return (port.get("protocol") or "tcp", port.get("host_port"))


def _check_ports(app, cvms, existing, here):
    """A host port of the app that another CVM holds, or (here) another program on this host: refused."""
    field = f"{app.path}/{app_folder.APP_YML}: ports"
    held = {_key(p): vm.get("name") for vm in cvms if vm is not existing
            for p in (vm.get("configuration") or {}).get("ports") or []}
    own = {_key(p) for p in ((existing or {}).get("configuration") or {}).get("ports") or []}
    for port in app.ports:
        key = _key(port)
        where = f"host port {port['host_port']}/{port['protocol']}"
        if key in held:
            raise DstackError(field, f"{where} is held by the CVM {held[key]!r} on the VMM: choose another host_port")
        if key in own or not here:
            continue
        code = host_ports.bind_error(port["protocol"], port["host_address"], port["host_port"])
        if code is None:
            continue
        where += f" on {port['host_address']}"
        if code == errno.EACCES:
            raise DstackError(field, f"{where} cannot be bound by this user (ports below 1024 need root)")
        if code == errno.EADDRNOTAVAIL:
            raise DstackError(field, f"{where}: no interface of this host has that address")
        pids = host_ports.holders(host_ports.socket_inodes(port["protocol"], port["host_address"], port["host_port"]))
        named = "; ".join(f"pid {pid} ({host_ports.cmdline(pid) or 'gone'})" for pid in pids[:3]) \
            or "a process this user cannot see (`ss -ltnup` as root names it)"
        raise DstackError(field, f"{where} is in use by another program, {named}, not a CVM of this VMM: "
                                 "stop it, or choose another host_port")


def main():
    module = AnsibleModule(
        argument_spec=dict(
            app_dir=dict(type="path", required=True),
            host_port=dict(type="int", default=0),
            kms_url=dict(type="str"),
            kms_ca_cert=dict(type="path"),
            vmm_url=dict(type="str"),
            vmm_token=dict(type="str", no_log=True),
            check_host_ports=dict(type="bool", default=True),
            vmms=dict(type="list", elements="dict", options=dict(
                host=dict(type="str", required=True), url=dict(type="str", required=True),
                token=dict(type="str", no_log=True), local=dict(type="bool", default=False))),
            replicas=dict(type="int", default=0),
            image=dict(type="str", default=""),
            os_image_hash=dict(type="str", default=""),
        ),
        mutually_exclusive=[("vmm_url", "vmms")],
        supports_check_mode=True,
    )
    p = module.params
    try:
        app = app_folder.read(p["app_dir"], host_port=p["host_port"])
        env_keys, dropped = app_folder.secret_names(app)
        data = app_compose.render(app.app_compose)
        meta = _kms_meta(p["kms_url"], p["kms_ca_cert"]) if p["kms_url"] else {}
        if p["vmms"]:
            placed, surplus, replicas = _place(app, p)
            existing = next((w["existing"] for w in placed + surplus if w["existing"]), {})
        else:
            cvms = _vmm_cvms(p["vmm_url"], p["vmm_token"]) if p["vmm_url"] else []
            found = next((vm for vm in cvms if vm.get("name") == app.name), None)
            _check_ports(app, cvms, found, p["check_host_ports"] and bool(p["vmm_url"]))
            existing, surplus, replicas = _brief(found), [], 1
            placed = [{"host": "", "url": p["vmm_url"], "existing": existing}] if p["vmm_url"] else []
        if p["image"]:
            if not p["os_image_hash"]:
                raise DstackError("os_image_hash", f"required with image {p['image']!r}: the hash you allow (its digest.txt)")
            parse_hex(p["os_image_hash"], "os_image_hash", length=32)  # a typo is named as one, not as a mismatch
            tokens = {vmm["host"]: vmm["token"] for vmm in p["vmms"] or []}
            for where in placed:
                _check_image(where, tokens.get(where["host"], p["vmm_token"]), p["image"], p["os_image_hash"])
    except DstackError as exc:
        module.fail_json(msg=str(exc), field=exc.field)
    compose_hash = app_compose.compose_hash(data)
    module.exit_json(
        changed=False, app_dir=app.path, name=app.name, app_compose=app.app_compose, compose_hash=compose_hash,
        app_id=app.app_id or app_compose.app_id_for(compose_hash), ports=app.ports, secrets_file=app.secrets,
        env_keys=env_keys, dropped_envs=dropped, kms_k256_pubkey=meta.get("k256_pubkey", ""),
        existing=existing, replicas=replicas, placement=placed, surplus=surplus)


if __name__ == "__main__":
    main()
