"""dstack.tee.tdx_domain and the VMM's libvirt backend against real libvirt.

Two libvirts, for two reasons:

- `test:///default`, libvirt's built-in test driver: no daemon, but its state lives in the
  process and only while a connection to it is open (a new process sees a fresh world). So the
  module's check/apply/again sequence runs in this process (Ansible's own
  `ansible.module_utils.testing.patch_module_args` feeds the arguments) while the test holds a
  connection open.
- `qemu:///system`, the real daemon with KVM: the module runs exactly as Ansible runs it (a
  process per task), so idempotence is checked against what libvirt's QEMU driver really reports
  (pc-q35-7.2 for q35, memory in KiB, added controllers and addresses), and the domain really
  boots: its kernel is a 100-byte multiboot guest that writes a line to the serial port, so the
  serial log proves the VM ran. The fixture (tests/integration/libvirt_fixtures.py) starts
  virtlogd and libvirtd when they are not running and leaves them running, as a host's libvirt;
  it skips only when it cannot (not root, or libvirt's daemon not installed).

libvirt 9.0 here refuses <launchSecurity type='tdx'>: the TDX domain is checked as text in
tests/unit/test_libvirt_domain.py, and here for the clean refusal; everything that runs is no_tee.
"""

import base64
import contextlib
import io
import json
import re
import os
import shutil
import struct
import subprocess
import time
import uuid

import pytest

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed (scripts/setup.sh --test installs it)")

# pylint: disable=wrong-import-position
from ansible.module_utils.testing import patch_module_args

from ansible_collections.dstack.tee.agents.vmm.backends.base import EXITED, RUNNING, STOPPED, STOPPING, VmRecord
from ansible_collections.dstack.tee.agents.vmm.backends.libvirt import LibvirtBackend
from ansible_collections.dstack.tee.plugins.module_utils import app_compose as ac
from ansible_collections.dstack.tee.plugins.module_utils import libvirt_conn as lv
from ansible_collections.dstack.tee.plugins.module_utils import libvirt_domain as ld
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.modules import tdx_domain
from libvirt_fixtures import host_dir, system_domains, system_libvirt  # noqa: F401  pylint: disable=unused-import

TEST_URI = "test:///default"
GUEST_LINE = b"dstack-guest-ok"
COMPOSE = "services:\n  web:\n    image: nginx\n"


def multiboot_guest(message=GUEST_LINE + b"\n"):
    """A multiboot kernel QEMU loads directly: it writes `message` to COM1, then halts."""
    magic, flags, base = 0x1BADB002, 0x00010000, 0x100000   # flags: the load addresses are given
    code = b"\xba\xf8\x03\x00\x00"                           # mov edx, 0x3f8
    code += b"".join(b"\xb0" + bytes([c]) + b"\xee" for c in message)  # mov al, c; out dx, al
    code += b"\xfa\xf4\xeb\xfd"                              # cli; hlt; jmp hlt
    header = struct.pack("<8I", magic, flags, (-(magic + flags)) & 0xFFFFFFFF, base, base, 0, 0, base + 32)
    return header + code


def run_in_process(args, check=False, diff=False):
    """Run the module's main() in this process (for test:///default), returning its JSON result."""
    payload = dict(args, _ansible_check_mode=check, _ansible_diff=diff, _ansible_no_log=False)
    out = io.StringIO()
    with patch_module_args(payload), contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        tdx_domain.main()
    result = json.loads(out.getvalue())
    result["warnings"] = [w["event"]["msg"] if isinstance(w, dict) else w for w in result.get("warnings", [])]
    return result


# ---- test:///default -----------------------------------------------------------------------------

@pytest.fixture
def test_world():
    """A connection to the test driver, held open so every connection of this process shares its state."""
    conn = lv.connect(TEST_URI)
    yield conn
    conn.close()


BASE = {"name": "cvm-one", "uri": TEST_URI, "no_tee": True, "kernel": "/img/bzImage",
        "initrd": "/img/initramfs.cpio.gz", "cmdline": "console=ttyS0", "rootfs": "/img/rootfs.img.verity",
        "data_disk": "/vm/hda.img", "shared_dir": "/vm/shared", "cid": 1000, "mac": "02:00:00:00:00:01",
        "serial_log": "/vm/serial.log", "vcpu": 1, "memory_mb": 512}


