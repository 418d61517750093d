"""The guest image boots in a real VM to its guest agent: scripts/build-guest-image.sh's image, under
libvirt's QEMU (qemu:///system) with the no_tee domain XML of plugins/module_utils/libvirt_domain.py,
as the libvirt backend renders it (rootfs disk vda, data disk vdb, the config share, user
networking, the org.dstack.quote channel, the serial console logged to a file).

The serial console shows each stage, and the test checks them in order: the kernel, the initramfs
opening the rootfs through dm-verity (local-top/dstack-verity), dstack-init as PID 1 mounting the
config share and the data disk (formatting the blank one) and bringing up eth0, the guest agent
started. The agent's first boot step is seen from the host: it reads .sys-config.json from the
share and reports `read-config` to the host API it names (http://10.0.2.2:PORT, QEMU's address of
the host), which proves the share, the network and the agent together. The app's image exists
nowhere, so the boot then fails at its containers (after the steps before them, the measurements
through the quote channel among them): dstack-init powers the VM off, and the next power-on mounts
the data disk without formatting it. A boot with a wrong root hash on the cmdline stops in the
initramfs: the rootfs is never mounted, the VM powers off. About 90 s with the image cached.

An app then boots in a VM with its keys from a real KMS on the host, its image from the config
share, its container running, and answers through a real `dstack-gateway serve` on the host over
the VM's WireGuard tunnel, with a quote naming the image's os_image_hash
(test_an_app_boots_in_the_vm_with_keys_from_the_kms; about 65 s more, the section's comment says how).

The domain's type is 'qemu' (TCG), not 'kvm': /dev/kvm on these machines is PVM, which runs a stock
Debian kernel through KVM's instruction emulator, far too slowly to boot (README, machine notes);
TCG boots it in seconds. /dev/kvm is still required: where it is missing the test fails naming it
(issue 17: a VM test must not pass on a host that cannot run VMs), as it fails without root (the
build) or the Debian mirror. The image comes from the build script's cache
(/var/cache/dstack-guest-image) when its inputs are unchanged (test_guest_image builds the same
inputs), else it is built (one to two minutes).
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from ansible_collections.dstack.tee.plugins.module_utils import app_compose as ac
from ansible_collections.dstack.tee.plugins.module_utils import libvirt_conn as lv
from ansible_collections.dstack.tee.plugins.module_utils import libvirt_domain as ld
from ansible_collections.dstack.tee.plugins.module_utils import attestation, quote_channel, tdx_sim, wireguard
from conftest import IMAGE, ROOT, eventually, free_port, needs_podman, run_module
from test_gateway_client import GATEWAY_COMPOSE, GuestTlsKey, _boot
from test_gateway_control import ADMIN_TOKEN
from test_gateway_serve import BASE, Network, _gateway_toml, _kill_everything_in, _remove_socket, _write_certs
from test_guest_boot import OS_IMAGE, SECRETS, HostApi, make_share
from test_kms_server import KmsProcess
from libvirt_fixtures import LIBVIRTD, VIRTLOGD, host_dir, system_libvirt  # noqa: F401  pylint: disable=unused-import

BOOT_TIMEOUT = 240   # TCG on two shared cores: about 30 s when the machine is idle
HOST_TOKEN = "0123456789abcdef"
# The boot stops before its containers (no image in the VM, no registry asked before that step).
COMPOSE = "services:\n  web:\n    image: localhost/dstack-test-absent:latest\n"


def fail_unless_the_host_can_run_vms():
    if not os.path.exists("/dev/kvm"):
        pytest.fail("/dev/kvm is missing: this host cannot run VMs, so the guest image's boot cannot be tested "
                    "(the VM runs with TCG here only because this /dev/kvm is PVM)")
    if os.geteuid() != 0:
        pytest.fail("the guest image's build and libvirt's qemu:///system need root; run the tests as root")
    for exe in (VIRTLOGD, LIBVIRTD, shutil.which("qemu-img")):
        if not exe or not os.access(exe, os.X_OK):
            pytest.fail(f"{exe or 'qemu-img'} is not installed (scripts/setup.sh --test installs libvirt and QEMU)")


@pytest.fixture(scope="module")
def guest_image():
    """The image folder (a copy libvirt's qemu user can read), from the build script's cache."""
    fail_unless_the_host_can_run_vms()
    folder = tempfile.mkdtemp(prefix="dstack-tee-guest-image-", dir="/var/tmp")
    os.chmod(folder, 0o755)
    image = os.path.join(folder, "image")
    proc = subprocess.run([str(ROOT / "scripts" / "build-guest-image.sh"), "--out", image], capture_output=True,
                          text=True, timeout=1200, check=False)
    if proc.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.fail(f"build-guest-image.sh failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    yield image
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def libvirt_uri(request):
    fail_unless_the_host_can_run_vms()   # before system_libvirt, which would skip instead
    return request.getfixturevalue("system_libvirt")


def told(host, event, prefix=""):
    """The payloads of the `event` events the host API was told that start with `prefix`."""
    return [payload for name, payload in host.events if name == event and payload.startswith(prefix)]


@pytest.fixture
def host_api():
    """The VMM's host API (test_guest_boot's recorder) on 127.0.0.1, which the guest reaches at 10.0.2.2."""
    api = HostApi()
    yield api
    api.close()


def make_vm_folder(folder, image, host_api_port):
    """The VM's run folder as the VMM lays it out: the config share, an empty data disk, the logs."""
    share = os.path.join(folder, "shared")
    os.makedirs(share)
    app = ac.build(COMPOSE, "boot-test", key_provider="none")
    with open(os.path.join(share, "app-compose.json"), "wb") as out:
        out.write(ac.render(app))
    os_image_hash = open(os.path.join(image, "digest.txt"), encoding="ascii").read().strip()
    vm_config = {"os_image_hash": os_image_hash, "cpu_count": 1, "memory_size": 1024 << 20, "image": "guest-image",
                 "spec_version": 1}
    sys_config = {"kms_urls": [], "gateway_urls": [], "pccs_url": "", "docker_registry": "",
                  "host_api_url": f"http://10.0.2.2:{host_api_port}/host-api/boot-test/{HOST_TOKEN}",
                  "vm_config": json.dumps(vm_config, sort_keys=True)}
    with open(os.path.join(share, ".sys-config.json"), "w", encoding="utf-8") as out:
        json.dump(sys_config, out, indent=2)
    for path in (folder, share, *(os.path.join(share, name) for name in os.listdir(share))):
        os.chmod(path, 0o755 if os.path.isdir(path) else 0o644)   # QEMU runs as libvirt-qemu
    disk = os.path.join(folder, "hda.img")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", disk, "1G"], check=True)
    return share, disk, sys_config["vm_config"]


