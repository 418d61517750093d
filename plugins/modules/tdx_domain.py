#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
---
module: tdx_domain
short_description: Define and run a libvirt domain for a dstack CVM (an Intel TDX guest)
version_added: 0.1.0
description:
  - Renders the libvirt domain XML of a dstack CVM (q35, split irqchip, no HPET, direct kernel
    boot, the read-only verity rootfs, the data disk, the read-only C(host-shared) config share,
    vsock, and C(<launchSecurity type='tdx'>) with the TD attributes, C(mrConfigId) and the quote
    generation service) and makes the domain V(present), V(running), V(stopped) or V(absent).
  - The domain is redefined only when the defined domain differs from the rendered XML in what
    this module manages (libvirt's own additions, such as PCI addresses, controllers and the
    expanded machine type, do not count).
  - O(no_tee=true) renders the same domain without C(launchSecurity) and without the
    host-passthrough CPU, a plain KVM VM. libvirt releases without TDX support (such as libvirt
    9.0 in Debian 12) refuse C(<launchSecurity type='tdx'>); the module then fails with libvirt's
    message.
  - A running domain whose definition changes keeps running its old definition until it is next
    started; the result says so with RV(restart_required).
author:
  - dstack.tee contributors (@dstack-tee)
requirements:
  - libvirt-python
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
    details: The diff shows the domain XML (the part the module manages) and the run state, before and after.
  idempotent:
    support: full
