"""What the verifier reads once and reuses (issue 16): a PCK chain per exact bytes, a runtime
event's digest per parsed log. Reuse must never carry a result to other bytes, nor keep a refusal
from being made again."""

import tempfile

import pytest

from ansible_collections.dstack.tee.plugins.module_utils import eventlog as el
from ansible_collections.dstack.tee.plugins.module_utils import tdx_quote as tq
from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx

BOOT = [("system-preparing", b""), ("app-id", b"\x11" * 20), ("compose-hash", b"\x22" * 32),
        ("instance-id", b"\x33" * 20), ("os-image-hash", b"\x44" * 32), ("key-provider", b"{}"),
        ("boot-mr-done", b""), ("system-ready", b"")]


@pytest.fixture(scope="module")
def raw_quote():
    with tempfile.TemporaryDirectory() as tmp:
        yield SimTdx(tmp).get_quote(b"\x01" * 64)


def _with_chain(raw, chain):
    """The quote's bytes with another PCK chain (the lengths around it adjusted)."""
    quote = tq.parse_quote(raw)
    quote.certification.cert_data = chain
    return quote.to_bytes()


def test_a_bad_chain_is_refused_every_time(raw_quote):
    chain = tq.parse_quote(raw_quote).certification.cert_data
    broken = _with_chain(raw_quote, chain.replace(b"-----END CERTIFICATE-----", b"-----END CERTIFICATX-----", 1))
    reasons = []
    for _attempt in range(2):
        with pytest.raises(tq.QuoteError) as refused:
            tq.parse_quote(broken)
        reasons.append(refused.value.reason)
    assert reasons[0] == reasons[1] and "END CERTIFICATE" in reasons[0]
    assert tq.parse_quote(raw_quote).identity()  # the good chain still reads after the refusals


def test_the_chain_read_follows_the_bytes(raw_quote):
    quote = tq.parse_quote(raw_quote)
    certs = quote.certification.pck_chain_der()
    certs.append(b"not a certificate")  # a caller's list is its own
    assert len(tq.parse_quote(raw_quote).certification.pck_chain_der()) == len(certs) - 1
    # The same certificates with other line breaks: another chain's bytes, the same leaf.
    rewrapped = _with_chain(raw_quote, quote.certification.cert_data.replace(b"\n", b"\r\n"))
    again = tq.parse_quote(rewrapped)
    assert again.certification.cert_data != quote.certification.cert_data
    assert again.certification.pck_leaf_tbs() == quote.certification.pck_leaf_tbs()
    assert again.identity() == quote.identity()
    # Another certification data type is refused by its type, whatever chain was read before.
    quote.certification.cert_type = 4
    with pytest.raises(tq.QuoteError, match="type 4"):
        quote.certification.pck_leaf_tbs()


def test_a_parsed_logs_digests_follow_its_entries():
    log = el.parse_event_log([el.RuntimeEvent(n, p).to_log_entry() for n, p in BOOT])
    replayed = el.replay_event_log(log)[3]
    assert replayed == el.replay(el.RuntimeEvent(n, p).digest() for n, p in BOOT)
    assert el.read_boot_log(log).get("app-id") == b"\x11" * 20
    # An entry changed after the first replay: its new payload is what is digested, and its
    # stored digest (of the old payload) no longer matches.
    log[1]["event_payload"] = b"\x99" * 20
    assert el.replay_event_log(log)[3] != replayed
    with pytest.raises(el.DstackError, match=r"event_log\[1\]\.digest"):
        el.read_boot_log(log)
