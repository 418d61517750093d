"""Fuzzing the quote parser and the verifier over mutated real, simulated and synthetic quotes.

Two properties:
- the parser raises only QuoteError, and what it parses re-serializes to the same bytes and has an
  identity (tdx_quote.quote_identity);
- a mutation of a valid quote's bytes either makes verification fail, or leaves quote_identity
  unchanged, and then the verification result is the same. This is what "the same quote" means
  (issue 11, finding 11): audit logs and cache keys may rely on it.

CI runs the "ci" Hypothesis profile (tests/conftest.py): derandomized, the same examples on every
machine, so a failure is a regression. A deeper random search:
    HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest tests/unit/test_tdx_quote_fuzz.py
(ten times the examples; the run's seed is in pytest's header, --hypothesis-seed=N repeats it).
"""

import struct
import tempfile
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import pytest
from hypothesis import event, given, settings, strategies as st

from ansible_collections.dstack.tee.plugins.module_utils import attestation
from ansible_collections.dstack.tee.plugins.module_utils import tdx_quote as tq
from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "tdx" / "tdx_quote"  # real Intel TDX evidence (README there)
PINNED = 1750331763  # when the real sample's collateral is valid (tests/data/tdx/README.md)
SCALE = 10 if settings.get_current_profile_name() == "long" else 1
PARSER_EXAMPLES = 3000 * SCALE
VERIFIER_EXAMPLES = 400 * SCALE


@dataclass
class Evidence:
    """A valid quote, what verifies it, and where in its bytes the PEM chain's parts are."""
    name: str
    raw: bytes
    collateral: object = None
    root_ca_der: bytes = None
    now: int = None

    def __post_init__(self):
        quote = tq.parse_quote(self.raw)
        chain = quote.certification.cert_data
        start = len(self.raw) - len(quote.padding) - len(chain)
        blocks = []
        pos = chain.find(tq.PEM_BEGIN)
        while pos >= 0:
            end = chain.index(tq.PEM_END, pos) + len(tq.PEM_END)
            blocks.append((start + pos, start + end))
            pos = chain.find(tq.PEM_BEGIN, end)
        self.chain = (start, start + len(chain))
        # Every whitespace byte of the chain, the text between blocks, and the root (last) block.
        self.whitespace = [start + i for i, b in enumerate(chain) if b in tq.PEM_WHITESPACE]
        self.between = [(blocks[i][1], blocks[i + 1][0]) for i in range(len(blocks) - 1)]
        self.root = blocks[-1]
        cert_offset = start - 6 - 2 - len(quote.certification.qe_auth_data) - 64 - 384 - 6
        self.signatures = [cert_offset - 128, cert_offset + 6 + 384]  # quote's, QE report's
        # The u32 sizes that cover the chain: signature data, type 6 data, type 5 data.
        self.sizes = [quote.signed_length, cert_offset + 2, start - 4]

    def resize(self, data, start, end, text):
        """data with data[start:end] replaced by text, and the sizes around the chain adjusted
        (what an attacker would do to change the chain's text)."""
        out = bytearray(data[:start] + text + data[end:])
        for where in self.sizes:
            if where + 4 <= min(start, len(out)):
                (size,) = struct.unpack_from("<I", out, where)
                out[where:where + 4] = struct.pack("<I", (size + len(text) - (end - start)) % 2 ** 32)
        return bytes(out)

    def verify(self, data):
        return attestation.verify_quote(data, self.collateral, root_ca_der=self.root_ca_der, now=self.now)


def _evidence():
    # The real sample is in the repository: a missing one fails here instead of being left out.
    collateral = attestation.load_collateral(str(SAMPLE.with_name("tdx_quote_collateral.json")))
    found = [Evidence("intel", SAMPLE.read_bytes(), collateral, None, PINNED)]
    with tempfile.TemporaryDirectory() as state:
        sim = SimTdx(state)
        now = int(time.time())
        found.append(Evidence("sim", sim.get_quote(b"fuzz"), attestation.load_collateral(sim.collateral_json(now=now)),
                              sim.root_ca_der, now + 1))
        chain = sim.pck_chain_pem
    # Quotes built from our own layout (v4 and v5, not signed), so the parser fuzz starts from those too.
    cert = tq.QeCertificationData(tq.SgxReportBody(), bytes(64), b"\x01" * 32, tq.CERT_TYPE_PCK_CHAIN, chain)
    layouts = [tq.Quote(tq.QuoteHeader(), tq.TdReport10(), bytes(64), bytes(64), cert).to_bytes(),
               tq.Quote(tq.QuoteHeader(version=5), tq.TdReport15(), bytes(64), bytes(64), cert,
                        body_type=tq.BODY_TYPE_TD15).to_bytes()]
    return found, [Evidence(f"layout-v{4 + i}", raw) for i, raw in enumerate(layouts)]