def test_check_apply_check_apply_on_the_test_driver(test_world):
    first = run_in_process(BASE, check=True, diff=True)
    assert first["changed"] is True and lv.lookup(test_world, "cvm-one") is None
    assert first["diff"][0]["before"] == "" and "<name>cvm-one</name>" in first["diff"][0]["after"]

    applied = run_in_process(BASE, diff=True)
    assert applied["changed"] is True and applied["state"] == "shutoff"
    dom = lv.lookup(test_world, "cvm-one")
    assert dom is not None and dom.UUIDString() == applied["uuid"]
    assert ld.normalized_current(lv.current_xml(dom), applied["xml"]) == applied["xml"]
    assert "launchSecurity" not in lv.current_xml(dom) and applied["mrconfigid"] == ""

    again = run_in_process(BASE, check=True, diff=True)
    assert again["changed"] is False and "diff" not in again
    again = run_in_process(BASE)
    assert again["changed"] is False and again["uuid"] == applied["uuid"] and again["xml"] == applied["xml"]


def test_running_stopped_absent_on_the_test_driver(test_world):
    started = run_in_process(dict(BASE, state="running"), diff=True)
    assert started["changed"] is True and started["state"] == "running"
    assert [d["after"] for d in started["diff"]][-1] == "running\n"
    assert lv.is_active(lv.lookup(test_world, "cvm-one"))
    assert run_in_process(dict(BASE, state="running"))["changed"] is False
    assert run_in_process(dict(BASE, state="present"))["changed"] is False   # present leaves it running

    would_stop = run_in_process(dict(BASE, state="stopped"), check=True)
    assert would_stop["changed"] is True and lv.is_active(lv.lookup(test_world, "cvm-one"))
    stopped = run_in_process(dict(BASE, state="stopped"))
    assert stopped["changed"] is True and stopped["state"] == "shutoff"
    assert not lv.is_active(lv.lookup(test_world, "cvm-one"))
    assert run_in_process(dict(BASE, state="stopped"))["changed"] is False

    would_remove = run_in_process({"name": "cvm-one", "uri": TEST_URI, "state": "absent"}, check=True, diff=True)
    assert would_remove["changed"] is True and lv.lookup(test_world, "cvm-one") is not None
    assert "<name>cvm-one</name>" in would_remove["diff"][0]["before"]
    removed = run_in_process({"name": "cvm-one", "uri": TEST_URI, "state": "absent"})
    assert removed["changed"] is True and removed["state"] == "absent"
    assert lv.lookup(test_world, "cvm-one") is None
    assert run_in_process({"name": "cvm-one", "uri": TEST_URI, "state": "absent"})["changed"] is False


def test_a_changed_option_redefines_and_the_diff_names_it(test_world):
    run_in_process(dict(BASE, state="running"))
    uuid_before = lv.lookup(test_world, "cvm-one").UUIDString()
    changed = run_in_process(dict(BASE, state="running", vcpu=2), diff=True)
    assert changed["changed"] is True and changed["restart_required"] is True
    assert any("old definition" in w for w in changed["warnings"])
    xml_diff = changed["diff"][0]
    assert "<vcpu>1</vcpu>" in xml_diff["before"] and "<vcpu>2</vcpu>" in xml_diff["after"]
    assert xml_diff["before"].replace("<vcpu>1</vcpu>", "<vcpu>2</vcpu>") == xml_diff["after"]
    dom = lv.lookup(test_world, "cvm-one")
    assert dom.UUIDString() == uuid_before                   # the same domain, redefined
    assert "<vcpu placement='static'>2</vcpu>" in lv.current_xml(dom)
    assert run_in_process(dict(BASE, state="running", vcpu=2))["changed"] is False


def test_the_tdx_domain_is_refused_cleanly_by_a_libvirt_without_tdx(test_world):
    args = dict(BASE, no_tee=False, ovmf="/img/ovmf.fd", mrconfigid="01" * 48)
    result = run_in_process(args)
    if result.get("failed"):
        assert "launchSecurity" in result["msg"] and "no_tee" in result["msg"]
        assert lv.lookup(test_world, "cvm-one") is None
    else:  # a libvirt with TDX support
        xml = lv.current_xml(lv.lookup(test_world, "cvm-one"))
        assert "<launchSecurity type='tdx'>" in xml
        assert base64.b64encode(b"\x01" * 48).decode() in xml


def test_the_mrconfigid_comes_from_the_app_compose_file(tmp_path, test_world):
    app = ac.build(COMPOSE, "hello")
    path = tmp_path / "app-compose.json"
    path.write_bytes(ac.render(app))
    result = run_in_process(dict(BASE, no_tee=False, ovmf="/img/ovmf.fd", app_compose_file=str(path)), check=True)
    expected = ac.mrconfigid(app, ac.app_id_for(ac.compose_hash(ac.render(app))))
    assert result["changed"] is True and result["mrconfigid"] == expected.hex()
    assert base64.b64encode(expected).decode() in result["xml"]
    assert lv.lookup(test_world, "cvm-one") is None


