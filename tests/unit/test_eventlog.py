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


def test_duplicate_identity_events_are_refused():
    log = [el.RuntimeEvent(n, p).to_log_entry() for n, p in
           [("app-id", b"\x01" * 20), ("compose-hash", b"\x02" * 32), ("compose-hash", b"\x03" * 32)]]
    with pytest.raises(DstackError, match="compose-hash"):
        el.runtime_events(log)
    assert [e.name for e in el.runtime_events(log[:2])] == ["app-id", "compose-hash"]


def test_runtime_events_stop_at_system_ready():
    names = ["system-preparing", "app-id", "system-ready", "late"]
    log = [el.RuntimeEvent(n).to_log_entry() for n in names]
    assert [e.name for e in el.runtime_events(log)] == names[:3]


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
