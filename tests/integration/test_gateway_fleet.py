"""The gateway's data plane for a fleet of CVMs, on real namespaces, wireguard-go and `dstack-gateway serve`.

test_gateway_proxy.py proves these rules against loopback backends; here they hold end to end.
The topology is test_gateway_serve's (its helpers, imported), with four CVM namespaces:

    root namespace --veth-- gw-<pid> (serve: proxy :8443, control, Admin; wgg<pid> 10.77.0.1)
                              |-- veth -- cvm-<pid>    a1  app A   wgc<pid>     10.77.0.2
                              |-- veth -- cvm-<pid>-1  a2  app A   wgc<pid>x1   10.77.0.3
                              |-- veth -- cvm-<pid>-2  b1  app B   wgc<pid>x2   10.77.0.4
                              `-- veth -- cvm-<pid>-3  b2  app B   wgc<pid>x3   10.77.0.5

Each CVM is booted by the guest agent against a real KMS (in process), registers from its own
namespace over mutual TLS with its RA-TLS client certificate (app B with a port policy that
restricts its ports and asks for a PROXY header on one), brings its own wireguard-go interface up
from the answer, and runs a small app on its tunnel address only that answers with its instance
id, the port, the address it saw and the PROXY v2 header it parsed, if any. Clients in the root
namespace reach the apps through the gateway's proxy only. One gateway and one fleet serve every
test (module fixture); everything is removed at the end, even on failure.
"""

import collections
import contextlib
import json
import socket
import ssl
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

# pylint: disable=wrong-import-position
from conftest import IMAGE, eventually  # noqa: E402
from test_gateway_serve import (  # noqa: E402
    BASE, GW_WG, PROXY_PORT, GatewayProcess, _admin, _body, _boot_cvms, _build_network, _cvm_tunnel,
    _gateway_toml, _in_cvm, _register, _start_in, _write_certs, needs_ip_netns, needs_wireguard_go)
from test_guest_boot import COMPOSE  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils import wireguard  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError  # noqa: E402

pytestmark = [needs_wireguard_go, needs_ip_netns]

B_COMPOSE = f"""services:
  other:
    image: {IMAGE}
    command: ["/bin/sh", "-c", "exec httpd -f -p 80"]
"""
GATEWAY_IP = "10.77.0.1"
OPEN_PORT = 9000     # every app serves it; app B's policy does not declare it
PP_PORT = 9001       # app B only; its policy asks for a PROXY v2 header on it
A_PORTS, B_PORTS = (80, OPEN_PORT), (80, OPEN_PORT, PP_PORT)
B_POLICY = {"ports": [{"port": 80, "pp": False}, {"port": PP_PORT, "pp": True}], "restrict_mode": True}
FLEET = (("a1", "a"), ("a2", "a"), ("b1", "b"), ("b2", "b"))   # (CVM, app folder), in namespace order
RECYCLE_TIMEOUT = 7.0

# The app in a CVM: plain HTTP on each port of its WireGuard address. Every connection may start
# with a PROXY v2 header (parsed here independently of agents/gateway/proxy_protocol.py); the
# answer says which instance and port answered, the TCP peer and the header's addresses (or null).
FLEET_APP = r"""
import json, socket, sys, threading
ip, instance_id, ports = sys.argv[1], sys.argv[2], [int(p) for p in sys.argv[3].split(",")]
SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

def receive(conn, data, until):
    while not until(data):
        chunk = conn.recv(4096)
        if not chunk:
            raise ConnectionError("closed before the request was whole")
        data += chunk
    return data

def address(raw):
    return [socket.inet_ntoa(raw[:4]), int.from_bytes(raw[4:6], "big")]

def answer(conn, peer, port):
    conn.settimeout(5)
    # Until 16 bytes are in, or they stop looking like the signature, it may be a header.
    data = receive(conn, b"", lambda d: len(d) >= 16 or d[:12] != SIGNATURE[:len(d[:12])])
    proxy = None
    if data[:12] == SIGNATURE:
        length = int.from_bytes(data[14:16], "big")
        data = receive(conn, data, lambda d: len(d) >= 16 + length)
        body, version, family = data[16:16 + length], data[12], data[13]
        if version == 0x21 and family == 0x11 and length >= 12:    # v2 PROXY, TCP over IPv4
            proxy = {"source": address(body[0:4] + body[8:10]), "destination": address(body[4:8] + body[10:12])}
        else:
            proxy = {"unexpected": data[12:16].hex()}
        data = data[16 + length:]
    receive(conn, data, lambda d: b"\r\n\r\n" in d)
    body = json.dumps({"instance_id": instance_id, "port": port, "peer": peer[0], "proxy": proxy}).encode()
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)

def handle(conn, peer, port):
    with conn:
        try:
            answer(conn, peer, port)
        except OSError:
            pass

def serve(port):
    server = socket.create_server((ip, port))
    while True:
        conn, peer = server.accept()
        threading.Thread(target=handle, args=(conn, peer, port), daemon=True).start()

for port in ports:
    threading.Thread(target=serve, args=(port,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

# A plain GET from inside a CVM's namespace to its own app (the gateway not involved).
LOCAL_GET = r"""
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as conn:
    conn.sendall(b"GET / HTTP/1.1\r\nHost: local\r\n\r\n")
    data = b""
    while chunk := conn.recv(4096):
        data += chunk
