"""make demo's path with `dstack_vmm_backend: libvirt` (issue 17, "Done when" point 3): site.yml runs
the KMS, the demo's ACME CA and DNS server (Pebble, BIND9), the gateway (its wildcard certificate
from them) and a VMM on the libvirt backend (qemu:///system, domain type qemu: TCG, as
test_guest_vm_boot explains) with the guest image in `dstack_vmm_image_path`; deploy-app.yml gives
a sample app (examples/hello without its host port: libvirt 9.0 has no passt to forward it) to it
with `dstack_app_image` and `dstack_app_no_tee`, and waits as it always does: the VM boots the guest
image, gets its keys from the KMS, loads the app's image from its config share, registers with the
gateway over WireGuard, and the deploy's own dstack.tee.verify_app checks the Worker's quote through
the gateway.

What the VMM made is checked where it is: the domain (libvirt's XML: the image's kernel, no
launchSecurity, the config share, the quote channel), the share's .sys-config.json (the KMS, the
gateway and the host API at 10.0.2.2, where the VM reaches the host's loopback) and images/*.tar
(the compose's image the host has). Then from outside, as anyone with the URL: the app's page
through the gateway (https://<app-id>.<base>:<port>/ under the gateway's CA, the demo's Pebble
root), and the Worker's quote over a fresh nonce through the gateway, verified with dstack-verify
under the simulated platform, naming the image's os_image_hash (its digest.txt, which the deploy
pins with dstack_app_os_image_hash and checks against the VMM's ListImages), the app's compose_hash and app_id. Without the
gateway the deploy is refused before the CVM is touched (nothing could check a libvirt VM's quote),
and site.yml again changes nothing.

Needs root, /dev/kvm, libvirt and QEMU (fails naming what is missing, as test_guest_vm_boot does),
podman, and the guest image (its build cache; one to two minutes when it has to be built).
"""

import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from ansible_collections.dstack.tee.agents.vmm.backends.libvirt import archive_name
from ansible_collections.dstack.tee.plugins.module_utils import image_archive, wireguard
from ansible_collections.dstack.tee.plugins.module_utils import libvirt_conn as lv
from conftest import ROOT, free_port, needs_podman, run_playbook
from dns_fixtures import free_port as free_tcp_udp_port
from libvirt_fixtures import system_libvirt  # noqa: F401  pylint: disable=unused-import
from test_demo_playbook import BASE, BIN, HELLO, TOKEN, _free_udp_port, _https_get, _recap, _teardown, _vmm
from test_guest_vm_boot import guest_image, libvirt_uri, tail  # noqa: F401  pylint: disable=unused-import
from test_libvirt_vmm import podman_id

HELLO_IMAGE = "localhost/dstack-hello:latest"
# The deploy's wait for the boot: TCG on two shared cores boots to the app in about two minutes on an
# idle machine, three to four times that beside another VM test and the rest of the suite (CI runs
# them at once); the playbook's own time limit leaves room for the steps around the wait.
DEPLOY_WAIT = 600
# examples/hello's app.yml without its port mapping (libvirt forwards ports only through passt).
APP_YML = """name: lv-hello
allowed_envs: [GREETING, API_TOKEN]
public_logs: true
gateway_enabled: true
"""


@pytest.fixture
def deploy_root(guest_image, libvirt_uri):  # noqa: F811  pylint: disable=redefined-outer-name
    """A root for site.yml (its own ports, interface and namespace names), the guest image in its
    images folder, the sample app; afterwards the VM, the services and the namespaces are gone."""
    root = Path(tempfile.mkdtemp(prefix="ld-", dir="/tmp"))
    os.chmod(root, 0o755)   # QEMU (libvirt-qemu) passes through to the VMM's run path
    (root / "images").mkdir(mode=0o755)
    os.symlink(guest_image, root / "images" / "guest")
    app = root / "lv-hello"
    shutil.copytree(ROOT / "examples" / "hello", app)
    (app / "app.yml").write_text(APP_YML)
    ports = {"kms": free_port(), "vmm": free_port(), "rpc": free_port(), "admin": free_port(), "proxy": free_port(),
             "wg": _free_udp_port(), "acme": free_port(), "acme_management": free_port(), "dns": free_tcp_udp_port()}
    netns = f"dstack-test-lgw-{os.getpid()}"
    extra = ["-e", json.dumps({
        "dstack_root": str(root), "dstack_kms_listen": f"127.0.0.1:{ports['kms']}",
        "dstack_kms_url": f"https://127.0.0.1:{ports['kms']}", "dstack_vmm_listen": f"127.0.0.1:{ports['vmm']}",
        "dstack_vmm_url": f"http://127.0.0.1:{ports['vmm']}", "dstack_vmm_tokens": [TOKEN],
        "dstack_vmm_backend": "libvirt", "dstack_vmm_image_path": str(root / "images"),
        "dstack_vmm_libvirt_domain_type": "qemu",
        "dstack_gateway_rpc_listen": f"0.0.0.0:{ports['rpc']}", "dstack_gateway_admin_listen": f"127.0.0.1:{ports['admin']}",
        "dstack_gateway_proxy_listen_addr": "127.0.0.1", "dstack_gateway_proxy_listen_port": ports["proxy"],
        "dstack_gateway_wg_listen_port": ports["wg"], "dstack_gateway_wg_interface": f"ldg{os.getpid() % 100000}",
        "dstack_gateway_wg_netns": netns,
        "dstack_acme_lab_pebble_listen": f"127.0.0.1:{ports['acme']}",
        "dstack_acme_lab_pebble_management_listen": f"127.0.0.1:{ports['acme_management']}",
        "dstack_acme_lab_dns_listen": f"127.0.0.1:{ports['dns']}"})]
    try:
        yield root, app, ports, extra, libvirt_uri
    finally:
        _teardown(root, ports)
        _remove_domains(libvirt_uri, root)
        wireguard.netns_remove(netns)
        shutil.rmtree(root, ignore_errors=True)


