"""Issue 11, finding 11: what "the same quote" means.

As found: a quote with bytes appended, or with a changed byte in the embedded root certificate or
in the PEM line breaks between the embedded certificates, still verified (no signed field
changes), so the KMS audit log's `quote_sha256` (SHA-256 of the raw bytes) did not identify a
quote; the fuzz test found a `\\n` between two embedded certificates turned into `\\x0b`.

Now the parser refuses bytes after the declared signature data (zero padding excepted: real
quotes carry it), and tdx_quote.quote_identity() is the one definition of a quote's identity: a
digest of its signed parts. Every mutation here either fails verification or keeps the identity.
Tried on the real Intel sample quote and on a simulated one, through the one verifier.
"""

import base64
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from ansible_collections.dstack.tee.plugins.module_utils import attestation
from ansible_collections.dstack.tee.plugins.module_utils import tdx_quote as tq
from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx

TESTDATA = Path(__file__).resolve().parents[1] / "data" / "tdx"  # real Intel TDX evidence (README there)
PINNED = 1750331763  # when the sample's collateral is valid (tests/data/tdx/README.md)
# The identity of Intel's sample quote. Audit logs keep identities: a change of definition must
# be deliberate (a new IDENTITY_DOMAIN), never a side effect.
SAMPLE_IDENTITY = "0e6168a02029ada1dd52abd87e89337461ce9ca75ec004874b2e5b86e00e9cce"


class Evidence:
    def __init__(self, name, raw, collateral, root_ca_der, now):
        self.name, self.raw, self.collateral, self.root_ca_der, self.now = name, raw, collateral, root_ca_der, now

    def verify(self, data):
        return attestation.verify_quote(data, self.collateral, root_ca_der=self.root_ca_der, now=self.now)

    def __repr__(self):
        return self.name


def _intel():
    return Evidence("intel", (TESTDATA / "tdx_quote").read_bytes(),
                    (TESTDATA / "tdx_quote_collateral.json").read_text(), None, PINNED)


def _sim(tmp_path_factory):
    sim = SimTdx(str(tmp_path_factory.mktemp("sim")))
    now = int(time.time())
    return Evidence("sim", sim.get_quote(b"finding 11"), sim.collateral_json(now=now), sim.root_ca_der, now + 1)


@pytest.fixture(scope="module", params=["intel", "sim"])
def evidence(request, tmp_path_factory):
    found = _intel() if request.param == "intel" else _sim(tmp_path_factory)
    assert found.verify(found.raw).ok
    return found


def _chain_span(raw):
    quote = tq.parse_quote(raw)
    end = len(raw) - len(quote.padding)
    return end - len(quote.certification.cert_data), end


def _gaps_between_certificates(raw):
    """Offsets of the line break after each END line that another certificate follows."""
    start, end = _chain_span(raw)
    gaps = []
    pos = raw.find(tq.PEM_END, start, end)
    while pos >= 0:
        after = pos + len(tq.PEM_END)
        if raw.startswith(b"\n" + tq.PEM_BEGIN, after):
            gaps.append(after)
        pos = raw.find(tq.PEM_END, after, end)
    return gaps


def _refused_or_same(evidence, data):
    """The property of finding 11, for one mutation; returns which of the two it was."""
    assert data != evidence.raw
    result = evidence.verify(data)
    if not result.ok:
        assert result.failures[0].detail
        return "refused"
    assert tq.quote_identity(data) == tq.quote_identity(evidence.raw)
    return "same"


def test_finding_11_appended_bytes_fail_verification_at_quote_format(evidence):
    for appended in (b"\x01", b"appended", b"\x00" * 16 + b"\xff"):
        result = evidence.verify(evidence.raw + appended)
        assert not result.ok
        failure = result.failures[0]
        assert failure.name == "quote_format"
        padding = len(tq.parse_quote(evidence.raw).padding)
        assert f"has {padding + len(appended)} bytes after the" in failure.detail, failure.detail


def test_finding_11_zero_padding_is_the_same_quote(evidence):
    """Zero bytes after the signature data are padding (Intel's sample has 70): still valid,
    recorded in Quote.padding, and the identity is unchanged."""
    padded = evidence.raw + bytes(30)
    assert evidence.verify(padded).ok
    assert tq.parse_quote(padded).padding.endswith(bytes(30))
    assert tq.quote_identity(padded) == tq.quote_identity(evidence.raw)


def test_finding_11_newline_to_vertical_tab_between_certificates(evidence):
    gaps = _gaps_between_certificates(evidence.raw)
    assert len(gaps) == 2  # leaf | PCK CA | root
    for gap in gaps:
        mutated = evidence.raw[:gap] + b"\x0b" + evidence.raw[gap + 1:]
        assert _refused_or_same(evidence, mutated) in ("refused", "same")


def test_finding_11_a_changed_byte_in_the_embedded_root_certificate(evidence):
    start, end = _chain_span(evidence.raw)
    root_begin = evidence.raw.rfind(tq.PEM_BEGIN, start, end)
    root_end = evidence.raw.find(tq.PEM_END, root_begin)
    outcomes = set()
    for pos in range(root_begin + len(tq.PEM_BEGIN) + 1, root_end, 37):
        old = evidence.raw[pos:pos + 1]
        if old == b"\n":
            continue
        for new in (b"A" if old != b"A" else b"B", b"\x0b", b"-"):
            outcomes.add(_refused_or_same(evidence, evidence.raw[:pos] + new + evidence.raw[pos + 1:]))
    # The verifier chains to its own trust root and reads no byte of the embedded one, so some of
    # these verify: the identity must not depend on it.
    assert "same" in outcomes


