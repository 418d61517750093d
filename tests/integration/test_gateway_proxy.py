"""The gateway's data plane (agents/gateway/proxy.py) on loopback: real TLS clients with SNI, real
backends (plain HTTP, TLS with their own certificate, an echo server) on 127.77.0.x addresses, and
a router stub that maps ids to them. A sentinel listens on addresses no route names: every test
ends by checking nothing reached it."""

import asyncio
import base64
import datetime
import json
import os
import select
import socket
import ssl
import struct
import threading
import time

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ansible_collections.dstack.tee.agents.gateway.proxy import (
    GatewayProxy, ProxySettings, StoreRouter, Timeouts, server_contexts)
from ansible_collections.dstack.tee.agents.gateway.config import load_config
from ansible_collections.dstack.tee.agents.gateway.store import Store

BASE = "gw.test"
HOST_A, HOST_B, HOST_OTHER, HOST_DEAD, HOST_SENTINEL = (f"127.77.0.{n}" for n in (2, 3, 4, 5, 9))
APP = "a1b2c3"                    # an app with two instances
INST_A, INST_B, INST_OTHER = "1aaa", "2bbb", "3ccc"
OTHER_APP = "d4e5f6"


# ----------------------------------------------------------------------------- certificates

def _name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(subject, key, issuer, issuer_key, ca=False, dns=()):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if dns:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns]),
                                        critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


class Pki:
    """A CA and one leaf under it, written as PEM files."""

    def __init__(self, folder, label, dns):
        ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        self.ca = _issue(f"{label} CA", ca_key, f"{label} CA", ca_key, ca=True)
        self.cert = _issue(dns[0], key, f"{label} CA", ca_key, dns=dns)
        self.ca_file, self.cert_file, self.key_file = (folder / f"{label}-{n}.pem" for n in ("ca", "cert", "key"))
        self.ca_file.write_bytes(self.ca.public_bytes(serialization.Encoding.PEM))
        self.cert_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))

    def server_context(self):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gateway-pki")
    return {"gateway": Pki(folder, "gateway", [f"*.{BASE}"]),
            "app": Pki(folder, "app", [f"*.{BASE}"])}


# ----------------------------------------------------------------------------- backends

def _read_proxy_v2(conn):
    """Parse a PROXY v2 header by hand (haproxy's proxy-protocol.txt 2.2): (source, destination)."""
    head = _recv_exact(conn, 16)
    assert head[:12] == b"\r\n\r\n\x00\r\nQUIT\n", head
    assert head[12] == 0x21 and head[13] == 0x11, head          # PROXY, TCP over IPv4
    body = _recv_exact(conn, struct.unpack("!H", head[14:16])[0])
    src, dst = socket.inet_ntoa(body[0:4]), socket.inet_ntoa(body[4:8])
    src_port, dst_port = struct.unpack("!HH", body[8:12])
    return (src, src_port), (dst, dst_port)


def _recv_exact(conn, count):
    data = b""
    while len(data) < count:
        chunk = conn.recv(count - len(data))
        if not chunk:
            raise ConnectionError("closed early")
        data += chunk
    return data


class Backend:
    """A real TCP server in threads: HTTP/1.1 (one request), or echo; optionally TLS and PROXY v2."""

    def __init__(self, name, host, port=0, tls=None, expect_pp=False, echo=False):
        self.name, self.tls, self.expect_pp, self.echo = name, tls, expect_pp, echo
        self.sock = socket.create_server((host, port))
        self.host, self.port = self.sock.getsockname()
        self.accepted = []
        self.proxy_headers = []
        self.open = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.accepted.append(peer)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn):
        self.open += 1
        try:
            conn.settimeout(10)
            if self.expect_pp:
                self.proxy_headers.append(_read_proxy_v2(conn))
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            if self.echo:
                while data := conn.recv(65536):
                    conn.sendall(data)
                return
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                request += chunk
            body = json.dumps({"backend": self.name, "port": self.port,
                               "request": request.split(b"\r\n")[0].decode()}).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        except (OSError, ConnectionError):
            pass
        finally:
            self.open -= 1
            conn.close()

    def close(self):
        self.sock.close()