options:
  name:
    description: The domain name (letters, digits, spaces and C(-_.@~!$^())).
    type: str
    required: true
  uri:
    description: The libvirt connection URI.
    type: str
    default: qemu:///system
  state:
    description:
      - V(present) defines the domain and leaves its run state alone; V(running) also starts it;
        V(stopped) powers it off (destroy) if it runs; V(absent) powers it off and undefines it.
    type: str
    choices: [present, running, stopped, absent]
    default: present
  uuid:
    description: The domain UUID. When unset, a new domain gets one from libvirt and an existing one keeps its own.
    type: str
  title:
    description: A one-line title shown by C(virsh list --title).
    type: str
  domain_type:
    description: The libvirt domain type, V(kvm) (hardware virtualization) or V(qemu) (emulation).
    type: str
    choices: [kvm, qemu]
    default: kvm
  vcpu:
    description: Virtual CPUs.
    type: int
    default: 1
  memory_mb:
    description: Memory in MiB.
    type: int
    default: 1024
  ovmf:
    description:
      - The firmware, loaded like QEMU's C(-bios) (the TDVF/OVMF image of the guest image).
      - Required for a TDX guest; when unset with O(no_tee=true) the guest boots with SeaBIOS.
    type: path
  kernel:
    description: The guest kernel (direct kernel boot). Required unless O(state=absent).
    type: path
  initrd:
    description: The guest initrd.
    type: path
  cmdline:
    description: The kernel command line.
    type: str
    default: ""
  rootfs:
    description: The read-only root disk (the image's C(*.verity)), attached as C(vda).
    type: path
  data_disk:
    description: The data disk (C(hda.img)), attached as C(vdb). It must exist before the domain starts.
    type: path
  data_disk_format:
    description: The format of O(data_disk).
    type: str
    choices: [qcow2, raw]
    default: qcow2
  shared_dir:
    description: The host directory shared read-only with the guest (9p, mount tag C(host-shared)).
    type: path
  cid:
    description: The guest's vsock CID (3 or more). No vsock device when unset.
    type: int
  mac:
    description: The NIC's MAC address (unicast). libvirt picks one when unset.
    type: str
  port_forwards:
    description:
      - Ports forwarded from the host to the guest (user networking through passt, which needs
        libvirt 9.2 or later).
    type: list
    elements: dict
    default: []
    suboptions:
      protocol:
        description: tcp or udp.
        type: str
        choices: [tcp, udp]
        default: tcp
      host_address:
        description: The host address to listen on.
        type: str
        default: 127.0.0.1
      host_port:
        description: The host port.
        type: int
        required: true
      vm_port:
        description: The guest port.
        type: int
        required: true
  mrconfigid:
    description: The 48-byte MRCONFIGID of the TD (hex). Mutually exclusive with O(app_compose_file).
    type: str
  app_compose_file:
    description:
      - An app-compose.json whose mrconfigid (dstack's v1, or v2 when it sets key_provider_id)
        becomes the TD's MRCONFIGID, computed from its exact bytes.
    type: path
  app_id:
    description: The app id for O(app_compose_file) when it is not compose_hash[0:20] (hex).
    type: str
  no_tee:
    description: Render a plain VM, with no C(launchSecurity) (for hosts and libvirt releases without TDX).
    type: bool
    default: false
  tdx_policy:
    description: The TD attributes (64 bits, hex or decimal). The default sets SEPT_VE_DISABLE and leaves DEBUG off.
    type: str
    default: "0x10000000"
  qgs_socket:
    description: The UNIX socket of the host's quote generation service (qgsd).
    type: path
    default: /var/run/tdx-qgs/qgs.socket
  serial_log:
    description: A file the serial console is logged to.
    type: path
extends_documentation_fragment:
  - dstack.tee.attributes
seealso:
  - module: dstack.tee.app_compose
  - module: dstack.tee.cvm
"""

EXAMPLES = r"""
- name: Define and start the CVM of the hello app as a TDX guest
  dstack.tee.tdx_domain:
    name: dstack-hello
    state: running
    vcpu: 2
    memory_mb: 2048
    ovmf: /var/lib/dstack/images/dstack-0.5.11/ovmf.fd
    kernel: /var/lib/dstack/images/dstack-0.5.11/bzImage
    initrd: /var/lib/dstack/images/dstack-0.5.11/initramfs.cpio.gz
    cmdline: console=ttyS0 init=/init panic=1
    rootfs: /var/lib/dstack/images/dstack-0.5.11/rootfs.img.verity
    data_disk: /var/lib/dstack/vm/hello/hda.img
    shared_dir: /var/lib/dstack/vm/hello/shared
    app_compose_file: /var/lib/dstack/vm/hello/shared/app-compose.json
    cid: 1000
    port_forwards:
      - {host_port: 8080, vm_port: 80}

- name: The same machine without TDX, on a host that has none
  dstack.tee.tdx_domain:
    name: dstack-hello-dev
    state: running
    no_tee: true
    kernel: /var/lib/dstack/images/dstack-0.5.11/bzImage
    initrd: /var/lib/dstack/images/dstack-0.5.11/initramfs.cpio.gz
    shared_dir: /var/lib/dstack/vm/hello/shared

- name: Remove it
  dstack.tee.tdx_domain:
    name: dstack-hello-dev
    state: absent
"""

RETURN = r"""
name:
  description: The domain name.
  returned: always
  type: str
uuid:
  description: The domain UUID (empty when the domain is absent, or would only be defined in check mode).
  returned: always
  type: str
state:
  description: The domain's libvirt state afterwards (running, shutoff, ...), or V(absent).
  returned: always
  type: str
xml:
  description: The rendered domain XML.
  returned: unless O(state=absent)
  type: str
mrconfigid:
  description: The MRCONFIGID set in the domain (hex), empty when none is.
  returned: unless O(state=absent)
  type: str
restart_required:
  description: True when a running domain was redefined and runs its old definition until it restarts.
  returned: always
  type: bool
"""

import dataclasses

from ansible.module_utils.basic import AnsibleModule, missing_required_lib
from ansible_collections.dstack.tee.plugins.module_utils import libvirt_conn as lv
from ansible_collections.dstack.tee.plugins.module_utils import libvirt_domain as ld
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.module_support import read_bytes

SPEC_OPTIONS = ("uuid", "title", "domain_type", "vcpu", "memory_mb", "ovmf", "kernel", "initrd", "cmdline",
                "rootfs", "data_disk", "data_disk_format", "shared_dir", "cid", "mac", "no_tee",
                "qgs_socket", "serial_log")


def _policy(value):
    try:
        return int(str(value).strip(), 0)
    except ValueError:
        raise DstackError("tdx_policy", f"is not a number: {str(value)[:30]!r}") from None


def _spec(module, existing_uuid):
    params = module.params
    fields = {key: params[key] for key in SPEC_OPTIONS}
    if not fields["uuid"]:
        fields["uuid"] = existing_uuid
    mrconfigid = params["mrconfigid"]
    if params["app_compose_file"]:
        data = read_bytes(params["app_compose_file"])
        if data is None:
            raise DstackError("app_compose_file", f"{params['app_compose_file']} does not exist")
        mrconfigid = ld.mrconfigid_for(data, params["app_id"])
    return ld.DomainSpec(
        name=params["name"], port_forwards=tuple(dict(p) for p in params["port_forwards"]),
        mrconfigid=None if params["no_tee"] or mrconfigid is None else mrconfigid,
        tdx_policy=_policy(params["tdx_policy"]), **fields)


def _diff(header, before, after):
    return dict(before_header=header, after_header=header, before=before, after=after)


def run(module):
    params = module.params
    name, wanted_state = params["name"], params["state"]
    conn = lv.connect(params["uri"])
    dom = lv.lookup(conn, name)
    before_state = lv.state(dom)[0] if dom is not None else "absent"
    result = dict(changed=False, name=name, uuid=dom.UUIDString() if dom is not None else "",
                  state=before_state, restart_required=False)
    diffs = []

    if wanted_state == "absent":
        if dom is not None:
            result["changed"] = True
            diffs.append(_diff(f"{name} (domain XML)", lv.current_xml(dom), ""))
            diffs.append(_diff(f"{name} (state)", before_state + "\n", "absent\n"))
            if not module.check_mode:
                lv.remove(dom)
            result.update(state="absent", uuid="")
        return result, diffs

    existing_uuid = dom.UUIDString() if dom is not None else None
    spec = ld.validate(_spec(module, existing_uuid))
    if existing_uuid and spec.uuid != existing_uuid:
        raise DstackError("uuid", f"the domain {name!r} exists with UUID {existing_uuid}; "
                                  "remove it first (state=absent) to give it another one")
    xml = ld.render_domain_xml(spec)
    result.update(xml=xml, mrconfigid=spec.mrconfigid.hex() if spec.mrconfigid else "")
    before = ld.normalized_current(lv.current_xml(dom), xml) if dom is not None else ""
    if before != xml:
        result["changed"] = True
        diffs.append(_diff(f"{name} (domain XML)", before, xml))
        if not module.check_mode:
            dom = lv.define(conn, xml)
            result["uuid"] = dom.UUIDString()
            if not spec.uuid:  # the XML as it is now defined, with the UUID libvirt gave it
                result["xml"] = ld.render_domain_xml(dataclasses.replace(spec, uuid=result["uuid"]))
        if before_state not in ("absent", "shutoff", "crashed") and wanted_state != "stopped":
            result["restart_required"] = True
            module.warn(f"the domain {name} runs its old definition until it is started again")

    after_state = before_state if before_state != "absent" else "shutoff"
    if wanted_state == "running" and (dom is None or not lv.is_active(dom)):
        after_state = "running"
        if not module.check_mode:
            lv.start(dom)
    elif wanted_state == "stopped" and dom is not None and lv.is_active(dom):
        after_state = "shutoff"
        if not module.check_mode:
            lv.destroy(dom)
    if after_state != before_state and not (before_state == "absent" and after_state == "shutoff"):
        result["changed"] = True
        diffs.append(_diff(f"{name} (state)", before_state + "\n", after_state + "\n"))
    if dom is not None and not module.check_mode:
        after_state = lv.state(dom)[0]
    result["state"] = after_state
    return result, diffs


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            uri=dict(type="str", default="qemu:///system"),
            state=dict(type="str", default="present", choices=["present", "running", "stopped", "absent"]),
            uuid=dict(type="str"),
            title=dict(type="str"),
            domain_type=dict(type="str", default="kvm", choices=list(ld.DOMAIN_TYPES)),
            vcpu=dict(type="int", default=1),
            memory_mb=dict(type="int", default=1024),
            ovmf=dict(type="path"),
            kernel=dict(type="path"),
            initrd=dict(type="path"),
            cmdline=dict(type="str", default=""),
            rootfs=dict(type="path"),
            data_disk=dict(type="path"),
            data_disk_format=dict(type="str", default="qcow2", choices=list(ld.DISK_FORMATS)),
            shared_dir=dict(type="path"),
            cid=dict(type="int"),
            mac=dict(type="str"),
            port_forwards=dict(type="list", elements="dict", default=[], options=dict(
                protocol=dict(type="str", default="tcp", choices=list(ld.PROTOCOLS)),
                host_address=dict(type="str", default="127.0.0.1"),
                host_port=dict(type="int", required=True),
                vm_port=dict(type="int", required=True),
            )),
            mrconfigid=dict(type="str"),
            app_compose_file=dict(type="path"),
            app_id=dict(type="str"),
            no_tee=dict(type="bool", default=False),
            tdx_policy=dict(type="str", default="0x10000000"),
            qgs_socket=dict(type="path", default=ld.DEFAULT_QGS_SOCKET),
            serial_log=dict(type="path"),
        ),
        mutually_exclusive=[("mrconfigid", "app_compose_file")],
        required_if=[("state", "present", ["kernel"]), ("state", "running", ["kernel"]),
                     ("state", "stopped", ["kernel"])],
        supports_check_mode=True,
    )
    if not lv.HAS_LIBVIRT:
        module.fail_json(msg=missing_required_lib("libvirt-python"), exception=lv.LIBVIRT_IMPORT_ERROR)
    try:
        result, diffs = run(module)
    except DstackError as exc:
        module.fail_json(msg=str(exc), field=exc.field)
    if module._diff and diffs:
        result["diff"] = diffs
    module.exit_json(**result)


if __name__ == "__main__":
    main()
