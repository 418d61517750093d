"""A gateway cluster on a real three-member etcd: two `dstack-gateway serve` nodes, a CVM, real
namespaces, wireguard-go, the real guest boot.

The topology (every name carries this process's pid; everything is removed, even on failure):

    root namespace 10.99.X.1  (the client; the etcd members' client ports)
         |                       lan-<pid>: one bridge
    gwa-<pid> 10.99.X.2  node 1: serve, wga<pid> 10.77.0.1/24, proxy :8443, control :8010, Admin :8011
    gwb-<pid> 10.99.X.3  node 2: serve, wgb<pid> 10.77.0.2/24 (inside client_ip_range: the cluster
                         keeps it out of the allocation)
    ccv-<pid> 10.99.X.4  the CVM: app A booted by the guest agent against a real KMS (in process),
                         gateway_urls [node 1, node 2]; its WireGuard interface; the app on its
                         tunnel address only

Both nodes are instances of one gateway app (the KMS's gatewayAppId), each with its own RA-TLS
certificate from its own CVM boot; they share etcd ([core.sync] etcd_endpoints, interval 1 s,
node_ttl 3 s). The CVM registers through node 1 and is answered by node 2's proxy; node 1 stops
and node 2 still answers; the CVM registers again (through node 2, then node 1 once it is back)
and keeps its address; the etcd leader is killed and nothing is lost; node 2 is killed and is
marked down once its lease expires.

The in-process tests check what a node accepts of another: only an attested node of the same
gateway app, with its record signed by its attested key.
"""

import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import types
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

# pylint: disable=wrong-import-position
from conftest import run_module  # noqa: E402
from etcd_fixtures import EtcdCluster, etcd_cluster, needs_etcd  # noqa: E402,F401  pylint: disable=unused-import
from test_gateway_client import GATEWAY_COMPOSE, GuestTlsKey, _boot  # noqa: E402
from test_gateway_control import ADMIN_TOKEN, Cvm, RecordingHub, gateway_toml  # noqa: E402
from test_gateway_cvm import SERVER_CERT  # noqa: E402
from test_gateway_serve import (  # noqa: E402
    ADMIN_PORT, APP_SERVERS, BASE, RPC_PORT, WG_PORT, _body, _free_third_octet,
    _gateway_toml, _https_get, _ip, _kill_everything_in, _ns_pids, _remove_socket, _write_certs, needs_ip_netns,
    needs_wireguard_go)
from test_guest_boot import OS_IMAGE, NoContainers, make_share  # noqa: E402
from test_kms import make_kms  # noqa: E402
from ansible_collections.dstack.tee.agents.gateway import config as gateway_config  # noqa: E402
from ansible_collections.dstack.tee.agents.gateway.app import create_admin_app, create_app  # noqa: E402
from ansible_collections.dstack.tee.agents.gateway.store_etcd import EtcdClient, EtcdStore  # noqa: E402
from ansible_collections.dstack.tee.agents.guest import gateway_link  # noqa: E402
from ansible_collections.dstack.tee.agents.guest.boot import Boot  # noqa: E402
from ansible_collections.dstack.tee.agents.guest.context import GuestContext  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils import root_keys, wireguard  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.kms_client import KmsCertSigner  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx  # noqa: E402

pytestmark = needs_etcd

PID = os.getpid()
LAN_NS, CVM_NS = f"lan-{PID}", f"ccv-{PID}"
NODE_NS = (f"gwa-{PID}", f"gwb-{PID}")
NODE_WG = (f"wga{PID}", f"wgb{PID}")
NODE_WG_IP = ("10.77.0.1/24", "10.77.0.2/24")
SYNC = {"interval": "1s", "node_ttl": "3s", "timeout": "1s"}


# ---- the world: a KMS, the gateway app (two node certificates), app A --------------------------------------

def _write_pair(folder, answer):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rpc.crt").write_text("".join(answer["certificate_chain"][:2]))
    (folder / "rpc.key").write_text(answer["key"])
    (folder / "rpc.key").chmod(0o600)
    return folder / "rpc.crt", folder / "rpc.key"