VERIFIABLE, LAYOUTS = _evidence()
SEEDS = VERIFIABLE + LAYOUTS
# Offsets (v4) of the length and type fields a malicious quote would lie in.
LENGTH_FIELDS = [632, 636 + 128, 636 + 128 + 2, 636 + 134 + 384 + 64, 636 + 134 + 384 + 64 + 2 + 32]
KINDS = ["flip", "set", "truncate", "append", "insert", "delete", "length",
         "pem_whitespace", "pem_between", "pem_root", "malleate"]
# For the verifier: more of the mutations that may leave a quote valid (most others break it).
SUBTLE_KINDS = KINDS + ["pem_whitespace", "pem_between", "pem_root", "malleate", "append"] * 2
# What a line break or the gap between two certificates may become: first in place (same length),
# then with the sizes around the chain adjusted.
GAP_BYTES = [b"\x0b", b"\x0c", b" ", b"\t", b"\r", b"\n", b"\x00", b"x", b"-", b"=", b"\x85", b"\xa0"]
GAP_TEXT = [b"", b"\r\n", b"\n\n", b"\n \n", b"\n\x00\n", b"junk\n", b"\xc2\xa0", b"\n" * 40]


def _position(draw, data, span=None):
    low, high = span or (0, len(data))
    high = min(high, len(data))
    return draw(st.integers(low, high - 1)) if high > low else None


@st.composite
def mutation(draw, seeds, kinds=tuple(KINDS)):
    """(the evidence, a mutation of its bytes): 1 to 4 steps of `kinds`."""
    seed = draw(st.sampled_from(seeds))
    data = bytearray(seed.raw)
    for _step in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(kinds))
        pos = _position(draw, data)
        if kind == "flip" and pos is not None:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and pos is not None:
            data[pos] = draw(st.integers(0, 255))
        elif kind == "truncate" and pos is not None:
            del data[pos:]
        elif kind == "append":
            data += draw(st.one_of(st.binary(min_size=1, max_size=16),
                                   st.integers(1, 64).map(bytes)))  # zero padding, as real quotes have
        elif kind == "insert" and pos is not None:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete" and pos is not None:
            del data[pos:pos + draw(st.integers(1, 64))]
        elif kind == "length":
            where = draw(st.sampled_from(LENGTH_FIELDS))
            if where + 4 <= len(data):
                data[where:where + 4] = struct.pack("<I", draw(st.sampled_from([0, 1, 0xFFFF, 0xFFFFFFFF, len(data)])))
        elif kind in ("pem_whitespace", "pem_between"):
            if kind == "pem_whitespace":
                start = draw(st.sampled_from(seed.whitespace))
                end = start + 1
            else:
                start, end = draw(st.sampled_from(seed.between))
            if end <= len(data):
                if draw(st.booleans()):
                    data[start:end] = draw(st.sampled_from(GAP_BYTES)) * (end - start)
                else:
                    data = bytearray(seed.resize(data, start, end, draw(st.sampled_from(GAP_TEXT))))
        elif kind == "pem_root":
            where = _position(draw, data, seed.root)
            if where is not None:
                data[where] = draw(st.integers(0, 255))
        elif kind == "malleate":
            where = draw(st.sampled_from(seed.signatures)) + 32  # s of a raw r || s signature
            if where + 32 <= len(data):
                s_value = int.from_bytes(data[where:where + 32], "big")
                data[where:where + 32] = ((tq.P256_ORDER - s_value) % 2 ** 256).to_bytes(32, "big")
    return seed, bytes(data)


def _parse_only_quote_error(data):
    try:
        quote = tq.parse_quote(data)
    except tq.QuoteError as exc:
        assert exc.field == "quote"
        return None
    # What parses re-serializes to the same bytes and has an identity.
    assert quote.to_bytes() == data
    assert len(tq.quote_identity(quote)) == 64
    return quote


@settings(max_examples=PARSER_EXAMPLES)
@given(mutation(SEEDS))
def test_mutated_quotes_raise_only_quote_error(case):
    _parse_only_quote_error(case[1])


