"""placement.place: N instances of one app on N different VMM hosts, stable across runs."""

import pytest

from ansible_collections.dstack.tee.plugins.module_utils import placement
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError


def _vmm(host, *names):
    return {"host": host, "url": f"http://{host}:9080", "cvms": [{"name": n, "id": f"{host}-{n}"} for n in names]}


def _hosts(found):
    return [w["host"] for w in found]


def test_new_instances_go_to_the_hosts_with_the_fewest_cvms_and_come_back_in_inventory_order():
    vmms = [_vmm("a", "x", "y"), _vmm("b"), _vmm("c", "z")]
    placed, surplus = placement.place("app", vmms, 2)
    assert _hosts(placed) == ["b", "c"] and surplus == []
    assert all(w["existing"] is None for w in placed)


def test_hosts_that_run_an_instance_keep_it_so_a_second_run_moves_nothing():
    vmms = [_vmm("a"), _vmm("b", "app"), _vmm("c", "app", "other"), _vmm("d")]
    placed, surplus = placement.place("app", vmms, 2)
    assert _hosts(placed) == ["b", "c"] and surplus == []
    assert placed[0]["existing"]["id"] == "b-app"
    # One more: the emptiest other host joins; the two instances stay where they are.
    placed, _surplus = placement.place("app", vmms, 3)
    assert _hosts(placed) == ["a", "b", "c"]


def test_shrinking_keeps_the_first_instances_and_names_the_rest_surplus():
    vmms = [_vmm("a", "app"), _vmm("b", "app"), _vmm("c", "app")]
    placed, surplus = placement.place("app", vmms, 1)
    assert _hosts(placed) == ["a"] and _hosts(surplus) == ["b", "c"]
    assert surplus[0]["existing"]["id"] == "b-app"


def test_pinned_hosts_bound_the_placement_and_an_instance_elsewhere_is_surplus():
    vmms = [_vmm("a", "app"), _vmm("b"), _vmm("c")]
    placed, surplus = placement.place("app", vmms, 2, pinned=["c", "b"])
    assert _hosts(placed) == ["b", "c"] and _hosts(surplus) == ["a"]


@pytest.mark.parametrize("replicas, pinned, field, reason", [
    (3, None, "replicas", "3 instances need 3 different VMM hosts"),
    (2, ["a"], "replicas", "the pinned hosts are 1: a"),
    (1, ["nowhere"], "hosts", "nowhere is not a VMM host of the inventory"),
    (0, None, "replicas", "must be a whole number from 1"),
    (True, None, "replicas", "must be a whole number from 1"),
])
def test_impossible_placements_are_refused_naming_the_field(replicas, pinned, field, reason):
    with pytest.raises(DstackError) as caught:
        placement.place("app", [_vmm("a"), _vmm("b")], replicas, pinned=pinned)
    assert caught.value.field == field and reason in caught.value.reason


def test_hosts_lists_are_checked():
    assert placement.check_hosts(["a", "b"]) == ["a", "b"]
    for bad, reason in (([], "non-empty list"), (["a", "a"], "names a host twice"), ("a", "non-empty list"),
                        ([""], "non-empty list")):
        with pytest.raises(DstackError) as caught:
            placement.check_hosts(bad, "app.yml: hosts")
        assert caught.value.field == "app.yml: hosts" and reason in caught.value.reason


def test_free_slots_then_memory_choose_among_hosts_and_a_full_host_takes_none():
    roomy = dict(_vmm("a", "x"), capacity=10)
    small = dict(_vmm("b"), capacity=2)
    busy = dict(_vmm("c", "y"), capacity=10)
    busy["cvms"][0]["configuration"] = {"memory": 4096}
    roomy["cvms"][0]["configuration"] = {"memory": 512}
    placed, _surplus = placement.place("app", [roomy, small, busy], 1)
    assert _hosts(placed) == ["a"]                    # 9 free slots, less memory given than c
    placed, _surplus = placement.place("app", [roomy, small, busy], 3)
    assert _hosts(placed) == ["a", "b", "c"]
    full = dict(_vmm("d", "p", "q"), capacity=2)
    with pytest.raises(DstackError) as caught:
        placement.place("app", [roomy, full], 2)
    assert caught.value.field == "replicas" and "d holds as many CVMs as they allow" in caught.value.reason
    # A host that runs an instance keeps it even when full.
    full["cvms"].append({"name": "app", "id": "d-app"})
    full["capacity"] = 3
    placed, _surplus = placement.place("app", [roomy, dict(full, capacity=3)], 2)
    assert _hosts(placed) == ["a", "d"]
