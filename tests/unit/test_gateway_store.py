"""The gateway's SQLite store: dstack's IP allocation, re-registration, conflicts, restarts,
port policies, handshakes; several processes registering at once."""

import ipaddress
import multiprocessing
import sqlite3

import pytest

from ansible_collections.dstack.tee.agents.gateway.store import Conflict, Exhausted, Store

APP, OTHER_APP = "a1" * 20, "b2" * 20
HASH = "c3" * 32


def key(n):
    """A distinct (fake but well-formed) WireGuard public key per n."""
    import base64  # pylint: disable=import-outside-toplevel
    return base64.b64encode(n.to_bytes(2, "big") * 16).decode()


def fill(store, count, app=APP, start=0):
    return [store.register(f"{i:040x}", app, HASH, key(i)).instance.client_ip for i in range(start, start + count)]


def test_dstacks_defaults_first_addresses(tmp_path):
    # dstack's defaults: gateway 10.0.0.1/24, client range 10.0.0.0/25, reserved 10.0.0.1/32.
    store = Store(str(tmp_path), "10.0.0.0/25", "10.0.0.1/24", ["10.0.0.1/32"])
    assert fill(store, 3) == ["10.0.0.2", "10.0.0.3", "10.0.0.4"]
    assert (tmp_path / "gateway.sqlite3").exists()


def test_skips_network_broadcast_own_address_and_reserved_and_exhausts_clearly(tmp_path):
    # 10.1.0.0/29: hosts .1-.6 (.0 network and .7 broadcast never). The gateway is .3; .5/32 reserved.
    store = Store(str(tmp_path / "s.sqlite3"), "10.1.0.0/29", "10.1.0.3/24", ["10.1.0.5/32"])
    assert fill(store, 4) == ["10.1.0.1", "10.1.0.2", "10.1.0.4", "10.1.0.6"]
    with pytest.raises(Exhausted) as err:
        store.register("ff" * 20, APP, HASH, key(99))
    assert err.value.field == "core.wg.client_ip_range" and "10.1.0.0/29" in err.value.reason
    assert store.instance("ff" * 20) is None and store.count() == 4  # nothing half made


def test_the_gateways_own_network_broadcast_is_never_given(tmp_path):
    # Client range wider than the gateway's network: 10.2.0.3 is the broadcast of 10.2.0.0/30.
    store = Store(str(tmp_path), "10.2.0.0/29", "10.2.0.1/30")
    assert fill(store, 4) == ["10.2.0.2", "10.2.0.4", "10.2.0.5", "10.2.0.6"]


def test_a_freed_address_is_reused_first(tmp_path):
    store = Store(str(tmp_path), "10.3.0.0/29", "10.3.0.100/24")
    fill(store, 3)
    assert store.remove(f"{1:040x}").client_ip == "10.3.0.2"
    assert store.register("ee" * 20, APP, HASH, key(50)).instance.client_ip == "10.3.0.2"


def test_re_registration_keeps_the_address_and_updates_the_key(tmp_path):
    store = Store(str(tmp_path), "10.0.0.0/25", "10.0.0.1/24")
    first = store.register("11" * 20, APP, HASH, key(1), now=100)
    assert first.created and first.previous_public_key == ""
    store.record_handshakes({key(1): 150})
    same = store.register("11" * 20, APP, "d4" * 32, key(1), {"ports": [], "restrict_mode": True}, now=200)
    assert not same.created and same.previous_public_key == ""
    assert same.instance.client_ip == first.instance.client_ip and same.instance.compose_hash == "d4" * 32
    assert same.instance.last_handshake == 150 and same.instance.registered_at == 100
    moved = store.register("11" * 20, APP, HASH, key(2), now=300)
    assert moved.instance.client_ip == first.instance.client_ip and moved.previous_public_key == key(1)
    assert moved.instance.public_key == key(2) and moved.instance.last_handshake == 0  # a new key: no handshake yet
    assert store.by_public_key(key(1)) is None


def test_conflicts_leave_everything_as_it_was(tmp_path):
    store = Store(str(tmp_path), "10.0.0.0/25", "10.0.0.1/24")
    store.register("11" * 20, APP, HASH, key(1))
    with pytest.raises(Conflict) as err:
        store.register("11" * 20, OTHER_APP, HASH, key(2))
    assert err.value.field == "instance_id" and "another app" in err.value.reason
    with pytest.raises(Conflict) as err:
        store.register("22" * 20, APP, HASH, key(1))
    assert err.value.field == "client_public_key"
    assert [(i.instance_id, i.app_id, i.public_key) for i in store.instances()] == [("11" * 20, APP, key(1))]


