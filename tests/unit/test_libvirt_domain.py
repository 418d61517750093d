"""The libvirt domain XML of a CVM: the TDX machine, mrconfigid, no_tee, determinism, escaping,
refusals, libvirt's schema, and the comparison with what libvirt reports for a defined domain."""

import base64
import dataclasses
import hashlib
import json
import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest
from hypothesis import given, strategies as st

from ansible_collections.dstack.tee.plugins.module_utils import app_compose as ac
from ansible_collections.dstack.tee.plugins.module_utils import libvirt_domain as ld
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError

COMPOSE = "services:\n  web:\n    image: nginx\n"
APP = ac.build(COMPOSE, "hello", allowed_envs=["A"])
APP_BYTES = ac.render(APP)
APP_ID = ac.app_id_for(ac.compose_hash(APP_BYTES))
VM_ID = "0b7e5a52-3f6c-4d8e-9a1b-2c3d4e5f6a7b"
IMG = "/var/lib/dstack/images/dstack-0.5.11"
RUN = f"/var/lib/dstack/vm/{VM_ID}"

SPEC = ld.DomainSpec(
    name="dstack-" + VM_ID, uuid=VM_ID, title="hello", vcpu=2, memory_mb=2048,
    ovmf=f"{IMG}/ovmf.fd", kernel=f"{IMG}/bzImage", initrd=f"{IMG}/initramfs.cpio.gz",
    cmdline="console=ttyS0 init=/init panic=1", rootfs=f"{IMG}/rootfs.img.verity",
    data_disk=f"{RUN}/hda.img", shared_dir=f"{RUN}/shared", cid=1000, mac=ld.mac_for(VM_ID),
    port_forwards=(("tcp", "127.0.0.1", 8080, 80), ("udp", "0.0.0.0", 5353, 53)),
    mrconfigid=ac.mrconfigid(APP, APP_ID), serial_log=f"{RUN}/serial.log")
NO_TEE = dataclasses.replace(SPEC, no_tee=True)

# libvirt 9.0's schema plus <launchSecurity type='tdx'> as libvirt documents it since its TDX
# support: policy (hex), mrConfigId/mrOwner/mrOwnerConfig (base64 SHA-384 digests), and
# quoteGenerationService with an optional UNIX socket path. Written from libvirt's
# formatdomain documentation; the rest of the domain is checked by libvirt's own grammar.
SCHEMAS = "/usr/share/libvirt/schemas"
TDX_RNG = f"""<?xml version="1.0"?>
<grammar xmlns="http://relaxng.org/ns/structure/1.0" datatypeLibrary="http://www.w3.org/2001/XMLSchema-datatypes">
  <start><ref name="domain"/></start>
  <include href="{SCHEMAS}/domaincommon.rng">
    <define name="launchSecurity">
      <element name="launchSecurity">
        <choice>
          <group><ref name="launchSecuritySEV"/></group>
          <group><attribute name="type"><value>s390-pv</value></attribute></group>
          <group><ref name="launchSecurityTDX"/></group>
        </choice>
      </element>
    </define>
  </include>
  <define name="storageStartupPolicy" combine="choice"><ref name="startupPolicy"/></define>
  <define name="storageSourceExtra" combine="choice"><ref name="diskspec"/></define>
  <define name="launchSecurityTDX">
    <attribute name="type"><value>tdx</value></attribute>
    <interleave>
      <optional><element name="policy"><ref name="hexuint"/></element></optional>
      <optional><element name="mrConfigId"><data type="base64Binary"/></element></optional>
      <optional><element name="mrOwner"><data type="base64Binary"/></element></optional>
      <optional><element name="mrOwnerConfig"><data type="base64Binary"/></element></optional>
      <optional>
        <element name="quoteGenerationService">
          <optional><attribute name="path"><ref name="absFilePath"/></attribute></optional>
        </element>
      </optional>
    </interleave>
  </define>
</grammar>
"""


def tree(spec):
    return ET.fromstring(ld.render_domain_xml(spec))


# ---- the TDX machine --------------------------------------------------------------------------

