"""The gateway's etcd store (agents/gateway/store_etcd.py) on a real three-member etcd cluster.

The SQLite store's own tests (tests/unit/test_gateway_store.py) run again on etcd: one
interface, two backends, the same behaviour. Then what only a cluster has: two nodes allocating
at once get distinct addresses, never a node's hub address; a lock held by one node is not held
by another, and a holder that dies frees it; a node that stops renewing its lease is marked down;
a member killed (the leader included) loses nothing and reads and writes go on.
"""

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit"))

# pylint: disable=wrong-import-position
import test_gateway_store as sqlite_suite  # noqa: E402
from conftest import ROOT, run_playbook, stop_process_group  # noqa: E402
from etcd_fixtures import EtcdCluster, etcd_cluster, needs_etcd  # noqa: E402,F401  pylint: disable=unused-import
from ansible_collections.dstack.tee.agents.gateway import config as gateway_config  # noqa: E402
from ansible_collections.dstack.tee.agents.gateway.store import (  # noqa: E402
    CLUSTER_BLOB_KEY_PATH, Store, Unavailable, open_store)
from ansible_collections.dstack.tee.agents.gateway.store_etcd import EtcdClient, EtcdStore  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils import guest_client, wireguard  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError  # noqa: E402

APP, HASH, key = sqlite_suite.APP, sqlite_suite.HASH, sqlite_suite.key

pytestmark = needs_etcd


BLOB_KEY = bytes(range(32))   # what GetKey gives every node of the gateway app (a fixed one here)


def etcd_store(cluster, prefix, client_ip_range="10.0.0.0/25", gateway_ip="10.0.0.1/24", reserved_net=(), node_id=1,
               blob_key=BLOB_KEY):
    return EtcdStore(EtcdClient(cluster.endpoints, timeout=2.0), client_ip_range, gateway_ip, reserved_net,
                     node_id=node_id, prefix=prefix, blob_key=blob_key)


def _prefix():
    return f"/test-{uuid.uuid4().hex[:12]}/"


# ---- the SQLite store's tests, on etcd -------------------------------------------------------------------

# The SQLite suite's tests of the store's behaviour (those about its file stay SQLite's).
SHARED = [
    "test_skips_network_broadcast_own_address_and_reserved_and_exhausts_clearly",
    "test_the_gateways_own_network_broadcast_is_never_given",
    "test_a_freed_address_is_reused_first",
    "test_re_registration_keeps_the_address_and_updates_the_key",
    "test_conflicts_leave_everything_as_it_was",
    "test_a_restart_keeps_registrations_addresses_and_overrides",
    "test_an_address_made_reserved_by_a_new_configuration_is_replaced",
    "test_port_policy_override_wins_and_can_be_removed",
    "test_instances_of_an_app_freshest_handshake_first_and_stale_ones",
    "test_processes_registering_at_once_get_distinct_addresses",
]


@pytest.mark.parametrize("name", SHARED)
def test_the_sqlite_stores_tests_pass_on_etcd(name, etcd_cluster, tmp_path, monkeypatch):  # pylint: disable=redefined-outer-name
    # Store(path, ...) opens the etcd state of that path: a second Store on the same path is a
    # gateway restarted on the same state, as with the SQLite file.
    prefixes = {}

    def store_on_etcd(path, client_ip_range, gateway_ip, reserved_net=()):
        prefix = prefixes.setdefault(os.path.dirname(path) if path.endswith(".sqlite3") else path, _prefix())
        return etcd_store(etcd_cluster, prefix, client_ip_range, gateway_ip, reserved_net)

    monkeypatch.setattr(sqlite_suite, "Store", store_on_etcd)
    getattr(sqlite_suite, name)(tmp_path)


def test_dstacks_default_addresses_on_etcd(etcd_cluster):  # pylint: disable=redefined-outer-name
    store = etcd_store(etcd_cluster, _prefix(), reserved_net=["10.0.0.1/32"])
    assert sqlite_suite.fill(store, 3) == ["10.0.0.2", "10.0.0.3", "10.0.0.4"]


# ---- one interface, picked by gateway.toml ------------------------------------------------------------

