"""`dstack-gateway serve` end to end: real network namespaces, wireguard-go, real processes.

The topology (every name carries this process's pid; everything is removed, even on failure):

    root namespace           gw-<pid>                               cvm-<pid>
    10.99.X.1/30 --veth-- 10.99.X.2/30  (proxy, control, admin)
                            10.99.X.5/30 ----------veth---------- 10.99.X.6/30
                            wgg<pid> 10.77.0.1/24 ==WireGuard==== wgc<pid> 10.77.0.2/32
                                                                  app: HTTP :80, TLS :8443

The gateway is `dstack-gateway serve` run in gw-<pid> (`ip netns exec`). The CVM side is done here
with real pieces: a KMS in process, a simulated CVM booted by the guest agent against it, its
RA-TLS client certificate, RegisterCvm over mutual TLS from the CVM's namespace to the gateway's
control port, the CVM's own wireguard-go interface set from the answer, and the app listening on
its WireGuard address only. A client in the root namespace reaches the app through the gateway's
proxy only.
"""

import contextlib
import datetime
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent))

# pylint: disable=wrong-import-position
from conftest import eventually, run_module  # noqa: E402
from test_gateway_control import ADMIN_TOKEN, Cvm, _allow, _boot  # noqa: E402
from test_guest_boot import COMPOSE, make_share  # noqa: E402
from test_kms import make_kms  # noqa: E402
from ansible_collections.dstack.tee.agents.gateway import server  # noqa: E402
from ansible_collections.dstack.tee.agents.gateway.store import Store  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils import root_keys  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils import wireguard  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx  # noqa: E402


def _ip_netns_works():
    if shutil.which("ip") is None:
        return False
    return subprocess.run(["ip", "netns", "list"], capture_output=True, check=False).returncode == 0


needs_wireguard_go = pytest.mark.skipif(shutil.which("wireguard-go") is None,
                                        reason="wireguard-go is not installed (scripts/setup.sh installs it)")
needs_ip_netns = pytest.mark.skipif(not _ip_netns_works(),
                                    reason="`ip netns` is not available (iproute2, root; scripts/setup.sh installs it)")

PID = os.getpid()
GW_NS, CVM_NS = f"gw-{PID}", f"cvm-{PID}"
VETH_ROOT, VETH_GW = f"dsr{PID}", f"dsg{PID}"   # the CVMs' veths: CvmNet
GW_WG, CVM_WG = f"wgg{PID}", f"wgc{PID}"
BASE = "dstack.localhost"
WG_IP, WG_RANGE = "10.77.0.1/24", "10.77.0.0/25"
PROXY_PORT, RPC_PORT, ADMIN_PORT, WG_PORT = 8443, 8010, 8011, 51820
APP_TLS_PORT = 8443

# The app in the CVM: HTTP on :80 and TLS (the CVM's own certificate) on :8443 of its WireGuard
# address; each answers with the client address it saw (the gateway's tunnel address, if the bytes
# came through WireGuard).
APP_SERVERS = r"""
import socket, ssl, sys, threading
ip, app_id, tls_port, cert, key = sys.argv[1:6]
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)

def answer(conn, peer, what):
    conn.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return
        data += chunk
    body = f"{what} app {app_id} answers {peer[0]}".encode()
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)

def serve(port, wrap):
    srv = socket.create_server((ip, port))
    while True:
        conn, peer = srv.accept()
        try:
            with (context.wrap_socket(conn, server_side=True) if wrap else conn) as conn:
                answer(conn, peer, "tls" if wrap else "http")
        except (OSError, ssl.SSLError):
            pass

for port, wrap in ((80, False), (int(tls_port), True)):
    threading.Thread(target=serve, args=(port, wrap), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

# RegisterCvm as the CVM sends it: mutual TLS with its RA-TLS client certificate.
REGISTER = r"""
import json, ssl, sys, urllib.error, urllib.request
url, server_ca, cert, key, body = sys.argv[1:6]
context = ssl.create_default_context(cafile=server_ca)
context.load_cert_chain(cert, key)
request = urllib.request.Request(url, data=body.encode(), headers={"Content-Type": "application/json"}, method="POST")
try:
    with urllib.request.urlopen(request, context=context, timeout=10) as response:
        print(json.dumps([response.status, json.loads(response.read())]))