class Router:
    """The stub of the control plane's routing table; it records every id asked."""

    def __init__(self, routes, policies=None):
        self.routes, self.policies = routes, policies or {}
        self.asked = []

    def resolve(self, ident):
        self.asked.append(ident)
        return list(self.routes.get(ident, ()))

    def port_policy(self, instance_id):
        return self.policies.get(instance_id)


class Gateway:
    """GatewayProxy on a uvloop loop in a thread, listening on 127.0.0.1."""

    def __init__(self, router, pki, app_info=None, **settings):
        timeouts = Timeouts(**settings.pop("timeouts", {}))
        self.settings = ProxySettings(base_domain=BASE, listen_addr="127.0.0.1", listen_port=0,
                                      timeouts=timeouts, **settings)
        self.loop = uvloop.new_event_loop()
        self.proxy = GatewayProxy(self.settings, router,
                                  *server_contexts(pki["gateway"].cert_file, pki["gateway"].key_file), app_info=app_info)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.proxy.start())
        self.port = self.proxy.sockname[1]

    def call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)

    def state(self):
        async def read():
            return dict(self.proxy.per_app), len(self.proxy.connections), self.proxy.refused
        return self.call(read())

    def stop(self):
        self.call(self.proxy.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def backends(pki):
    """Instances A and B of APP on the same ports (80, 443 TLS, P, P TLS, P echo), another app's."""
    made = {}
    made["a80"] = Backend("A", HOST_A, 80)
    made["b80"] = Backend("B", HOST_B, 80)
    made["a"] = Backend("A", HOST_A)
    port = made["a"].port
    made["b"] = Backend("B", HOST_B, port)
    made["a443s"] = Backend("A-tls", HOST_A, 443, tls=pki["app"].server_context())
    made["as"] = Backend("A-tls", HOST_A, tls=pki["app"].server_context())
    made["aecho"] = Backend("A-echo", HOST_A, echo=True)
    made["other"] = Backend("other", HOST_OTHER, port)
    made["dead_port"] = port                    # nothing listens on HOST_DEAD
    yield made
    for backend in made.values():
        if isinstance(backend, Backend):
            backend.close()


@pytest.fixture(scope="module")
def sentinel(backends):
    """Listeners on the addresses and ports no route names (and 127.0.0.1 on the backends' port)."""
    port = backends["dead_port"]
    listeners = [Backend("sentinel", HOST_SENTINEL, 80), Backend("sentinel", HOST_SENTINEL, port),
                 Backend("sentinel", "127.0.0.1", port)]
    yield listeners
    for listener in listeners:
        listener.close()


@pytest.fixture
def router():
    return Router({APP: [(INST_A, HOST_A), (INST_B, HOST_B)], INST_A: [(INST_A, HOST_A)],
                   INST_B: [(INST_B, HOST_B)], OTHER_APP: [(INST_OTHER, HOST_OTHER)],
                   INST_OTHER: [(INST_OTHER, HOST_OTHER)]})


@pytest.fixture
def gateway(pki, router, sentinel):
    made = []

    def start(routes=None, app_info=None, **settings):
        gw = Gateway(routes or router, pki, app_info=app_info, **settings)
        made.append(gw)
        return gw
    yield start
    for gw in made:
        gw.stop()
    assert [listener.accepted for listener in sentinel] == [[], [], []], "a connection went where no route led"


# ----------------------------------------------------------------------------- clients

def tls_connect(gw, name, cafile, alpn=None):
    context = ssl.create_default_context(cafile=str(cafile))
    if alpn:
        context.set_alpn_protocols(alpn)
    raw = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    try:
        return context.wrap_socket(raw, server_hostname=name)
    except BaseException:
        raw.close()
        raise


def _closed_by_peer(conn):
    try:
        return conn.recv(1) == b""
    except (ssl.SSLError, ConnectionError):
        return True


def http_get(conn, name, path="/"):
    conn.sendall(f"GET {path} HTTP/1.1\r\nHost: {name}\r\n\r\n".encode())
    answer = b""
    while chunk := conn.recv(65536):
        answer += chunk
    head, _sep, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def get_via_gateway(gw, pki, name, path="/"):
    with tls_connect(gw, name, pki["gateway"].ca_file) as conn:
        status, body = http_get(conn, name, path)
    return status, json.loads(body) if body.startswith(b"{") else body


# ----------------------------------------------------------------------------- routes

def test_termination_goes_to_port_80_by_default(gateway, pki, router):
    gw = gateway()
    with tls_connect(gw, f"{INST_A}.{BASE}", pki["gateway"].ca_file, alpn=["h2", "http/1.1"]) as conn:
        # The client verified the gateway's wildcard certificate; plain HTTP goes on to the app.
        assert conn.getpeercert(binary_form=True) == pki["gateway"].cert.public_bytes(serialization.Encoding.DER)
        assert conn.selected_alpn_protocol() == "http/1.1"
        status, body = http_get(conn, f"{INST_A}.{BASE}", "/x")
    assert status == 200 and json.loads(body) == {"backend": "A", "port": 80, "request": "GET /x HTTP/1.1"}
    assert router.asked == [INST_A]


def test_id_dash_port_goes_to_that_port(gateway, pki, backends):
    gw = gateway()
    status, body = get_via_gateway(gw, pki, f"{INST_B}-{backends['b'].port}.{BASE}")
    assert status == 200 and body["backend"] == "B" and body["port"] == backends["b"].port


def test_passthrough_delivers_the_apps_own_certificate(gateway, pki, backends):
    gw = gateway()
    app_der = pki["app"].cert.public_bytes(serialization.Encoding.DER)
    for name, port in ((f"{INST_A}-{backends['as'].port}s.{BASE}", backends["as"].port),
                       (f"{INST_A}-s.{BASE}", 443)):
        # The client trusts only the app's CA: the handshake is the app's, end to end.
        with tls_connect(gw, name, pki["app"].ca_file) as conn:
            assert conn.getpeercert(binary_form=True) == app_der
            status, body = http_get(conn, name)
        assert status == 200 and json.loads(body)["backend"] == "A-tls" and json.loads(body)["port"] == port
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_connect(gw, f"{INST_A}-s.{BASE}", pki["gateway"].ca_file)


def test_g_terminates_with_h2_only(gateway, pki, backends):
    gw = gateway()
    name = f"{INST_A}-{backends['aecho'].port}g.{BASE}"
    with tls_connect(gw, name, pki["gateway"].ca_file, alpn=["h2", "http/1.1"]) as conn:
        assert conn.selected_alpn_protocol() == "h2"
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        conn.sendall(preface)
        assert _recv_exact(conn, len(preface)) == preface       # the app got the bytes in clear
    with tls_connect(gw, name, pki["gateway"].ca_file, alpn=["http/1.1"]) as conn:
        assert conn.selected_alpn_protocol() is None


def test_bulk_relay_both_ways(gateway, pki, backends):
    gw = gateway()
    data = bytes(range(256)) * 8192                              # 2 MiB, past every buffer
    with tls_connect(gw, f"{INST_A}-{backends['aecho'].port}.{BASE}", pki["gateway"].ca_file) as conn:
        assert _pump(conn, data) == data


def _pump(conn, data):
    """Send and receive at once from one thread (an SSL socket must not be used by two)."""
    conn.setblocking(False)
    sent, received = 0, bytearray()
    deadline = time.monotonic() + 20
    while len(received) < len(data):
        assert time.monotonic() < deadline, (sent, len(received))
        readable, writable, _unused = select.select([conn], [conn] if sent < len(data) else [], [], 1)
        if writable:
            try:
                sent += conn.send(data[sent:sent + 65536])
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                pass
        if readable or conn.pending():
            try:
                chunk = conn.recv(262144)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                continue
            if not chunk:
                raise ConnectionError("closed early")
            received += chunk
    return bytes(received)


def test_an_app_id_balances_over_its_instances_in_turn_and_passes_over_a_dead_one(gateway, pki, backends, router):
    gw = gateway()
    port = backends["a"].port
    seen = [get_via_gateway(gw, pki, f"{APP}-{port}.{BASE}")[1]["backend"] for _round in range(12)]
    # Each connection starts with the next instance in turn: they take turns, not the nearest all.
    assert sorted(seen) == ["A"] * 6 + ["B"] * 6, seen
    # One candidate is dead (connection refused): the other one answers every time, at once.
    router.routes[APP] = [("dead", HOST_DEAD), (INST_B, HOST_B)]
    for _round in range(4):
        assert get_via_gateway(gw, pki, f"{APP}-{port}.{BASE}")[1]["backend"] == "B"
    # Only the first connect_top_n are tried.
    gw1 = gateway(connect_top_n=1)
    with pytest.raises(ssl.SSLError, match="INTERNAL_ERROR"):
        get_via_gateway(gw1, pki, f"{APP}-{port}.{BASE}")


def test_a_silent_candidate_costs_a_stagger_not_the_connect_timeout(gateway, pki, backends, router):
    """A candidate that never answers (its accept queue full: the kernel drops new SYNs) does not
    hold the connection until the connect timeout: the next candidate is tried after the stagger."""
    port = backends["a"].port
    silent = socket.socket()
    silent.bind(("127.77.0.6", port))
    silent.listen(0)
    fillers = []
    try:
        for _unused in range(2):       # fill the accept queue (listen(0) keeps one) without accepting
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.77.0.6", port))
            fillers.append(filler)
        time.sleep(0.2)
        gw = gateway(timeouts={"connect": 2})
        router.routes[APP] = [("silent", "127.77.0.6"), (INST_B, HOST_B)]
        # Whichever candidate each connection starts with, B answers, after the stagger when the
        # silent one went first (waiting for it would run out the 2-s connect timeout: a refusal).
        for _round in range(4):
            assert get_via_gateway(gw, pki, f"{APP}-{port}.{BASE}")[1]["backend"] == "B"
    finally:
        for filler in fillers:
            filler.close()
        silent.close()


def test_an_instance_id_reaches_that_instance_only(gateway, pki, backends):
    gw = gateway()
    port = backends["a"].port
    assert {get_via_gateway(gw, pki, f"{INST_B}-{port}.{BASE}")[1]["backend"] for _round in range(5)} == {"B"}
    assert get_via_gateway(gw, pki, f"{OTHER_APP}-{port}.{BASE}")[1]["backend"] == "other"


# ----------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("name", [
    f"unknown.{BASE}",                       # no such id
    f"{INST_A}-80-1.{BASE}",                 # two dashes
    f"{INST_A}-80gs.{BASE}", f"{INST_A}-gs.{BASE}",
    f"{INST_A}-0.{BASE}", f"{INST_A}-70000.{BASE}", f"{INST_A}-8o.{BASE}",
    f"{INST_A}.other.test", f"{INST_A}.x.{BASE}", f"{INST_A}.{BASE}.evil.test", BASE,
    f"gateway-8080.{BASE}", f"gateway-s.{BASE}", f"localhost.{BASE}",
    f"my_app.{BASE}",                        # not a host name
])
def test_refused_at_the_handshake(gateway, pki, router, name):
    gw = gateway()
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        tls_connect(gw, name, pki["gateway"].ca_file)
    assert router.asked in ([], ["unknown"], ["localhost"])
    assert gw.state() == ({}, 0, 1)