def test_a_tdx_guest_has_the_machine_dstack_runs():
    dom = tree(SPEC)
    assert dom.get("type") == "kvm" and dom.findtext("name") == "dstack-" + VM_ID
    assert dom.findtext("uuid") == VM_ID and dom.findtext("title") == "hello"
    assert dom.find("memory").get("unit") == "MiB" and dom.findtext("memory") == "2048"
    assert dom.findtext("vcpu") == "2"
    os_type = dom.find("os/type")
    assert (os_type.text, os_type.get("arch"), os_type.get("machine")) == ("hvm", "x86_64", "q35")
    assert dom.find("os/loader").get("type") == "rom" and dom.findtext("os/loader") == f"{IMG}/ovmf.fd"
    assert dom.findtext("os/kernel") == f"{IMG}/bzImage"
    assert dom.findtext("os/initrd") == f"{IMG}/initramfs.cpio.gz"
    assert dom.findtext("os/cmdline") == "console=ttyS0 init=/init panic=1"
    assert dom.find("features/ioapic").get("driver") == "qemu"           # kernel-irqchip=split
    timer = dom.find("clock/timer")
    assert (timer.get("name"), timer.get("present")) == ("hpet", "no")  # hpet=off
    assert dom.find("cpu").get("mode") == "host-passthrough"
    assert [e.get("name") + "=" + e.text for e in dom.findall("sysinfo/system/entry")] == [
        "manufacturer=dstack", "product=dstack"]

    rootfs, data = dom.findall("devices/disk")
    assert rootfs.find("source").get("file") == f"{IMG}/rootfs.img.verity"
    assert rootfs.find("driver").get("type") == "raw" and rootfs.find("readonly") is not None
    assert rootfs.find("target").attrib == {"dev": "vda", "bus": "virtio"}
    assert data.find("source").get("file") == f"{RUN}/hda.img"
    assert data.find("driver").get("type") == "qcow2" and data.find("readonly") is None
    share = dom.find("devices/filesystem")
    assert share.get("accessmode") == "mapped" and share.find("target").get("dir") == "host-shared"
    assert share.find("source").get("dir") == f"{RUN}/shared" and share.find("readonly") is not None
    nic = dom.find("devices/interface")
    assert nic.get("type") == "user" and nic.find("mac").get("address") == ld.mac_for(VM_ID)
    assert nic.find("backend").get("type") == "passt"
    forwards = [(f.get("proto"), f.get("address"), f.find("range").get("start"), f.find("range").get("to"))
                for f in nic.findall("portForward")]
    assert forwards == [("tcp", "127.0.0.1", "8080", "80"), ("udp", "0.0.0.0", "5353", "53")]
    assert dom.find("devices/vsock/cid").attrib == {"auto": "no", "address": "1000"}
    assert dom.find("devices/serial/log").get("file") == f"{RUN}/serial.log"
    assert dom.find("devices/memballoon").get("model") == "none"


def test_launch_security_is_tdx_with_policy_mrconfigid_and_the_quote_service():
    launch = tree(SPEC).find("launchSecurity")
    assert launch.get("type") == "tdx"
    assert [child.tag for child in launch] == ["policy", "mrConfigId", "quoteGenerationService"]
    assert launch.findtext("policy") == "0x10000000"      # SEPT_VE_DISABLE, DEBUG off
    assert launch.find("quoteGenerationService").attrib == {"path": "/var/run/tdx-qgs/qgs.socket"}
    debug = tree(dataclasses.replace(SPEC, tdx_policy=0x10000001, qgs_socket="/run/qgs.sock")).find("launchSecurity")
    assert debug.findtext("policy") == "0x10000001"
    assert debug.find("quoteGenerationService").get("path") == "/run/qgs.sock"


def test_mrconfigid_round_trips_through_base64_to_app_compose_mrconfigid():
    text = tree(SPEC).findtext("launchSecurity/mrConfigId")
    raw = base64.b64decode(text, validate=True)
    assert len(raw) == 48 and raw == ac.mrconfigid(APP, APP_ID)
    assert raw[0] == 1 and raw[1:33].hex() == ac.compose_hash(APP_BYTES)          # v1
    assert ld.mrconfigid_for(APP_BYTES) == raw


def test_mrconfigid_for_v2_and_for_bytes_not_written_canonically():
    app = ac.build(COMPOSE, "hello", key_provider_id="ab" * 32)
    data = ac.render(app)
    app_id = "12" * 20
    assert ld.mrconfigid_for(data, app_id) == ac.mrconfigid(app, app_id)
    assert ld.mrconfigid_for(data, app_id)[0] == 2
    # vmm-cli.py writes indented JSON: its compose_hash is the hash of those very bytes.
    indented = json.dumps(APP, indent=4, ensure_ascii=False).encode()
    assert ld.mrconfigid_for(indented) == ac.mrconfigid_v1(hashlib.sha256(indented).hexdigest())
    assert ld.mrconfigid_for(indented) != ld.mrconfigid_for(APP_BYTES)