except urllib.error.HTTPError as exc:
    print(json.dumps([exc.code, json.loads(exc.read())]))
"""


# ---- certificates: a test CA for the gateway's own TLS (rpc and the wildcard) ------------------------

def _name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_certs(folder, gateway_ips):
    """ca.crt; rpc.crt/key for the gateway's addresses; wildcard.crt/key for *.BASE."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("serve test CA")).issuer_name(_name("serve test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(ca_key, hashes.SHA256()))
    (folder / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name, alt_names in (("rpc", [x509.IPAddress(ipaddress.ip_address(ip)) for ip in gateway_ips]),
                            ("wildcard", [x509.DNSName(f"*.{BASE}")])):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(alt_names), critical=False).sign(ca_key, hashes.SHA256()))
        (folder / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / f"{name}.key").write_bytes(_pem_key(key))
        (folder / f"{name}.key").chmod(0o600)
    return folder / "ca.crt"


# ---- the network --------------------------------------------------------------------------------------

class CvmNet:
    """One CVM's namespace: its veth to the gateway's namespace, its addresses, its WireGuard
    interface. The first keeps the names of the module docstring's picture; the k-th (k >= 1)
    is cvm-<pid>-k with the /30 10.99.X.(4k+4) (interface names stay within 15 bytes)."""

    def __init__(self, index, third):
        suffix = f"x{index}" if index else ""
        self.netns = f"{CVM_NS}-{index}" if index else CVM_NS
        self.veth_gw, self.veth = f"dsc{PID}{suffix}", f"dsv{PID}{suffix}"
        self.wg = f"wgc{PID}{suffix}"
        self.gw_ip, self.ip = f"10.99.{third}.{4 * index + 5}", f"10.99.{third}.{4 * index + 6}"


class Network:
    """The addresses of one topology (the module docstring's picture), with `cvms` CVM namespaces."""

    def __init__(self, third, cvms=1):
        prefix = f"10.99.{third}"
        self.root_ip, self.gw_ip = f"{prefix}.1", f"{prefix}.2"              # root <-> gateway
        self.cvms = [CvmNet(index, third) for index in range(cvms)]
        self.gw_cvm_ip, self.cvm_ip = self.cvms[0].gw_ip, self.cvms[0].ip   # gateway <-> the first CVM


def _free_third_octet():
    """A 10.99.X.0/24 no address of the root namespace is in (another run may hold one)."""
    used = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    for offset in range(250):
        third = (PID + offset) % 250 + 1
        if f" 10.99.{third}." not in used:
            return third
    pytest.skip("no free 10.99.X.0/24 in the root namespace")
    return None


def _ns_pids(netns):
    found = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, check=False)
    return [int(pid) for pid in found.stdout.split()]