def test_no_sni_and_not_tls_are_refused(gateway, pki):
    gw = gateway()
    context = ssl.create_default_context(cafile=str(pki["gateway"].ca_file))
    context.check_hostname = False
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as raw:
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
            context.wrap_socket(raw)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: a.gw.test\r\n\r\n")
        assert raw.recv(100) == bytes((21, 3, 3, 0, 2, 2, 50))   # a decode_error alert, then closed


def test_only_addresses_the_router_named(gateway, pki, backends, router):
    gw = gateway()
    port = backends["dead_port"]
    # A router answer that is a name, not an address, is not resolved: 127.0.0.1:port (a
    # sentinel) must see nothing.
    router.routes["named"] = [("named", "localhost"), ("named2", "127.0.0.1.nip.io")]
    with pytest.raises(ssl.SSLError, match="ACCESS_DENIED|UNRECOGNIZED_NAME"):
        get_via_gateway(gw, pki, f"named-{port}.{BASE}")
    # The other app's id never reaches app A's instances, whatever the port.
    for _round in range(3):
        assert get_via_gateway(gw, pki, f"{OTHER_APP}-{port}.{BASE}")[1]["backend"] == "other"


def test_port_policy(gateway, pki, backends, router):
    port = backends["a"].port
    router.policies[INST_A] = {"ports": [{"port": 80, "pp": False}], "restrict_mode": True}
    router.policies[INST_B] = {"ports": [{"port": 80, "pp": False}], "restrict_mode": False}
    gw = gateway()
    assert get_via_gateway(gw, pki, f"{INST_A}.{BASE}")[1]["backend"] == "A"
    with pytest.raises(ssl.SSLError, match="ACCESS_DENIED"):
        get_via_gateway(gw, pki, f"{INST_A}-{port}.{BASE}")
    # Not restricted: any port.
    assert get_via_gateway(gw, pki, f"{INST_B}-{port}.{BASE}")[1]["backend"] == "B"
    # For the app, the instance that refuses the port is not a candidate.
    assert {get_via_gateway(gw, pki, f"{APP}-{port}.{BASE}")[1]["backend"] for _round in range(6)} == {"B"}
    # A policy not of dstack's shape refuses (fail closed).
    for bad in ({"ports": "all"}, {"ports": [{"port": str(port)}]}, {"ports": [{"port": port, "pp": "false"}]},
                {"ports": [], "restrict_mode": "no"}, ["ports"], {"ports": [{"port": True}]}):
        router.policies[INST_B] = bad
        with pytest.raises(ssl.SSLError, match="ACCESS_DENIED"):
            get_via_gateway(gw, pki, f"{INST_B}-{port}.{BASE}")