def domain_spec(name, image, folder, share, disk, cmdline=None, quote_socket=None):
    meta = json.load(open(os.path.join(image, "metadata.json"), encoding="utf-8"))
    return ld.DomainSpec(
        name=name, kernel=os.path.join(image, meta["kernel"]), initrd=os.path.join(image, meta["initrd"]),
        ovmf=os.path.join(image, meta["bios"]), cmdline=cmdline or meta["cmdline"],
        rootfs=os.path.join(image, meta["rootfs"]), data_disk=disk, shared_dir=share, mac=ld.mac_for(name),
        serial_log=os.path.join(folder, "serial.log"), quote_channel=quote_socket, no_tee=True,
        domain_type="qemu", vcpu=1, memory_mb=1024)


def read_log(path, offset=0):
    try:
        with open(path, "rb") as log:
            log.seek(offset)
            return log.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def wait_until(done, serial_log, offset=0, timeout=BOOT_TIMEOUT):
    """Poll until done(serial log text from offset) is true; False after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done(read_log(serial_log, offset)):
            return True
        time.sleep(0.5)
    return False


def wait_for_power_off(dom, timeout=60):
    deadline = time.monotonic() + timeout
    while lv.is_active(dom) and time.monotonic() < deadline:
        time.sleep(0.5)
    return not lv.is_active(dom)


def in_order(text, *markers):
    """Each marker found after the one before it; the first one missing is named."""
    pos = 0
    for marker in markers:
        found = text.find(marker, pos)
        assert found >= 0, f"{marker!r} is not on the serial console (after the previous stage)"
        pos = found + len(marker)


def tail(serial_log, lines=60):
    return "\n".join(read_log(serial_log).splitlines()[-lines:])


def domain_name():
    return "dstack-tee-boot-" + uuid.uuid4().hex[:8]


@contextlib.contextmanager
def running_domain(libvirt_uri, spec):
    """The domain of `spec`, defined and started; on a failure inside, the console's last lines are
    printed; afterwards the domain is removed."""
    conn = lv.connect(libvirt_uri)
    dom = None
    try:
        dom = lv.define(conn, ld.render_domain_xml(spec))
        lv.start(dom)
        yield dom
    except BaseException:
        print(f"---- serial console ({spec.serial_log}), last lines:\n{tail(spec.serial_log)}")
        raise
    finally:
        if dom is not None:
            lv.remove(dom)
        conn.close()


def test_the_image_boots_through_verity_and_dstack_init_to_the_guest_agent(guest_image, libvirt_uri, host_api, host_dir):
    share, disk, vm_config = make_vm_folder(host_dir, guest_image, host_api.server.server_port)
    quote_socket = os.path.join(host_dir, "quote.sock")
    sim = tdx_sim.SimTdx(os.path.join(host_dir, "tdx-sim"))
    quotes = quote_channel.QuoteChannelServer(
        quote_socket, quote_channel.QuoteService(sim, tdx_sim.launch_measurements(vm_config))).start()
    spec = domain_spec(domain_name(), guest_image, host_dir, share, disk, quote_socket=quote_socket)
    serial = spec.serial_log
    meta = json.load(open(os.path.join(guest_image, "metadata.json"), encoding="utf-8"))
    started = time.monotonic()
    with contextlib.closing(quotes), running_domain(libvirt_uri, spec) as dom:
        # Until the host is told read-config, or the console shows a stop (a failed agent has told
        # the host all it had before it exits: a failed boot waits for that).
        reached = wait_until(lambda text: told(host_api, "boot.progress", "read-config") or "FATAL" in text
                             or "the guest agent exited" in text, serial)
        first_step = time.monotonic() - started
        text = read_log(serial)
        assert reached and "FATAL" not in text, f"no boot to the agent's first step in {first_step:.0f} s"
        in_order(text,
                 "Linux version 6.12",
                 f"dstack-verity: /dev/vda verified: /dev/mapper/dstack-root (root hash {meta['rootfs_hash']}",
                 "dstack-init: ", "starting (kernel 6.12",
                 "/var and /etc/cni/net.d writable (overlays on tmpfs)",
                 "config share host-shared mounted read-only at /dstack/share: .sys-config.json app-compose.json",
                 "data disk /dev/vdb is blank: making ext4",
                 "data disk /dev/vdb (ext4) mounted at /dstack/data; /var/lib/containers on it",
                 "network: eth0 10.0.2.15/24, gateway 10.0.2.2, DNS 10.0.2.3",
                 "starting the guest agent: dstack-guest-agent run --tee auto --config-dir /dstack/share "
                 "--work-dir /run/dstack --socket /var/run/dstack.sock --tappd-socket ''")
        # The agent's first step, told over the network to the host API the share names.
        assert set(host_api.paths) == {f"/host-api/boot-test/{HOST_TOKEN}/Notify"}
        app_hash = ac.compose_hash(open(os.path.join(share, "app-compose.json"), "rb").read())
        assert told(host_api, "boot.progress", "read-config") == [f"read-config: app 'boot-test', compose_hash {app_hash}"]

        # The app's image is nowhere: the boot fails at its containers (podman and podman-compose
        # ran), after it was measured, so the agent's exit powers the VM off, the host told why.
        # The wait is the boot's: the containers step waits for the agent's socket API (its child
        # process's Flask and gunicorn start, 20-40 s of the guest's TCG CPU here), podman's pull of
        # the absent image is refused at once (localhost:443; three retries 1 s apart, idle), then
        # the failed boot's `podman-compose down` (measured with the qemu process's CPU time).
        assert wait_for_power_off(dom, BOOT_TIMEOUT), f"the VM still runs {time.monotonic() - started:.0f} s after its start"
        powered_off = time.monotonic() - started
        in_order(read_log(serial), "[agent] boot failed at containers: ",
                 "dstack-init: ", "the guest agent exited with status 2 after its boot was measured; "
                 "it cannot boot again before the next power-on: powering off")
        assert [error.split(":", 1)[0] for error in told(host_api, "boot.error")] == ["containers"]

        # A new power-on: the data disk is ext4 now, mounted as it is.
        offset = os.path.getsize(serial)
        lv.start(dom)
        assert wait_until(lambda text: "starting the guest agent" in text or "FATAL" in text, serial, offset), \
            "the second power-on did not get to the guest agent"
        again = read_log(serial, offset)
        assert "data disk /dev/vdb (ext4) mounted at /dstack/data" in again and "is blank" not in again
        print(f"the agent's first step {first_step:.1f} s after the start, powered off after {powered_off:.1f} s; "
              "the host was told:")
        for event, payload in host_api.events:
            print(f"  {event}: {payload[:160]}")


def test_a_rootfs_that_does_not_verify_is_never_mounted(guest_image, libvirt_uri, host_dir):
    share, disk, _vm_config = make_vm_folder(host_dir, guest_image, 9)
    meta = json.load(open(os.path.join(guest_image, "metadata.json"), encoding="utf-8"))
    wrong = "%064x" % (int(meta["rootfs_hash"], 16) ^ 1)
    spec = domain_spec(domain_name(), guest_image, host_dir, share, disk,
                       cmdline=meta["cmdline"].replace(meta["rootfs_hash"], wrong))
    serial = spec.serial_log
    with running_domain(libvirt_uri, spec) as dom:
        assert wait_until(lambda text: "dstack-verity: FATAL" in text, serial), "the initramfs did not refuse the rootfs"
        assert wait_for_power_off(dom, 30), "the VM did not power off after the rootfs failed to verify"
        text = read_log(serial)
        assert f"dstack-verity: FATAL: /dev/vda does not verify against root hash {wrong}" in text
        assert "dstack-verity: /dev/vda verified" not in text and "dstack-init:" not in text


# ---- an app in the VM, with its keys from a real KMS, answering through a real gateway -----------
#
# An app runs in the guest image's VM, with its keys from a real KMS on the host, and answers through
# a real gateway on the host: the whole boot the process backend runs (test_guest_boot, test_gateway_cvm),
# inside a VM under libvirt (TCG, as above).
#
# The host side, as the VMM and the operator make it:
# - `dstack-kms serve --simulated` on 127.0.0.1 (QEMU's user networking takes the guest's 10.0.2.2 to
#   the host's loopback), its RPC certificate naming 10.0.2.2 (kms.toml's domain), allowing the image's
#   os_image_hash and the app's compose hash; the VM's quotes come from the KMS's simulated platform
#   over the org.dstack.quote channel (the quote service the libvirt backend runs);
# - `dstack-gateway serve` (HostGateway): control, Admin and proxy on 127.0.0.1, WireGuard UDP on the
#   host's network with the endpoint 10.0.2.2:PORT (the gateway role's default for libvirt), its tunnel
#   link in a namespace of its own; its RA-TLS certificate the gateway app's, from a CVM booted against
#   the same KMS, whose allowlist names it gatewayAppId;
# - the config share: app-compose.json (key_provider kms, gateway_enabled), .encrypted-env sealed to the
#   app's env key from that KMS, .sys-config.json naming the KMS (https://10.0.2.2:PORT and its root CA),
#   the gateway (https://10.0.2.2:PORT) and the host API, and images/app.tar, the compose's image saved with `podman save --format docker-archive`
#   (no registry is reachable from the VM: the image exists only there).
#
# One boot serves every assertion: the agent measures, gets its keys from the KMS (the KMS's audit log
# has the release), decrypts the env, loads the image, starts the container with podman in the VM; the
# container POSTs to the host API over the VM's network (through podman's bridge and the VM's NAT) with
# a value of the encrypted env, which proves it runs with its keys' env. The gateway step registers
# (RA-TLS both ways: the VM checks the gateway's quote under the host's simulated platform, the quote
# channel's `platform`), brings its wireguard-go interface up in the VM (run --own-network) and the app
# answers through the gateway: https://<app-id>.<base> (SNI, the gateway's wildcard certificate) reaches
# the container's published port 80 in the VM over the tunnel (QEMU's user networking carries its UDP to
# the host's loopback), and https://<app-id>-8090.<base> the agent's Worker API, whose Attest quote
# verifies and names the image's os_image_hash (digest.txt). libvirt 9.0 here has no passt, so no QEMU
# port forward: the gateway is the app's way in, as in dstack.
# About 65 s (the boot to the app about 60 s; the gateway adds a second or two: its first request is
# answered at once, the tunnel up while the containers start).
GUEST_HOST = "10.0.2.2"   # the host's loopback, as QEMU's user networking shows it to the guest
APP_HOST_TOKEN = "fedcba9876543210"
# The container tells the host it runs, with a value only the env the KMS's key decrypts holds.
APP_COMPOSE = """services:
  web:
    image: {image}
    command:
      - /bin/sh
      - -c
      - >-
        for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
        busybox wget -q -O /dev/null --header 'Content-Type: application/json'
        --post-data "{{\\"event\\": \\"app.hello\\", \\"payload\\": \\"$$GREETING\\"}}" {host_api}/App && break;
        sleep 1; done; echo told the host; mkdir -p /w; echo app-says-$$GREETING > /w/index.html;
        exec httpd -f -p 80 -h /w
    environment:
      GREETING: ${{GREETING}}
    ports:
      - "80:80"
