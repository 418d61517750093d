"""The VMM on the libvirt backend, as a guest VM sees it (issue 17 point 4, the VMM side): a real
`dstack-vmm serve --backend libvirt` on libvirt's test driver (test:///default: domains defined and
"started" without QEMU), driven over HTTP.

- `--image-path` and `--libvirt-domain-type` (and vmm.toml image_path, libvirt_domain_type,
  preload_images) reach the backend: the domain boots the image's kernel, with the type asked.
- A VM on QEMU's user network reaches the host's loopback at 10.0.2.2: the KMS, gateway and host
  API URLs of its .sys-config.json name that address, and the VMM answers its host API there
  (Host: 10.0.2.2:PORT, as QEMU's user network delivers it).
- The compose's images the host's podman holds are in the share as docker-archives (images/*.tar,
  0644 in a 0755 folder, the image ID podman has), an image the host lacks is left to the guest (a
  log line says so), and a second start keeps an archive of the same image.
- dstack.tee.cvm's image and no_tee reach CreateVm; a change of no_tee needs recreate.
"""

import grp
import json
import os
import subprocess
import urllib.request

import pytest

from ansible_collections.dstack.tee.agents.vmm import cli
from ansible_collections.dstack.tee.agents.vmm.backends.base import VmRecord
from ansible_collections.dstack.tee.agents.vmm.backends.libvirt import QEMU_GROUP, LibvirtBackend, archive_name
from ansible_collections.dstack.tee.plugins.module_utils import app_compose as ac
from ansible_collections.dstack.tee.plugins.module_utils import image_archive
from ansible_collections.dstack.tee.plugins.module_utils import libvirt_conn as lv
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from conftest import free_port
from test_vmm import VmmProcess

DIGEST = "7a" * 32
ABSENT = "localhost/dstack-test-absent:1"


def make_image(images):
    folder = images / "guest"
    folder.mkdir(parents=True)
    (folder / "metadata.json").write_text(json.dumps({"kernel": "bzImage", "initrd": "initramfs.img",
                                                      "cmdline": "console=ttyS0"}))
    (folder / "digest.txt").write_text(DIGEST + "\n")


def compose_text(*images):
    services = "".join(f"  s{pos}:\n    image: {image}\n" for pos, image in enumerate(images))
    return ac.render(ac.build("services:\n" + services, "lv-app", key_provider="none")).decode()


@pytest.fixture
def libvirt_vmm(short_tmp):
    """A dstack-vmm on the libvirt backend (test driver), its KMS and gateway on the host's loopback."""
    make_image(short_tmp / "images")
    vmm = VmmProcess(short_tmp / "run", None, free_port(), extra_args=[
        "--backend", "libvirt", "--libvirt-uri", "test:///default", "--image-path", str(short_tmp / "images"),
        "--libvirt-domain-type", "qemu", "--kms-url", "https://127.0.0.1:9201",
        "--gateway-url", "https://localhost:9202", "--sim-state", str(short_tmp / "tdx-sim")])
    vmm.start()
    yield vmm
    vmm.stop()


def vmm_output(vmm):
    vmm.stop()
    return vmm.proc.stdout.read()


