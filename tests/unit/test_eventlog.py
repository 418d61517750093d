"""RTMR3 event log: digests, replay against the SDK, the JSON forms, and refusals."""

import base64
import hashlib
import json

import pytest
from dstack_sdk import GetQuoteResponse
from dstack_sdk.dstack_client import replay_rtmr
from hypothesis import given, strategies as st

from ansible_collections.dstack.tee.plugins.module_utils import eventlog as el
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError

events = st.lists(st.tuples(st.text(min_size=1, max_size=20), st.binary(max_size=64)), max_size=12)


def test_v1_digest_formula():
    expected = hashlib.sha384(b"\x01\x00\x00\x08" + b":compose-hash:" + b"\xaa" * 32).digest()
    assert el.event_digest("compose-hash", b"\xaa" * 32) == expected


def test_v2_digest_is_over_jcs_json():
    expected = hashlib.sha384(b'{"name":"app-id","payload":"0102","type":134217729}').digest()
    assert el.event_digest("app-id", b"\x01\x02", version=2) == expected


@given(events)
def test_replay_equals_the_sdk(evts):
    digests = [el.event_digest(name, payload).hex() for name, payload in evts]
    assert el.replay(bytes.fromhex(d) for d in digests).hex() == replay_rtmr(digests)


@given(events)
def test_event_log_json_replays_like_the_sdk_response_model(evts):
    log = [el.RuntimeEvent(name, payload).to_log_entry() for name, payload in evts]
    ours = el.replay_event_log(json.dumps(log))[3]
    sdk = GetQuoteResponse(quote="", event_log=json.dumps(log), report_data="", vm_config="").replay_rtmrs()
    assert ours.hex() == sdk[3]


def test_replay_recomputes_runtime_digests_and_ignores_stored_ones():
    entry = el.RuntimeEvent("compose-hash", b"\x01" * 32).to_log_entry()
    honest = el.replay_event_log([entry])[3]
    forged = dict(entry, event_payload="02" * 32)  # payload swapped, digest left as it was
    assert el.replay_event_log([forged])[3] != honest
    other_imr = {"imr": 1, "event_type": 1, "digest": "ab" * 48, "event": "", "event_payload": ""}
    assert el.replay_event_log([other_imr])[1] == el.extend(el.INIT_MR, b"\xab" * 48)


HONEST = [("system-preparing", b""), ("app-id", b"\x01" * 20), ("compose-hash", b"\x02" * 32),
          ("instance-id", b"\x03" * 20), ("os-image-hash", b"\x04" * 32),
          ("key-provider", b'{"name":"kms","id":"05"}'), ("boot-mr-done", b""), ("storage-fs", b"ext4"),
          ("system-ready", b""), ("app-event", b"\x06")]
HONEST_IDENTITY = dict(HONEST[1:6])


def honest_log(events=None):
    return [el.RuntimeEvent(n, p).to_log_entry() for n, p in (HONEST if events is None else events)]


def test_identity_is_read_from_before_boot_mr_done():
    read = el.read_boot_log(honest_log())
    assert read.identity == HONEST_IDENTITY and read.sealed and read.ready
    assert [e.name for e in read.app_events] == ["app-event"]
    assert [e.name for e in el.runtime_events(honest_log())][-1] == "system-ready"
    # Before boot-mr-done there is no identity yet (a quote taken mid-boot names no app).
    assert el.read_boot_log(honest_log(HONEST[:5])).identity == {}


def test_a_dstack_guests_order_reads_without_post_boot_identity():
    dstack_order = [HONEST[i] for i in (0, 1, 2, 3, 6, 4, 5, 7, 8)]
    read = el.read_boot_log(honest_log(dstack_order))
    assert read.identity == {name: HONEST_IDENTITY[name] for name in ("app-id", "compose-hash", "instance-id")}


@pytest.mark.parametrize("events, where", [
    ([HONEST[0], HONEST[1], HONEST[2], ("compose-hash", b"\x03" * 32)], "event_log[3]"),  # twice
    ([HONEST[1], HONEST[0]], "event_log[0]"),  # not system-preparing first
    ([*HONEST[:6], ("app-event", b""), *HONEST[6:]], "event_log[6]"),  # app event before boot-mr-done
    ([*HONEST, ("app-id", b"\x09" * 20)], "event_log[10]"),  # a boot name after system-ready
    ([*HONEST[:7], ("compose-hash", b"\x09" * 32)], "event_log[7]"),  # identity after boot-mr-done
    ([*HONEST[:7], ("os-image-hash", b"\x09" * 32)], "event_log[7]"),  # measured before already
])
def test_boot_log_rules_refuse(events, where):
    with pytest.raises(DstackError) as err:
        el.read_boot_log(honest_log(events))
    assert err.value.field.startswith(where)


def test_rtmr3_entries_a_verifier_cannot_recompute_are_refused():
    log = honest_log()
    relabelled = [dict(e) for e in log]
    relabelled[1]["event_type"] = 1  # replayed from its digest, so RTMR3 still matches
    with pytest.raises(DstackError) as err:
        el.read_boot_log(relabelled)
    assert err.value.field == "event_log[1].event_type"
    # The stored digest must be the recomputed one, so the SDK's replay (from digests) agrees.
    wrong_digest = [dict(e) for e in log]
    wrong_digest[2]["digest"] = "00" * 48
    with pytest.raises(DstackError) as err:
        el.read_boot_log(wrong_digest)
    assert err.value.field == "event_log[2].digest"
    # Other registers' entries are replayed, never read for identity.
    other = [{"imr": 1, "event_type": 1, "digest": "ab" * 48, "event": "app-id", "event_payload": "09" * 20}]
    assert el.read_boot_log(other + log).identity == HONEST_IDENTITY


