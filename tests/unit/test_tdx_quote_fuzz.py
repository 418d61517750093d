"""Fuzzing the quote parser: over mutated real, simulated and synthetic quotes it raises only QuoteError.

CI runs a few thousand cases per property. A longer run:
    HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest tests/unit/test_tdx_quote_fuzz.py
(20,000 cases per property; raise max_examples in tests/conftest.py's "long" profile for more).
"""

import os
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from ansible_collections.dstack.tee.plugins.module_utils import tdx_quote as tq
from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx

SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "testdata" / "tdx" / "tdx_quote"
FUZZ_EXAMPLES = 20000 if os.environ.get("HYPOTHESIS_PROFILE") == "long" else 3000


def _seeds():
    seeds = []
    if SAMPLE.exists():
        seeds.append(SAMPLE.read_bytes())
    # A quote built from our own layout (v4 and v5), so the fuzzer also starts from those.
    cert = tq.QeCertificationData(tq.SgxReportBody(), bytes(64), b"\x01" * 32, tq.CERT_TYPE_PCK_CHAIN,
                                  b"-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n")
    seeds.append(tq.Quote(tq.QuoteHeader(), tq.TdReport10(), bytes(64), bytes(64), cert).to_bytes())
    seeds.append(tq.Quote(tq.QuoteHeader(version=5), tq.TdReport15(), bytes(64), bytes(64), cert,
                          body_type=tq.BODY_TYPE_TD15).to_bytes())
    # And a simulated quote, signed through the simulated DCAP chain.
    with tempfile.TemporaryDirectory() as state:
        seeds.append(SimTdx(state).get_quote(b"fuzz"))
    return seeds


SEEDS = _seeds()
# Offsets of the length and type fields a malicious quote would lie in.
LENGTH_FIELDS = [632, 636 + 128, 636 + 128 + 2, 636 + 134 + 384 + 64, 636 + 134 + 384 + 64 + 2 + 32]


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _step in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "length", "set"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 64))]
        elif kind == "length":
            where = draw(st.sampled_from(LENGTH_FIELDS))
            if where + 4 <= len(data):
                data[where:where + 4] = struct.pack("<I", draw(st.sampled_from([0, 1, 0xFFFF, 0xFFFFFFFF, len(data)])))
        elif kind == "set" and data:
            data[pos] = draw(st.integers(0, 255))
    return bytes(data)


def _parse_only_quote_error(data):
    try:
        quote = tq.parse_quote(data)
    except tq.QuoteError as exc:
        assert exc.field == "quote"
        return None
    # What parses re-serializes to the same bytes.
    assert quote.to_bytes() == data
    return quote


@settings(max_examples=FUZZ_EXAMPLES)
@given(mutated())
def test_mutated_quotes_raise_only_quote_error(data):
    _parse_only_quote_error(data)


@settings(max_examples=FUZZ_EXAMPLES // 3)
@given(st.binary(max_size=2000))
def test_random_bytes_raise_only_quote_error(data):
    _parse_only_quote_error(data)


def test_seeds_parse():
    for seed in SEEDS:
        assert tq.parse_quote(seed).to_bytes() == seed


@pytest.mark.parametrize("data, reason", [
    (b"", "truncated in the header"),
    (b"\x03\x00" + bytes(46), "version 3"),
    ("not bytes", "must be bytes"),
    (bytes(70000), "more than the 65536"),
])
def test_clear_errors(data, reason):
    with pytest.raises(tq.QuoteError) as err:
        tq.parse_quote(data)
    assert reason in str(err.value)


@settings(max_examples=300)
@given(mutated())
def test_the_verifier_reports_mutated_quotes_as_failed_checks(data):
    from ansible_collections.dstack.tee.plugins.module_utils import attestation
    collateral = SAMPLE.with_name("tdx_quote_collateral.json")
    if not collateral.exists():
        pytest.skip("no shared TDX sample")
    result = attestation.verify_quote(data, str(collateral), now=1750331763)
    if result.ok:
        # Only the real quote verifies, so a mutation that passes may only have touched the
        # padding after the signature data, which nothing reads.
        parsed, original = tq.parse_quote(data), tq.parse_quote(SEEDS[0])
        assert data[:len(data) - len(parsed.trailing)] == SEEDS[0][:len(SEEDS[0]) - len(original.trailing)]