def test_proxy_protocol_v2_header_carries_the_client_address(gateway, pki, router):
    pp_backend = Backend("A-pp", HOST_A, expect_pp=True)
    pp_tls_backend = Backend("A-pp-tls", HOST_A, expect_pp=True, tls=pki["app"].server_context())
    try:
        router.policies[INST_A] = {"ports": [{"port": pp_backend.port, "pp": True},
                                             {"port": pp_tls_backend.port, "pp": True}], "restrict_mode": True}
        gw = gateway()
        for backend, suffix, ca in ((pp_backend, "", "gateway"), (pp_tls_backend, "s", "app")):
            name = f"{INST_A}-{backend.port}{suffix}.{BASE}"
            with tls_connect(gw, name, pki[ca].ca_file) as conn:
                client_address = conn.getsockname()
                status, body = http_get(conn, name)
            assert status == 200 and json.loads(body)["backend"] == backend.name
            assert backend.proxy_headers == [(client_address, ("127.0.0.1", gw.port))]
    finally:
        pp_backend.close()
        pp_tls_backend.close()


# ----------------------------------------------------------------------------- limits

def test_connection_cap_per_app(gateway, pki, backends):
    gw = gateway(max_connections_per_app=2)
    name = f"{INST_A}-{backends['aecho'].port}.{BASE}"
    held = [tls_connect(gw, name, pki["gateway"].ca_file) for _round in range(2)]
    try:
        for conn in held:
            conn.sendall(b"ping")
            assert _recv_exact(conn, 4) == b"ping"
        with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
            tls_connect(gw, name, pki["gateway"].ca_file)
        # Another id has its own count.
        assert get_via_gateway(gw, pki, f"{INST_B}.{BASE}")[1]["backend"] == "B"
        assert gw.state()[0] == {INST_A: 2}
    finally:
        held.pop().close()
    deadline = time.monotonic() + 5
    while gw.state()[0] != {INST_A: 1} and time.monotonic() < deadline:
        time.sleep(0.02)
    with tls_connect(gw, name, pki["gateway"].ca_file) as conn:
        conn.sendall(b"pong")
        assert _recv_exact(conn, 4) == b"pong"
    held.pop().close()