def _mutations():
    """Mutations of an honest log: reorder, relabel (name, type, imr), duplicate, inject, drop."""
    entry = st.integers(min_value=0, max_value=len(HONEST) - 1)
    name = st.sampled_from(el.RESERVED_EVENTS + ("app-event", "x"))
    return st.lists(st.one_of(
        st.tuples(st.just("swap"), entry, entry),
        st.tuples(st.just("rename"), entry, name),
        st.tuples(st.just("type"), entry, st.sampled_from([0, 1, 0x80000003, el.DSTACK_EVENT_TYPE + 1])),
        st.tuples(st.just("imr"), entry, st.integers(min_value=0, max_value=2)),
        st.tuples(st.just("duplicate"), entry, entry),
        st.tuples(st.just("inject"), entry, st.tuples(name, st.binary(max_size=32))),
        st.tuples(st.just("drop"), entry, st.none()),
        st.tuples(st.just("payload"), entry, st.binary(max_size=32)),
    ), min_size=1, max_size=4)


def _apply(log, mutations):
    log = [dict(e) for e in log]
    for kind, pos, arg in mutations:
        pos %= len(log) or 1
        if not log:
            return log
        if kind == "swap":
            other = arg % len(log)
            log[pos], log[other] = log[other], log[pos]
        elif kind == "rename":
            log[pos]["event"] = arg
        elif kind == "type":
            log[pos]["event_type"] = arg
        elif kind == "imr":
            log[pos]["imr"] = arg
        elif kind == "duplicate":
            log.insert(arg % len(log), dict(log[pos]))
        elif kind == "inject":
            log.insert(pos, el.RuntimeEvent(arg[0], arg[1]).to_log_entry())
        elif kind == "drop":
            del log[pos]
        elif kind == "payload":
            log[pos]["event_payload"] = arg.hex()
    return log


def _identity_if_accepted(log, rtmr3):
    """What a verifier reads from this log against the quote's RTMR3, or None when it refuses."""
    try:
        if el.replay_event_log(log)[3] != rtmr3:
            return None
        return el.read_boot_log(log).identity
    except DstackError:
        return None


@given(_mutations(), st.booleans())
def test_no_mutation_of_an_honest_log_reads_as_another_identity(mutations, restamp):
    """Relabelled, reordered, duplicated, injected or dropped entries: refused, or the honest identity.

    restamp: the attacker also rewrites each entry's stored digest to match its new content
    (what a forger would do); otherwise the digests stay as measured."""
    honest = honest_log()
    rtmr3 = el.replay_event_log(honest)[3]
    forged = _apply(honest, mutations)
    if restamp:
        for entry in forged:
            if entry["event_type"] == el.DSTACK_EVENT_TYPE and isinstance(entry["event"], str):
                entry["digest"] = el.event_digest(entry["event"], bytes.fromhex(entry["event_payload"])).hex()
    seen = _identity_if_accepted(forged, rtmr3)
    assert seen is None or seen == HONEST_IDENTITY


@given(_mutations())
def test_mutations_replayed_into_rtmr3_are_what_the_guest_measured(mutations):
    """Even when the forged log is what RTMR3 really holds (a guest bug let the app measure it),
    no boot name after boot-mr-done and no second identity event is read as identity."""
    forged = _apply(honest_log(), mutations)
    for entry in forged:  # RTMR3 is extended with exactly these (recomputable) events
        if entry["event_type"] == el.DSTACK_EVENT_TYPE:
            entry["digest"] = el.event_digest(entry["event"], bytes.fromhex(entry["event_payload"])).hex()
    try:
        read = el.read_boot_log(forged)
    except DstackError:
        return
    # Accepted: its identity is exactly the events before its (only) boot-mr-done.
    before = []
    for entry in forged:
        if entry["imr"] != 3:
            continue
        if entry["event"] == "boot-mr-done":
            break
        before.append(entry)
    expected = {e["event"]: bytes.fromhex(e["event_payload"]) for e in before if e["event"] in el.IDENTITY_EVENTS}
    assert read.identity == (expected if read.sealed else {})
    assert len([e for e in before if e["event"] in el.IDENTITY_EVENTS]) == len(expected)


def test_runtime_log_lines_round_trip():
    evts = [el.RuntimeEvent("app-id", b"\x01" * 20), el.RuntimeEvent("system-ready")]
    text = "\n".join(e.to_runtime_line() for e in evts)
    assert json.loads(text.splitlines()[0]) == {"event": "app-id", "payload": base64.b64encode(b"\x01" * 20).decode()}
    assert el.events_from_runtime_log(text) == evts
    with pytest.raises(DstackError, match="line 1"):
        el.events_from_runtime_log("{not json")


@pytest.mark.parametrize("log, field", [
    ("[", "event_log"),
    ('{"a": 1}', "event_log"),
    ('[{"imr": 4, "event_type": 1}]', "event_log[0].imr"),
    ('[{"imr": 3, "event_type": 1, "digest": "zz"}]', "event_log[0].digest"),
    ('[{"imr": 3, "event_type": 1, "digest": "ab"}]', "event_log[0].digest"),
])
def test_malformed_event_logs_name_the_field(log, field):
    with pytest.raises(DstackError) as err:
        el.parse_event_log(log)
    assert err.value.field == field