def test_a_restart_keeps_registrations_addresses_and_overrides(tmp_path):
    store = Store(str(tmp_path), "10.0.0.0/25", "10.0.0.1/24")
    fill(store, 3)
    store.set_port_policy_override(APP, {"ports": [{"port": 80, "pp": True}], "restrict_mode": True})
    before = [i.to_dict() for i in store.instances()]
    store.close()
    again = Store(str(tmp_path), "10.0.0.0/25", "10.0.0.1/24")  # a new gateway process on the same file
    assert [i.to_dict() for i in again.instances()] == before
    assert again.register(f"{1:040x}", APP, HASH, key(1)).instance.client_ip == "10.0.0.3"
    assert again.register("ab" * 20, APP, HASH, key(77)).instance.client_ip == "10.0.0.5"
    assert again.port_policy(f"{0:040x}")["restrict_mode"] is True


def test_an_address_made_reserved_by_a_new_configuration_is_replaced(tmp_path):
    Store(str(tmp_path), "10.0.0.0/25", "10.0.0.1/24").register("11" * 20, APP, HASH, key(1))
    store = Store(str(tmp_path), "10.0.0.0/25", "10.0.0.1/24", ["10.0.0.2/31"])  # .2 and .3 now reserved
    again = store.register("11" * 20, APP, HASH, key(1))
    assert again.instance.client_ip == "10.0.0.4"


def test_port_policy_override_wins_and_can_be_removed(tmp_path):
    store = Store(str(tmp_path), "10.0.0.0/25", "10.0.0.1/24")
    own = {"ports": [{"port": 443, "pp": False}], "restrict_mode": False}
    store.register("11" * 20, APP, HASH, key(1), own)
    store.register("22" * 20, OTHER_APP, HASH, key(2))
    assert store.port_policy("11" * 20) == own and store.port_policy("22" * 20) is None
    assert store.port_policy("33" * 20) is None  # unknown instance
    override = {"ports": [{"port": 8080, "pp": True}], "restrict_mode": True}
    store.set_port_policy_override(APP, override)
    assert store.port_policy("11" * 20) == override and store.port_policy("22" * 20) is None
    store.set_port_policy_override(APP, None)
    assert store.port_policy("11" * 20) == own


def test_instances_of_an_app_freshest_handshake_first_and_stale_ones(tmp_path):
    store = Store(str(tmp_path), "10.0.0.0/25", "10.0.0.1/24")
    for n in range(3):
        store.register(f"{n:040x}", APP, HASH, key(n), now=1000 + n)
    store.register("ff" * 20, OTHER_APP, HASH, key(9), now=1000)
    store.record_handshakes({key(0): 5000, key(1): 0, key(2): 4000, "unknown": 6000})
    assert [i.instance_id for i in store.instances_of(APP)] == [f"{0:040x}", f"{2:040x}", f"{1:040x}"]
    assert store.instances_of("00" * 20) == []
    store.record_handshakes({key(0): 10})  # an older handshake never moves it back
    assert store.instance(f"{0:040x}").last_handshake == 5000
    assert sorted(i.instance_id for i in store.stale(4500)) == sorted([f"{1:040x}", f"{2:040x}", "ff" * 20])


def test_the_file_is_private_and_in_wal_mode(tmp_path):
    Store(str(tmp_path), "10.0.0.0/25", "10.0.0.1/24").register("11" * 20, APP, HASH, key(1))
    assert (tmp_path / "gateway.sqlite3").stat().st_mode & 0o077 == 0
    with sqlite3.connect(tmp_path / "gateway.sqlite3") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _register_many(path, start, count, results):
    store = Store(path, "10.0.0.0/24", "10.0.0.1/24")
    results.extend([store.register(f"{n:040x}", APP, HASH, key(n)).instance.client_ip
                    for n in range(start, start + count)])


def test_processes_registering_at_once_get_distinct_addresses(tmp_path):
    path = str(tmp_path)
    Store(path, "10.0.0.0/24", "10.0.0.1/24")
    with multiprocessing.Manager() as manager:
        results = manager.list()
        procs = [multiprocessing.get_context("fork").Process(target=_register_many, args=(path, 40 * w, 40, results))
                 for w in range(4)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(60)
        addresses = list(results)
    assert len(addresses) == 160 and len(set(addresses)) == 160
    expected = {str(h) for h in ipaddress.ip_network("10.0.0.0/24").hosts() if str(h) != "10.0.0.1"}
    assert set(addresses) == set(sorted(expected, key=ipaddress.ip_address)[:160])


def test_a_state_dir_not_made_yet_is_made_a_folder_with_the_state_file_in_it(tmp_path):
    """core.state_dir names a folder: one that does not exist yet is made, not taken for the file."""
    store = Store(str(tmp_path / "state"), "10.0.0.0/25", "10.0.0.1/24")
    assert (tmp_path / "state").is_dir() and store.path == str(tmp_path / "state" / "gateway.sqlite3")