def test_idle_timeout_closes_both_sides(gateway, pki, backends):
    gw = gateway(timeouts={"idle": 0.6})
    echo = backends["aecho"]
    with tls_connect(gw, f"{INST_A}-{echo.port}.{BASE}", pki["gateway"].ca_file) as conn:
        for _round in range(4):              # activity keeps it open past the idle timeout
            time.sleep(0.3)
            conn.sendall(b"x")
            assert conn.recv(1) == b"x"
        started = time.monotonic()
        conn.settimeout(5)
        assert _closed_by_peer(conn)
        assert 0.4 < time.monotonic() - started < 2.0
    deadline = time.monotonic() + 3
    while gw.state()[1] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert gw.state()[:2] == ({}, 0)


def test_total_and_handshake_timeouts(gateway, pki, backends):
    gw = gateway(timeouts={"total": 1.0, "handshake": 0.5})
    with tls_connect(gw, f"{INST_A}-{backends['aecho'].port}.{BASE}", pki["gateway"].ca_file) as conn:
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < 4 and not closed:
            try:
                conn.sendall(b"y")
                closed = conn.recv(1) == b""
            except (OSError, ssl.SSLError):
                closed = True
            time.sleep(0.1)
        assert closed and 0.8 < time.monotonic() - started < 2.0
    # A client that sends no ClientHello is dropped after the handshake timeout.
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as raw:
        started = time.monotonic()
        assert raw.recv(10) == b""
        assert 0.3 < time.monotonic() - started < 2.0