class ClusterWorld:
    """The KMS, two CVMs of the gateway app (one per node: each its own attested certificate),
    a CVM of app A (whose certificate is attested but another app's), app A's share."""

    def __init__(self, base, gateway_urls=()):
        self.base = base
        self.sim = SimTdx(str(base / "sim"))
        _kms_app, self.kms = make_kms(base, self.sim)
        (base / "a").mkdir()
        (base / "g").mkdir()
        self.share, self.app = make_share(base / "a", run_module, self.kms)
        share_g, self.app_g = make_share(base / "g", run_module, self.kms, compose=GATEWAY_COMPOSE)
        (base / "auth-config.json").write_text(json.dumps({
            "gatewayAppId": self.app_g["app_id"], "osImages": ["0x" + OS_IMAGE],
            "apps": {"0x" + a["app_id"]: {"composeHashes": ["0x" + a["compose_hash"]], "allowAnyDevice": True}
                     for a in (self.app, self.app_g)}}))
        self.node_certs = [_write_pair(base / f"node{i + 1}", GuestTlsKey(_boot(base, f"g{i + 1}", share_g, self.sim,
                                                                                self.kms))(SERVER_CERT))
                           for i in range(2)]
        self.app_a_cvm = _boot(base, "a0", self.share, self.sim, self.kms)
        self.other_app_cert = _write_pair(base / "other", GuestTlsKey(self.app_a_cvm)(SERVER_CERT))
        self.kms_dir = base / "kms"
        self.kms_root = self.kms_dir / root_keys.ROOT_CA_CERT
        sys_config = json.loads((self.share / ".sys-config.json").read_text())
        sys_config["gateway_urls"] = list(gateway_urls)
        (self.share / ".sys-config.json").write_text(json.dumps(sys_config))

    def boot(self, cleanup, name, netns, **settings):
        """A CVM of app A booted by the real Boot, its gateway step included."""
        ctx = GuestContext.open(str(self.share), str(self.base / name), tee="sim", sim_state_dir=self.sim.state_dir)
        ctx.cert_signer = KmsCertSigner(self.kms, ctx)
        boot = Boot(ctx, kms_client=self.kms, runner=NoContainers(), netns=netns, gateway_settings=settings)
        cleanup.callback(boot.close)
        try:
            return boot.run()
        finally:
            if boot.instance_id:
                cleanup.callback(_remove_socket, gateway_link.interface_name(boot.instance_id, boot.app_id))


# ---- in process: what a node accepts of another -------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return ClusterWorld(tmp_path_factory.mktemp("cluster-world"))


def _node_config(world, etcd, prefix, folder, node, cert=None, hub_ip=None):  # pylint: disable=redefined-outer-name
    cert, key = cert or world.node_certs[node - 1]
    path = gateway_toml({"kms_dir": world.kms_dir, "sim": world.sim}, folder / f"gw{node}", **{
        "core.wg": {"private_key": wireguard.generate_private_key(), "endpoint": f"10.99.0.{node}:51820",
                    "ip": hub_ip or f"10.0.0.{node}/24", "reserved_net": []},
        "core.sync": {"etcd_endpoints": etcd.endpoints, "etcd_prefix": prefix, "node_id": node, **SYNC},
        "rpc": {"cert": str(cert), "key": str(key), "listen": f"10.99.0.{node}:8010"},
        "admin": {"listen": "127.0.0.1:8011", "token": ADMIN_TOKEN}})
    return gateway_config.load_config(path, environ={})