def _config(tmp_path, **sync):
    (tmp_path / "root-ca.crt").write_text("x")
    return gateway_config.load_config(environ={}, overrides={
        "core.state_dir": str(tmp_path / "state"), "core.wg.public_key": key(1), "core.wg.endpoint": "10.0.0.9:51820",
        "core.wg.ip": "10.0.0.5/24", "rpc.kms_root_ca": str(tmp_path / "root-ca.crt"),
        "attestation.mode": "simulation", "attestation.sim_state_dir": str(tmp_path / "sim"),
        **{f"core.sync.{k}": v for k, v in sync.items()}})


def test_open_store_is_sqlite_by_default_and_etcd_with_endpoints(etcd_cluster, tmp_path):  # pylint: disable=redefined-outer-name
    assert isinstance(open_store(_config(tmp_path)), Store)
    config = _config(tmp_path, etcd_endpoints=[e.removeprefix("http://") for e in etcd_cluster.endpoints],
                     etcd_prefix=_prefix())
    assert config["core"]["sync"]["etcd_endpoints"] == etcd_cluster.endpoints
    assert config["core"]["sync"]["node_id"] == 5            # the host part of core.wg.ip
    store = open_store(config)
    assert isinstance(store, EtcdStore) and store.node_id == 5
    assert store.register("11" * 20, APP, HASH, key(1)).instance.client_ip == "10.0.0.2"   # .1: reserved_net
    # No guest agent, so no key to seal with: blobs (private keys among them) are refused, not put in etcd in clear.
    with pytest.raises(DstackError) as err:
        store.put_blob("acme/account", b"secret")
    assert err.value.field == "rpc.guest_agent" and "sealed" in err.value.reason
    assert store.client.get(config["core"]["sync"]["etcd_prefix"] + "blob/", prefix=True) == []
    # Blobs, in both: opaque bytes, replaced whole.
    store.blob_key = BLOB_KEY
    for backend in (store, open_store(_config(tmp_path))):
        assert backend.get_blob("acme/account") is None
        backend.put_blob("acme/account", b"\x00\xffkey")
        backend.put_blob("acme/account", b"\x01")
        assert backend.get_blob("acme/account") == b"\x01"
        backend.delete_blob("acme/account")
        assert backend.get_blob("acme/account") is None


@pytest.mark.parametrize("sync, field", [
    ({"etcd_endpoints": ["ftp://x:1"]}, "core.sync.etcd_endpoints[0]"),
    ({"etcd_endpoints": ["127.0.0.1"]}, "core.sync.etcd_endpoints[0]"),
    ({"etcd_endpoints": ["127.0.0.1:2379"], "interval": "5s", "node_ttl": "6s"}, "core.sync.node_ttl"),
    ({"etcd_endpoints": ["127.0.0.1:2379"], "etcd_cert": "/etc/hostname"}, "core.sync.etcd_key"),
    ({"etcd_endpoints": ["127.0.0.1:2379"], "etcd_ca_cert": "/nonexistent/ca.crt"}, "core.sync.etcd_ca_cert"),
    ({"etcd_prefix": "dstack"}, "core.sync.etcd_prefix"),
])
def test_sync_configuration_errors_name_the_key(tmp_path, sync, field):
    with pytest.raises(DstackError) as err:
        _config(tmp_path, **sync)
    assert err.value.field == field, str(err.value)


def test_blobs_are_sealed_to_the_gateway_app_in_etcd(etcd_cluster):  # pylint: disable=redefined-outer-name
    prefix = _prefix()
    one, two = etcd_store(etcd_cluster, prefix, node_id=1), etcd_store(etcd_cluster, prefix, node_id=2)
    secret = b"-----BEGIN PRIVATE KEY-----\nnot for etcd's eyes\n"
    one.put_blob("cert/example.com", secret)
    assert two.get_blob("cert/example.com") == secret                     # every node of the app opens it
    raw = one.client.get(prefix + "blob/cert/example.com")[0]["value"]
    assert b"PRIVATE KEY" not in raw and raw.startswith(b"dstack-gateway-sealed-v1:")
    # Another app's key, a blob moved to another name, or one altered: refused, naming it.
    other = etcd_store(etcd_cluster, prefix, node_id=3, blob_key=bytes(32))
    with pytest.raises(DstackError) as err:
        other.get_blob("cert/example.com")
    assert err.value.field == "store" and "cert/example.com" in err.value.reason
    one.client.put(prefix + "blob/cert/other.com", raw)
    with pytest.raises(DstackError):
        one.get_blob("cert/other.com")
    one.client.put(prefix + "blob/cert/example.com", raw[:-1] + bytes([raw[-1] ^ 1]))
    with pytest.raises(DstackError):
        one.get_blob("cert/example.com")
    assert secret not in repr(err.value).encode()