def test_gateway_health(gateway, pki, router):
    gw = gateway()
    assert get_via_gateway(gw, pki, f"gateway.{BASE}", "/health") == (200, b"OK\n")
    assert get_via_gateway(gw, pki, f"gateway.{BASE}", "/nothing")[0] == 404
    assert router.asked == []


def test_gateway_pages_index_and_app_info(gateway, pki, router):
    """dstack's /.dstack/index and /.dstack/app-info (the gateway CVM's Info, asked off the event loop)."""
    asked = []

    def app_info():
        asked.append(threading.current_thread().name)
        if len(asked) == 2:
            raise OSError("the guest agent is gone")
        return {"app_id": "ab" * 20, "compose_hash": "cd" * 32}

    gw = gateway(app_info=app_info)
    assert get_via_gateway(gw, pki, f"gateway.{BASE}", "/.dstack/index") == \
        (200, {"type": "dstack gateway", "paths": ["/index", "/app-info"]})
    assert get_via_gateway(gw, pki, f"gateway.{BASE}", "/.dstack/app-info") == \
        (200, {"app_id": "ab" * 20, "compose_hash": "cd" * 32})
    assert get_via_gateway(gw, pki, f"gateway.{BASE}", "/.dstack/app-info")[0] == 502
    assert asked and gw.thread.name not in asked            # never on the event loop's thread
    # Without a guest agent there is no app-info page.
    plain = gateway()
    assert get_via_gateway(plain, pki, f"gateway.{BASE}", "/.dstack/app-info")[0] == 404
    assert get_via_gateway(plain, pki, f"gateway.{BASE}", "/.dstack/index")[1]["paths"] == ["/index"]
    assert router.asked == []