def _malleate(signature):
    """The other valid signature: (r, s) -> (r, n - s)."""
    s_value = int.from_bytes(signature[32:], "big")
    return signature[:32] + (tq.P256_ORDER - s_value).to_bytes(32, "big")


def _leaf_with_malleated_signature(chain):
    """The PEM chain with the PCK leaf's CA signature replaced by (r, n - s), re-encoded in DER."""
    end = chain.index(tq.PEM_END) + len(tq.PEM_END)
    leaf = x509.load_pem_x509_certificate(chain[:end])
    r_value, s_value = decode_dss_signature(leaf.signature)
    signature = encode_dss_signature(r_value, tq.P256_ORDER - s_value)
    # After the tbsCertificate (outer header: 30 82 LL LL) comes the short AlgorithmIdentifier.
    rest = leaf.public_bytes(serialization.Encoding.DER)[4 + len(leaf.tbs_certificate_bytes):]
    algorithm = rest[:2 + rest[1]]
    der = _der(0x30, leaf.tbs_certificate_bytes + algorithm + _der(0x03, b"\x00" + signature))
    assert x509.load_der_x509_certificate(der).tbs_certificate_bytes == leaf.tbs_certificate_bytes
    pem = tq.PEM_BEGIN + b"\n" + base64.encodebytes(der) + tq.PEM_END
    return pem + chain[end:]


def _der(tag, content):
    if len(content) < 0x80:
        return bytes([tag, len(content)]) + content
    size = len(content).to_bytes((len(content).bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def test_finding_11_the_other_valid_ecdsa_signatures_are_the_same_quote(evidence):
    """Each ECDSA signature (r, s) has a twin (r, n - s) that verifies too (dcap-qvl accepts both):
    the quote's, the QE report's and the PCK leaf's. None of the twins is another quote."""
    quote = tq.parse_quote(evidence.raw)
    cert = quote.certification
    twins = {
        "quote signature": tq.Quote(quote.header, quote.report, _malleate(quote.signature), quote.attestation_key,
                                    cert, quote.body_type, padding=quote.padding),
        "QE report signature": tq.Quote(quote.header, quote.report, quote.signature, quote.attestation_key,
                                        tq.QeCertificationData(cert.qe_report, _malleate(cert.qe_report_signature),
                                                               cert.qe_auth_data, cert.cert_type, cert.cert_data),
                                        quote.body_type, padding=quote.padding),
        "PCK leaf signature": tq.Quote(quote.header, quote.report, quote.signature, quote.attestation_key,
                                       tq.QeCertificationData(cert.qe_report, cert.qe_report_signature,
                                                              cert.qe_auth_data, cert.cert_type,
                                                              _leaf_with_malleated_signature(cert.cert_data)),
                                       quote.body_type, padding=quote.padding),
    }
    for name, twin in twins.items():
        data = twin.to_bytes()
        result = evidence.verify(data)
        assert result.ok, (name, result.failures)
        assert tq.quote_identity(data) == tq.quote_identity(evidence.raw), name


def test_finding_11_identity_changes_with_what_is_signed(evidence):
    """The identity is not a constant: another quote over other report data, or the same body
    with another attestation key or PCK leaf, is another identity (and such bytes fail to verify)."""
    quote = tq.parse_quote(evidence.raw)
    identity = tq.quote_identity(evidence.raw)
    assert tq.quote_identity(quote) == identity and len(identity) == 64
    other_body = tq.with_report(quote, report_data=bytes(64)).to_bytes()
    other_key = tq.Quote(quote.header, quote.report, quote.signature, bytes(64), quote.certification,
                         quote.body_type, padding=quote.padding).to_bytes()
    for data in (other_body, other_key):
        assert tq.quote_identity(data) != identity
        assert not evidence.verify(data).ok


def test_finding_11_the_sample_identity_is_pinned():
    intel = _intel()
    assert tq.quote_identity(intel.raw) == SAMPLE_IDENTITY
    assert len(tq.parse_quote(intel.raw).padding) == 70  # Intel's sample ends in 70 zero bytes


def test_finding_11_a_pck_chain_in_the_collateral_does_not_replace_the_quotes(evidence):
    """dcap-qvl verifies a collateral's pck_certificate_chain instead of the quote's own: the verifier
    drops it, so a quote whose embedded leaf was changed is refused even when the collateral carries
    the genuine chain."""
    import json  # pylint: disable=import-outside-toplevel
    quote = tq.parse_quote(evidence.raw)
    fields = json.loads(evidence.collateral)
    fields["pck_certificate_chain"] = quote.certification.cert_data.rstrip(b"\0").decode()
    start, _end = _chain_span(evidence.raw)
    changed = bytearray(evidence.raw)
    body = start + len(tq.PEM_BEGIN) + 80  # a base64 character inside the leaf certificate
    changed[body] = ord("A") if changed[body] != ord("A") else ord("B")
    result = attestation.verify_quote(bytes(changed), json.dumps(fields), root_ca_der=evidence.root_ca_der,
                                      now=evidence.now)
    assert not result.ok
    assert attestation.verify_quote(evidence.raw, json.dumps(fields), root_ca_der=evidence.root_ca_der,
                                    now=evidence.now).ok