def test_the_sealing_key_comes_from_the_gateway_cvms_guest_agent(etcd_cluster, tmp_path):  # pylint: disable=redefined-outer-name
    base = Path(tempfile.mkdtemp(prefix="gwe-", dir="/tmp"))   # a unix socket path is short
    agent = subprocess.Popen(  # pylint: disable=consider-using-with
        [str(Path(sys.executable).parent / "dstack-guest-agent"), "simulate", "--socket", str(base / "dstack.sock"),
         "--state-dir", str(base / "state")], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        start_new_session=True)
    try:
        assert "simulating" in agent.stdout.readline()
        prefix = _prefix()
        config = _config(tmp_path, etcd_endpoints=etcd_cluster.endpoints, etcd_prefix=prefix)
        config["rpc"]["guest_agent"] = str(base / "dstack.sock")
        store = open_store(config)
        store.put_blob("acme/account", b"account key")
        # Sealed under the app's GetKey of that path: a store holding that key opens it.
        app_key = bytes.fromhex(guest_client.call(str(base / "dstack.sock"), "GetKey",
                                                  {"path": CLUSTER_BLOB_KEY_PATH, "purpose": "seal"})["key"])
        assert etcd_store(etcd_cluster, prefix, blob_key=app_key).get_blob("acme/account") == b"account key"
        assert open_store(config).get_blob("acme/account") == b"account key"       # the same key again
    finally:
        stop_process_group(agent)
        shutil.rmtree(base, ignore_errors=True)


def _role_gateway_toml(folder, **variables):
    """roles/gateway's gateway.toml template rendered by ansible-playbook over the role's defaults
    (variables as -e), then read as serve reads it: the checked configuration."""
    root = folder / "root"
    playbook = folder / "render.yml"
    playbook.write_text(f"""
- hosts: localhost
  gather_facts: false
  vars_files: [{ROOT / "roles" / "gateway" / "defaults" / "main.yml"}]
  tasks:
    - ansible.builtin.template:
        src: {ROOT / "roles" / "gateway" / "templates" / "gateway.toml.j2"}
        dest: {folder / "gateway.toml"}
        mode: "0600"
""")
    done = run_playbook(playbook, "-i", str(ROOT / "playbooks" / "localhost.yml"),
                        "-e", json.dumps(dict(variables, dstack_root=str(root))))
    assert done.returncode == 0, done.stdout + done.stderr
    (root / "gateway").mkdir(parents=True, exist_ok=True)
    (root / "gateway" / "kms-root-ca.crt").write_text("x")   # the role copies the KMS's root there
    return gateway_config.load_config(
        str(folder / "gateway.toml"), environ={"DSTACK_GATEWAY_ADMIN_TOKEN": "t" * 32},
        overrides={"core.wg.public_key": wireguard.public_key(wireguard.generate_private_key())})