@settings(max_examples=PARSER_EXAMPLES // 3)
@given(st.binary(max_size=2000))
def test_random_bytes_raise_only_quote_error(data):
    _parse_only_quote_error(data)


def test_seeds_parse_and_verify():
    assert [e.name for e in VERIFIABLE] == ["intel", "sim"]
    for seed in SEEDS:
        assert tq.parse_quote(seed.raw).to_bytes() == seed.raw
    for seed in VERIFIABLE:
        assert seed.verify(seed.raw).ok, seed.name


@pytest.mark.parametrize("cls", [tq.TdReport10, tq.TdReport15, tq.SgxReportBody])
def test_layouts_read_and_write_each_field_at_its_offset(cls):
    """from_bytes reads the fields in one call, in LAYOUT's order: the dataclass fields must be in it."""
    assert [f.name for f in fields(cls)] == [name for name, _size in cls.LAYOUT]
    data = bytes(range(256)) * 4
    parsed = cls.from_bytes(data, 5)
    pos = 5
    for name, size in cls.LAYOUT:
        assert getattr(parsed, name) == data[pos:pos + size], name
        pos += size
    assert parsed.to_bytes() == data[5:pos] and pos - 5 == cls.size()
    (first, first_size), (second, second_size) = cls.LAYOUT[:2]
    # One field a byte long, the next a byte short: the total is right, the fields are not.
    swapped = replace(parsed, **{first: bytes(first_size + 1), second: bytes(second_size - 1)})
    with pytest.raises(tq.QuoteError, match=f"^{first}: {first} must be {first_size} bytes, got {first_size + 1}$"):
        swapped.to_bytes()
    with pytest.raises(tq.QuoteError, match=f"truncated in the TD report at offset 7: needs {cls.size()} bytes, 3 left"):
        cls.from_bytes(bytes(10), 7, "TD report")


@pytest.mark.parametrize("data, reason", [
    (b"", "truncated in the header"),
    (b"\x03\x00" + bytes(46), "version 3"),
    ("not bytes", "must be bytes"),
    (bytes(70000), "more than the 65536"),
    (VERIFIABLE[-1].raw + b"\x01\x02", "has 2 bytes after the"),
    (VERIFIABLE[-1].resize(VERIFIABLE[-1].raw, *VERIFIABLE[-1].between[0], b"\nxx\n"),
     "has b'xx\\n-----BEGI' at byte"),
    (VERIFIABLE[-1].resize(VERIFIABLE[-1].raw, VERIFIABLE[-1].root[1] - 20, VERIFIABLE[-1].root[1] - 19, b""),
     "without its END CERTIFICATE line"),
])
def test_clear_errors(data, reason):
    with pytest.raises(tq.QuoteError) as err:
        tq.parse_quote(data)
    assert reason is None or reason in str(err.value)


def _outcome(result):
    """What a verification says, less the quote's byte count in the quote_format detail."""
    return {"checks": [(c.name, c.ok) for c in result.checks], "tcb_status": result.tcb_status,
            "advisory_ids": result.advisory_ids, "boot_info": result.boot_info,
            "report": result.quote.report.to_dict(), "attestation_mode": result.attestation_mode}


ORIGINAL = {seed.name: (tq.quote_identity(seed.raw), _outcome(seed.verify(seed.raw))) for seed in VERIFIABLE}


@settings(max_examples=VERIFIER_EXAMPLES)
@given(mutation(VERIFIABLE, tuple(SUBTLE_KINDS)))
def test_a_mutated_quote_fails_verification_or_is_the_same_quote(case):
    seed, data = case
    result = seed.verify(data)
    event(f"{seed.name}: " + ("verifies" if result.ok else f"refused by {result.failures[0].name}"))
    if result.ok:
        identity, outcome = ORIGINAL[seed.name]
        assert tq.quote_identity(data) == identity, "a quote that verifies changed its identity"
        assert _outcome(result) == outcome
    else:
        assert result.failures[0].detail


def test_the_invariant_covers_mutations_that_still_verify():
    """The property above is not empty: these mutations verify and keep the identity."""
    for seed in VERIFIABLE:
        identity = tq.quote_identity(seed.raw)
        start, end = seed.between[-1]
        root_newline = seed.raw.index(b"\n", seed.root[0] + len(tq.PEM_BEGIN) + 1)
        signature_s = seed.signatures[0] + 32
        s_value = int.from_bytes(seed.raw[signature_s:signature_s + 32], "big")
        for data in (seed.raw + bytes(8),
                     seed.raw[:start] + b"\x0b" + seed.raw[end:],
                     seed.resize(seed.raw, start, end, b"\r\n\r\n"),
                     seed.resize(seed.raw, root_newline, root_newline + 1, b"\r\n"),
                     seed.raw[:signature_s] + (tq.P256_ORDER - s_value).to_bytes(32, "big")
                     + seed.raw[signature_s + 32:]):
            assert data != seed.raw
            result = seed.verify(data)
            assert result.ok, (seed.name, result.failures)
            assert tq.quote_identity(data) == identity