def test_no_tee_is_the_same_domain_minus_launch_security_and_the_host_cpu():
    tdx = tree(SPEC)
    tdx.remove(tdx.find("launchSecurity"))
    tdx.remove(tdx.find("cpu"))
    assert ld.serialize(tdx) == ld.render_domain_xml(NO_TEE)
    assert "launchSecurity" not in ld.render_domain_xml(NO_TEE)
    # A no_tee guest needs no firmware of its own (SeaBIOS) and carries no mrconfigid.
    bare = tree(dataclasses.replace(NO_TEE, ovmf=None, mrconfigid=None))
    assert bare.find("os/loader") is None and bare.find("launchSecurity") is None


def test_optional_devices_are_left_out():
    dom = tree(ld.DomainSpec(name="min", kernel="/k", no_tee=True))
    assert dom.find("uuid") is None and dom.find("title") is None and dom.find("os/initrd") is None
    assert dom.find("os/cmdline") is None and dom.findall("devices/disk") == []
    assert dom.find("devices/filesystem") is None and dom.find("devices/vsock") is None
    assert dom.find("devices/channel") is None
    nic = dom.find("devices/interface")
    assert nic.find("mac") is None and nic.find("backend") is None and nic.find("portForward") is None


# ---- determinism and escaping -------------------------------------------------------------------

def test_the_same_spec_gives_the_same_bytes_however_it_is_spelled():
    one = ld.render_domain_xml(SPEC)
    assert one == ld.render_domain_xml(SPEC) == ld.render_domain_xml(dataclasses.replace(SPEC))
    spelled = dataclasses.replace(
        SPEC, uuid=VM_ID.upper(), mac=SPEC.mac.upper(), mrconfigid="0x" + SPEC.mrconfigid.hex(),
        port_forwards=[{"protocol": "tcp", "host_address": "127.0.0.1", "host_port": 8080, "vm_port": 80},
                       ld.PortForward("udp", "0.0.0.0", 5353, 53)])
    assert ld.render_domain_xml(spelled) == one
    assert one.endswith("</domain>\n") and "\t" not in one


def test_values_are_escaped():
    nasty = dataclasses.replace(
        SPEC, cmdline="""a=<b> & c="d" e='f' ]]> &amp;""", title="x & <y> 'z' \"w\"",
        kernel="/img/it's \"a\" <kernel> & more", shared_dir="/run/a'b\"c&d<e>")
    text = ld.render_domain_xml(nasty)
    dom = ET.fromstring(text)
    assert dom.findtext("os/cmdline") == nasty.cmdline
    assert dom.findtext("title") == nasty.title
    assert dom.findtext("os/kernel") == nasty.kernel
    assert dom.find("devices/filesystem/source").get("dir") == nasty.shared_dir
    assert "<b>" not in text and "&amp;amp;" in text


printable = st.text(st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="\ufffe\uffff"),
                    min_size=1, max_size=40).map(str.strip).filter(bool)


@given(cmdline=printable, title=printable, path=printable)
def test_any_printable_value_reads_back_unchanged(cmdline, title, path):
    spec = dataclasses.replace(SPEC, cmdline=cmdline, title=title, rootfs="/" + path)
    dom = tree(spec)
    assert dom.findtext("os/cmdline") == cmdline and dom.findtext("title") == title
    assert dom.find("devices/disk/source").get("file") == "/" + path
    assert ld.render_domain_xml(spec) == ld.render_domain_xml(spec)


# ---- refusals name the field ---------------------------------------------------------------------