def test_the_gateway_roles_etcd_variables_make_a_cluster_node(tmp_path):
    """dstack_gateway_etcd_endpoints (and its TLS files), dstack_gateway_wg_ip and dstack_gateway_url
    become the node's [core.sync]; without endpoints the role's gateway is one node on SQLite."""
    tls = {name: tmp_path / f"etcd-{name}.pem" for name in ("ca", "cert", "key")}
    for path in tls.values():
        path.write_text("x")
    endpoints = ["http://10.99.0.1:2379", "https://10.99.0.2:2379", "https://10.99.0.3:2379"]
    (tmp_path / "node").mkdir()
    config = _role_gateway_toml(tmp_path / "node", dstack_gateway_etcd_endpoints=endpoints,
                                dstack_gateway_wg_ip="10.189.0.2/24", dstack_gateway_url="https://10.99.0.2:9202",
                                dstack_gateway_etcd_ca_cert=str(tls["ca"]), dstack_gateway_etcd_cert=str(tls["cert"]),
                                dstack_gateway_etcd_key=str(tls["key"]))
    sync = config["core"]["sync"]
    assert sync["etcd_endpoints"] == endpoints and sync["my_url"] == "https://10.99.0.2:9202"
    assert sync["node_id"] == 2 and config["core"]["wg"]["ip"] == "10.189.0.2/24"   # the hub address's host part
    assert (sync["etcd_ca_cert"], sync["etcd_cert"], sync["etcd_key"]) == (str(tls["ca"]), str(tls["cert"]),
                                                                           str(tls["key"]))
    (tmp_path / "single").mkdir()
    single = _role_gateway_toml(tmp_path / "single")
    assert single["core"]["sync"]["etcd_endpoints"] == []
    assert isinstance(open_store(single), Store)


# ---- two nodes ---------------------------------------------------------------------------------------