def podman_id(name):
    return subprocess.run(["podman", "image", "inspect", "--format", "{{.Id}}", name], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_a_vm_gets_the_hosts_loopback_at_10_0_2_2_and_the_images_the_host_has(short_tmp, libvirt_vmm, busybox_image):
    client = libvirt_vmm.client()
    vm_id = client.call("CreateVm", {"name": "lv-app", "compose_file": compose_text(busybox_image, ABSENT),
                                     "image": "guest", "no_tee": True})["id"]
    run_dir = short_tmp / "run" / vm_id
    share = run_dir / "shared"
    sys_config = json.loads((share / ".sys-config.json").read_text())
    port = libvirt_vmm.port
    assert sys_config["kms_urls"] == ["https://10.0.2.2:9201"]
    assert sys_config["gateway_urls"] == ["https://10.0.2.2:9202"]
    assert sys_config["host_api_url"].startswith(f"http://10.0.2.2:{port}/host-api/{vm_id}/")
    assert json.loads(sys_config["vm_config"])["os_image_hash"] == DIGEST

    # The host API as QEMU's user network delivers the guest's request: to 127.0.0.1, Host 10.0.2.2.
    path = sys_config["host_api_url"].split(f"10.0.2.2:{port}", 1)[1] + "/Notify"
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST",
                                     data=json.dumps({"event": "boot.progress", "payload": "read-config"}).encode(),
                                     headers={"Host": f"10.0.2.2:{port}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200
    info = client.call("GetInfo", {"id": vm_id})["info"]
    assert info["boot_progress"] == "read-config" and info["status"] == "running"
    assert (info["configuration"]["image"], info["configuration"]["no_tee"]) == ("guest", True)

    # The image the host has, as a docker-archive of the same image ID; nothing else in images/.
    images = share / "images"
    archive = images / archive_name(busybox_image)
    assert sorted(os.listdir(images)) == [archive.name]
    assert image_archive.read_archive(str(archive), "archive").id == podman_id(busybox_image)
    assert (os.stat(images).st_mode & 0o777, os.stat(archive).st_mode & 0o777) == (0o755, 0o644)
    # QEMU (libvirt's qemu user) reaches the share through its group; others do not.
    if os.geteuid() == 0 and _has_group(QEMU_GROUP):
        gid = grp.getgrnam(QEMU_GROUP).gr_gid
        for path, mode in ((short_tmp / "run", 0o710), (run_dir, 0o710), (share, 0o750)):
            assert (os.stat(path).st_gid, os.stat(path).st_mode & 0o777) == (gid, mode), path
        assert os.stat(share / ".sys-config.json").st_gid == gid

    # A second start keeps the archive of the same image.
    before = os.stat(archive)
    client.call("StopVm", {"id": vm_id})
    client.call("StartVm", {"id": vm_id})
    after = os.stat(archive)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    # An UpdateVm whose compose no longer names the image: its archive goes at the next start.
    client.call("UpdateVm", {"id": vm_id, "compose_file": compose_text(ABSENT)})
    assert os.listdir(images) == []
    output = vmm_output(libvirt_vmm)
    assert f"image {ABSENT} is not in this host's podman store: the guest pulls it" in output
    assert f"image {busybox_image} (" in output


def _has_group(name):
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def test_the_serve_flags_and_vmm_toml_reach_the_libvirt_backend(tmp_path):
    make_image(tmp_path / "images")
    parser = cli.build_parser()
    args = parser.parse_args(["serve", "--backend", "libvirt", "--libvirt-uri", "test:///default", "--run-path",
                              str(tmp_path / "run"), "--image-path", str(tmp_path / "images"),
                              "--libvirt-domain-type", "qemu"])
    backend = cli.make_backend(cli.load_config(args))
    try:
        assert backend.preload_images is True and backend.domain_type == "qemu"
        run_dir = tmp_path / "run" / "vm"
        os.makedirs(run_dir / "shared")
        (run_dir / "shared" / "app-compose.json").write_text(compose_text("busybox"))
        vm = VmRecord("0b6b1d2e-1111-4222-8333-444455556666", str(run_dir), {"image": "guest", "no_tee": True})
        xml = backend.domain_xml(vm)
        assert xml.startswith("<domain type='qemu'>")
        assert f"<kernel>{tmp_path / 'images' / 'guest' / 'bzImage'}</kernel>" in xml
        assert backend.os_image_hash(vm) == DIGEST
    finally:
        backend.close()

    toml = tmp_path / "vmm.toml"
    toml.write_text(f'backend = "libvirt"\nlibvirt_uri = "test:///default"\nimage_path = "{tmp_path}/images"\n'
                    'libvirt_domain_type = "qemu"\npreload_images = false\n')
    backend = cli.make_backend(cli.load_config(parser.parse_args(["serve", "--config", str(toml), "--run-path",
                                                                  str(tmp_path / "run")])))
    assert (backend.preload_images, backend.domain_type, backend.image_dir) == (False, "qemu", str(tmp_path / "images"))
    assert cli.make_backend(cli.load_config(parser.parse_args(
        ["serve", "--backend", "libvirt", "--no-preload-images", "--run-path", str(tmp_path / "run")]))).preload_images \
        is False
    toml.write_text('backend = "libvirt"\npreload_images = "yes"\n')
    with pytest.raises(DstackError, match="preload_images"):
        cli.make_backend(cli.load_config(parser.parse_args(["serve", "--config", str(toml)])))


def test_the_cvm_module_gives_the_image_and_no_tee_to_the_vmm(short_tmp, libvirt_vmm, module):
    compose_file = short_tmp / "app-compose.json"
    compose_file.write_text(compose_text(ABSENT))
    args = {"vmm_url": f"http://127.0.0.1:{libvirt_vmm.port}", "name": "lv-cvm", "app_compose_file": str(compose_file),
            "image": "guest", "no_tee": True, "wait": False, "vcpu": 1, "memory": 256, "disk_size": 1}
    client = libvirt_vmm.client()

    planned = module("cvm", args, check=True, diff=True)
    assert planned["changed"] and settings(planned["diff"])["after"]["no_tee"] is True, planned
    assert client.call("Status")["vms"] == []
    made = module("cvm", args, diff=True)
    assert made["changed"] and not made.get("failed"), made.get("msg")
    config = client.call("GetInfo", {"id": made["id"]})["info"]["configuration"]
    assert (config["image"], config["no_tee"]) == ("guest", True)
    assert module("cvm", args)["changed"] is False

    tee = dict(args, no_tee=False)
    preview = module("cvm", tee, check=True, diff=True)
    diff = settings(preview["diff"])
    assert preview["changed"] and (diff["before"]["no_tee"], diff["after"]["no_tee"]) == (True, False)
    assert [k for k in diff["before"] if diff["before"][k] != diff["after"][k]] == ["no_tee"]
    refused = module("cvm", tee)
    assert refused.get("failed") and refused["field"] == "no_tee", refused
    assert refused["msg"].startswith("no_tee: cannot change on the existing CVM 'lv-cvm' (no_tee True -> False)")
    assert client.call("GetInfo", {"id": made["id"]})["info"]["configuration"]["no_tee"] is True


def settings(diff):
    """The CVM's settings diff (the first of two when the app-compose changes too)."""
    return diff[0] if isinstance(diff, list) else diff


def test_a_vm_with_ports_on_a_libvirt_without_passt_is_refused_naming_ports_and_leaves_nothing(short_tmp, libvirt_vmm):
    conn = lv.connect("test:///default")
    try:
        version = conn.getLibVersion()
    finally:
        conn.close()
    if version >= 9002000:
        pytest.skip("this libvirt has the passt backend: it forwards the ports")
    client = libvirt_vmm.client()
    with pytest.raises(DstackError) as refused:
        client.call("CreateVm", {"name": "lv-ports", "compose_file": compose_text(ABSENT), "image": "guest",
                                 "no_tee": True, "ports": [{"host_port": free_port(), "vm_port": 80}]})
    assert "has no passt backend" in str(refused.value) and "libvirt 9.2 or later" in str(refused.value)
    assert "HTTP 400: ports: " in str(refused.value), refused.value
    assert client.call("Status")["vms"] == []
    assert [name for name in os.listdir(short_tmp / "run") if name != "tdx-sim"] == []


def test_a_damaged_archive_is_saved_again_and_leftovers_go(tmp_path, busybox_image):
    make_image(tmp_path / "images")
    backend = LibvirtBackend("test:///default", image_dir=str(tmp_path / "images"), vsock=False)
    run_dir = tmp_path / "run" / "vm"
    (run_dir / "shared" / "images").mkdir(parents=True)
    (run_dir / "shared" / "app-compose.json").write_text(compose_text(busybox_image, ABSENT))
    vm = VmRecord("0b6b1d2e-1111-4222-8333-444455556666", str(run_dir), {"image": "guest", "no_tee": True})
    images = run_dir / "shared" / "images"
    archive = images / archive_name(busybox_image)
    archive.write_bytes(b"not a tar")                       # a damaged archive of the image
    (images / ".0123.tmp").write_bytes(b"half")             # an interrupted save
    (images / archive_name("localhost/gone:1")).write_bytes(b"x")   # an image the compose no longer names
    try:
        assert backend.save_images(vm) == [busybox_image]
    finally:
        backend.close()
    assert os.listdir(images) == [archive.name]
    assert image_archive.read_archive(str(archive), "archive").id == podman_id(busybox_image)