@pytest.mark.parametrize("changes, field", [
    ({"kernel": "relative"}, "kernel"),
    ({"name": "bad/name"}, "name"),
    ({"mac": "01:00:00:00:00:01"}, "mac"),
    ({"tdx_policy": "lots", "no_tee": False, "ovmf": "/img/ovmf.fd"}, "tdx_policy"),
    ({"no_tee": False}, "ovmf"),
    ({"port_forwards": [{"host_port": 8080, "vm_port": 80, "host_address": "localhost"}]},
     "port_forwards[0].host_address"),
])
def test_bad_options_fail_naming_the_field(test_world, changes, field):
    result = run_in_process(dict(BASE, **changes))
    assert result["failed"] is True and result["field"] == field
    assert lv.lookup(test_world, "cvm-one") is None


def test_a_different_uuid_for_an_existing_domain_is_refused(test_world):
    run_in_process(BASE)
    result = run_in_process(dict(BASE, uuid=str(uuid.uuid4())))
    assert result["failed"] is True and result["field"] == "uuid" and "state=absent" in result["msg"]


def test_missing_kernel_is_refused_by_the_argument_spec(test_world):
    args = {k: v for k, v in BASE.items() if k != "kernel"}
    result = run_in_process(args)
    assert result["failed"] is True and "kernel" in result["msg"]


# ---- the VMM backend on test:///default ----------------------------------------------------------

def _image(folder, bios=True):
    folder.mkdir(parents=True)
    meta = {"kernel": "bzImage", "initrd": "initramfs.cpio.gz", "rootfs": "rootfs.img.verity",
            "cmdline": "console=ttyS0 init=/init", "version": "0.5.11"}
    if bios:
        meta["bios"] = "ovmf.fd"
    (folder / "metadata.json").write_text(json.dumps(meta))


def _vm(run_path, image="dstack-test", no_tee=True, name="hello", disk_size=1, app=None):
    vm_id = str(uuid.uuid4())
    run_dir = os.path.join(run_path, vm_id)
    os.makedirs(os.path.join(run_dir, "shared"))
    data = ac.render(app or ac.build(COMPOSE, name))
    with open(os.path.join(run_dir, "shared", "app-compose.json"), "wb") as handle:
        handle.write(data)
    manifest = {"id": vm_id, "name": name, "app_id": ac.compose_hash(data)[:40], "vcpu": 1, "memory": 256,
                "disk_size": disk_size, "image": image, "port_map": [], "no_tee": no_tee}
    return VmRecord(vm_id, run_dir, manifest)


def test_the_backend_lifecycle_on_the_test_driver(tmp_path):
    _image(tmp_path / "images" / "dstack-test")
    backend = LibvirtBackend(TEST_URI, image_dir=str(tmp_path / "images"), vsock=True)
    try:
        vm = _vm(str(tmp_path / "run"))
        assert backend.status(vm) == STOPPED                     # nothing defined yet
        dom = backend.create(vm)
        xml = lv.current_xml(dom)
        assert dom.name() == "dstack-" + vm.id and dom.UUIDString() == vm.id
        assert "<title>hello</title>" in xml and ld.mac_for(vm.id) in xml
        # A CID from the pool (1000 on an empty driver; the next free one when earlier tests of this
        # process left domains on test:///default).
        cid = int(re.search(r"<cid auto='no' address='(\d+)'/>", xml).group(1))
        assert 1000 <= cid < 2000 and "launchSecurity" not in xml
        assert os.path.join(vm.run_dir, "hda.img") in xml and f"{tmp_path}/images/dstack-test/bzImage" in xml
        with open(os.path.join(vm.run_dir, "hda.img"), "rb") as handle:   # qemu-img made a qcow2
            assert handle.read(4) == (b"QFI\xfb" if shutil.which("qemu-img") else b"\0\0\0\0")
        wanted = backend.domain_xml(vm, dom)
        assert ld.normalized_current(lv.current_xml(backend.create(vm)), wanted) == wanted  # create is idempotent
        assert backend.status(vm) == STOPPED

        other = _vm(str(tmp_path / "run"), name="other")
        other_cid = int(re.search(r"<cid auto='no' address='(\d+)'/>", lv.current_xml(backend.create(other))).group(1))
        assert cid < other_cid < 2000  # the next free CID, not the first VM's

        backend.start(vm)
        assert backend.status(vm) == RUNNING
        backend.start(vm)                                        # starting a running VM does nothing
        backend.stop(vm, force=True)
        assert backend.status(vm) == STOPPED
        backend.start(vm)
        backend.stop(vm, force=False)                            # the test driver's guest obeys at once
        assert backend.status(vm) == EXITED                      # it powered itself off

        backend.remove(vm)
        assert lv.lookup(backend.conn, "dstack-" + vm.id) is None
        assert not os.path.exists(os.path.join(vm.run_dir, "hda.img"))
        assert backend.status(vm) == STOPPED
        backend.remove(vm)                                       # removing twice is fine
    finally:
        backend.close()


