"""deploy-app.yml with `dstack_vmm_backend: libvirt` (issue 17 point 4, the VMM and Ansible side):
site.yml runs the KMS and a VMM on the libvirt backend (qemu:///system, domain type qemu: TCG, as
test_guest_vm_boot explains) with the guest image in `dstack_vmm_image_path`, and deploy-app.yml
gives the app to it with `dstack_app_image` and `dstack_app_no_tee`. What the VMM made is checked
where it is: the domain (libvirt's XML: the image's kernel, no launchSecurity, the config share,
the quote channel), the share's .sys-config.json (the KMS and the host API at 10.0.2.2, where the
VM reaches the host's loopback) and images/*.tar (the compose's image the host has, for the guest
to load). The guest then boots far enough to tell the VMM's host API (at 10.0.2.2) that it read
its config: QEMU read the kernel, the disks and the share through the VMM's permissions, and the
VM reached the host. The boot is not waited for to its end (the deploy's own wait is cut short):
the app answering through the gateway is the later test, once the guest's side is complete.

Needs root, /dev/kvm, libvirt and QEMU (fails naming what is missing, as test_guest_vm_boot does),
and the guest image (its build cache; one to two minutes when it has to be built).
"""

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from ansible_collections.dstack.tee.agents.vmm.backends.libvirt import archive_name
from ansible_collections.dstack.tee.plugins.module_utils import image_archive
from ansible_collections.dstack.tee.plugins.module_utils import libvirt_conn as lv
from conftest import IMAGE, ROOT, free_port, needs_podman, run_playbook
from libvirt_fixtures import system_libvirt  # noqa: F401  pylint: disable=unused-import
from test_demo_playbook import TOKEN, _recap, _teardown, _vmm
from test_guest_vm_boot import BOOT_TIMEOUT, guest_image, libvirt_uri, tail  # noqa: F401  pylint: disable=unused-import
from test_libvirt_vmm import ABSENT, podman_id

COMPOSE = """services:
  web:
    image: {image}
    command: ["httpd", "-f", "-p", "80"]
  helper:
    image: {absent}
"""


@pytest.fixture
def deploy_root(guest_image, libvirt_uri, busybox_image):  # noqa: F811  pylint: disable=redefined-outer-name
    """A root for site.yml's KMS and VMM (its own ports), the guest image in its images folder, an app."""
    root = Path(tempfile.mkdtemp(prefix="ld-", dir="/tmp"))
    os.chmod(root, 0o755)   # QEMU (libvirt-qemu) passes through to the VMM's run path
    (root / "images").mkdir(mode=0o755)
    os.symlink(guest_image, root / "images" / "guest")
    app = root / "lv-app"
    app.mkdir()
    (app / "docker-compose.yaml").write_text(COMPOSE.format(image=busybox_image, absent=ABSENT))
    (app / "app.yml").write_text("name: lv-app\n")
    ports = {"kms": free_port(), "vmm": free_port()}
    extra = ["-e", json.dumps({
        "dstack_root": str(root), "dstack_kms_listen": f"127.0.0.1:{ports['kms']}",
        "dstack_kms_url": f"https://127.0.0.1:{ports['kms']}", "dstack_vmm_listen": f"127.0.0.1:{ports['vmm']}",
        "dstack_vmm_url": f"http://127.0.0.1:{ports['vmm']}", "dstack_vmm_tokens": [TOKEN],
        "dstack_gateway_enabled": False, "dstack_vmm_backend": "libvirt", "dstack_vmm_image_path": str(root / "images"),
        "dstack_vmm_libvirt_domain_type": "qemu"})]
    try:
        yield root, app, ports, extra, libvirt_uri
    finally:
        _teardown(root, ports)
        shutil.rmtree(root, ignore_errors=True)


@needs_podman
def test_deploy_app_gives_the_app_to_a_libvirt_vm(deploy_root):
    root, app, ports, extra, uri = deploy_root
    site = run_playbook(ROOT / "playbooks" / "site.yml", *extra)
    assert site.returncode == 0, site.stdout[-4000:] + site.stderr[-2000:]
    # The deploy's wait for the boot is cut short: the guest's whole boot is not this test's.
    deploy = run_playbook(ROOT / "playbooks" / "deploy-app.yml", *extra, "-e", f"app_dir={app}", "-e",
                          json.dumps({"dstack_app_image": "guest", "dstack_app_no_tee": True, "dstack_app_wait_timeout": 1}))
    vms = _vmm(ports, "Status")["vms"]
    assert [vm["name"] for vm in vms] == ["lv-app"], deploy.stdout[-4000:] + deploy.stderr[-2000:]
    vm = _vmm(ports, "GetInfo", {"id": vms[0]["id"]})["info"]
    assert (vm["configuration"]["image"], vm["configuration"]["no_tee"]) == ("guest", True)
    run_dir = root / "run" / vm["id"]
    share = run_dir / "shared"

    conn = lv.connect(uri)
    try:
        dom = lv.lookup(conn, "dstack-" + vm["id"])
        assert dom is not None and lv.is_active(dom), deploy.stdout[-3000:]
        xml = lv.current_xml(dom)
    finally:
        conn.close()
    assert xml.startswith("<domain type='qemu'") and "launchSecurity" not in xml
    assert f"<kernel>{root / 'images' / 'guest' / 'bzImage'}</kernel>" in xml
    assert f"<source dir='{share}'/>" in xml and "name='org.dstack.quote'" in xml

    sys_config = json.loads((share / ".sys-config.json").read_text())
    assert sys_config["kms_urls"] == [f"https://10.0.2.2:{ports['kms']}"]
    assert sys_config["host_api_url"].startswith(f"http://10.0.2.2:{ports['vmm']}/host-api/{vm['id']}/")
    digest = (root / "images" / "guest" / "digest.txt").read_text().strip()
    assert json.loads(sys_config["vm_config"])["os_image_hash"] == digest

    # The compose's image the host has, for the guest to load; the one it lacks is the guest's to pull.
    archive = share / "images" / archive_name(IMAGE)
    assert os.listdir(share / "images") == [archive.name]
    assert image_archive.read_archive(str(archive), "archive").id == podman_id(IMAGE)

    # The guest reads its config from the share and tells the VMM's host API, at 10.0.2.2.
    deadline = time.monotonic() + BOOT_TIMEOUT
    events = []
    while time.monotonic() < deadline:
        events = _vmm(ports, "GetInfo", {"id": vm["id"]})["info"]["events"]
        if any(e["event"] == "boot.progress" and e["body"].startswith("read-config") for e in events):
            break
        time.sleep(1)
    else:
        pytest.fail(f"the guest never told the VMM read-config (events {events}); serial console:\n"
                    f"{tail(str(run_dir / 'serial.log'))}")

    # site.yml again changes nothing: the run path the VMM opened to QEMU's group is the role's.
    again = run_playbook(ROOT / "playbooks" / "site.yml", *extra)
    assert again.returncode == 0 and _recap(again.stdout)["changed"] == 0, again.stdout[-4000:]