"""


def kms_config(folder):
    path = Path(folder) / "kms.toml"
    path.write_text(f'domain = "{GUEST_HOST}"\n')
    return str(path)


def save_image(image, dest, conf_dir):
    """`podman save --format docker-archive` of the host's image, as the VMM puts it in the share."""
    from conftest import _containers_conf  # pylint: disable=import-outside-toplevel
    env = dict(os.environ, CONTAINERS_CONF=str(_containers_conf(conf_dir)))
    subprocess.run(["podman", "save", "-q", "--format", "docker-archive", "-o", dest, image], check=True,
                   capture_output=True, env=env, timeout=120)
    os.chmod(dest, 0o644)


class HostGateway:
    """`dstack-gateway serve` on the host, as the gateway role runs it beside a libvirt VMM: its
    control API, Admin API and proxy on 127.0.0.1 (the VM reaches the control API at 10.0.2.2), its
    WireGuard UDP socket on the host's network (the endpoint it gives the CVMs is 10.0.2.2:PORT, as
    the role's default for libvirt), its tunnel link in a namespace of its own ([core.wg] netns), so
    the CVMs' tunnel addresses are reachable only from the proxy. Its RA-TLS certificate is the
    gateway app's, from a CVM booted against the same KMS (the KMS's gatewayAppId)."""

    def __init__(self, folder, kms, sim):
        self.folder = folder
        folder.mkdir()
        self.rpc_port, self.admin_port, self.proxy_port, self.wg_port = (free_port() for _port in range(4))
        pid = os.getpid()
        self.interface, self.netns = f"wgv{pid}", f"gwv-{pid}"
        self.server_ca = _write_certs(folder, ["127.0.0.1"])   # the proxy's wildcard certificate's CA
        self.config = _gateway_toml(
            folder, sim, kms.state_dir, Network(1),
            **{"core.wg": {"interface": self.interface, "netns": self.netns, "listen_port": self.wg_port,
                           "endpoint": f"{GUEST_HOST}:{self.wg_port}"},
               "core.proxy": {"listen_addr": "127.0.0.1", "listen_port": self.proxy_port},
               "rpc": {"listen": f"127.0.0.1:{self.rpc_port}"},
               "admin": {"listen": f"127.0.0.1:{self.admin_port}"}})
        self.log_path = folder / "serve.log"
        self.proc = None

    def use_certificate(self, answer):
        (self.folder / "rpc.crt").write_text("".join(answer["certificate_chain"][:2]))
        (self.folder / "rpc.key").write_text(answer["key"])
        (self.folder / "rpc.key").chmod(0o600)

    @property
    def log(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout=30):
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
                [sys.executable, "-m", "ansible_collections.dstack.tee.agents.gateway.cli", "serve",
                 "--config", str(self.config)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        deadline = time.monotonic() + timeout
        while " ready: " not in self.log:
            assert self.proc.poll() is None, f"serve exited with {self.proc.returncode}:\n{self.log[-6000:]}"
            assert time.monotonic() < deadline, f"serve did not get ready in {timeout} s:\n{self.log[-6000:]}"
            time.sleep(0.1)

    def stop(self, timeout=20):
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def remove(self):
        """Whatever is left, even after a failure: the process group, the link's namespace, its socket."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if wireguard.netns_exists(self.netns):
            _kill_everything_in(self.netns)
            wireguard.netns_remove(self.netns)
        _remove_socket(self.interface)

    def request(self, server_name, request, timeout=10.0):
        """One request through the proxy, by SNI, the wildcard certificate checked: (status, body)."""
        context = ssl.create_default_context(cafile=str(self.server_ca))
        with socket.create_connection(("127.0.0.1", self.proxy_port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=server_name) as conn:
                conn.sendall(request)
                data = b""
                while True:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
        head, _sep, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1."), data[:300]
        return int(head.split()[1]), body

    def get(self, server_name):
        return self.request(server_name, f"GET / HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n".encode())

    def post(self, server_name, path, params):
        body = json.dumps(params).encode()
        return self.request(server_name, f"POST {path} HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n"
                                         f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                                         .encode() + body)

    def registered(self, kms_root):
        """Admin.Status's hosts (the gateway's RA-TLS certificate, checked against the KMS root)."""
        import urllib.request  # pylint: disable=import-outside-toplevel
        context = ssl.create_default_context(cafile=str(kms_root))
        context.check_hostname = False   # an RA-TLS certificate names no address
        request = urllib.request.Request(f"https://127.0.0.1:{self.admin_port}/prpc/Admin.Status", data=b"{}",
                                         method="POST", headers={"Content-Type": "application/json",
                                                                 "Authorization": f"Bearer {ADMIN_TOKEN}"})
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return {h["instance_id"]: h["ip"] for h in json.loads(response.read())["hosts"]}


@needs_podman
def test_an_app_boots_in_the_vm_with_keys_from_the_kms(guest_image, libvirt_uri, host_dir, module, busybox_image):
    """The whole boot with a real KMS, the image from the share, the container running, and the app
    answering through a real gateway (see the comment above)."""
    folder = Path(host_dir)
    os_image_hash = (Path(guest_image) / "digest.txt").read_text().strip()
    host_api = HostApi()
    kms = KmsProcess(folder / "kms", free_port(), "--config", kms_config(folder),
                     "--auth-config", str(folder / "auth-config.json"))
    (folder / "auth-config.json").write_text(json.dumps({"osImages": [], "apps": {}}))
    gateway = None
    try:
        kms.start()
        sim = tdx_sim.SimTdx(str(kms.state_dir / "tdx-sim"))
        host_url = f"http://{GUEST_HOST}:{host_api.server.server_port}/host-api/app-test/{APP_HOST_TOKEN}"
        share, app = make_share(folder, module, kms.client(),
                                compose=APP_COMPOSE.format(image=IMAGE, host_api=host_url))
        gateway = HostGateway(folder / "gateway", kms, sim)
        _finish_share(share, app, kms, host_url, os_image_hash, folder, busybox_image, gateway)
        gateway.start()
        _boot_and_check(libvirt_uri, share, app, kms, host_api, guest_image, folder, gateway, sim, os_image_hash)
        assert gateway.stop() == 0, gateway.log[-6000:]
    finally:
        if gateway is not None:
            gateway.remove()
        kms_output = kms.stop()
        host_api.close()
    assert "Traceback" not in kms_output, kms_output[-3000:]
    assert "Traceback" not in gateway.log, gateway.log[-6000:]


def _gateway_app(folder, kms):
    """The gateway app's share and app (the caller allows it and names it gatewayAppId)."""
    (folder / "g").mkdir()
    return make_share(folder / "g", run_module, kms.client(), compose=GATEWAY_COMPOSE)


