"""The verifier on real Intel TDX evidence (tests/data/tdx): accepted only when all is right."""

import datetime
import json
from pathlib import Path

import dcap_qvl
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ansible_collections.dstack.tee.plugins.module_utils import attestation as at
from ansible_collections.dstack.tee.plugins.module_utils import tdx_quote as tq
from ansible_collections.dstack.tee.plugins.module_utils.intel_root_ca import INTEL_SGX_ROOT_CA_SHA256

TESTDATA = Path(__file__).resolve().parents[1] / "data" / "tdx"  # real Intel TDX evidence (README there)
PINNED = 1750331763  # one hour after the TCB info's issueDate (testdata README)


def _testdata():
    return (TESTDATA / "tdx_quote").read_bytes(), (TESTDATA / "tdx_quote_collateral.json").read_text()


@pytest.fixture(scope="module")
def sample():
    return _testdata()


def test_the_real_quote_verifies_up_to_date_with_intels_root(sample):
    quote, collateral = sample
    result = at.verify_quote(quote, collateral, now=PINNED)
    assert result.ok, result.to_dict()["checks"]
    assert result.tcb_status == "UpToDate" and result.advisory_ids == []
    assert result.attestation_mode == "dstack-tdx"
    # device_id = SHA-256(PPID) of the verified PCK certificate
    ppid = dcap_qvl.parse_quote(quote).pck_extension().ppid
    assert result.boot_info["device_id"] == __import__("hashlib").sha256(ppid).hexdigest()


def test_the_embedded_root_is_intels(sample):
    quote, collateral = sample
    assert __import__("hashlib").sha256(at.intel_root_ca_der()).hexdigest() == INTEL_SGX_ROOT_CA_SHA256
    # dcap-qvl's own built-in root accepts the quote too: the two roots agree.
    assert dcap_qvl.verify(quote, dcap_qvl.QuoteCollateralV3.from_json(collateral), PINNED).status == "UpToDate"


SIGNED_POSITIONS = [int(i * (48 + 584 - 1) / 19) for i in range(20)]


@pytest.mark.parametrize("position", SIGNED_POSITIONS)
def test_a_flipped_byte_in_the_signed_region_is_refused(sample, position):
    quote, collateral = sample
    bad = bytearray(quote)
    bad[position] ^= 0x01
    result = at.verify_quote(bytes(bad), collateral, now=PINNED)
    assert not result.ok
    failed = result.failures[0]
    assert failed.name in ("quote_format", "dcap") and failed.detail


def test_past_next_update_is_refused(sample):
    quote, collateral = sample
    next_update = json.loads(json.loads(collateral)["tcb_info"])["nextUpdate"]
    after = int(datetime.datetime.fromisoformat(next_update.replace("Z", "+00:00")).timestamp()) + 1
    result = at.verify_quote(quote, collateral, now=after)
    assert not result.ok and result.failures[0].name == "dcap"
    assert "expired" in result.failures[0].detail.lower()


def _other_ca():
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Intel SGX Root CA")])  # same name, other key
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(days=3650))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


def test_another_trust_root_is_refused(sample):
    quote, collateral = sample
    other = _other_ca()
    result = at.verify_quote(quote, collateral, root_ca_der=other, now=PINNED)
    assert not result.ok and result.failures[0].name == "dcap"
    assert result.attestation_mode == "dstack-sim"  # any root but Intel's is not dstack-tdx


def test_policy_checks(sample):
    quote, collateral = sample
    parsed = tq.parse_quote(quote)
    ok = at.verify_quote(quote, collateral, policy=at.Policy(expected_report_data=parsed.report.report_data),
                         now=PINNED)
    assert ok.ok and any(c.name == "report_data" and c.ok for c in ok.checks)
    wrong = at.verify_quote(quote, collateral, policy=at.Policy(expected_report_data=b"other"), now=PINNED)
    assert [c.name for c in wrong.failures] == ["report_data"]
    strict = at.verify_quote(quote, collateral, policy=at.Policy(allowed_tcb_statuses=("OutOfDate",)), now=PINNED)
    assert [c.name for c in strict.failures] == ["tcb_status"]
    needs_log = at.verify_quote(quote, collateral, policy=at.Policy(require_event_log=True), now=PINNED)
    assert [c.name for c in needs_log.failures] == ["event_log"]


def test_our_parser_agrees_with_dcap_qvl(sample):
    quote, _collateral = sample
    ours = tq.parse_quote(quote)
    theirs = dcap_qvl.parse_quote(quote)
    report = theirs.report
    for name in ("tee_tcb_svn", "mr_seam", "mr_signer_seam", "seam_attributes", "td_attributes", "xfam",
                 "mr_td", "mr_config_id", "mr_owner", "mr_owner_config", "report_data"):
        assert getattr(ours.report, name) == getattr(report, name), name
    assert [ours.report.rtmr0, ours.report.rtmr1, ours.report.rtmr2, ours.report.rtmr3] == [
        report.rt_mr0, report.rt_mr1, report.rt_mr2, report.rt_mr3]
    assert ours.header.qe_vendor_id == theirs.header.qe_vendor_id and ours.header.version == 4
    assert ours.certification.pck_chain_pem.rstrip(b"\0") == theirs.cert_chain_pem_bytes().rstrip(b"\0")
    assert ours.to_bytes() == quote
