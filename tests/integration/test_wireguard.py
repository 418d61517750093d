"""plugins/module_utils/wireguard.py on real network namespaces and wireguard-go.

Two namespaces ("gateway" and "cvm") joined by a veth pair, a wireguard-go interface in each,
configured through the Uapi client, and TCP through the tunnel (the machine has no ping). Every
namespace, link, process and UAPI socket a test makes is removed, even when the test fails: the
names carry this process's pid, and test_cleanup_after_a_failure checks that nothing is left.
"""

import contextlib
import itertools
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ansible_collections.dstack.tee.plugins.module_utils import wireguard
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.wireguard import Peer, Uapi, WgInterface


def _ip_netns_works():
    if shutil.which("ip") is None:
        return False
    return subprocess.run(["ip", "netns", "list"], capture_output=True, check=False).returncode == 0


pytestmark = [
    pytest.mark.skipif(shutil.which("wireguard-go") is None,
                       reason="wireguard-go is not installed (scripts/setup.sh installs it)"),
    pytest.mark.skipif(not _ip_netns_works(),
                       reason="`ip netns` is not available (iproute2, root; scripts/setup.sh installs it)"),
]

PID = os.getpid()
_SERIAL = itertools.count()
UNDERLAY = ("172.31.77.1", "172.31.77.2")   # the veth pair: the "internet" between the two
TUNNEL = ("10.201.0.1", "10.201.0.2")       # the WireGuard addresses
WG_PORT = 51820
ECHO_PORT = 8090

# Serves connections until killed: answers "<what it read, reversed> from <the client's address>".
ECHO_SERVER = """
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(8)
print("ready", flush=True)
while True:
    conn, addr = srv.accept()
    with conn:
        data = conn.recv(100)
        conn.sendall(data[::-1] + b" from " + addr[0].encode())
"""
CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as sock:
    sock.settimeout(float(sys.argv[3]))
    sock.sendall(b"hello")
    print(sock.recv(100).decode())
