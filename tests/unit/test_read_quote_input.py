"""attestation.read_quote_input, the one reader of a quote as a user gives it (dstack-verify's
QUOTE_FILE, dstack-ct-monitor's acme-info quotes): raw, hex or GetQuote JSON, errors naming the
caller's field."""

import json

import pytest

from ansible_collections.dstack.tee.plugins.module_utils.attestation import read_quote_input
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError

QUOTE = bytes([4, 0, 2, 0, 0x81, 0]) + bytes(range(250))  # raw bytes: not ASCII, taken as they are


def test_raw_hex_and_get_quote_json_give_the_same_quote():
    assert read_quote_input(QUOTE, "QUOTE_FILE") == (QUOTE, None)
    assert read_quote_input(QUOTE.hex().encode() + b"\n", "QUOTE_FILE") == (QUOTE, None)
    answer = json.dumps({"quote": QUOTE.hex(), "event_log": "[]", "vm_config": "{}"}).encode()
    assert read_quote_input(answer, "QUOTE_FILE") == (QUOTE, "[]")
    assert read_quote_input(json.dumps({"quote": QUOTE.hex(), "event_log": ""}).encode(), "q") == (QUOTE, None)


@pytest.mark.parametrize("data, field, named", [
    (b'{"event_log": "[]"}', "acme.keys[0].quote", "acme.keys[0].quote"),
    (b'{"quote": "zz"}', "acme.keys[0].quote", "acme.keys[0].quote.quote"),
    (b'{"quote": ', "QUOTE_FILE", "QUOTE_FILE"),
    (b"abc", "QUOTE_FILE", "QUOTE_FILE"),   # odd-length hex
])
def test_bad_input_is_named_with_the_callers_field(data, field, named):
    with pytest.raises(DstackError) as caught:
        read_quote_input(data, field)
    assert caught.value.field == named