class Node:
    """One node's control and Admin apps (in process), its store on etcd."""

    def __init__(self, config):
        self.config = config
        self.hub = RecordingHub()
        self.app = create_app(config, hub=self.hub)
        self.service = self.app.extensions["dstack_gateway"]
        self.client = self.app.test_client()
        self.admin = create_admin_app(config, self.service).test_client()
        self.service.cluster.join()

    def register(self, cvm):
        return self.client.post("/prpc/Gateway.RegisterCvm", json={"client_public_key": cvm.wg_public},
                                environ_base={"dstack.peer_cert_chain": cvm.chain})

    def status(self):
        answer = self.admin.post("/prpc/Admin.Status", json={}, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert answer.status_code == 200, answer.json
        return answer.json


def test_a_cvm_registered_with_one_node_gets_every_live_attested_node(world, etcd_cluster, tmp_path):  # pylint: disable=redefined-outer-name
    prefix = f"/cluster-{PID}-{time.time_ns()}/"
    one = Node(_node_config(world, etcd_cluster, prefix, tmp_path, 1))
    two = Node(_node_config(world, etcd_cluster, prefix, tmp_path, 2))
    cvm = Cvm(world.app_a_cvm, world.kms, world.app)
    answer = one.register(cvm)
    assert answer.status_code == 200, answer.json
    wg = answer.json["wg"]
    # 10.0.0.1 and .2 are the nodes' hub addresses (no reserved_net here): the CVM gets .3.
    assert wg["client_ip"] == "10.0.0.3"
    assert wg["servers"] == [{"pk": n.config["core"]["wg"]["public_key"], "ip": f"10.0.0.{i}/24",
                              "endpoint": f"10.99.0.{i}:51820"} for i, n in ((1, one), (2, two))]
    assert [(g["id"], g["url"]) for g in answer.json["gateways"]] == [(1, "https://10.99.0.1:8010"),
                                                                      (2, "https://10.99.0.2:8010")]
    # Node 2 sees it, answers for it, and lists itself first.
    again = two.register(cvm)
    assert again.json["wg"]["client_ip"] == "10.0.0.3" and [s["ip"] for s in again.json["wg"]["servers"]] == [
        "10.0.0.2/24", "10.0.0.1/24"]
    peers = two.client.post("/prpc/Gateway.GetPeers", environ_base={"dstack.peer_cert_chain": cvm.chain}).json
    assert peers == {"my_id": 2, "my_url": "https://10.99.0.2:8010",
                     "peers": [{"id": 2, "url": "https://10.99.0.2:8010"}, {"id": 1, "url": "https://10.99.0.1:8010"}]}
    assert [(n["id"], n["up"], n["accepted"]) for n in one.status()["nodes"]] == [(1, True, True), (2, True, True)]

    # A node with another app's certificate (attested, the same KMS) joins the store: never listed.
    rogue = Node(_node_config(world, etcd_cluster, prefix, tmp_path, 3, cert=world.other_app_cert,
                              hub_ip="10.0.0.103/24"))
    listed = one.register(cvm).json
    assert [s["ip"] for s in listed["wg"]["servers"]] == ["10.0.0.1/24", "10.0.0.2/24"]
    status = {n["id"]: n for n in one.status()["nodes"]}
    assert status[3]["up"] and not status[3]["accepted"] and "app_id" in status[3]["reason"], status[3]
    # ... and the rogue node does not list the others either (they are not its app).
    assert [s["ip"] for s in rogue.register(cvm).json["wg"]["servers"]] == ["10.0.0.103/24"]

    # Node 2's record copied next to another WireGuard key: the signature no longer holds.
    store = EtcdStore(EtcdClient(etcd_cluster.endpoints), "10.0.0.0/25", "10.0.0.9/24", node_id=4, prefix=prefix)
    forged = json.loads(dict((n, r) for n, r, _alive in store.nodes())[2])
    forged["record"].update(id=4, wg_public_key=wireguard.public_key(wireguard.generate_private_key()))
    store.put_node(json.dumps(forged).encode())
    store.heartbeat(3)
    status = {n["id"]: n for n in one.status()["nodes"]}
    assert not status[4]["accepted"] and status[4]["reason"].startswith("node.signature"), status[4]
    assert len(one.register(cvm).json["wg"]["servers"]) == 2

    # Node 2 stops: marked down at once, no longer given to CVMs.
    two.service.cluster.leave()
    assert [s["ip"] for s in one.register(cvm).json["wg"]["servers"]] == ["10.0.0.1/24"]
    assert [(n["id"], n["up"]) for n in one.status()["nodes"] if n["id"] <= 2] == [(1, True), (2, False)]
    store.leave()
    rogue.service.cluster.leave()


def test_a_node_without_an_attested_certificate_does_not_start(world, etcd_cluster, tmp_path):  # pylint: disable=redefined-outer-name
    server_ca = _write_certs(tmp_path, ["10.99.0.1"])   # a certificate of a test CA: no attestation
    config = _node_config(world, etcd_cluster, f"/cluster-{PID}-x/", tmp_path, 1,
                          cert=(tmp_path / "rpc.crt", tmp_path / "rpc.key"))
    del server_ca
    service = create_app(config, hub=RecordingHub()).extensions["dstack_gateway"]
    assert isinstance(service.store, EtcdStore)   # what needs only the store (the ACME commands) works
    with pytest.raises(DstackError) as err:       # serve joins first thing: it stops here
        service.cluster.join()
    assert err.value.field == "rpc.cert" and "attested identity" in err.value.reason


# ---- end to end: two serve processes, a CVM, namespaces ------------------------------------------------------

class ClusterNet:
    """The addresses of the module docstring's picture."""

    def __init__(self, third):
        prefix = f"10.99.{third}"
        self.root_ip, self.node_ips, self.cvm_ip = f"{prefix}.1", (f"{prefix}.2", f"{prefix}.3"), f"{prefix}.4"


def _build_lan(cleanup):
    """One bridge (in lan-<pid>) joining the root namespace, both nodes' and the CVM's."""
    net = ClusterNet(_free_third_octet())
    for netns in (LAN_NS, *NODE_NS, CVM_NS):
        cleanup.callback(wireguard.netns_remove, netns)
        wireguard.netns_add(netns)
        wireguard.configure_link("lo", netns)
    _ip("-n", LAN_NS, "link", "add", "br0", "type", "bridge")
    _ip("-n", LAN_NS, "link", "set", "br0", "up")
    cleanup.callback(wireguard.delete_link, f"ckr{PID}")
    for outside, netns, inside, address in ((f"ckr{PID}", None, f"clr{PID}", net.root_ip),
                                            (f"cka{PID}", NODE_NS[0], f"cla{PID}", net.node_ips[0]),
                                            (f"ckb{PID}", NODE_NS[1], f"clb{PID}", net.node_ips[1]),
                                            (f"ckc{PID}", CVM_NS, f"clc{PID}", net.cvm_ip)):
        wireguard.veth_pair(outside, netns, inside, LAN_NS)
        wireguard.configure_link(outside, netns, address=f"{address}/24")
        _ip("-n", LAN_NS, "link", "set", inside, "master", "br0", "up")
    for netns, interface in ((NODE_NS[0], NODE_WG[0]), (NODE_NS[1], NODE_WG[1])):   # run before the namespaces go
        cleanup.callback(_remove_socket, interface)
        cleanup.callback(_kill_everything_in, netns)
    cleanup.callback(_kill_everything_in, CVM_NS)
    return net


class NodeProcess:
    """`dstack-gateway serve` in a node's namespace; its log in a file."""

    def __init__(self, netns, config, log_path):
        self.netns, self.config, self.log_path = netns, config, log_path
        self.proc = None

    @property
    def log(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout=60):
        begun = len(self.log)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
                wireguard.netns_exec_argv(self.netns, [sys.executable, "-m", "ansible_collections.dstack.tee.agents."
                                                       "gateway.cli", "serve", "--config", str(self.config)]),
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        deadline = time.monotonic() + timeout
        while " ready: " not in self.log[begun:]:
            assert self.proc.poll() is None, f"serve exited with {self.proc.returncode}:\n{self.log[-6000:]}"
            assert time.monotonic() < deadline, f"serve did not get ready in {timeout} s:\n{self.log[-6000:]}"
            time.sleep(0.1)

    def stop(self, timeout=30):
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


def _admin(address, kms_root, method, **params):
    """The Admin API, which serves the node's RA-TLS certificate (checked against the KMS root; it names no address)."""
    context = ssl.create_default_context(cafile=str(kms_root))
    context.check_hostname = False
    request = urllib.request.Request(f"https://{address}:{ADMIN_PORT}/prpc/Admin.{method}",
                                     data=json.dumps(params).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {ADMIN_TOKEN}"})
    with urllib.request.urlopen(request, context=context, timeout=10) as response:
        return json.loads(response.read())


def _nodes_up(address, kms_root):
    return {n["id"]: n["up"] for n in _admin(address, kms_root, "Status")["nodes"]}


def _wait_for(what, check, timeout=20.0):
    """Poll check() until it is true; the seconds it took."""
    started = time.monotonic()
    while True:
        try:
            if check():
                return time.monotonic() - started
        except (OSError, AssertionError, ssl.SSLError):
            pass
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.2)


@needs_wireguard_go
@needs_ip_netns
def test_two_nodes_serve_one_cvm_through_either_survive_a_node_and_an_etcd_member(tmp_path):
    timings = {}
    with contextlib.ExitStack() as cleanup:
        net = _build_lan(cleanup)
        etcd = EtcdCluster(tmp_path / "etcd", client_host=net.root_ip).start()
        cleanup.callback(etcd.stop)
        urls = [f"https://{ip}:{RPC_PORT}" for ip in net.node_ips]
        world = ClusterWorld(tmp_path, gateway_urls=urls)
        server_ca = _write_certs(tmp_path, list(net.node_ips))   # the wildcard certificate's CA
        nodes = []
        for i in range(2):
            folder = tmp_path / f"node{i + 1}"
            for name in ("wildcard.crt", "wildcard.key"):
                shutil.copy(tmp_path / name, folder / name)
            cert, key = world.node_certs[i]
            config = _gateway_toml(folder, world.sim, world.kms_dir, types.SimpleNamespace(gw_cvm_ip=net.node_ips[i]), **{
                "core.wg": {"interface": NODE_WG[i], "ip": NODE_WG_IP[i], "endpoint": f"{net.node_ips[i]}:{WG_PORT}"},
                "core.sync": {"etcd_endpoints": etcd.endpoints, "my_url": urls[i], **SYNC},
                "rpc": {"cert": str(cert), "key": str(key)}})
            node = NodeProcess(NODE_NS[i], config, tmp_path / f"serve{i + 1}.log")
            cleanup.callback(node.kill)
            nodes.append(node)
        for node in nodes:
            node.start()
        assert "cluster: node 1 (app " in nodes[0].log and "cluster: node 2 (app " in nodes[1].log
        _wait_for("node 1 sees both nodes up", lambda: _nodes_up(net.node_ips[0], world.kms_root) == {1: True, 2: True})

        # The CVM boots and registers through node 1 (the first of its gateway_urls).
        boot = world.boot(cleanup, "cvm", CVM_NS, interval=3600)
        link = boot.gateway_link
        client_ip = link.registration.client_ip
        assert link.url == urls[0]
        assert client_ip == "10.77.0.3"   # .1 reserved, .2 node 2's hub address
        assert [(s["ip"], s["endpoint"]) for s in link.registration.answer["wg"]["servers"]] == [
            (NODE_WG_IP[0], f"{net.node_ips[0]}:{WG_PORT}"), (NODE_WG_IP[1], f"{net.node_ips[1]}:{WG_PORT}")]
        app = subprocess.Popen(  # pylint: disable=consider-using-with
            wireguard.netns_exec_argv(CVM_NS, [sys.executable, "-c", APP_SERVERS, client_ip, boot.app_id, "8443",
                                               str(tmp_path / "wildcard.crt"), str(tmp_path / "wildcard.key")]),
            stdout=subprocess.PIPE, text=True)
        cleanup.callback(app.wait)
        cleanup.callback(app.kill)
        assert app.stdout.readline().strip() == "ready"

        def through(i):
            return _body(_https_get(net.node_ips[i], f"{boot.app_id}.{BASE}", server_ca, timeout=3)[0])

        def answers_through(i):
            return lambda: through(i) == f"http app {boot.app_id} answers {NODE_WG_IP[i].split('/')[0]}"

        # Registered through node 1, answered through node 2's proxy (and node 1's).
        timings["registered via 1 -> answers via 2"] = _wait_for("node 2 routes the CVM", answers_through(1))
        assert answers_through(0)()
        assert "cluster: WireGuard peers from the store: 1 added" in nodes[1].log

        # Node 1 stops: marked down at once; node 2 keeps answering.
        assert nodes[0].stop() == 0, nodes[0].log[-6000:]
        assert "cluster: node 1 left (marked down)" in nodes[0].log
        assert _nodes_up(net.node_ips[1], world.kms_root) == {1: False, 2: True}
        timings["node 1 stopped -> answers via 2"] = _wait_for("node 2 still answers", answers_through(1))

        # The CVM registers again while node 1 is down: node 2 takes it, the address is kept, node 2 alone listed.
        again = link.connect()
        assert link.url == urls[1] and again.client_ip == client_ip
        assert [s["ip"] for s in again.answer["wg"]["servers"]] == [NODE_WG_IP[1]]
        assert answers_through(1)()

        # Node 1 comes back; the CVM registers again (through node 1): the same address, both nodes.
        nodes[0].start()
        _wait_for("node 2 sees node 1 up again", lambda: _nodes_up(net.node_ips[1], world.kms_root) == {1: True, 2: True})
        back = link.connect()
        assert link.url == urls[0] and back.client_ip == client_ip
        assert [s["ip"] for s in back.answer["wg"]["servers"]] == [NODE_WG_IP[0], NODE_WG_IP[1]]
        timings["node 1 back, re-registered -> answers via 1"] = _wait_for("node 1 answers again", answers_through(0))
        assert answers_through(1)()

        # The etcd leader is killed: both nodes keep answering (new lookups read the other members),
        # a registration still works and keeps the address, and the state is intact.
        def hosts():   # the registered instances (the handshake times move on)
            return [{k: v for k, v in h.items() if k != "latest_handshake"}
                    for h in _admin(net.node_ips[1], world.kms_root, "Status")["hosts"]]

        before = hosts()
        leader = etcd.leader()
        assert leader is not None
        etcd.kill(leader)
        started = time.monotonic()
        time.sleep(2.5)   # past the data plane's 2 s cache: the next answers come from etcd
        assert answers_through(0)() and answers_through(1)()
        assert link.connect().client_ip == client_ip
        timings["etcd leader killed -> registered again"] = time.monotonic() - started
        assert hosts() == before and [h["ip"] for h in before] == [client_ip]
        assert _nodes_up(net.node_ips[0], world.kms_root) == {1: True, 2: True}

        # Node 2 dies (every process in its namespace killed: no goodbye): node 1 marks it down once
        # its lease expires (node_ttl 3 s) and keeps answering.
        etcd.start_member(leader)
        etcd.wait_healthy([leader])
        _kill_everything_in(NODE_NS[1])
        nodes[1].proc.wait(10)
        timings["node 2 killed -> marked down"] = _wait_for(
            "node 1 marks node 2 down", lambda: _nodes_up(net.node_ips[0], world.kms_root) == {1: True, 2: False})
        assert 1.5 < timings["node 2 killed -> marked down"] < 8
        assert answers_through(0)()

        assert nodes[0].stop() == 0, nodes[0].log[-6000:]
        for netns in NODE_NS:
            assert _ns_pids(netns) == []
    print("cluster timings (s):", json.dumps({k: round(v, 2) for k, v in timings.items()}))