print(data.decode().partition("\r\n\r\n")[2])
"""


class Fleet:
    """What the tests share: the network, the gateway, the CVMs and their tunnels."""

    def __init__(self, base, net, sim, cvms, server_ca, gateway):
        self.base, self.net, self.sim, self.cvms, self.server_ca, self.gateway = base, net, sim, cvms, server_ca, gateway
        self.answers, self.interfaces, self.registered_at = {}, {}, {}
        self.app_a, self.app_b = cvms["a1"].app["app_id"], cvms["b1"].app["app_id"]
        self.ids = {name: cvm.instance_id for name, cvm in cvms.items()}

    def toml(self, **extra):
        return _gateway_toml(self.base, self.sim, self.base / "kms", self.net, **extra)

    def fetch(self, name, host=None, timeout=5.0):
        """GET / through the gateway with this SNI (and Host): (the app's JSON answer, the client's address)."""
        context = ssl.create_default_context(cafile=str(self.server_ca))
        with socket.create_connection((self.net.gw_ip, PROXY_PORT), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=name) as conn:
                client = conn.getsockname()
                conn.sendall(f"GET / HTTP/1.1\r\nHost: {host or name}\r\nConnection: close\r\n\r\n".encode())
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
        return json.loads(_body(data.decode(errors="replace"))), client

    def instance(self, name, **kwargs):
        """The instance id that answered."""
        return self.fetch(name, **kwargs)[0]["instance_id"]

    def refusal(self, name):
        """The TLS error the gateway's refusal gave the client (the request must not succeed)."""
        with pytest.raises(ssl.SSLError) as err:
            self.fetch(name)
        return str(err.value)

    def status(self):
        """Admin.Status: {instance_id: latest_handshake} of the registered instances."""
        return {h["instance_id"]: h["latest_handshake"] for h in _admin(self.net, self.server_ca, "Status")["hosts"]}

    def gateway_peers(self):
        """The gateway interface's peers, read on its UAPI socket: {public key: Peer}."""
        return {p.public_key: p for p in wireguard.Uapi(GW_WG).get()["peers"]}