def _remove_domains(uri, root):
    """The VMs of this root the VMM did not remove (it failed, or never answered)."""
    conn = lv.connect(uri)
    try:
        for vm_dir in (root / "run").glob("*-*-*-*-*"):
            dom = lv.lookup(conn, "dstack-" + vm_dir.name)
            if dom is not None:
                lv.remove(dom)
    finally:
        conn.close()


def _attest(port, host, cafile, nonce):
    """Worker.Attest over `nonce` through the gateway's data plane: the answer's JSON."""
    body = json.dumps({"nonce": nonce.hex()}).encode()
    context = ssl.create_default_context(cafile=cafile)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, \
            context.wrap_socket(raw, server_hostname=host) as conn:
        conn.sendall(f"POST /prpc/Worker.Attest HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        answer = b"".join(iter(lambda: conn.recv(65536), b""))
    head, _sep, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer[:500]
    return json.loads(payload)


@needs_podman
def test_an_app_deployed_to_a_libvirt_vm_answers_through_the_gateway_with_a_quote_naming_the_image(deploy_root):
    root, app, ports, extra, uri = deploy_root
    started = time.monotonic()
    built = subprocess.run([str(ROOT / "examples" / "hello" / "image" / "build.sh"), HELLO_IMAGE], capture_output=True,
                           text=True, timeout=300, check=False)
    assert built.returncode == 0, built.stdout + built.stderr
    site = run_playbook(ROOT / "playbooks" / "site.yml", *extra)
    assert site.returncode == 0, site.stdout[-4000:] + site.stderr[-2000:]
    digest = (root / "images" / "guest" / "digest.txt").read_text().strip()
    site_took = time.monotonic() - started
    # The deploy waits for the boot and checks the app through the gateway (its verify_app).
    deploy = run_playbook(ROOT / "playbooks" / "deploy-app.yml", *extra, "-e", f"app_dir={app}", "-e",
                          json.dumps({"dstack_app_image": "guest", "dstack_app_no_tee": True, "dstack_app_os_image_hash": digest,
                                      "dstack_app_wait_timeout": DEPLOY_WAIT}), timeout=DEPLOY_WAIT + 300)
    vms = _vmm(ports, "Status")["vms"]
    assert [vm["name"] for vm in vms] == ["lv-hello"], deploy.stdout[-4000:] + deploy.stderr[-2000:]
    vm = _vmm(ports, "GetInfo", {"id": vms[0]["id"]})["info"]
    run_dir = root / "run" / vm["id"]
    assert deploy.returncode == 0, (deploy.stdout[-5000:] + deploy.stderr[-2000:] + "\nserial console:\n"
                                    + tail(str(run_dir / "serial.log"), 80))
    deploy_took = time.monotonic() - started - site_took
    assert (vm["configuration"]["image"], vm["configuration"]["no_tee"]) == ("guest", True)
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
    assert sys_config["gateway_urls"] == [f"https://10.0.2.2:{ports['rpc']}"]
    assert sys_config["host_api_url"].startswith(f"http://10.0.2.2:{ports['vmm']}/host-api/{vm['id']}/")
    assert json.loads(sys_config["vm_config"])["os_image_hash"] == digest
    # The deploy allowed that image at the KMS (the VMM's ListImages named its digest.txt).
    assert "0x" + digest in json.loads((root / "kms" / "auth-config.json").read_text())["osImages"]
    # The compose's image the host has, for the guest to load.
    archive = share / "images" / archive_name(HELLO_IMAGE)
    assert os.listdir(share / "images") == [archive.name]
    assert image_archive.read_archive(str(archive), "archive").id == podman_id(HELLO_IMAGE)

    # The deploy's summary: checked through the gateway.
    compose_hash = hashlib.sha256((root / "build" / "lv-hello" / "app-compose.json").read_bytes()).hexdigest()
    app_id = compose_hash[:40]
    url = f"https://{app_id}.{BASE}:{ports['proxy']}/"
    assert f"url:            {url}" in deploy.stdout and "via the gateway: answered; checked from outside" in deploy.stdout, \
        deploy.stdout[-3000:]

    # From outside: the page through the gateway, under the gateway's CA (the demo's Pebble root).
    gateway_ca = str(root / "gateway" / "tls" / "ca.crt")
    page = _https_get(ports["proxy"], f"{app_id}.{BASE}", gateway_ca)
    assert page.startswith("HTTP/1.1 200") and HELLO in page and "App key fingerprint" in page and "(no key" not in page, \
        page[:600]
    # The Worker's quote over a fresh nonce, through the gateway: dstack-verify under the simulated
    # platform, report_data SHA-512("dstack.tee-worker-attest:" || nonce), the event log replayed.
    nonce = os.urandom(32)
    answer = _attest(ports["proxy"], f"{app_id}-8090.{BASE}", gateway_ca, nonce)
    (root / "worker-quote.json").write_text(json.dumps(answer))
    event_log = answer["event_log"]   # JSON text, as dstack's GetQuote gives it
    (root / "event-log.json").write_text(event_log if isinstance(event_log, str) else json.dumps(event_log))
    report_data = hashlib.sha512(b"dstack.tee-worker-attest:" + nonce).hexdigest()
    verify = subprocess.run([str(BIN / "dstack-verify"), str(root / "worker-quote.json"), "--sim-state",
                             str(root / "kms" / "tdx-sim"), "--event-log", str(root / "event-log.json"),
                             "--require-event-log", "--report-data", report_data],
                            capture_output=True, text=True, timeout=120, check=False)
    assert verify.returncode == 0, verify.stdout[-3000:] + verify.stderr[-2000:]
    boot_info = json.loads(verify.stdout)["boot_info"]
    assert (boot_info["os_image_hash"], boot_info["compose_hash"], boot_info["app_id"]) == (digest, compose_hash, app_id), \
        verify.stdout[-3000:]
    print(f"site.yml {site_took:.0f} s, deploy-app.yml (boot, gateway, verify_app) {deploy_took:.0f} s; "
          f"dstack-verify's boot info: {boot_info}")

    # Without the gateway nothing could check a libvirt VM's quote (it has no socket on the host):
    # the deploy is refused, saying so, before the CVM is touched.
    refused = run_playbook(ROOT / "playbooks" / "deploy-app.yml", *extra, "-e", f"app_dir={app}", "-e",
                           json.dumps({"dstack_app_image": "guest", "dstack_app_no_tee": True, "dstack_app_os_image_hash": digest,
                                       "dstack_gateway_enabled": False}))
    assert refused.returncode != 0 and "whose quote is checked through the gateway only" in refused.stdout, \
        refused.stdout[-3000:]
    after = _vmm(ports, "GetInfo", {"id": vm["id"]})["info"]
    assert (after["status"], after["configuration"]) == ("running", vm["configuration"]), after
    # The image's hash is the deployer's pin, never the host's word: a pin the VMM's image does not
    # match is refused before anything is changed (the KMS allowlist, the CVM), naming both.
    wrong = "ab" * 32
    refused = run_playbook(ROOT / "playbooks" / "deploy-app.yml", *extra, "-e", f"app_dir={app}", "-e",
                           json.dumps({"dstack_app_image": "guest", "dstack_app_no_tee": True, "dstack_app_os_image_hash": wrong}))
    said = " ".join(refused.stdout.split())
    assert refused.returncode != 0 and (f"os_image_hash: is {wrong}, but the VMM on localhost boots the image "
                                        f"guest with os_image_hash {digest}") in said, refused.stdout[-3000:]
    assert "-e dstack_app_os_image_hash=HASH" in said, refused.stdout[-3000:]
    after = _vmm(ports, "GetInfo", {"id": vm["id"]})["info"]
    assert (after["status"], after["configuration"]) == ("running", vm["configuration"]), after
    assert "0x" + wrong not in json.loads((root / "kms" / "auth-config.json").read_text())["osImages"]

    # site.yml again changes nothing: the run path the VMM opened to QEMU's group is the role's.
    again = run_playbook(ROOT / "playbooks" / "site.yml", *extra)
    assert again.returncode == 0 and _recap(again.stdout)["changed"] == 0, again.stdout[-4000:]