@pytest.mark.parametrize("field, changes", [
    ("name", {"name": ""}),
    ("name", {"name": "a/b"}),
    ("name", {"name": "semi;colon"}),
    ("name", {"name": "new\nline"}),
    ("kernel", {"kernel": None}),
    ("kernel", {"kernel": "relative/bzImage"}),
    ("kernel", {"kernel": "/img/bzImage "}),
    ("ovmf", {"ovmf": None}),                              # a TDX guest needs its TDVF
    ("initrd", {"initrd": "initramfs"}),
    ("rootfs", {"rootfs": "/img/\x00"}),
    ("cmdline", {"cmdline": "console=ttyS0\x07"}),
    ("cmdline", {"cmdline": "two\nlines"}),
    ("title", {"title": "two\nlines"}),
    ("uuid", {"uuid": "not-a-uuid"}),
    ("mac", {"mac": "02:00:00:00:00"}),
    ("mac", {"mac": "01:00:5e:00:00:01"}),                 # multicast
    ("vcpu", {"vcpu": 0}),
    ("vcpu", {"vcpu": True}),
    ("memory_mb", {"memory_mb": "1024"}),
    ("cid", {"cid": 2}),                                   # 2 is the host
    ("mrconfigid", {"mrconfigid": b"\x01" * 32}),
    ("mrconfigid", {"mrconfigid": "zz" * 48}),
    ("tdx_policy", {"tdx_policy": -1}),
    ("tdx_policy", {"tdx_policy": 2 ** 64}),
    ("qgs_socket", {"qgs_socket": "qgs.socket"}),
    ("data_disk_format", {"data_disk_format": "vmdk"}),
    ("domain_type", {"domain_type": "xen"}),
    ("port_forwards[0].protocol", {"port_forwards": [("sctp", "127.0.0.1", 1, 2)]}),
    ("port_forwards[1].host_address", {"port_forwards": [("tcp", "127.0.0.1", 1, 2), ("tcp", "localhost", 1, 2)]}),
    ("port_forwards[0].host_port", {"port_forwards": [("tcp", "127.0.0.1", 0, 2)]}),
    ("port_forwards[0].vm_port", {"port_forwards": [{"host_port": 80}]}),
    ("port_forwards[0]", {"port_forwards": ["8080:80"]}),
])
def test_bad_input_is_refused_naming_the_field(field, changes):
    with pytest.raises(DstackError) as info:
        ld.render_domain_xml(dataclasses.replace(SPEC, **changes))
    assert info.value.field == field


def test_dstack_names_are_accepted():
    dom = tree(dataclasses.replace(SPEC, name="my app-1_2.3 @home ~!$^()"))
    assert dom.findtext("name") == "my app-1_2.3 @home ~!$^()"


def test_mac_for_is_stable_unicast_and_local():
    mac = ld.mac_for(VM_ID)
    assert mac == ld.mac_for(VM_ID) and mac != ld.mac_for(VM_ID[:-1] + "c")
    first = int(mac[:2], 16)
    assert first & 1 == 0 and first & 2 == 2          # unicast, locally administered
    assert len({ld.mac_for(f"vm-{n}") for n in range(2000)}) == 2000
    with pytest.raises(DstackError):
        ld.mac_for("")


# ---- libvirt's schema --------------------------------------------------------------------------