def _until(check, timeout=10.0, what="the condition"):
    """Poll `check` (a callable returning a truthy value when done); the data plane's router
    caches each answer for 2 s, so a change there is seen within that."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    base = tmp_path_factory.mktemp("fleet")
    with contextlib.ExitStack() as cleanup:
        net = _build_network(cleanup, cvms=len(FLEET))
        apps = {"a": (COMPOSE, []), "b": (B_COMPOSE, [])}
        for name, folder in FLEET:
            apps[folder][1].append(name)
        sim, cvms = _boot_cvms(base, apps)
        server_ca = _write_certs(base, [net.gw_ip, net.gw_cvm_ip])
        gateway = GatewayProcess(None, base / "serve.log")
        world = Fleet(base, net, sim, cvms, server_ca, gateway)
        gateway.config = world.toml()
        cleanup.callback(gateway.kill)
        gateway.start()
        assert world.app_a != world.app_b
        for (name, folder), cvm_net in zip(FLEET, net.cvms):
            cvm = cvms[name]
            policy = {"port_policy": B_POLICY} if folder == "b" else {}
            status, answer = _register(net, cvm, server_ca, base, netns=cvm_net.netns, **policy)
            assert status == 200, (name, answer)
            world.registered_at[name] = time.time()
            world.answers[name] = answer
            world.interfaces[name] = _cvm_tunnel(cleanup, cvm, answer, netns=cvm_net.netns, interface=cvm_net.wg)
            ports = A_PORTS if folder == "a" else B_PORTS
            _start_in(cleanup, cvm_net.netns, FLEET_APP, answer["wg"]["client_ip"], cvm.instance_id,
                      ",".join(map(str, ports)))
        assert [world.answers[name]["wg"]["client_ip"] for name, _folder in FLEET] == \
            ["10.77.0.2", "10.77.0.3", "10.77.0.4", "10.77.0.5"]
        for name, _folder in FLEET:   # every tunnel carries a request before the tests start
            assert eventually(lambda name=name: world.instance(f"{world.ids[name]}.{BASE}", timeout=3),
                              errors=(OSError, AssertionError)) == world.ids[name]
        yield world


# ---- 1. an app's instances share its name; each keeps its own -----------------------------------------

def test_an_apps_cvms_are_load_balanced_and_each_is_reached_by_its_instance_id(fleet):
    ids = fleet.ids
    # New connections by app id: the candidates race and the first to connect wins, so both
    # instances answer (about evenly here; a busy machine may skew it, hence up to 60 tries).
    answers = []
    while len(answers) < 20 or (len({a["instance_id"] for a in answers}) < 2 and len(answers) < 60):
        answers.append(fleet.fetch(f"{fleet.app_a}.{BASE}")[0])
    seen = collections.Counter(answer["instance_id"] for answer in answers)
    assert set(seen) == {ids["a1"], ids["a2"]}, seen          # both instances, and only app A's
    assert {(a["port"], a["peer"], a["proxy"]) for a in answers} == {(80, GATEWAY_IP, None)}   # through the tunnel
    # Another port of the app, by its id: app A's instances again.
    assert {fleet.instance(f"{fleet.app_a}-{OPEN_PORT}.{BASE}") for _round in range(10)} <= {ids["a1"], ids["a2"]}
    # An instance id reaches that CVM only, on any port its app serves (and allows).
    for name in ("a1", "a2", "b1"):
        assert {fleet.instance(f"{ids[name]}.{BASE}") for _round in range(5)} == {ids[name]}
        port = PP_PORT if name == "b1" else OPEN_PORT
        answer, _client = fleet.fetch(f"{ids[name]}-{port}.{BASE}")
        assert (answer["instance_id"], answer["port"]) == (ids[name], port)


# ---- 2. another app's CVM is not reached through an app's name ---------------------------------------

def test_another_apps_cvm_is_unreachable_through_an_apps_names(fleet):
    ids, app_a = fleet.ids, fleet.app_a
    b_instances = {ids["b1"], ids["b2"]}
    # App B's CVM serves PP_PORT, by its own name...
    assert fleet.instance(f"{ids['b1']}-{PP_PORT}.{BASE}") == ids["b1"]
    # ... and app B's id reaches app B's instances only.
    assert {fleet.instance(f"{fleet.app_b}.{BASE}") for _round in range(10)} <= b_instances
    # App A's names never reach it: not by app id (whatever the Host header says: the gateway
    # routes by the TLS name), and not on a port only app B serves (app A's CVMs have nothing
    # there, so the gateway refuses; it does not look for the port elsewhere).
    # (Which of A's instances answers is the race's choice: test 1 shows both do; here only
    # "never B's" is the point, so one answering every time is fine.)
    reached = {fleet.instance(f"{app_a}.{BASE}", host=f"{ids['b1']}.{BASE}") for _round in range(10)}
    assert reached and reached <= {ids["a1"], ids["a2"]}, reached
    for name in (f"{app_a}-{PP_PORT}.{BASE}", f"{ids['a1']}-{PP_PORT}.{BASE}"):
        assert "INTERNAL_ERROR" in fleet.refusal(name), name
        assert f"no candidate of {name.split('-', maxsplit=1)[0]} answered on port {PP_PORT}" in fleet.gateway.log
    # B's instance id combined with A's names, or one character short, is no route: refused at
    # the handshake. (Their concatenation, a label longer than 63 bytes, cannot even be sent.)
    for name in (f"{ids['b1']}.{app_a}.{BASE}", f"{app_a}.{ids['b1']}.{BASE}", f"{app_a}-{ids['b1'][:8]}.{BASE}",
                 f"{ids['b1'][:-1]}.{BASE}", f"{ids['b1'][1:]}-{PP_PORT}.{BASE}"):
        assert "UNRECOGNIZED_NAME" in fleet.refusal(name), name


# ---- 3. a port the app did not declare is refused when its policy restricts ports ---------------------

def test_an_undeclared_port_is_refused_when_the_port_policy_restricts_ports(fleet):
    ids, net = fleet.ids, fleet.net
    # App B's CVM does serve OPEN_PORT (asked from inside its namespace): the refusal is the policy's.
    b1_ip = fleet.answers["b1"]["wg"]["client_ip"]
    local = _in_cvm([sys.executable, "-c", LOCAL_GET, b1_ip, str(OPEN_PORT)], netns=net.cvms[2].netns)
    assert json.loads(local.stdout)["instance_id"] == ids["b1"], local
    for name in (f"{ids['b1']}-{OPEN_PORT}.{BASE}", f"{fleet.app_b}-{OPEN_PORT}.{BASE}"):
        assert "ACCESS_DENIED" in fleet.refusal(name), name
    assert f"port {OPEN_PORT} not allowed for {ids['b1']}" in fleet.gateway.log
    # The ports it declared are served.
    assert fleet.instance(f"{ids['b1']}.{BASE}") == ids["b1"]
    assert fleet.instance(f"{ids['b1']}-{PP_PORT}.{BASE}") == ids["b1"]

    # The Admin's override (Admin.SetPortPolicy) replaces the apps' own: A restricted, B opened.
    def admin_policy(app_id, policy):
        return _admin(net, fleet.server_ca, "SetPortPolicy", app_id=app_id, policy=policy)

    def refused(name):
        try:
            fleet.fetch(name)
        except ssl.SSLError as exc:
            return "ACCESS_DENIED" in str(exc)
        return False

    def answered(name, instance_ids):
        try:
            return fleet.instance(name) in instance_ids
        except ssl.SSLError:
            return False

    a_ids = {ids["a1"], ids["a2"]}
    try:
        admin_policy(fleet.app_a, {"ports": [{"port": 80, "pp": False}], "restrict_mode": True})
        admin_policy(fleet.app_b, {"ports": [], "restrict_mode": False})
        _until(lambda: refused(f"{fleet.app_a}-{OPEN_PORT}.{BASE}"), what="app A's undeclared port refused")
        assert fleet.instance(f"{fleet.app_a}.{BASE}") in a_ids
        _until(lambda: answered(f"{ids['b1']}-{OPEN_PORT}.{BASE}", {ids["b1"]}), what="app B's port open")
    finally:
        admin_policy(fleet.app_a, None)
        admin_policy(fleet.app_b, None)
    # The overrides removed: each app's own policy again.
    _until(lambda: answered(f"{fleet.app_a}-{OPEN_PORT}.{BASE}", a_ids), what="app A's port open again")
    _until(lambda: refused(f"{ids['b1']}-{OPEN_PORT}.{BASE}"), what="app B's undeclared port refused again")


# ---- 4. the PROXY v2 header, where the port policy asks for it -------------------------------------

def test_the_app_sees_the_proxy_protocol_header_where_its_port_policy_asks_for_it(fleet):
    ids, net = fleet.ids, fleet.net
    for name in (f"{ids['b1']}-{PP_PORT}.{BASE}", f"{fleet.app_b}-{PP_PORT}.{BASE}"):
        answer, client = fleet.fetch(name)
        assert client[0] == net.root_ip
        # The client's own address and port, and the address it connected to; the TCP peer is the gateway.
        assert answer["proxy"] == {"source": [client[0], client[1]], "destination": [net.gw_ip, PROXY_PORT]}, answer
        assert (answer["port"], answer["peer"]) == (PP_PORT, GATEWAY_IP)
    # No header where the policy says pp false (port 80) or says nothing (app A, no policy).
    for name in (f"{ids['b1']}.{BASE}", f"{ids['a1']}.{BASE}", f"{ids['a1']}-{OPEN_PORT}.{BASE}"):
        answer, _client = fleet.fetch(name)
        assert answer["proxy"] is None, (name, answer)


# ---- 5. a stale peer is recycled; live ones stay -------------------------------------------------------

class HandshakeKeeper:
    """Makes CVMs handshake with the gateway anew every `every` seconds, as live CVMs do (WireGuard
    renews a session only every 2 minutes, longer than the test's recycle timeout): each one's
    gateway peer removed and set again (what the guest's checker does), so a new session starts."""

    def __init__(self, fleet, names, every=1.0):
        self.fleet, self.names, self.every = fleet, names, every
        self.stopped = threading.Event()
        self.failures = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def handshake(self, name):
        uapi = self.fleet.interfaces[name].uapi
        for gw in self.fleet.answers[name]["wg"]["servers"]:
            uapi.remove_peer(gw["pk"])
            uapi.set_peer(gw["pk"], [f"{gw['ip'].split('/')[0]}/32"], endpoint=gw["endpoint"],
                          persistent_keepalive=wireguard.CVM_KEEPALIVE)

    def _run(self):
        while True:
            for name in self.names:
                try:
                    self.handshake(name)
                except DstackError as exc:
                    self.failures.append(f"{name}: {exc}")
            if self.stopped.wait(self.every):
                return

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        self.thread.join(10)


def test_a_stale_peer_is_recycled_and_live_ones_stay(fleet):
    ids, gateway = fleet.ids, fleet.gateway
    live = ("a1", "a2", "b1")
    keys = {name: fleet.cvms[name].wg_public for name in ids}
    with HandshakeKeeper(fleet, live) as keeper:
        # The victim's last handshake, just now; then its WireGuard goes down for good.
        asked = time.time()
        keeper.handshake("b2")
        last = _until(lambda: fleet.gateway_peers()[keys["b2"]].last_handshake > asked and
                      fleet.gateway_peers()[keys["b2"]].last_handshake, what="b2's handshake")
        # The gateway has read them into its store (it does every second), the victim's included.
        _until(lambda: all(fleet.status()[ids[name]] >= int(asked) for name in (*live, "b2")),
               what="the fresh handshakes in the store")
        victim = fleet.interfaces["b2"].process
        victim.kill()
        victim.wait(10)
        try:
            # The gateway again, now recycling instances silent for RECYCLE_TIMEOUT s (checked every 0.5 s).
            gateway.stop()
            gateway.config = fleet.toml(**{"core.recycle": {"timeout": f"{RECYCLE_TIMEOUT}s", "interval": "500ms"}})
            gateway.start()
            restarted = time.time()
            assert f"after {RECYCLE_TIMEOUT:.0f} s without a handshake" in gateway.log
            # Not before the timeout: still registered a second before it ends.
            assert time.time() < last + RECYCLE_TIMEOUT - 1, "the restart took too long to check this"
            time.sleep(max(0.0, last + RECYCLE_TIMEOUT - 1 - time.time()))
            assert ids["b2"] in fleet.status()
            # After it: gone from the store (Admin.Status) and from the interface's peers.
            _until(lambda: ids["b2"] not in fleet.status(), timeout=5, what="b2 recycled")
            assert time.time() < last + RECYCLE_TIMEOUT + 4
            assert set(fleet.status()) == {ids[name] for name in live}
            assert keys["b2"] not in fleet.gateway_peers()
            assert f"recycled instance {ids['b2']} of app {fleet.app_b}" in gateway.log
            # Its name is refused (unknown id) and app B's name reaches only the live instance.
            _until(lambda: "UNRECOGNIZED_NAME" in fleet.refusal(f"{ids['b2']}.{BASE}"), what="b2's name refused")
            assert {fleet.instance(f"{fleet.app_b}.{BASE}") for _round in range(5)} == {ids["b1"]}

            # The live ones stay, kept by their handshakes alone: their registrations, and the
            # handshakes the restarted gateway started itself, are older than the timeout by now.
            time.sleep(max(0.0, max(restarted, *fleet.registered_at.values()) + RECYCLE_TIMEOUT + 1 - time.time()))
            status = fleet.status()
            assert set(status) == {ids[name] for name in live}, status
            assert all(status[ids[name]] >= time.time() - RECYCLE_TIMEOUT for name in live), status
            assert set(fleet.gateway_peers()) == {keys[name] for name in live}
            assert gateway.log.count("recycled instance") == 1
            assert eventually(lambda: fleet.instance(f"{ids['a1']}.{BASE}"), errors=(OSError,)) == ids["a1"]
            assert keeper.failures == []
        finally:
            # The module's gateway again (no quick recycling) for whatever runs next.
            if gateway.proc.poll() is None:
                gateway.stop()
            gateway.config = fleet.toml()
            gateway.start()
