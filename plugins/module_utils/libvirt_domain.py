# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The libvirt domain XML of a dstack CVM: the one place it is written, read back and compared.

dstack runs a CVM as one QEMU command line (dstack-reference 2.5). This is the same machine in
libvirt's domain XML:

    -machine q35,kernel-irqchip=split,hpet=off   <type machine='q35'>, <ioapic driver='qemu'/>,
                                                  <timer name='hpet' present='no'/>
    -bios OVMF -kernel -initrd -append            <loader type='rom'>, <kernel>, <initrd>, <cmdline>
    -cpu host                                     <cpu mode='host-passthrough'/> (TDX guests only)
    rootfs.verity read-only, hda.img              virtio disks vda (raw, <readonly/>) and vdb
    -virtfs ...,mount_tag=host-shared,readonly    <filesystem accessmode='mapped'> 9p, <readonly/>
    -netdev user,hostfwd=...                      <interface type='user'> (+ passt <portForward>)
    -device vhost-vsock-pci,guest-cid=N           <vsock><cid auto='no' address='N'/></vsock>
    -smbios type=1 (vendor/product "dstack")      <sysinfo type='smbios'>
    tdx-guest object: mrconfigid, QGS             <launchSecurity type='tdx'>
    (no_tee only) the simulated TEE's quotes      <channel type='unix'> virtio-serial port
                                                  org.dstack.quote (module_utils/quote_channel.py)

<launchSecurity type='tdx'> follows the form libvirt documents since its TDX support (libvirt 11):
<policy> (the 64-bit TD attributes, hex; QEMU's default 0x10000000 is SEPT_VE_DISABLE without
DEBUG), <mrConfigId> (base64 of the 48 bytes), and <quoteGenerationService path='...'/>. libvirt
connects QEMU to the quote generation service (QGS) over that UNIX socket; it has no form for
dstack's raw-QEMU `{"type":"vsock","cid":"2","port":"4050"}`. The host's qgsd serves both (vsock
port 4050 and /var/run/tdx-qgs/qgs.socket), and the guest asks for quotes the same way (GetQuote
TDVMCALL) either way.

Libvirt 9.0 (Debian 12) rejects <launchSecurity type='tdx'>; a `no_tee` spec renders the same
domain without launchSecurity and without the host-passthrough CPU, which KVM runs anywhere.

Comparing with a defined domain: libvirt's XML of a domain holds much more than was defined
(addresses, controllers, the emulator, the expanded machine name pc-q35-7.2, memory in KiB).
`normalized_current` cuts libvirt's XML down to what `render_domain_xml` manages, in the same
format, so "unchanged" is plain string equality and a diff shows only what matters.
"""

import base64
import hashlib
import ipaddress
import os
import re
import uuid as uuid_mod
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from ansible_collections.dstack.tee.plugins.module_utils import app_compose as compose
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError, parse_hex
from ansible_collections.dstack.tee.plugins.module_utils.quote_channel import PORT_NAME as QUOTE_PORT_NAME

DEFAULT_QGS_SOCKET = "/var/run/tdx-qgs/qgs.socket"
# TD attributes: bit 28 SEPT_VE_DISABLE set, bit 0 DEBUG clear (QEMU's default).
DEFAULT_TDX_POLICY = 0x10000000
TDX_POLICY_DEBUG = 0x1
SHARE_TAG = "host-shared"
DOMAIN_TYPES = ("kvm", "qemu")
DISK_FORMATS = ("qcow2", "raw")
PROTOCOLS = ("tcp", "udp")
MRCONFIGID_LEN = 48
_MAC_RE = re.compile(r"\A[0-9a-f]{2}(:[0-9a-f]{2}){5}\Z")
# XML 1.0 has no place for these characters, escaped or not.
_BAD_XML_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
_LINE_BREAKS = re.compile("[\r\n]")
_MEMORY_UNITS = {"b": 1, "bytes": 1, "KiB": 1024, "k": 1024, "MiB": 1024 ** 2, "M": 1024 ** 2,
                 "GiB": 1024 ** 3, "G": 1024 ** 3, "TiB": 1024 ** 4, "T": 1024 ** 4}
# What libvirt adds to every device; never part of a difference.
_NOISE = ("address", "alias")
_Q35_RE = re.compile(r"\Apc-q35-[0-9.]+\Z")


@dataclass(frozen=True)
class PortForward:
    """One forwarded port: host_address:host_port on the host to vm_port in the guest."""
    protocol: str
    host_address: str
    host_port: int
    vm_port: int


@dataclass(frozen=True)
class DomainSpec:
    """What a CVM's domain is made of. Paths are host paths and must be absolute."""
    name: str
    kernel: str
    vcpu: int = 1
    memory_mb: int = 1024
    uuid: str = None
    title: str = None
    ovmf: str = None              # the firmware (TDVF for TDX), loaded like -bios; None: SeaBIOS
    initrd: str = None
    cmdline: str = ""
    rootfs: str = None            # the read-only verity root disk
    data_disk: str = None         # hda.img
    data_disk_format: str = "qcow2"
    shared_dir: str = None        # the config share, mounted read-only with tag host-shared
    cid: int = None               # the guest's vsock CID; None: no vsock device
    mac: str = None
    port_forwards: tuple = field(default_factory=tuple)
    mrconfigid: bytes = None      # 48 bytes (TDX only)
    no_tee: bool = False
    tdx_policy: int = DEFAULT_TDX_POLICY
    qgs_socket: str = DEFAULT_QGS_SOCKET
    serial_log: str = None
    domain_type: str = "kvm"
    quote_channel: str = None     # no_tee: the host socket of the `org.dstack.quote` port (quote_channel)