def _finish_share(share, app, kms, host_url, os_image_hash, folder, image, gateway):
    share_g, app_g = _gateway_app(folder, kms)
    (folder / "auth-config.json").write_text(json.dumps({
        "gatewayAppId": app_g["app_id"], "osImages": ["0x" + os_image_hash, "0x" + OS_IMAGE],
        "apps": {"0x" + a["app_id"]: {"composeHashes": ["0x" + a["compose_hash"]], "allowAnyDevice": True}
                 for a in (app, app_g)}}))
    # The gateway app's RA-TLS server certificate, from its CVM (the KMS signs it).
    gateway_cvm = _boot(folder, "g1", share_g, tdx_sim.SimTdx(str(kms.state_dir / "tdx-sim")), kms.client())
    gateway.use_certificate(GuestTlsKey(gateway_cvm)({"subject": "gateway.test", "usage_ra_tls": True,
                                                      "usage_server_auth": True}))
    vm_config = {"os_image_hash": os_image_hash, "cpu_count": 1, "memory_size": 1024 << 20, "image": "guest-image",
                 "spec_version": 1}
    sys_config = {"kms_urls": [f"https://{GUEST_HOST}:{kms.port}"],
                  "gateway_urls": [f"https://{GUEST_HOST}:{gateway.rpc_port}"], "pccs_url": "",
                  "docker_registry": "",
                  "kms_ca_cert": (kms.state_dir / "root-ca.crt").read_text(),
                  "host_api_url": host_url,
                  "vm_config": json.dumps(vm_config, sort_keys=True)}
    (share / ".sys-config.json").write_text(json.dumps(sys_config, indent=2))
    (share / "images").mkdir()
    save_image(image, str(share / "images" / "app.tar"), folder)
    for path in (folder, share, *share.rglob("*")):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)   # QEMU runs as libvirt-qemu
    disk = folder / "hda.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "2G"], check=True)