def test_two_nodes_allocating_at_once_get_distinct_addresses_never_a_nodes_own(etcd_cluster):  # pylint: disable=redefined-outer-name
    prefix = _prefix()
    # Node 1 at 10.0.0.1, node 2 at 10.0.0.2: both inside the client range, so the claim is what keeps .2 out.
    nodes = [etcd_store(etcd_cluster, prefix, "10.0.0.0/24", "10.0.0.1/24", node_id=1),
             etcd_store(etcd_cluster, prefix, "10.0.0.0/24", "10.0.0.2/24", node_id=2)]
    for node in nodes:
        node.claim_node_address()
    results, errors = {}, []

    def register(node, start):
        try:
            for n in range(start, start + 25):
                results[n] = node.register(f"{n:040x}", APP, HASH, key(n)).instance.client_ip
        except Exception as exc:  # pylint: disable=broad-exception-caught
            errors.append(exc)

    # Two threads per node, all at once.
    threads = [threading.Thread(target=register, args=(node, 100 * i + offset))
               for i, node in enumerate(nodes) for offset in (0, 50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    addresses = list(results.values())
    assert len(addresses) == 100 and len(set(addresses)) == 100
    assert "10.0.0.1" not in addresses and "10.0.0.2" not in addresses
    assert set(addresses) == {f"10.0.0.{i}" for i in range(3, 103)}   # the first free ones, none skipped
    # Each node sees every registration, and an instance coming back through the other node keeps its address.
    assert nodes[0].count() == nodes[1].count() == 100
    again = nodes[1].register(f"{5:040x}", APP, HASH, key(5))
    assert not again.created and again.instance.client_ip == results[5]


def test_a_nodes_hub_address_is_its_own(etcd_cluster):  # pylint: disable=redefined-outer-name
    prefix = _prefix()
    first = etcd_store(etcd_cluster, prefix, "10.0.0.0/25", "10.0.0.1/24", node_id=1)
    first.claim_node_address()
    first.claim_node_address()   # again (a restart): still its own
    with pytest.raises(DstackError) as err:
        etcd_store(etcd_cluster, prefix, "10.0.0.0/25", "10.0.0.1/24", node_id=2).claim_node_address()
    assert err.value.field == "core.wg.ip" and "node 1's hub address" in err.value.reason
    held = first.register("11" * 20, APP, HASH, key(1)).instance.client_ip
    with pytest.raises(DstackError) as err:
        etcd_store(etcd_cluster, prefix, "10.0.0.0/25", f"{held}/24", node_id=3).claim_node_address()
    assert err.value.field == "core.wg.ip" and f"instance {'11' * 20}'s address" in err.value.reason


def test_handshakes_and_endpoints_are_per_node_and_merged(etcd_cluster):  # pylint: disable=redefined-outer-name
    prefix = _prefix()
    one = etcd_store(etcd_cluster, prefix, node_id=1)
    two = etcd_store(etcd_cluster, prefix, "10.0.0.0/25", "10.0.0.100/24", node_id=2)
    one.register("11" * 20, APP, HASH, key(1), now=100)
    one.record_handshakes({key(1): 500})
    two.record_handshakes({key(1): 700, key(9): 800})
    assert two.instance("11" * 20).last_handshake == 700 == one.instance("11" * 20).last_handshake
    one.record_handshakes({key(1): 600})   # node 1's own newer view; node 2's is still the freshest
    assert one.instance("11" * 20).last_handshake == 700
    one.record_endpoints({key(1): "10.99.0.6:9182"})
    assert two.endpoints() == {key(1): "10.99.0.6:9182"}       # another node's, when it has none of its own
    two.record_endpoints({key(1): "10.98.0.6:9182"})
    assert two.endpoints() == {key(1): "10.98.0.6:9182"} and one.endpoints() == {key(1): "10.99.0.6:9182"}
    assert one.remove("11" * 20).client_ip == "10.0.0.2"
    assert one.endpoints() == {} and two.instance("11" * 20) is None
    two.record_handshakes({key(1): 900})   # an instance removed meanwhile gets no handshake key back
    assert etcd_store(etcd_cluster, prefix).client.get(prefix + "hs/", prefix=True) == []


# ---- locks -----------------------------------------------------------------------------------------

def _hold_lock(endpoints, prefix, held):
    store = EtcdStore(EtcdClient(endpoints), "10.0.0.0/25", "10.0.0.1/24", node_id=7, prefix=prefix)
    with store.lock("cert/example.com", ttl=2):
        held.set()
        time.sleep(600)


def test_a_lock_is_held_by_one_node_at_a_time_and_freed_when_its_holder_dies(etcd_cluster):  # pylint: disable=redefined-outer-name
    prefix = _prefix()
    one, two = etcd_store(etcd_cluster, prefix, node_id=1), etcd_store(etcd_cluster, prefix, node_id=2)
    inside, order = [], []

    def job(store, name):
        with store.lock("cert/example.com", ttl=2, wait=20):
            inside.append(name)
            assert len(inside) == 1, inside        # nobody else in the block
            order.append(name)
            time.sleep(0.5)
            inside.remove(name)

    threads = [threading.Thread(target=job, args=(s, n)) for s, n in ((one, "one"), (two, "two"), (one, "one-b"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(order) == ["one", "one-b", "two"]

    # Held longer than its ttl: renewed, so still held; another node's try with no wait names the holder.
    with one.lock("cert/example.com", ttl=1):
        time.sleep(2.5)
        with pytest.raises(Unavailable) as err:
            with two.lock("cert/example.com", ttl=1, wait=0):
                pass
        assert err.value.field == "lock" and "node 1" in err.value.reason
    with two.lock("cert/example.com", ttl=1, wait=0):   # released at the block's end
        pass

    # A holder killed (no release, no renewal): the lock is free once its lease expires.
    held = multiprocessing.get_context("fork").Event()
    holder = multiprocessing.get_context("fork").Process(target=_hold_lock, args=(etcd_cluster.endpoints, prefix, held))
    holder.start()
    try:
        assert held.wait(20)
        with pytest.raises(Unavailable):
            with two.lock("cert/example.com", ttl=2, wait=0.5):
                pass
        os.kill(holder.pid, signal.SIGKILL)
        started = time.monotonic()
        with two.lock("cert/example.com", ttl=2, wait=10):
            freed_after = time.monotonic() - started
    finally:
        holder.kill()
        holder.join()
    assert freed_after < 5, freed_after


# ---- node liveness --------------------------------------------------------------------------------

def test_a_node_is_up_while_it_renews_its_lease_and_down_when_it_stops(etcd_cluster):  # pylint: disable=redefined-outer-name
    prefix = _prefix()
    one, two = etcd_store(etcd_cluster, prefix, node_id=1), etcd_store(etcd_cluster, prefix, node_id=2)
    one.put_node(b'{"id": 1}')
    two.put_node(b'{"id": 2}')
    one.heartbeat(2, now=1000.0)
    two.heartbeat(2, now=1000.0)
    assert list(one.nodes()) == [
        (1, b'{"id": 1}', {"last_seen": 1000.0}), (2, b'{"id": 2}', {"last_seen": 1000.0})]
    # Node 1 keeps renewing; node 2 stops (killed: no goodbye). After its ttl it is down, its record kept.
    started = time.monotonic()
    while time.monotonic() - started < 6:
        one.heartbeat(2, now=1001.0)
        if dict((n, alive) for n, _record, alive in one.nodes())[2] is None:
            break
        time.sleep(0.5)
    down_after = time.monotonic() - started
    assert 1.5 < down_after < 5, down_after
    assert [(n, alive) for n, _record, alive in two.nodes()] == [(1, {"last_seen": 1001.0}), (2, None)]
    # Its next heartbeat finds its lease expired and makes a new one: up again.
    two.heartbeat(2, now=1002.0)
    assert dict((n, alive) for n, _record, alive in one.nodes())[2] == {"last_seen": 1002.0}
    # Leaving (a clean stop) marks it down at once.
    two.leave()
    assert dict((n, alive) for n, _record, alive in one.nodes())[2] is None


# ---- a member killed ---------------------------------------------------------------------------------

def test_a_member_killed_loses_nothing_and_reads_and_writes_go_on(tmp_path):
    cluster = EtcdCluster(tmp_path / "etcd").start()
    try:
        prefix = _prefix()
        store = etcd_store(cluster, prefix)
        before = sqlite_suite.fill(store, 5)
        store.set_port_policy_override(APP, {"ports": [{"port": 80, "pp": True}], "restrict_mode": True})
        store.put_blob("acme/account", b"account")
        # Kill the leader (the worst member to lose), then the store keeps going on the other two.
        leader = cluster.leader()
        assert leader is not None
        cluster.kill(leader)
        started = time.monotonic()
        after = sqlite_suite.fill(store, 5, start=5)
        first_write = time.monotonic() - started
        assert before + after == [f"10.0.0.{i}" for i in range(2, 12)]
        assert [i.client_ip for i in store.instances()] == sorted(before + after)
        assert store.port_policy(f"{0:040x}")["restrict_mode"] is True and store.get_blob("acme/account") == b"account"
        assert first_write < 6, first_write
        # The member comes back and catches up: reading from it alone shows everything.
        cluster.start_member(leader)
        cluster.wait_healthy([leader])
        alone = EtcdStore(EtcdClient([cluster.endpoints[leader]]), "10.0.0.0/25", "10.0.0.1/24", prefix=prefix)
        deadline = time.monotonic() + 10
        while alone.count() != 10:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert [i.to_dict() for i in alone.instances()] == [i.to_dict() for i in store.instances()]
        # The data plane's copy reads the same state (and the sealed blobs).
        data_plane = store.for_data_plane()
        assert data_plane.instances() == store.instances() and data_plane.get_blob("acme/account") == b"account"
        # Every member down: a clear 503-class error naming the key, no traceback, nothing half made.
        for i in range(3):
            cluster.kill(i)
        started = time.monotonic()
        with pytest.raises(Unavailable):
            data_plane.instance(f"{0:040x}")
        assert time.monotonic() - started < 1   # one pass over the members: the event loop does not stall
        quick = EtcdStore(EtcdClient(cluster.endpoints, timeout=0.5, retry_for=1.0), "10.0.0.0/25", "10.0.0.1/24",
                          prefix=prefix)
        with pytest.raises(Unavailable) as err:
            quick.register("ee" * 20, APP, HASH, key(99))
        assert err.value.field == "core.sync.etcd_endpoints" and "no etcd member answered" in err.value.reason
    finally:
        cluster.stop()


def test_the_gateway_roles_wireguard_endpoint_for_libvirt_vms(tmp_path):
    """The hub's endpoint RegisterCvm gives the CVMs: the host address, or 10.0.2.2 (where a VM on
    QEMU's user networking reaches the host's loopback) when the VMMs are libvirt ones."""
    (tmp_path / "process").mkdir()
    (tmp_path / "libvirt").mkdir()
    assert _role_gateway_toml(tmp_path / "process")["core"]["wg"]["endpoint"] == "127.0.0.1:51830"
    libvirt = _role_gateway_toml(tmp_path / "libvirt", dstack_vmm_backend="libvirt")
    assert libvirt["core"]["wg"]["endpoint"] == "10.0.2.2:51830"