"""


def names():
    """Names unique to this process and call: interfaces (<= 15 bytes) and namespaces."""
    n = next(_SERIAL)
    return {"ns_a": f"dstack-wgt-{PID}-{n}-gw", "ns_b": f"dstack-wgt-{PID}-{n}-cvm",
            "veth_a": f"dwv{PID}x{n}a", "veth_b": f"dwv{PID}x{n}b",
            "wg_a": f"dwg{PID}x{n}a", "wg_b": f"dwg{PID}x{n}b", "wg_c": f"dwg{PID}x{n}c"}


class Topology:
    """What one test made, to drive and to check."""

    def __init__(self, made):
        self.names = made
        self.key_a = wireguard.generate_private_key()
        self.key_b = wireguard.generate_private_key()
        self.pub_a = wireguard.public_key(self.key_a)
        self.pub_b = wireguard.public_key(self.key_b)
        self.wg_a = WgInterface(made["wg_a"], netns=made["ns_a"])
        self.wg_b = WgInterface(made["wg_b"], netns=made["ns_b"])
        self.echo = None

    @property
    def a(self):
        return self.wg_a.uapi

    @property
    def b(self):
        return self.wg_b.uapi

    def connect(self, timeout=3.0):
        """From the gateway namespace to the CVM's tunnel address: the echo's answer, or None."""
        proc = subprocess.run(
            wireguard.netns_exec_argv(self.names["ns_a"], [sys.executable, "-c", CLIENT, TUNNEL[1],
                                                           str(ECHO_PORT), str(timeout)]),
            capture_output=True, text=True, timeout=timeout + 10, check=False)
        return proc.stdout.strip() if proc.returncode == 0 else None

    def connect_retrying(self, attempts=3):
        for _attempt in range(attempts):
            answer = self.connect()
            if answer:
                return answer
        return None

    def link_up_both_ways(self):
        """A knows B's key and where B is; B knows A's key and learns where A is from its packets."""
        self.a.set_peer(self.pub_b, [f"{TUNNEL[1]}/32"], endpoint=f"{UNDERLAY[1]}:{WG_PORT}")
        self.b.set_peer(self.pub_a, [f"{TUNNEL[0]}/32"])


@contextlib.contextmanager
def topology(inner=False):
    """Two namespaces joined by a veth, a wireguard-go interface in each, the echo server behind B's.
    inner: A's interface is moved into a third namespace (names()["ns_a"] + "-in"; WgInterface
    link_netns) while its wireguard-go and UDP port stay in ns_a."""
    made = names()
    made["inner"] = made["ns_a"] + "-in" if inner else None
    with contextlib.ExitStack() as stack:
        for ns in (made["ns_a"], made["ns_b"], made["inner"]):
            if ns:
                stack.callback(wireguard.netns_remove, ns)
                wireguard.netns_add(ns)
        if inner:
            wireguard.configure_link("lo", made["inner"])
        wireguard.veth_pair(made["veth_a"], made["ns_a"], made["veth_b"], made["ns_b"])
        wireguard.configure_link(made["veth_a"], made["ns_a"], address=f"{UNDERLAY[0]}/24")
        wireguard.configure_link(made["veth_b"], made["ns_b"], address=f"{UNDERLAY[1]}/24")
        topo = Topology(made)
        if inner:
            topo.wg_a = WgInterface(made["wg_a"], netns=made["ns_a"], link_netns=made["inner"])
        stack.callback(topo.wg_a.down)
        topo.wg_a.up(f"{TUNNEL[0]}/24", private_key=topo.key_a, listen_port=WG_PORT)
        stack.callback(topo.wg_b.down)
        topo.wg_b.up(f"{TUNNEL[1]}/24", private_key=topo.key_b, listen_port=WG_PORT)
        topo.echo = subprocess.Popen(  # pylint: disable=consider-using-with
            wireguard.netns_exec_argv(made["ns_b"], [sys.executable, "-c", ECHO_SERVER, TUNNEL[1], str(ECHO_PORT)]),
            stdout=subprocess.PIPE, text=True)
        stack.callback(_stop, topo.echo)
        assert topo.echo.stdout.readline().strip() == "ready"
        yield topo


def _stop(proc):
    proc.kill()
    proc.wait()
    proc.stdout.close()


@pytest.fixture
def topo():
    with topology() as made:
        yield made


def peers_by_key(uapi):
    return {peer.public_key: peer for peer in uapi.get()["peers"]}


def test_tcp_through_the_tunnel_and_the_handshake_read_back(topo):
    device = topo.a.get()
    assert device["private_key"] == topo.key_a
    assert device["public_key"] == topo.pub_a
    assert device["listen_port"] == WG_PORT
    assert device["peers"] == []
    # The tunnel address exists only on the other side of the tunnel: unreachable without a peer.
    assert topo.connect(timeout=1.0) is None

    before = time.time()
    topo.link_up_both_ways()
    answer = topo.connect_retrying()
    # The CVM's server saw the gateway's tunnel address: the bytes came through WireGuard.
    assert answer == f"olleh from {TUNNEL[0]}"

    peer_b = peers_by_key(topo.a)[topo.pub_b]
    assert peer_b.allowed_ips == [f"{TUNNEL[1]}/32"]
    assert peer_b.endpoint == f"{UNDERLAY[1]}:{WG_PORT}"
    assert before - 1 <= peer_b.last_handshake <= time.time() + 1
    assert peer_b.rx_bytes > 0 and peer_b.tx_bytes > 0
    assert peer_b.persistent_keepalive is None
    peer_a = peers_by_key(topo.b)[topo.pub_a]
    assert before - 1 <= peer_a.last_handshake <= time.time() + 1
    # B was given no endpoint: it learned A's from the handshake.
    assert peer_a.endpoint == f"{UNDERLAY[0]}:{WG_PORT}"


def test_set_peer_replaces_allowed_ips_and_remove_peer_closes_the_tunnel(topo):
    topo.link_up_both_ways()
    topo.a.set_peer(topo.pub_b, ["10.201.0.2", "10.99.0.0/16"], endpoint=f"{UNDERLAY[1]}:{WG_PORT}",
                    persistent_keepalive=25)
    peer_b = peers_by_key(topo.a)[topo.pub_b]
    assert sorted(peer_b.allowed_ips) == ["10.201.0.2/32", "10.99.0.0/16"]
    assert peer_b.persistent_keepalive == 25
    topo.a.set_peer(topo.pub_b, ["10.201.0.2/32"])  # replaced, not added to; endpoint kept
    peer_b = peers_by_key(topo.a)[topo.pub_b]
    assert peer_b.allowed_ips == ["10.201.0.2/32"]
    assert peer_b.endpoint == f"{UNDERLAY[1]}:{WG_PORT}"
    assert peer_b.persistent_keepalive is None
    assert topo.connect_retrying() == f"olleh from {TUNNEL[0]}"

    topo.b.remove_peer(topo.pub_a)
    assert topo.b.get()["peers"] == []
    assert topo.connect(timeout=1.0) is None
    topo.b.remove_peer(topo.pub_a)  # removing a peer that is not there is not an error
    assert topo.b.get()["peers"] == []


def test_sync_peers_makes_the_set_exact_and_keeps_live_sessions(topo):
    topo.link_up_both_ways()
    assert topo.connect_retrying()
    stale = [wireguard.public_key(wireguard.generate_private_key()) for _peer in range(2)]
    topo.a.set_peer(stale[0], ["10.201.0.10/32"])
    topo.a.set_peer(stale[1], ["10.201.0.11/32"])
    handshake = peers_by_key(topo.a)[topo.pub_b].last_handshake
    assert handshake > 0
    fresh = wireguard.public_key(wireguard.generate_private_key())

    topo.a.sync_peers([Peer(topo.pub_b, [f"{TUNNEL[1]}/32", "10.202.0.0/24"]),
                       Peer(fresh, ["10.201.0.12/32"], endpoint="172.31.77.9:9182", persistent_keepalive=25)])
    now = peers_by_key(topo.a)
    assert set(now) == {topo.pub_b, fresh}
    assert sorted(now[topo.pub_b].allowed_ips) == ["10.201.0.2/32", "10.202.0.0/24"]
    assert now[fresh].endpoint == "172.31.77.9:9182" and now[fresh].persistent_keepalive == 25
    # The peer that stayed kept its session (replace_peers would have dropped it) and its
    # endpoint (no endpoint in the Peer: left as it was).
    assert now[topo.pub_b].last_handshake == handshake
    assert now[topo.pub_b].endpoint == f"{UNDERLAY[1]}:{WG_PORT}"
    assert topo.connect() == f"olleh from {TUNNEL[0]}"

    topo.a.sync_peers([])
    assert topo.a.get()["peers"] == []


def test_sync_peers_checks_everything_before_changing_anything(topo):
    topo.link_up_both_ways()
    other = wireguard.public_key(wireguard.generate_private_key())
    cases = [
        ([Peer(other, ["10.201.0.7/32"]), Peer(other, ["10.201.0.8/32"])], "peers[1].public_key"),
        ([Peer(other, ["10.201.0.7/32"]), Peer(topo.pub_b, ["10.201.0.7/32"])], "peers[1].allowed_ips[0]"),
        ([Peer(other, ["10.201.0.7/32"]), Peer(topo.pub_b, ["10.201.0.300/32"])], "peers[1].allowed_ips[0]"),
        ([Peer(other, ["10.201.0.7/32"]), Peer(topo.pub_b, ["10.201.0.2/24"])], "peers[1].allowed_ips[0]"),
        ([Peer(other, ["10.201.0.7/32"], endpoint="gateway.example:51820")], "peers[0].endpoint"),
        ([Peer(other, ["10.201.0.7/32"], persistent_keepalive=-1)], "peers[0].persistent_keepalive"),
        ([Peer(other, []), {"public_key": other}], "peers[1]"),
    ]
    before = topo.a.get()
    for peers, field in cases:
        with pytest.raises(DstackError) as info:
            topo.a.sync_peers(peers)
        assert info.value.field == field
        assert topo.a.get() == before  # nothing half applied


def test_errors_name_the_field_and_carry_no_private_key(topo):
    secret = wireguard.generate_private_key()
    almost = secret[:-2] + "="  # key-shaped, one byte short
    with pytest.raises(DstackError) as info:
        topo.a.set_device(private_key=almost)
    assert info.value.field == "private_key" and secret[:20] not in str(info.value)
    with pytest.raises(DstackError) as info:
        topo.a.set_peer("not a key", [f"{TUNNEL[1]}/32"])
    assert info.value.field == "public_key"
    with pytest.raises(DstackError) as info:
        topo.a.set_peer(topo.pub_b, [f"{TUNNEL[1]}/32", "10.0.0.0/33"])
    assert info.value.field == "allowed_ips[1]"
    with pytest.raises(DstackError) as info:
        topo.a.set_peer(topo.pub_b, f"{TUNNEL[1]}/32")
    assert info.value.field == "allowed_ips"
    with pytest.raises(DstackError) as info:
        topo.a.set_peer(topo.pub_b, [f"{TUNNEL[1]}/32"], endpoint="gateway.example:51820")
    assert info.value.field == "endpoint" and "host name" in info.value.reason
    with pytest.raises(DstackError) as info:
        topo.a.set_device(listen_port=70000)
    assert info.value.field == "listen_port"
    # None of those reached wireguard-go: A is as it was.
    device = topo.a.get()
    assert device["private_key"] == topo.key_a and device["peers"] == []

    # A port in use, found by wireguard-go itself: a third interface in A's namespace. Its up()
    # fails naming the field and leaves no process, link or socket behind.
    third = WgInterface(topo.names["wg_c"], netns=topo.names["ns_a"])
    try:
        with pytest.raises(DstackError) as info:
            third.up("10.203.0.1/24", private_key=secret, listen_port=WG_PORT)
        assert info.value.field == "listen_port" and "in use" in info.value.reason
        assert secret not in str(info.value)
        assert not third.running
        assert not Path(third.uapi.path).exists()
        assert not wireguard.link_exists(topo.names["wg_c"], topo.names["ns_a"])
    finally:
        third.down()

    # No socket: the interface is named.
    with pytest.raises(DstackError) as info:
        Uapi(f"dwg{PID}none").get()
    assert info.value.field == "interface" and "no WireGuard UAPI socket" in info.value.reason
    # A name already in use is refused, and the interface that has it keeps working.
    with pytest.raises(DstackError) as info:
        WgInterface(topo.names["wg_a"], netns=topo.names["ns_b"]).up()
    assert info.value.field == "interface" and "in use" in info.value.reason
    assert topo.a.get()["public_key"] == topo.pub_a
    # A link of that name (here the veth) in the namespace: refused, and the link left alone.
    with pytest.raises(DstackError) as info:
        with WgInterface(topo.names["veth_a"], netns=topo.names["ns_a"]) as clash:
            clash.up()
    assert info.value.field == "interface" and "exists" in info.value.reason
    assert wireguard.link_exists(topo.names["veth_a"], topo.names["ns_a"])
    with pytest.raises(DstackError) as info:
        WgInterface("-help")  # wireguard-go would take it for a flag
    assert info.value.field == "interface"


def test_render_wg_quick_field_by_field():
    key = wireguard.generate_private_key()
    pk1, pk2 = sorted(wireguard.public_key(wireguard.generate_private_key()) for _peer in range(2))
    servers = [{"pk": pk2, "ip": "10.0.0.1/24", "endpoint": "gateway.example.com:9182"},
               {"pk": pk1, "ip": "fd00::1", "endpoint": "[fd00::53]:51820"}]
    text = wireguard.render_wg_quick(key, "10.0.0.7", servers)
    # dstack's dstack-wg0.conf, byte for byte: interface, then peers sorted by pk.
    assert text == (
        "[Interface]\n"
        f"PrivateKey = {key}\n"
        "ListenPort = 9182\n"
        "Address = 10.0.0.7/32\n"
        "\n"
        "[Peer]\n"
        f"PublicKey = {pk1}\n"
        "AllowedIPs = fd00::1/128\n"
        "Endpoint = [fd00::53]:51820\n"
        "PersistentKeepalive = 25\n"
        "[Peer]\n"
        f"PublicKey = {pk2}\n"
        "AllowedIPs = 10.0.0.1/32\n"
        "Endpoint = gateway.example.com:9182\n"
        "PersistentKeepalive = 25\n")
    assert wireguard.render_wg_quick(key, "10.0.0.7", list(reversed(servers))) == text

    bad = [
        (("x", "10.0.0.7", servers), "private_key"),
        ((key, "10.0.0.700", servers), "client_ip"),
        ((key, "10.0.0.7", {"pk": pk1}), "servers"),
        ((key, "10.0.0.7", [servers[0], {"pk": pk1, "ip": "10.0.0.1"}]), "servers[1].endpoint"),
        ((key, "10.0.0.7", [{"pk": "nope", "ip": "10.0.0.1", "endpoint": "a:1"}]), "servers[0].pk"),
        ((key, "10.0.0.7", [{"pk": pk1, "ip": "gateway", "endpoint": "a:1"}]), "servers[0].ip"),
        ((key, "10.0.0.7", [{"pk": pk1, "ip": "10.0.0.1", "endpoint": "a:1\nPostUp = sh"}]), "servers[0].endpoint"),
        ((key, "10.0.0.7", [{"pk": pk1, "ip": "10.0.0.1", "endpoint": "a:99999"}]), "servers[0].endpoint"),
        ((key, "10.0.0.7", [{"pk": pk1, "ip": "10.0.0.1", "endpoint": "a b:1"}]), "servers[0].endpoint"),
    ]
    for args, field in bad:
        with pytest.raises(DstackError) as info:
            wireguard.render_wg_quick(*args)
        assert info.value.field == field, (args[1:], info.value)
        assert key not in str(info.value)


def test_render_wg_quick_brings_up_a_cvm_with_wg_quick(topo, tmp_path):
    """The rendered file, as dstack's CVM uses it (`wg-quick up`), joins the gateway's tunnel."""
    if shutil.which("wg-quick") is None:
        pytest.skip("wg-quick (wireguard-tools) is not installed (scripts/setup.sh installs it)")
    # The CVM side becomes a wg-quick interface in B's namespace instead of the supervised one.
    topo.wg_b.down()
    cvm_if = topo.names["wg_c"]
    conf = tmp_path / f"{cvm_if}.conf"
    conf.write_text(wireguard.render_wg_quick(
        topo.key_b, TUNNEL[1], [{"pk": topo.pub_a, "ip": f"{TUNNEL[0]}/24", "endpoint": f"{UNDERLAY[0]}:{WG_PORT}"}],
        listen_port=WG_PORT))
    conf.chmod(0o600)
    ns_b = topo.names["ns_b"]
    env = dict(os.environ, WG_QUICK_USERSPACE_IMPLEMENTATION="wireguard-go")
    # The gateway has the CVM's peer before the CVM comes up (RegisterCvm answers after adding
    # it), so the CVM's first keepalive completes a handshake.
    topo.a.set_peer(topo.pub_b, [f"{TUNNEL[1]}/32"])
    try:
        up = subprocess.run(wireguard.netns_exec_argv(ns_b, ["wg-quick", "up", str(conf)]), env=env,
                            capture_output=True, text=True, timeout=20, check=False)
        assert up.returncode == 0, up.stderr
        cvm = Uapi(cvm_if).get()
        assert cvm["public_key"] == topo.pub_b and cvm["listen_port"] == WG_PORT
        [gateway] = cvm["peers"]
        assert gateway.public_key == topo.pub_a
        assert gateway.allowed_ips == [f"{TUNNEL[0]}/32"]
        assert gateway.endpoint == f"{UNDERLAY[0]}:{WG_PORT}"
        assert gateway.persistent_keepalive == 25
        deadline = time.time() + 10
        while time.time() < deadline and not peers_by_key(topo.a)[topo.pub_b].last_handshake:
            time.sleep(0.1)
        peer = peers_by_key(topo.a)[topo.pub_b]
        assert peer.last_handshake > 0
        assert peer.endpoint == f"{UNDERLAY[1]}:{WG_PORT}"  # learned from the CVM's packets
        assert topo.connect_retrying() == f"olleh from {TUNNEL[0]}"
    finally:
        subprocess.run(wireguard.netns_exec_argv(ns_b, ["wg-quick", "down", str(conf)]), env=env,
                       capture_output=True, timeout=20, check=False)
        # wg-quick's wireguard-go is a daemon, not ours to supervise: deleting its link ends it.
        wireguard.delete_link(cvm_if, ns_b)
        socket_path = Path(Uapi(cvm_if).path)
        deadline = time.time() + 5
        while socket_path.exists() and time.time() < deadline:
            time.sleep(0.05)
    assert not socket_path.exists()


def test_cleanup_after_a_failure_leaves_nothing():
    seen = {}
    with pytest.raises(RuntimeError):
        with topology() as made:
            seen["names"] = made.names
            seen["processes"] = [made.wg_a.process, made.wg_b.process, made.echo]
            seen["sockets"] = [Path(made.a.path), Path(made.b.path)]
            assert all(path.exists() for path in seen["sockets"])
            raise RuntimeError("a test failing half way")
    assert all(proc.poll() is not None for proc in seen["processes"])
    assert not any(path.exists() for path in seen["sockets"])
    assert not wireguard.netns_exists(seen["names"]["ns_a"])
    assert not wireguard.netns_exists(seen["names"]["ns_b"])
    assert not wireguard.link_exists(seen["names"]["veth_a"])
    assert not wireguard.link_exists(seen["names"]["wg_a"])


def test_link_netns_puts_the_tunnel_in_its_own_namespace_and_the_udp_port_outside():
    """The gateway's namespace trick: wireguard-go (and its UDP port) in ns_a, the interface moved
    into an inner namespace. The CVM's tunnel address answers from the inner namespace only; the
    encrypted packets still go out through ns_a; down() removes the moved link."""
    with topology(inner=True) as topo:
        made, inner = topo.names, topo.names["inner"]
        assert wireguard.link_exists(made["wg_a"], inner) and not wireguard.link_exists(made["wg_a"], made["ns_a"])
        topo.link_up_both_ways()

        def connect_from(netns, timeout):
            return subprocess.run(wireguard.netns_exec_argv(netns, [sys.executable, "-c", CLIENT, TUNNEL[1],
                                                                    str(ECHO_PORT), str(timeout)]),
                                  capture_output=True, text=True, timeout=timeout + 10, check=False)

        answer = next((done.stdout.strip() for done in (connect_from(inner, 3.0) for _attempt in range(3))
                       if done.returncode == 0), None)
        assert answer == f"olleh from {TUNNEL[0]}"
        # The packets went through ns_a's UDP port: B learned A's endpoint on the underlay.
        assert peers_by_key(topo.b)[topo.pub_a].endpoint == f"{UNDERLAY[0]}:{WG_PORT}"
        # From the namespace wireguard-go runs in, the tunnel address is not there at all.
        assert connect_from(made["ns_a"], 1.0).returncode != 0
        topo.wg_a.down()
        assert not wireguard.link_exists(made["wg_a"], inner)
        assert not Path(topo.a.path).exists()