def test_the_backend_renders_a_tdx_guest_with_the_apps_mrconfigid(tmp_path):
    _image(tmp_path / "images" / "dstack-test")
    backend = LibvirtBackend(TEST_URI, image_dir=str(tmp_path / "images"), vsock=True)
    try:
        app = ac.build(COMPOSE, "hello", key_provider_id="cd" * 32)
        vm = _vm(str(tmp_path / "run"), no_tee=False, app=app)
        xml = backend.domain_xml(vm)
        expected = ac.mrconfigid(app, vm.manifest["app_id"])
        assert expected[0] == 2 and f"<mrConfigId>{base64.b64encode(expected).decode()}</mrConfigId>" in xml
        assert "<launchSecurity type='tdx'>" in xml and f"{tmp_path}/images/dstack-test/ovmf.fd" in xml
        try:
            backend.create(vm)
        except lv.LibvirtFailure as exc:                         # libvirt without TDX (9.0 here)
            assert "launchSecurity" in exc.reason
        else:
            assert "<launchSecurity type='tdx'>" in lv.current_xml(lv.lookup(backend.conn, "dstack-" + vm.id))
    finally:
        backend.close()


def test_the_backend_names_a_missing_image(tmp_path):
    backend = LibvirtBackend(TEST_URI, image_dir=str(tmp_path / "images"))
    try:
        vm = _vm(str(tmp_path / "run"), image="nope")
        with pytest.raises(DstackError) as info:
            backend.create(vm)
        assert info.value.field == "image" and "metadata.json" in info.value.reason
        vm.manifest["image"] = "../etc"
        with pytest.raises(DstackError) as info:
            backend.create(vm)
        assert info.value.field == "image"
    finally:
        backend.close()


# ---- qemu:///system: the real daemon, a real KVM guest ---------------------------------------------