# ---- identities ---------------------------------------------------------------------------------

def mac_for(vm_id):
    """A MAC address made from the VM id: locally administered, unicast, the same every time."""
    if not isinstance(vm_id, str) or not vm_id:
        raise DstackError("vm_id", "must be a non-empty string")
    digest = hashlib.sha256(b"dstack.tee mac:" + vm_id.encode("utf-8")).digest()
    return ":".join(f"{b:02x}" for b in (b"\x02" + digest[:5]))


def mrconfigid_for(app_compose_bytes, app_id=None):
    """The 48-byte mrconfigid of app-compose.json bytes (dstack-reference 2.5), through app_compose.

    compose_hash is the hash of the exact bytes. app_compose.mrconfigid hashes the canonical
    rendering of the parsed dict, which is the same thing for canonical bytes (what
    dstack.tee.app_compose writes); bytes written another way (`vmm-cli.py` indents) use the
    hash of the bytes themselves with app_compose's v1/v2 constructions.
    """
    app = compose.parse(app_compose_bytes)
    chash = compose.compose_hash(app_compose_bytes)
    app_id = compose.app_id_for(chash, app_id)
    if compose.render(app) == app_compose_bytes:
        return compose.mrconfigid(app, app_id)
    kp_id = app.get("key_provider_id") or ""
    if kp_id:
        return compose.mrconfigid_v2(chash, app_id, compose.key_provider_of(app), kp_id)
    return compose.mrconfigid_v1(chash)


# ---- validation ---------------------------------------------------------------------------------

def _text(value, name, required=False, single_line=False):
    if value is None or value == "":
        if required:
            raise DstackError(name, "is required")
        return None
    if not isinstance(value, str):
        raise DstackError(name, f"must be a string, not {type(value).__name__}")
    if _BAD_XML_CHARS.search(value):
        raise DstackError(name, "holds a control character that XML cannot carry")
    if single_line and _LINE_BREAKS.search(value):
        raise DstackError(name, "must be one line")
    return value


def _path(value, name, required=False):
    value = _text(value, name, required=required, single_line=True)
    if value is not None and (not os.path.isabs(value) or value != value.strip()):
        raise DstackError(name, f"must be an absolute path (no surrounding spaces), got {value[:80]!r}")
    return value


def _int(value, name, low, high):
    if isinstance(value, bool) or not isinstance(value, int):
        raise DstackError(name, f"must be an integer, not {type(value).__name__}")
    if not low <= value <= high:
        raise DstackError(name, f"must be between {low} and {high}, got {value}")
    return value


def _port_forward(item, pos):
    where = f"port_forwards[{pos}]"
    if isinstance(item, dict):
        try:
            item = PortForward(item.get("protocol", "tcp"), item.get("host_address") or "127.0.0.1",
                               item["host_port"], item["vm_port"])
        except KeyError as exc:
            raise DstackError(f"{where}.{exc.args[0]}", "is required") from None
    elif isinstance(item, (tuple, list)) and len(item) == 4:
        item = PortForward(*item)
    elif not isinstance(item, PortForward):
        raise DstackError(where, "must be (protocol, host_address, host_port, vm_port)")
    if item.protocol not in PROTOCOLS:
        raise DstackError(f"{where}.protocol", f"must be tcp or udp, got {str(item.protocol)[:20]!r}")
    try:
        address = str(ipaddress.ip_address(item.host_address))
    except ValueError:
        raise DstackError(f"{where}.host_address", f"must be an IP address, got {str(item.host_address)[:60]!r}") from None
    return PortForward(item.protocol, address, _int(item.host_port, f"{where}.host_port", 1, 65535),
                       _int(item.vm_port, f"{where}.vm_port", 1, 65535))