def _boot_and_check(libvirt_uri, share, app, kms, host_api, image, folder, gateway, sim, os_image_hash):
    sys_config = json.loads((share / ".sys-config.json").read_text())
    quote_socket = str(folder / "quote.sock")
    quotes = quote_channel.QuoteChannelServer(
        quote_socket, quote_channel.QuoteService(sim, tdx_sim.launch_measurements(sys_config["vm_config"]))).start()
    spec = domain_spec(domain_name(), image, str(folder), str(share), str(folder / "hda.img"),
                       quote_socket=quote_socket)
    serial = spec.serial_log
    started = time.monotonic()
    with contextlib.closing(quotes), running_domain(libvirt_uri, spec):
        # Until the boot is done and the app told the host (in either order: the container may
        # answer before the agent tells the host its containers step), or the boot stopped.
        reached = wait_until(lambda text: (told(host_api, "app.hello") and told(host_api, "boot.progress", "running"))
                             or told(host_api, "boot.error") or "FATAL" in text or "the guest agent exited" in text,
                             serial, timeout=2 * BOOT_TIMEOUT)
        took = time.monotonic() - started
        assert reached, f"the boot was not done and the app had not told the host within {took:.0f} s"
        assert not told(host_api, "boot.error"), told(host_api, "boot.error")
        assert told(host_api, "app.hello") == [SECRETS["GREETING"]]
        print(f"booted and the app told the host {took:.1f} s after the start; the host was told:")
        for event, payload in host_api.events:
            print(f"  {event}: {payload[:160]}")
        # The agent prints the container's output on the console, after its own `booted` line.
        assert wait_until(lambda text: "| told the host" in text, serial, timeout=30), "no container output on the console"
        text = read_log(serial)
        assert told(host_api, "boot.progress", "containers") == [
            f"containers: compose services started; images loaded: images/app.tar (Loaded image: {IMAGE})"]
        in_order(text, "[agent] dstack-guest-agent: booted: app_id " + app["app_id"], "[agent] web-1  | told the host")
        progress = [payload.split(":", 1)[0] for payload in told(host_api, "boot.progress")]
        assert progress == ["read-config", "instance-id", "measure", "keys", "measure-system", "env", "gateway",
                            "containers", "running"], progress
        assert "keys: app keys from key provider kms" in told(host_api, "boot.progress")
        # The KMS released this app's keys to this boot (its audit log: app, compose hash, image).
        audit = [json.loads(line) for line in (kms.state_dir / "audit.log").read_text().splitlines() if line.strip()]
        releases = [entry for entry in audit if entry.get("decision") == "release"]
        assert releases and releases[-1]["app_id"] == app["app_id"]
        assert releases[-1]["compose_hash"] == app["compose_hash"]
        assert SECRETS["API_TOKEN"] not in read_log(serial)
        _check_the_gateway_route(gateway, host_api, app, kms, sim, os_image_hash)