def _wait_for_serial(path, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and GUEST_LINE in open(path, "rb").read():
            return True
        time.sleep(0.2)
    return False


def test_the_module_on_qemu_system_runs_a_kvm_guest(module, system_libvirt, system_domains, host_dir):
    kernel = os.path.join(host_dir, "guest.bin")
    with open(kernel, "wb") as handle:
        handle.write(multiboot_guest())
    disk = os.path.join(host_dir, "hda.img")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", disk, "1G"], check=True)
    os.makedirs(os.path.join(host_dir, "shared"), mode=0o755)
    serial = os.path.join(host_dir, "serial.log")
    name = system_domains()
    args = {"name": name, "uri": system_libvirt, "no_tee": True, "kernel": kernel, "cmdline": "console=ttyS0",
            "data_disk": disk, "shared_dir": os.path.join(host_dir, "shared"), "mac": ld.mac_for(name),
            "serial_log": serial, "memory_mb": 128, "title": "dstack.tee test guest",
            "domain_type": "kvm" if os.path.exists("/dev/kvm") else "qemu"}

    first = module("tdx_domain", args, check=True, diff=True)
    assert first["changed"] is True and first["diff"][0]["before"] == ""
    conn = lv.connect(system_libvirt)
    try:
        assert lv.lookup(conn, name) is None
        applied = module("tdx_domain", args, diff=True)
        assert applied["changed"] is True, applied.get("msg")
        defined = lv.current_xml(lv.lookup(conn, name))
        assert "machine='pc-q35-" in defined and "<memory unit='KiB'>131072</memory>" in defined
        # What libvirt's QEMU driver reports is the same domain: no change, twice.
        assert module("tdx_domain", args, check=True)["changed"] is False
        again = module("tdx_domain", args, diff=True)
        assert again["changed"] is False and "diff" not in again and again["uuid"] == applied["uuid"]

        running = module("tdx_domain", dict(args, state="running"), diff=True)
        assert running["changed"] is True and running["state"] == "running", running.get("msg")
        assert _wait_for_serial(serial), "the guest wrote nothing to its serial port"
        assert module("tdx_domain", dict(args, state="running"))["changed"] is False

        bigger = module("tdx_domain", dict(args, state="running", memory_mb=256), diff=True)
        assert bigger["changed"] is True and bigger["restart_required"] is True
        assert "<memory unit='MiB'>128</memory>" in bigger["diff"][0]["before"]
        assert "<memory unit='MiB'>256</memory>" in bigger["diff"][0]["after"]

        stopped = module("tdx_domain", dict(args, state="stopped", memory_mb=256))
        assert stopped["changed"] is True and stopped["state"] == "shutoff"
        assert module("tdx_domain", dict(args, state="stopped", memory_mb=256))["changed"] is False

        absent = {"name": name, "uri": system_libvirt, "state": "absent"}
        assert module("tdx_domain", absent, check=True)["changed"] is True
        assert lv.lookup(conn, name) is not None
        assert module("tdx_domain", absent)["changed"] is True
        assert lv.lookup(conn, name) is None
        assert module("tdx_domain", absent)["changed"] is False
    finally:
        conn.close()


def test_the_backend_boots_a_no_tee_vm_on_qemu_system(system_libvirt, host_dir):
    images = os.path.join(host_dir, "images", "dstack-stub")
    os.makedirs(images)
    with open(os.path.join(images, "guest.bin"), "wb") as handle:
        handle.write(multiboot_guest())
    with open(os.path.join(images, "rootfs.img.verity"), "wb") as handle:
        handle.truncate(1024 * 1024)
    with open(os.path.join(images, "metadata.json"), "w", encoding="utf-8") as handle:
        json.dump({"kernel": "guest.bin", "rootfs": "rootfs.img.verity", "cmdline": "console=ttyS0"}, handle)
    run_path = os.path.join(host_dir, "run")
    os.makedirs(run_path, mode=0o755)
    vm = _vm(run_path, image="dstack-stub")
    os.chmod(vm.run_dir, 0o755)
    os.chmod(vm.shared_dir, 0o755)
    backend = LibvirtBackend(system_libvirt, image_dir=os.path.join(host_dir, "images"),
                             domain_prefix="dstack-tee-test-",
                             domain_type="kvm" if os.path.exists("/dev/kvm") else "qemu")
    try:
        started = time.monotonic()
        backend.create(vm)
        backend.start(vm)
        assert backend.status(vm) == RUNNING
        assert _wait_for_serial(vm.serial_log), "the guest wrote nothing to its serial port"
        boot_seconds = time.monotonic() - started
        assert boot_seconds < 20
        live = lv.current_xml(lv.lookup(backend.conn, backend.domain_name(vm)), inactive=False)
        assert ld.mac_for(vm.id) in live and "host-shared" in live and "readonly" in live
        backend.create(vm)                                       # unchanged: no redefinition needed
        assert backend.status(vm) == RUNNING

        backend.stop(vm, force=False)                            # ACPI: the stub guest ignores it
        assert backend.status(vm) in (RUNNING, STOPPING)
        backend.stop(vm, force=True)
        assert backend.status(vm) == STOPPED
        backend.remove(vm)
        assert lv.lookup(backend.conn, backend.domain_name(vm)) is None
        assert not os.path.exists(os.path.join(vm.run_dir, "hda.img"))
    finally:
        dom = lv.lookup(backend.conn, backend.domain_name(vm))
        if dom is not None:
            lv.remove(dom)
        backend.close()


def test_the_vmm_config_chooses_the_libvirt_domain_type():
    """vmm.toml libvirt_domain_type: kvm by default, qemu (TCG) for a PVM host; anything else named."""
    from ansible_collections.dstack.tee.agents.vmm.cli import make_backend  # pylint: disable=import-outside-toplevel
    from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError  # pylint: disable=import-outside-toplevel
    base = {"backend": "libvirt", "libvirt_uri": "test:///default"}
    assert make_backend(base).domain_type == "kvm"
    backend = make_backend(dict(base, libvirt_domain_type="qemu"))
    xml = ld.render_domain_xml(ld.DomainSpec(name="t", kernel="/k", no_tee=True, domain_type=backend.domain_type))
    assert re.search(r"<domain [^>]*type=.qemu.", xml), xml[:200]
    with pytest.raises(DstackError) as err:
        make_backend(dict(base, libvirt_domain_type="xen"))
    assert err.value.field == "libvirt_domain_type"