def validate(spec):
    """The spec with every field checked and put in canonical form, or a DstackError naming the field."""
    if not isinstance(spec, DomainSpec):
        raise DstackError("spec", f"must be a DomainSpec, not {type(spec).__name__}")
    name = _text(spec.name, "name", required=True)
    if not compose.NAME_RE.match(name):
        raise DstackError("name", "may hold only letters, digits, spaces and -_.@~!$^()")
    uuid = None
    if spec.uuid:
        try:
            uuid = str(uuid_mod.UUID(str(spec.uuid)))
        except ValueError:
            raise DstackError("uuid", f"is not a UUID: {str(spec.uuid)[:40]!r}") from None
    mac = None
    if spec.mac:
        mac = str(spec.mac).lower()
        if not _MAC_RE.match(mac):
            raise DstackError("mac", f"is not a MAC address (aa:bb:cc:dd:ee:ff): {str(spec.mac)[:40]!r}")
        if int(mac[:2], 16) & 1:
            raise DstackError("mac", "is a multicast address; a NIC needs a unicast one")
    if spec.data_disk_format not in DISK_FORMATS:
        raise DstackError("data_disk_format", f"must be qcow2 or raw, got {str(spec.data_disk_format)[:20]!r}")
    if spec.domain_type not in DOMAIN_TYPES:
        raise DstackError("domain_type", f"must be kvm or qemu, got {str(spec.domain_type)[:20]!r}")
    mrconfigid = None
    if spec.mrconfigid is not None:
        mrconfigid = parse_hex(spec.mrconfigid, "mrconfigid", length=MRCONFIGID_LEN)
    no_tee = bool(spec.no_tee)
    ovmf = _path(spec.ovmf, "ovmf", required=not no_tee)
    if not no_tee and spec.tdx_policy is not None:
        _int(spec.tdx_policy, "tdx_policy", 0, 2 ** 64 - 1)
    return DomainSpec(
        name=name,
        kernel=_path(spec.kernel, "kernel", required=True),
        vcpu=_int(spec.vcpu, "vcpu", 1, 4096),
        memory_mb=_int(spec.memory_mb, "memory_mb", 1, 2 ** 32),
        uuid=uuid,
        title=_text(spec.title, "title", single_line=True),
        ovmf=ovmf,
        initrd=_path(spec.initrd, "initrd"),
        cmdline=_text(spec.cmdline, "cmdline", single_line=True) or "",
        rootfs=_path(spec.rootfs, "rootfs"),
        data_disk=_path(spec.data_disk, "data_disk"),
        data_disk_format=spec.data_disk_format,
        shared_dir=_path(spec.shared_dir, "shared_dir"),
        cid=None if spec.cid is None else _int(spec.cid, "cid", 3, 2 ** 32 - 2),
        mac=mac,
        port_forwards=tuple(_port_forward(item, pos) for pos, item in enumerate(spec.port_forwards or ())),
        mrconfigid=mrconfigid,
        no_tee=no_tee,
        tdx_policy=spec.tdx_policy,
        qgs_socket=_path(spec.qgs_socket, "qgs_socket"),
        serial_log=_path(spec.serial_log, "serial_log"),
        domain_type=spec.domain_type,
        quote_channel=_path(spec.quote_channel, "quote_channel"),
    )


# ---- rendering ----------------------------------------------------------------------------------

def _sub(parent, tag, text=None, **attrs):
    """A child element; attributes keep the order given (libvirt's own order), None ones are left out."""
    elem = ET.SubElement(parent, tag)
    for key, value in attrs.items():
        if value is not None:
            elem.set(key, str(value))
    if text is not None:
        elem.text = str(text)
    return elem