def test_no_descriptor_left_behind(gateway, pki, backends, router):
    gw = gateway(timeouts={"handshake": 0.5})
    port = backends["a"].port

    def open_fds():
        return len(os.listdir("/proc/self/fd"))

    get_via_gateway(gw, pki, f"{INST_A}.{BASE}")
    before = open_fds()
    router.routes[APP] = [("dead", HOST_DEAD), (INST_B, HOST_B)]
    for _round in range(10):
        get_via_gateway(gw, pki, f"{INST_A}.{BASE}")                     # termination
        get_via_gateway(gw, pki, f"{APP}-{port}.{BASE}")                 # a dead candidate closed
        with tls_connect(gw, f"{INST_A}-s.{BASE}", pki["app"].ca_file) as conn:
            http_get(conn, f"{INST_A}-s.{BASE}")                           # passthrough
        with pytest.raises(ssl.SSLError):
            tls_connect(gw, f"unknown.{BASE}", pki["gateway"].ca_file)   # refused
        with pytest.raises(ssl.SSLError):
            tls_connect(gw, f"{INST_A}.{BASE}", pki["app"].ca_file)      # client gives up mid-handshake
        get_via_gateway(gw, pki, f"gateway.{BASE}", "/health")
    socket.create_connection(("127.0.0.1", gw.port)).close()             # no ClientHello at all
    deadline = time.monotonic() + 5
    while (open_fds() > before or gw.state()[1]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_fds() <= before and gw.state()[:2] == ({}, 0)


def test_store_router_over_the_control_planes_store(gateway, pki, tmp_path):
    """Instances registered in the real SQLite store (addresses from a loopback client_ip_range)."""
    store = Store(str(tmp_path / "gateway.sqlite"), "127.78.0.0/25", "127.78.0.1/24")
    keys = [base64.b64encode(bytes([n]) * 32).decode() for n in (1, 2, 3)]
    first = store.register("1" * 40, "a" * 40, "c" * 64, keys[0]).instance
    second = store.register("2" * 40, "a" * 40, "c" * 64, keys[1]).instance
    assert (first.client_ip, second.client_ip) == ("127.78.0.2", "127.78.0.3")
    listeners = [Backend("first", first.client_ip), None]
    listeners[1] = Backend("second", second.client_ip, listeners[0].port)
    port = listeners[0].port
    try:
        store.record_handshakes({keys[1]: time.time()})           # the second is the freshest
        gw = gateway(StoreRouter(store, ttl=0.2), connect_top_n=1)
        assert get_via_gateway(gw, pki, f"{'a' * 40}-{port}.{BASE}")[1]["backend"] == "second"
        assert get_via_gateway(gw, pki, f"{'1' * 40}-{port}.{BASE}")[1]["backend"] == "first"
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
            get_via_gateway(gw, pki, f"{'b' * 40}-{port}.{BASE}")
        # The Admin's override for the app, and a removal, are routed within the ttl.
        store.set_port_policy_override("a" * 40, {"ports": [{"port": 80, "pp": False}], "restrict_mode": True})
        store.remove("2" * 40)
        time.sleep(0.3)
        with pytest.raises(ssl.SSLError, match="ACCESS_DENIED"):
            get_via_gateway(gw, pki, f"{'a' * 40}-{port}.{BASE}")
        store.set_port_policy_override("a" * 40, None)
        time.sleep(0.3)
        assert get_via_gateway(gw, pki, f"{'a' * 40}-{port}.{BASE}")[1]["backend"] == "first"
    finally:
        for listener in listeners:
            listener.close()
        store.close()


def _v2_header_by_hand(source, destination):
    addresses = (socket.inet_aton(source[0]) + socket.inet_aton(destination[0])
                 + struct.pack("!HH", source[1], destination[1]))
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes((0x21, 0x11)) + struct.pack("!H", len(addresses)) + addresses


def test_inbound_proxy_protocol_from_a_balancer(gateway, pki, router):
    """With inbound_pp the client address the app sees is the one the balancer's header gives."""
    pp_backend = Backend("A-pp", HOST_A, expect_pp=True)
    pp_tls_backend = Backend("A-pp-tls", HOST_A, expect_pp=True, tls=pki["app"].server_context())
    try:
        router.policies[INST_A] = {"ports": [{"port": pp_backend.port, "pp": True},
                                             {"port": pp_tls_backend.port, "pp": True}], "restrict_mode": False}
        gw = gateway(inbound_pp=True)
        headers = [_v2_header_by_hand(("203.0.113.7", 4242), ("198.51.100.1", 443)),
                   b"PROXY TCP4 192.0.2.9 198.51.100.2 5555 8443\r\n"]
        for header, backend, suffix, ca in ((headers[0], pp_backend, "", "gateway"),
                                            (headers[1], pp_tls_backend, "s", "app")):
            name = f"{INST_A}-{backend.port}{suffix}.{BASE}"
            context = ssl.create_default_context(cafile=str(pki[ca].ca_file))
            with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as raw:
                raw.sendall(header)
                with context.wrap_socket(raw, server_hostname=name) as conn:
                    assert http_get(conn, name)[0] == 200
        assert pp_backend.proxy_headers == [(("203.0.113.7", 4242), ("198.51.100.1", 443))]
        assert pp_tls_backend.proxy_headers == [(("192.0.2.9", 5555), ("198.51.100.2", 8443))]
        # A route without pp still works behind the balancer; a connection without the header is refused.
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as raw:
            raw.sendall(headers[0])
            context = ssl.create_default_context(cafile=str(pki["gateway"].ca_file))
            with context.wrap_socket(raw, server_hostname=f"{INST_B}.{BASE}") as conn:
                assert json.loads(http_get(conn, f"{INST_B}.{BASE}")[1])["backend"] == "B"
        with pytest.raises((ssl.SSLError, ConnectionError)):
            tls_connect(gw, f"{INST_A}.{BASE}", pki["gateway"].ca_file)
        # Without inbound_pp a PROXY header is not TLS: refused.
        plain = gateway()
        with socket.create_connection(("127.0.0.1", plain.port), timeout=10) as raw:
            raw.sendall(headers[0])
            assert raw.recv(100) == bytes((21, 3, 3, 0, 2, 2, 50))
    finally:
        pp_backend.close()
        pp_tls_backend.close()


def test_settings_from_gateway_toml(tmp_path):
    (tmp_path / "kms-root-ca.crt").write_text("the control plane's; the proxy reads none of it\n")
    (tmp_path / "gateway.toml").write_text(
        f'[core]\nstate_dir = "{tmp_path}"\n[core.wg]\npublic_key = "{base64.b64encode(bytes(32)).decode()}"\nendpoint = "127.0.0.1:51820"\n'
        f'[attestation]\nmode = "simulation"\nsim_state_dir = "{tmp_path}"\n'
        f'[rpc]\nkms_root_ca = "{tmp_path / "kms-root-ca.crt"}"\n'
        '[core.proxy]\nlisten_addr = "127.0.0.1"\nlisten_port = 9443\nbase_domain = "dstack.localhost"\n'
        'connect_top_n = 2\nmax_connections_per_app = 0\ninbound_pp_enabled = true\nworkers = 2\n'
        '[core.proxy.timeouts]\nconnect = "2s"\nhandshake = "500ms"\nidle = "1m"\ntotal = "1h"\n')
    config = load_config(str(tmp_path / "gateway.toml"), environ={})
    settings = ProxySettings.from_config(config["core"]["proxy"])
    assert settings == ProxySettings(base_domain="dstack.localhost", listen_addr="127.0.0.1", listen_port=9443,
                                     connect_top_n=2, max_connections_per_app=0, inbound_pp=True, reuse_port=True,
                                     timeouts=Timeouts(connect=2.0, handshake=0.5, idle=60.0, total=3600.0))