def _validate(xml_text, tmp_path, schema=None):
    path = tmp_path / "domain.xml"
    path.write_text(xml_text)
    if schema is None:
        cmd = ["virt-xml-validate", str(path), "domain"]
    else:
        rng = tmp_path / "schema.rng"
        rng.write_text(schema)
        cmd = ["xmllint", "--noout", "--relaxng", str(rng), str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


needs_schema_tools = pytest.mark.skipif(
    not (shutil.which("xmllint") and shutil.which("virt-xml-validate")),
    reason="xmllint/virt-xml-validate are not installed (scripts/setup.sh --test installs libxml2-utils, libvirt-clients)")


@needs_schema_tools
def test_the_no_tee_domain_is_valid_for_this_machines_libvirt(tmp_path):
    proc = _validate(ld.render_domain_xml(NO_TEE), tmp_path)
    assert proc.returncode == 0, proc.stderr + proc.stdout


def test_a_no_tee_vm_gets_its_quotes_over_a_virtio_serial_port():
    dom = tree(dataclasses.replace(NO_TEE, quote_channel="/run/vm/quote.sock"))
    channel = dom.find("devices/channel")
    assert channel.get("type") == "unix"
    assert channel.find("source").attrib == {"mode": "bind", "path": "/run/vm/quote.sock"}
    assert channel.find("target").attrib == {"type": "virtio", "name": "org.dstack.quote"}
    with pytest.raises(DstackError, match="quote_channel"):
        ld.render_domain_xml(dataclasses.replace(NO_TEE, quote_channel="relative.sock"))


@needs_schema_tools
def test_the_no_tee_domain_with_its_quote_channel_is_valid_for_this_machines_libvirt(tmp_path):
    proc = _validate(ld.render_domain_xml(dataclasses.replace(NO_TEE, quote_channel="/run/vm/quote.sock")), tmp_path)
    assert proc.returncode == 0, proc.stderr + proc.stdout


@needs_schema_tools
def test_the_tdx_domain_is_valid_with_tdx_launch_security(tmp_path):
    proc = _validate(ld.render_domain_xml(SPEC), tmp_path, TDX_RNG)
    assert proc.returncode == 0, proc.stderr
    # ... and libvirt 9.0's grammar alone refuses it, for launchSecurity.
    old = _validate(ld.render_domain_xml(SPEC), tmp_path)
    assert old.returncode != 0 and "Extra element launchSecurity" in old.stderr
    broken = ld.render_domain_xml(SPEC).replace("<policy>0x10000000</policy>", "<policy>high</policy>")
    assert _validate(broken, tmp_path, TDX_RNG).returncode != 0


# ---- comparing with what libvirt reports ----------------------------------------------------------

def _as_libvirt_reports(xml_text, extra_launch=None):
    """What libvirt's qemu driver makes of a definition: defaults added, values respelled."""
    dom = ET.fromstring(xml_text)
    dom.find("os/type").set("machine", "pc-q35-7.2")
    memory = dom.find("memory")
    memory.set("unit", "KiB")
    memory.text = str(int(memory.text) * 1024)
    ET.SubElement(dom, "currentMemory", unit="KiB").text = memory.text
    dom.find("vcpu").set("placement", "static")
    ET.SubElement(dom.find("os"), "boot", dev="hd")
    devices = dom.find("devices")
    devices.insert(0, ET.Element("emulator"))
    devices[0].text = "/usr/bin/qemu-system-x86_64"
    for dev in list(devices)[1:]:
        ET.SubElement(dev, "address", type="pci", domain="0x0000", bus="0x01", slot="0x00", function="0x0")
    ET.SubElement(devices, "controller", type="pci", index="0", model="pcie-root")
    ET.SubElement(devices.find("serial"), "target", type="isa-serial", port="0")
    if dom.find("devices/interface/mac") is not None:
        mac = dom.find("devices/interface/mac")
        mac.set("address", mac.get("address").upper())
    balloon = devices.find("memballoon")          # another device order
    devices.remove(balloon)
    devices.append(balloon)
    if extra_launch is not None:
        dom.append(extra_launch)
    return ET.tostring(dom, encoding="unicode")


def test_libvirts_additions_do_not_count_as_a_difference():
    for spec in (SPEC, NO_TEE):
        want = ld.render_domain_xml(spec)
        assert ld.normalized_current(_as_libvirt_reports(want), want) == want


def test_values_libvirt_chooses_when_none_are_wanted_do_not_count():
    want = ld.render_domain_xml(dataclasses.replace(NO_TEE, mac=None, uuid=None))
    dom = ET.fromstring(_as_libvirt_reports(want))
    ET.SubElement(dom.find("devices/interface"), "mac", address="52:54:00:12:34:56")
    ET.SubElement(dom, "uuid").text = VM_ID
    assert ld.normalized_current(ET.tostring(dom, encoding="unicode"), want) == want


@pytest.mark.parametrize("changes", [
    {"vcpu": 4}, {"memory_mb": 4096}, {"cmdline": "console=hvc0"}, {"cid": 1001},
    {"mrconfigid": b"\x02" * 48}, {"tdx_policy": 0x10000001}, {"shared_dir": "/elsewhere"},
    {"port_forwards": ()}, {"port_forwards": SPEC.port_forwards[:1]}, {"rootfs": None},
    {"data_disk_format": "raw"}, {"no_tee": True}, {"title": None}, {"serial_log": None},
    {"mac": "02:00:00:00:00:99"}, {"kernel": "/img/other"}, {"domain_type": "qemu"},
])
def test_a_changed_value_is_a_difference_and_shows_in_the_projection(changes):
    defined = ld.render_domain_xml(SPEC)
    want = ld.render_domain_xml(dataclasses.replace(SPEC, **changes))
    before = ld.normalized_current(_as_libvirt_reports(defined), want)
    assert before != want


def test_a_launch_security_that_is_not_wanted_is_a_difference():
    want = ld.render_domain_xml(NO_TEE)
    sev = ET.Element("launchSecurity", type="sev")
    ET.SubElement(sev, "policy").text = "0x0001"
    before = ld.normalized_current(_as_libvirt_reports(want, sev), want)
    assert before != want and "<launchSecurity type='sev'>" in before


def test_policy_is_compared_as_a_number():
    want = ld.render_domain_xml(SPEC)
    assert ld.normalized_current(want.replace("0x10000000", "0x0010000000"), want) == want


def test_parse_refuses_what_is_not_a_domain():
    with pytest.raises(DstackError) as info:
        ld.parse("<domain>", "current")
    assert info.value.field == "current"
    with pytest.raises(DstackError):
        ld.parse("<network/>")
    assert ld.domain_uuid(ld.render_domain_xml(SPEC)) == VM_ID