def _domain_tree(spec):
    tee = not spec.no_tee
    dom = ET.Element("domain")
    dom.set("type", spec.domain_type)
    _sub(dom, "name", spec.name)
    if spec.uuid:
        _sub(dom, "uuid", spec.uuid)
    if spec.title:
        _sub(dom, "title", spec.title)
    _sub(dom, "memory", spec.memory_mb, unit="MiB")
    _sub(dom, "vcpu", spec.vcpu)

    sysinfo = _sub(dom, "sysinfo", type="smbios")
    system = _sub(sysinfo, "system")
    _sub(system, "entry", "dstack", name="manufacturer")
    _sub(system, "entry", "dstack", name="product")

    os_elem = _sub(dom, "os")
    _sub(os_elem, "type", "hvm", arch="x86_64", machine="q35")
    if spec.ovmf:
        _sub(os_elem, "loader", spec.ovmf, type="rom")
    _sub(os_elem, "kernel", spec.kernel)
    if spec.initrd:
        _sub(os_elem, "initrd", spec.initrd)
    if spec.cmdline:
        _sub(os_elem, "cmdline", spec.cmdline)
    _sub(os_elem, "smbios", mode="sysinfo")

    features = _sub(dom, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    _sub(features, "ioapic", driver="qemu")          # kernel-irqchip=split
    if tee:
        _sub(dom, "cpu", mode="host-passthrough")    # TDX needs the host CPU model
    clock = _sub(dom, "clock", offset="utc")
    _sub(clock, "timer", name="hpet", present="no")  # hpet=off

    devices = _sub(dom, "devices")
    if spec.rootfs:
        disk = _sub(devices, "disk", type="file", device="disk")
        _sub(disk, "driver", name="qemu", type="raw")
        _sub(disk, "source", file=spec.rootfs)
        _sub(disk, "target", dev="vda", bus="virtio")
        _sub(disk, "readonly")
    if spec.data_disk:
        disk = _sub(devices, "disk", type="file", device="disk")
        _sub(disk, "driver", name="qemu", type=spec.data_disk_format)
        _sub(disk, "source", file=spec.data_disk)
        _sub(disk, "target", dev="vdb", bus="virtio")
    if spec.shared_dir:
        share = _sub(devices, "filesystem", type="mount", accessmode="mapped")
        _sub(share, "source", dir=spec.shared_dir)
        _sub(share, "target", dir=SHARE_TAG)
        _sub(share, "readonly")
    nic = _sub(devices, "interface", type="user")
    if spec.mac:
        _sub(nic, "mac", address=spec.mac)
    _sub(nic, "model", type="virtio")
    if spec.port_forwards:
        # libvirt forwards ports of user networking only through passt (libvirt 9.2 and later).
        _sub(nic, "backend", type="passt")
        for fwd in spec.port_forwards:
            rule = _sub(nic, "portForward", proto=fwd.protocol, address=fwd.host_address)
            _sub(rule, "range", start=fwd.host_port, to=fwd.vm_port)
    serial = _sub(devices, "serial", type="pty")
    console = _sub(devices, "console", type="pty")
    if spec.serial_log:
        _sub(serial, "log", file=spec.serial_log, append="on")
        _sub(console, "log", file=spec.serial_log, append="on")
    if spec.quote_channel:
        # The simulated TEE of a VM without TDX: quotes from the host, as QGS serves them on TDX.
        channel = _sub(devices, "channel", type="unix")
        _sub(channel, "source", mode="bind", path=spec.quote_channel)
        _sub(channel, "target", type="virtio", name=QUOTE_PORT_NAME)
    _sub(devices, "memballoon", model="none")
    if spec.cid is not None:
        vsock = _sub(devices, "vsock", model="virtio")
        _sub(vsock, "cid", auto="no", address=spec.cid)

    if tee:
        launch = _sub(dom, "launchSecurity", type="tdx")
        if spec.tdx_policy is not None:
            _sub(launch, "policy", f"0x{spec.tdx_policy:x}")
        if spec.mrconfigid is not None:
            _sub(launch, "mrConfigId", base64.b64encode(spec.mrconfigid).decode("ascii"))
        if spec.qgs_socket:
            _sub(launch, "quoteGenerationService", path=spec.qgs_socket)
    return dom


def render_domain_xml(spec):
    """The domain XML for a spec: deterministic text (same spec, same bytes), values escaped."""
    return serialize(_domain_tree(validate(spec)))


# ---- one text form for every domain XML ------------------------------------------------------------

def _escape(text, attribute=False):
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    if attribute:
        text = (text.replace("'", "&apos;").replace('"', "&quot;")
                .replace("\n", "&#10;").replace("\r", "&#13;").replace("\t", "&#9;"))
    return text


def _write(elem, depth, out):
    pad = "  " * depth
    attrs = "".join(f" {key}='{_escape(value, True)}'" for key, value in elem.attrib.items())
    children = list(elem)
    text = (elem.text or "").strip()
    if children:
        out.append(f"{pad}<{elem.tag}{attrs}>")
        for child in children:
            _write(child, depth + 1, out)
        out.append(f"{pad}</{elem.tag}>")
    elif text:
        out.append(f"{pad}<{elem.tag}{attrs}>{_escape(text)}</{elem.tag}>")
    else:
        out.append(f"{pad}<{elem.tag}{attrs}/>")


def serialize(elem):
    """Elements as text in libvirt's own style: two-space indents, single-quoted attributes."""
    out = []
    _write(elem, 0, out)
    return "\n".join(out) + "\n"


def parse(xml_text, field_name="xml"):
    """Parse domain XML, or a DstackError naming the field."""
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError as exc:
        raise DstackError(field_name, f"is not well-formed XML: {exc}") from None
    if root.tag != "domain":
        raise DstackError(field_name, f"is a <{root.tag}>, not a <domain>")
    return root


# ---- comparing with a defined domain -------------------------------------------------------------

# Children that count even when the rendered XML has none of them: one of these in the defined
# domain but not in the wanted one is a difference (a launchSecurity to drop, a port forward gone).
MANAGED_CHILDREN = {
    "domain": ("title", "launchSecurity"),
    "os": ("loader", "nvram", "kernel", "initrd", "cmdline"),
    "devices": ("disk", "filesystem", "interface", "vsock", "memballoon", "serial", "console", "channel"),
    "interface": ("backend", "portForward"),           # no MAC wanted: libvirt's own one is fine
    "disk": ("readonly",),
    "filesystem": ("readonly",),
    "serial": ("log",),
    "console": ("log",),
    "launchSecurity": ("policy", "mrConfigId", "mrOwner", "mrOwnerConfig", "quoteGenerationService"),
}


def _normal_value(tag, key, have, want):
    """libvirt's spelling of a value, turned into ours where both mean the same."""
    if have == want or want is None:
        return have
    if tag == "type" and key == "machine" and want == "q35" and _Q35_RE.match(have):
        return want                                   # libvirt expands q35 to pc-q35-<qemu version>
    if tag == "mac" and key == "address" and have.lower() == want.lower():
        return want
    return have


def _normal_text(cur, want):
    have = (cur.text or "").strip()
    wanted = (want.text or "").strip()
    if have == wanted:
        return have
    if cur.tag in ("memory", "currentMemory"):
        try:
            size = int(have) * _MEMORY_UNITS[cur.get("unit", "KiB")]
            factor = _MEMORY_UNITS[want.get("unit", "KiB")]
        except (KeyError, ValueError):
            return have
        return str(size // factor) if size % factor == 0 else have
    if cur.tag == "policy":
        try:
            return wanted if int(have, 16) == int(wanted, 16) else have
        except ValueError:
            return have
    return have


def _project(cur, want):
    """`cur` cut down to the attributes and children `want` has (plus the managed ones)."""
    out = ET.Element(cur.tag)
    if want is None:                                      # not wanted: shown whole, minus noise
        for key, value in cur.attrib.items():
            out.set(key, value)
        out.text = (cur.text or "").strip() or None
        for child in cur:
            if child.tag not in _NOISE:
                out.append(_project(child, None))
        return out
    for key, wanted in want.attrib.items():
        if key in cur.attrib:
            value = _normal_value(cur.tag, key, cur.attrib[key], wanted)
            if cur.tag in ("memory", "currentMemory") and key == "unit":
                value = wanted                            # the number is converted to this unit
            out.set(key, value)
    if (want.text or "").strip():
        out.text = _normal_text(cur, want)
    order = []
    for child in want:
        if child.tag not in order:
            order.append(child.tag)
    for tag in MANAGED_CHILDREN.get(want.tag, ()):
        if tag not in order:
            order.append(tag)
    for tag in order:
        wanted = [c for c in want if c.tag == tag]
        have = [c for c in cur if c.tag == tag]
        for pos, child in enumerate(have):
            out.append(_project(child, wanted[pos] if pos < len(wanted) else None))
    return out


def normalized_current(current_xml, wanted_xml):
    """A defined domain's XML (libvirt's), cut down to what the wanted XML manages, as text.

    Equal to `wanted_xml` exactly when the defined domain already is what was rendered; else a
    text to diff against it, showing only managed values.
    """
    cur = parse(current_xml, "current domain XML")
    want = parse(wanted_xml, "wanted domain XML")
    return serialize(_project(cur, want))


def domain_uuid(xml_text):
    """The <uuid> of domain XML, or None."""
    elem = parse(xml_text).find("uuid")
    return (elem.text or "").strip() if elem is not None else None