def _check_the_gateway_route(gateway, host_api, app, kms, sim, os_image_hash):
    """The app answers through the gateway: the VM registered (RA-TLS both ways) and its tunnel is up;
    https://<app-id>.<base> reaches the container's port 80 in the VM, and <app-id>-8090 the agent's
    Worker API, whose Attest quote verifies under the host's simulated platform and names the image."""
    gateway_told = told(host_api, "boot.progress", "gateway")
    assert len(gateway_told) == 1 and gateway_told[0].startswith(
        f"gateway: registered with https://{GUEST_HOST}:{gateway.rpc_port} (gateway app "), gateway_told
    started = time.monotonic()
    status, body = eventually(lambda: gateway.get(f"{app['app_id']}.{BASE}"), 60, (OSError, AssertionError), 1)
    print(f"the app answered through the gateway {time.monotonic() - started:.1f} s after the boot")
    assert (status, body) == (200, f"app-says-{SECRETS['GREETING']}\n".encode()), (status, body)
    nonce = os.urandom(32)
    status, body = eventually(lambda: gateway.post(f"{app['app_id']}-8090.{BASE}", "/prpc/Worker.Attest",
                                                   {"nonce": nonce.hex()}), 30, (OSError, AssertionError), 1)
    assert status == 200, body
    answer = json.loads(body)
    result = attestation.verify_quote(bytes.fromhex(answer["quote"]), sim.collateral(), sim.root_ca_der,
                                      event_log=answer["event_log"])
    assert result.ok, [(c.name, c.detail) for c in result.checks if not c.ok]
    assert result.quote.report.report_data == attestation.worker_report_data(nonce)
    assert result.boot_info["os_image_hash"] == os_image_hash
    assert (result.boot_info["app_id"], result.boot_info["compose_hash"]) == (app["app_id"], app["compose_hash"])
    # The gateway's record of the VM: this instance, at its tunnel address.
    assert gateway.registered(kms.state_dir / "root-ca.crt") == {result.boot_info["instance_id"]: "10.77.0.2"}