def _kill_everything_in(netns):
    """The processes left in one of our namespaces (`ip netns pids`: only what runs in it)."""
    for pid in _ns_pids(netns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _remove_socket(interface):
    with contextlib.suppress(FileNotFoundError):
        os.unlink(wireguard.Uapi(interface).path)


def _ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _build_network(cleanup, cvms=1):
    """The namespaces and veths of Network(cvms); every removal registered on `cleanup` first."""
    net = Network(_free_third_octet(), cvms)
    for netns in (GW_NS, *(cvm.netns for cvm in net.cvms)):
        cleanup.callback(wireguard.netns_remove, netns)
        wireguard.netns_add(netns)
        wireguard.configure_link("lo", netns)
    cleanup.callback(wireguard.delete_link, VETH_ROOT)  # its peer (and the route through it) go with it
    wireguard.veth_pair(VETH_ROOT, None, VETH_GW, GW_NS)
    wireguard.configure_link(VETH_ROOT, None, address=f"{net.root_ip}/30")
    wireguard.configure_link(VETH_GW, GW_NS, address=f"{net.gw_ip}/30")
    for cvm in net.cvms:
        wireguard.veth_pair(cvm.veth_gw, GW_NS, cvm.veth, cvm.netns)
        wireguard.configure_link(cvm.veth_gw, GW_NS, address=f"{cvm.gw_ip}/30")
        wireguard.configure_link(cvm.veth, cvm.netns, address=f"{cvm.ip}/30")
        # The gateway's control port and WireGuard endpoint are on the first CVM's veth
        # (net.gw_cvm_ip): every CVM reaches them through its own veth (no forwarding involved).
        _ip("-n", cvm.netns, "route", "add", "default", "via", cvm.gw_ip)
    for netns, interface in ((GW_NS, GW_WG), *((cvm.netns, cvm.wg) for cvm in net.cvms)):  # run before the namespaces go
        cleanup.callback(_remove_socket, interface)
        cleanup.callback(_kill_everything_in, netns)
    return net


# ---- the CVM side -------------------------------------------------------------------------------------

def _boot_cvms(base, apps):
    """A KMS (in process) and, for each app {folder: (compose, [CVM names])}, its config share and
    its CVMs booted against the KMS, every app allowed: (sim, {CVM name: Cvm})."""
    sim = SimTdx(str(base / "sim"))
    _kms_app, kms = make_kms(base, sim)
    shares = {}
    for folder, (compose, _names) in apps.items():
        (base / folder).mkdir()
        shares[folder] = make_share(base / folder, run_module, kms, compose=compose)
    _allow(base / "auth-config.json", *(app for _share, app in shares.values()))
    return sim, {name: Cvm(_boot(base, name, shares[folder][0], sim, kms), kms, shares[folder][1])
                 for folder, (_compose, names) in apps.items() for name in names}


def _boot_cvm(base):
    sim, cvms = _boot_cvms(base, {"app": (COMPOSE, ["cvm"])})
    return sim, cvms["cvm"]


def _in_cvm(argv, netns=CVM_NS, **kwargs):
    return subprocess.run(wireguard.netns_exec_argv(netns, argv), capture_output=True, text=True, timeout=30,
                          check=False, **kwargs)


def _register(net, cvm, server_ca, folder, netns=CVM_NS, **body):
    """RegisterCvm from the CVM's namespace with its RA-TLS client certificate: [status, answer].
    `body`: more of the request (port_policy)."""
    cert, key = folder / f"client-{cvm.instance_id}.pem", folder / f"client-{cvm.instance_id}.key"
    cert.write_text("".join(cvm.cert["certificate_chain"][:2]))
    key.write_text(cvm.cert["key"])
    key.chmod(0o600)
    done = _in_cvm([sys.executable, "-c", REGISTER, f"https://{net.gw_cvm_ip}:{RPC_PORT}/prpc/Gateway.RegisterCvm",
                    str(server_ca), str(cert), str(key), json.dumps({"client_public_key": cvm.wg_public, **body})],
                   netns=netns)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _cvm_tunnel(cleanup, cvm, answer, netns=CVM_NS, interface=CVM_WG):
    """The CVM's WireGuard interface in its namespace from RegisterCvm's answer alone (as wg-quick
    would make it from dstack-wg0.conf): its address, the gateway peers and a route to each."""
    cvm_interface = wireguard.WgInterface(interface, netns=netns)
    cleanup.callback(cvm_interface.down)
    cvm_hub = cvm_interface.up(f"{answer['wg']['client_ip']}/32", private_key=cvm.wg_private,
                               listen_port=wireguard.CVM_LISTEN_PORT)
    for gw in answer["wg"]["servers"]:
        gateway_ip = gw["ip"].split("/")[0]
        cvm_hub.set_peer(gw["pk"], [f"{gateway_ip}/32"], endpoint=gw["endpoint"],
                         persistent_keepalive=wireguard.CVM_KEEPALIVE)
        _ip("-n", netns, "route", "add", f"{gateway_ip}/32", "dev", interface)
    return cvm_interface


def _start_in(cleanup, netns, script, *args):
    """A Python script in a namespace that prints "ready" once it serves; killed at cleanup."""
    process = subprocess.Popen(  # pylint: disable=consider-using-with
        wireguard.netns_exec_argv(netns, [sys.executable, "-c", script, *map(str, args)]), stdout=subprocess.PIPE,
        text=True)
    cleanup.callback(process.wait)
    cleanup.callback(process.kill)
    assert process.stdout.readline().strip() == "ready"
    return process


# ---- the gateway ----------------------------------------------------------------------------------------

def _gateway_toml(folder, sim, kms_dir, net, **extra):
    values = {
        "core": {"state_dir": str(folder / "state"), "kms_url": "https://kms.test"},
        "core.wg": {"interface": GW_WG, "ip": WG_IP, "client_ip_range": WG_RANGE, "reserved_net": ["10.77.0.1/32"],
                    "listen_port": WG_PORT, "endpoint": f"{net.gw_cvm_ip}:{WG_PORT}"},
        "core.proxy": {"listen_addr": "0.0.0.0", "listen_port": PROXY_PORT, "base_domain": BASE,
                       "cert_chain": str(folder / "wildcard.crt"), "cert_key": str(folder / "wildcard.key")},
        "core.proxy.timeouts": {"connect": "2s", "handshake": "5s"},
        "core.recycle": {"interval": "1s"},
        "rpc": {"listen": f"0.0.0.0:{RPC_PORT}", "cert": str(folder / "rpc.crt"), "key": str(folder / "rpc.key"),
                "kms_root_ca": str(kms_dir / root_keys.ROOT_CA_CERT), "workers": 1},
        "attestation": {"mode": "simulation", "sim_state_dir": sim.state_dir},
        "admin": {"listen": f"0.0.0.0:{ADMIN_PORT}", "token": ADMIN_TOKEN},
    }
    for name, table in extra.items():
        values.setdefault(name, {}).update(table)
    text = "".join(f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items()) + "\n"
                   for name, table in values.items())
    (folder / "gateway.toml").write_text(text)
    return folder / "gateway.toml"


class GatewayProcess:
    """`dstack-gateway serve` inside the gateway's namespace; its log in a file."""

    def __init__(self, config, log_path):
        self.config, self.log_path = config, log_path
        self.proc = None

    @property
    def log(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout=30):
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
                wireguard.netns_exec_argv(GW_NS, [sys.executable, "-m", "ansible_collections.dstack.tee.agents.gateway.cli",
                                                  "serve", "--config", str(self.config)]),
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        begun = len(self.log)
        deadline = time.monotonic() + timeout
        while " ready: " not in self.log[begun:]:
            assert self.proc.poll() is None, f"serve exited with {self.proc.returncode}:\n{self.log[-6000:]}"
            assert time.monotonic() < deadline, f"serve did not get ready in {timeout} s:\n{self.log[-6000:]}"
            time.sleep(0.1)

    def stop(self, timeout=20):
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"serve did not stop in {timeout} s:\n{self.log[-6000:]}") from None

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


# ---- clients in the root namespace ------------------------------------------------------------------------

def _https_get(address, server_name, cafile, timeout=5.0):
    """GET / over TLS with this SNI: (status line and body, the server's certificate as DER)."""
    context = ssl.create_default_context(cafile=str(cafile))
    with socket.create_connection((address, PROXY_PORT), timeout=timeout) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as conn:
            served = conn.getpeercert(binary_form=True)
            conn.sendall(f"GET / HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            return data.decode(errors="replace"), served


def _body(answer):
    head, _sep, body = answer.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200"), answer
    return body


def _admin(net, server_ca, method, **params):
    import urllib.request  # pylint: disable=import-outside-toplevel
    request = urllib.request.Request(f"https://{net.gw_ip}:{ADMIN_PORT}/prpc/Admin.{method}",
                                     data=json.dumps(params).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {ADMIN_TOKEN}"})
    with urllib.request.urlopen(request, context=ssl.create_default_context(cafile=str(server_ca)),
                                timeout=10) as response:
        return json.loads(response.read())


# ---- the test ----------------------------------------------------------------------------------------------

@needs_wireguard_go
@needs_ip_netns
def test_serve_routes_through_wireguard_keeps_routes_across_a_restart_and_drops_removed_instances(tmp_path):
    with contextlib.ExitStack() as cleanup:
        net = _build_network(cleanup)
        sim, cvm = _boot_cvm(tmp_path)
        server_ca = _write_certs(tmp_path, [net.gw_ip, net.gw_cvm_ip])
        kms_root = tmp_path / "kms" / root_keys.ROOT_CA_CERT
        gateway = GatewayProcess(_gateway_toml(tmp_path, sim, tmp_path / "kms", net), tmp_path / "serve.log")
        cleanup.callback(gateway.kill)
        gateway.start()
        log = gateway.log
        assert f"WireGuard: {GW_WG} up at {WG_IP}, UDP port {WG_PORT}" in log
        assert f"control API on https://0.0.0.0:{RPC_PORT}/prpc/Gateway.*" in log
        assert f"Admin API on https://0.0.0.0:{ADMIN_PORT}/prpc/Admin.*" in log
        assert f"data plane on 0.0.0.0:{PROXY_PORT} for *.{BASE}" in log

        # No key in gateway.toml: the gateway made its own, once, 0600, in the state directory.
        key_file = tmp_path / "state" / server.KEY_FILE
        assert key_file.stat().st_mode & 0o777 == 0o600
        gateway_public = wireguard.public_key(key_file.read_text().strip())
        gateway_hub = wireguard.Uapi(GW_WG)
        assert gateway_hub.get()["public_key"] == gateway_public
        assert key_file.read_text().strip() not in log

        # The CVM registers from its namespace, over mutual TLS, with its RA-TLS certificate.
        status, answer = _register(net, cvm, server_ca, tmp_path)
        assert status == 200, answer
        client_ip = answer["wg"]["client_ip"]
        assert client_ip == "10.77.0.2"
        assert answer["wg"]["servers"] == [{"pk": gateway_public, "ip": WG_IP, "endpoint": f"{net.gw_cvm_ip}:{WG_PORT}"}]
        assert {p.public_key: p.allowed_ips for p in gateway_hub.get()["peers"]} == {cvm.wg_public: [f"{client_ip}/32"]}

        # The CVM's interface, from the answer alone (as wg-quick would make it from dstack-wg0.conf).
        _cvm_tunnel(cleanup, cvm, answer)

        # The app, on the CVM's WireGuard address only; its TLS port with the CVM's own certificate.
        instance_id, app_id = cvm.instance_id, cvm.app["app_id"]
        passthrough_name = f"{instance_id}-{APP_TLS_PORT}s.{BASE}"
        own = cvm.tls_key(usage_server_auth=True, usage_client_auth=False, alt_names=[passthrough_name])
        (tmp_path / "app.crt").write_text("".join(own["certificate_chain"][:2]))
        (tmp_path / "app.key").write_text(own["key"])
        _start_in(cleanup, CVM_NS, APP_SERVERS, client_ip, app_id, APP_TLS_PORT, tmp_path / "app.crt", tmp_path / "app.key")

        # Terminated with the wildcard certificate, by app id, to port 80 through the tunnel.
        answer_text, served = eventually(lambda: _https_get(net.gw_ip, f"{app_id}.{BASE}", server_ca), 10.0,
                                         interval=0.2)
        assert _body(answer_text) == f"http app {app_id} answers 10.77.0.1"
        assert x509.load_der_x509_certificate(served).subject == _name("wildcard")
        # Passthrough: the CVM's own certificate (its chain to the KMS root checked by the client).
        answer_text, served = _https_get(net.gw_ip, passthrough_name, kms_root)
        assert _body(answer_text) == f"tls app {app_id} answers 10.77.0.1"
        assert served == x509.load_pem_x509_certificate(own["certificate_chain"][0].encode()).public_bytes(
            serialization.Encoding.DER)

        # The app is not reachable on its WireGuard address from the root namespace, even with the
        # tunnel's network routed to the gateway: the gateway namespace does not forward into the
        # tunnel, and the CVM's WireGuard accepts only the gateway's own tunnel address.
        _ip("route", "add", WG_RANGE, "via", net.gw_ip, "dev", VETH_ROOT)
        for port in (80, APP_TLS_PORT):
            with pytest.raises(OSError):
                socket.create_connection((client_ip, port), timeout=1.5).close()

        # The supervisor's loop read the handshake into the store (Admin.GetMeta counts it online).
        deadline = time.monotonic() + 10
        while _admin(net, server_ca, "GetMeta") != {"registered": 1, "online": 1}:
            assert time.monotonic() < deadline, _admin(net, server_ca, "GetMeta")
            time.sleep(0.2)

        # SIGTERM stops everything: exit 0, the interface and its socket gone, no process left in the namespace.
        assert gateway.stop() == 0, gateway.log[-6000:]
        assert not wireguard.link_exists(GW_WG, GW_NS)
        assert not os.path.exists(gateway_hub.path)
        assert _ns_pids(GW_NS) == []
        assert f"WireGuard: {GW_WG} down" in gateway.log

        # A restart keeps the route: the same request works without the CVM registering again.
        restarted_at = time.time()
        gateway.start()
        assert gateway_hub.get()["public_key"] == gateway_public   # the same key file
        # Before any request, the gateway has started the handshake itself (one datagram to each
        # restored CVM): an idle CVM does not look stale to the recycler after a restart.
        deadline = time.monotonic() + 6
        while not any(p.last_handshake >= restarted_at - 1 for p in gateway_hub.get()["peers"]):
            assert time.monotonic() < deadline, [vars(p) for p in gateway_hub.get()["peers"]]
            time.sleep(0.2)
        assert "a handshake started with 1 CVM(s)" in gateway.log
        answer_text, _served = eventually(lambda: _https_get(net.gw_ip, f"{app_id}.{BASE}", server_ca), 8,
                                          interval=0.2)
        assert _body(answer_text) == f"http app {app_id} answers 10.77.0.1"
        assert gateway.log.count("registered instance") == 1

        # Admin.RemoveInstance: the peer leaves the interface, and the name is refused at the handshake.
        assert _admin(net, server_ca, "RemoveInstance", id=instance_id) == {"removed": True}
        assert gateway_hub.get()["peers"] == []
        # (The data plane's router caches an answer for 2 s.)
        deadline = time.monotonic() + 10
        while True:
            try:
                _https_get(net.gw_ip, f"{app_id}.{BASE}", server_ca, timeout=3)
                outcome = "still routed"
            except ssl.SSLError as exc:
                outcome = str(exc)
            if "UNRECOGNIZED_NAME" in outcome.upper():  # the gateway's alert to the ClientHello: an unknown id
                break
            assert time.monotonic() < deadline, f"after RemoveInstance: {outcome}"
            time.sleep(0.3)
        assert gateway.stop() == 0, gateway.log[-6000:]
        assert _ns_pids(GW_NS) == []


@needs_wireguard_go
@needs_ip_netns
@pytest.mark.parametrize("victim", ["data plane", "control API", "wireguard-go"])
def test_serve_stops_whole_when_one_of_its_processes_dies(tmp_path, victim):
    """Whichever part dies, the gateway stops (exit 2, naming it), its interface down and nothing left
    running, so that supervisord or systemd restarts it whole."""
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(wireguard.netns_remove, GW_NS)
        wireguard.netns_add(GW_NS)
        wireguard.configure_link("lo", GW_NS)
        cleanup.callback(_remove_socket, GW_WG)
        cleanup.callback(_kill_everything_in, GW_NS)
        sim = SimTdx(str(tmp_path / "sim"))
        server_ca = _write_certs(tmp_path, ["127.0.0.1"])
        (tmp_path / "kms").mkdir()
        shutil.copy(server_ca, tmp_path / "kms" / root_keys.ROOT_CA_CERT)  # any CA: no CVM registers here
        gateway = GatewayProcess(_gateway_toml(tmp_path, sim, tmp_path / "kms", Network(1)), tmp_path / "serve.log")
        cleanup.callback(gateway.kill)
        gateway.start()
        pattern = {"data plane": r"data plane on \S+ for \S+ \(uvloop, pid (\d+)\)",
                   "control API": r"\(gunicorn pid (\d+)\)", "wireguard-go": r"\(wireguard-go pid (\d+)\)"}[victim]
        pid = int(re.search(pattern, gateway.log).group(1))
        os.kill(pid, signal.SIGKILL)
        assert gateway.proc.wait(20) == 2, gateway.log[-6000:]
        expected = f"wireguard-go for {GW_WG} exited" if victim == "wireguard-go" else \
            f"the {victim} process {pid} exited with status -9"
        assert f"dstack-gateway: error: serve: {expected}" in gateway.log, gateway.log[-6000:]
        assert not wireguard.link_exists(GW_WG, GW_NS)
        assert not os.path.exists(wireguard.Uapi(GW_WG).path)
        assert _ns_pids(GW_NS) == []


# ---- without namespaces: what serve refuses before anything is up, its key, the endpoints it keeps ---------

def _plain_toml(tmp_path, **extra):
    (tmp_path / "root-ca.crt").write_text("not read before serve starts")
    values = {
        "core": {"state_dir": str(tmp_path / "state")},
        "core.wg": {"interface": f"wgx{PID}", "endpoint": "10.0.0.9:51820"},
        "rpc": {"kms_root_ca": str(tmp_path / "root-ca.crt")},
        "attestation": {"mode": "simulation", "sim_state_dir": str(tmp_path / "sim")},
    }
    for name, table in extra.items():
        values.setdefault(name, {}).update(table)
    text = "".join(f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items()) + "\n"
                   for name, table in values.items())
    (tmp_path / "gateway.toml").write_text(text)
    return str(tmp_path / "gateway.toml")


def test_the_gateway_key_is_made_once_0600_and_checked(tmp_path):
    path = _plain_toml(tmp_path)
    config = server.load_config(path)
    key_file = tmp_path / "state" / server.KEY_FILE
    assert key_file.stat().st_mode & 0o777 == 0o600
    key = key_file.read_text().strip()
    assert config["core"]["wg"]["private_key"] == key
    assert config["core"]["wg"]["public_key"] == wireguard.public_key(key)
    assert server.load_config(path)["core"]["wg"]["private_key"] == key   # not made again
    key_file.chmod(0o644)
    with pytest.raises(DstackError) as err:
        server.load_config(path)
    assert err.value.field == "core.wg.private_key" and "chmod 600" in str(err.value) and key not in str(err.value)
    key_file.chmod(0o600)
    # A configured public key that is not the file's: refused, not silently another identity.
    other = wireguard.public_key(wireguard.generate_private_key())
    with pytest.raises(DstackError) as err:
        server.load_config(_plain_toml(tmp_path, **{"core.wg": {"public_key": other}}))
    assert err.value.field == "core.wg.public_key"
    # A key in gateway.toml is used as it is; no file is read.
    given = wireguard.generate_private_key()
    assert server.load_config(_plain_toml(tmp_path, **{"core.wg": {"private_key": given}}))["core"]["wg"]["private_key"] == given


@pytest.mark.parametrize("extra, field", [
    ({}, "rpc.cert"),
    ({"rpc": {"cert": "/nonexistent/rpc.crt", "key": "/nonexistent/rpc.key"}}, "core.proxy.cert_chain"),
    ({"rpc": {"cert": "/nonexistent/rpc.crt", "key": "/nonexistent/rpc.key"},
      "core.proxy": {"cert_chain": "/nonexistent/w.crt", "cert_key": "/nonexistent/w.key"}}, "core.proxy.cert_chain"),
])
def test_serve_refuses_what_it_cannot_serve_before_anything_is_up(tmp_path, extra, field):
    done = subprocess.run([sys.executable, "-m", "ansible_collections.dstack.tee.agents.gateway.cli", "serve",
                           "--config", _plain_toml(tmp_path, **extra)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 2, done.stderr
    assert f"dstack-gateway: error: {field}:" in done.stderr
    assert " up at " not in done.stderr and not os.path.exists(wireguard.Uapi(f"wgx{PID}").path)


def test_the_store_keeps_endpoints_and_adds_their_column_to_an_older_file(tmp_path):
    store = Store(str(tmp_path), WG_RANGE, WG_IP, ["10.77.0.1/32"])
    key = wireguard.public_key(wireguard.generate_private_key())
    store.register("aa" * 20, "bb" * 20, "cc" * 32, key)
    store.record_endpoints({key: "10.99.0.6:9182", "unknown": "10.99.0.7:9182"})
    assert store.endpoints() == {key: "10.99.0.6:9182"}
    # A state file from before the column: reopened, it gets the column and keeps its instances.
    store._db().execute("ALTER TABLE instances DROP COLUMN endpoint")  # pylint: disable=protected-access
    store.close()
    again = Store(str(tmp_path), WG_RANGE, WG_IP, ["10.77.0.1/32"])
    assert again.endpoints() == {} and again.instance("aa" * 20).client_ip == "10.77.0.2"
    again.record_endpoints({key: "10.99.0.6:9182"})
    assert again.endpoints() == {key: "10.99.0.6:9182"}
