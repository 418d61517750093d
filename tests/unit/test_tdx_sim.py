"""The simulated TDX: its quotes and collateral go through the real DCAP verifier (dcap-qvl).

Real crypto throughout, no mocks: a quote from the simulator must verify under the simulated
root exactly as a hardware quote verifies under Intel's, and fail wherever a real one would.
"""

import hashlib
import json
import multiprocessing
import os
import stat
import time

import dcap_qvl
import pytest
from cryptography import x509

from ansible_collections.dstack.tee.plugins.module_utils import tdx_quote
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import KEY_NAMES, SimTdx

NOW = int(time.time())


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """One installation shared by the tests that only read (quotes and collateral)."""
    return SimTdx(str(tmp_path_factory.mktemp("sim")))


@pytest.fixture
def fresh(tmp_path):
    return SimTdx(str(tmp_path / "state"))


def collateral(sim, **kw):
    return dcap_qvl.QuoteCollateralV3.from_json(sim.collateral_json(now=NOW, **kw))


def verify(sim, quote, now=NOW, **kw):
    """dcap-qvl's verification under the simulated root (raises ValueError when it fails)."""
    return dcap_qvl.verify_with_root_ca(quote, collateral(sim, **kw), sim.root_ca_der, now)


def verified_td(sim, quote):
    """The TD report fields as dcap-qvl returns them after verifying the quote (hex)."""
    return json.loads(verify(sim, quote).to_json())["report"]["TD10"]


def claims(sim, quote, policy, **kw):
    verifier = dcap_qvl.QuoteVerifier(root_ca_der=sim.root_ca_der)
    return json.loads(verifier.verify_with_policy(quote, collateral(sim, **kw), NOW, policy).to_json())


# --- the quote verifies under the simulated root, and only there ---

def test_quote_verifies_under_the_sim_root_with_ppid_and_fmspc(sim):
    quote = sim.get_quote(b"nonce")
    report = verify(sim, quote)
    assert report.status == "UpToDate"
    assert report.advisory_ids == []
    assert report.ppid == sim.ppid
    parsed = dcap_qvl.parse_quote(quote)
    assert parsed.is_tdx() and parsed.header.version == 4
    assert bytes.fromhex(parsed.fmspc()) == sim.fmspc
    ext = dcap_qvl.parse_pck_extension_from_pem(parsed.cert_chain_pem_bytes())
    assert (ext.ppid, ext.fmspc, ext.pce_svn, ext.sgx_type) == (sim.ppid, sim.fmspc, 11, 0)
    assert len(sim.ppid) == 16 and len(sim.fmspc) == 6


def test_strict_policy_accepts_an_up_to_date_sim_quote(sim):
    result = claims(sim, sim.get_quote(b"x"), dcap_qvl.QuotePolicy.strict(NOW))
    assert result["tcb"]["status"] == "UpToDate"
    assert bytes(result["platform"]["pck"]["fmspc"]) == sim.fmspc
    assert bytes(result["platform"]["pck"]["ppid"]) == sim.ppid


def test_the_same_quote_is_refused_under_intels_root(sim):
    quote = sim.get_quote(b"nonce")
    with pytest.raises(ValueError):
        dcap_qvl.verify(quote, collateral(sim), NOW)
    with pytest.raises(ValueError):
        dcap_qvl.QuoteVerifier().verify_with_policy(quote, collateral(sim), NOW, dcap_qvl.QuotePolicy.claims_only(NOW))


def test_another_installations_root_refuses_it(sim, fresh):
    with pytest.raises(ValueError):
        dcap_qvl.verify_with_root_ca(sim.get_quote(b"x"), collateral(sim), fresh.root_ca_der, NOW)
    assert fresh.root_ca_der != sim.root_ca_der
    assert fresh.ppid != sim.ppid


def test_root_ca_is_labelled_simulated(sim):
    cert = x509.load_der_x509_certificate(sim.root_ca_der)
    assert "dstack-sim" in cert.subject.rfc4514_string()
    assert cert == x509.load_pem_x509_certificate(sim.root_ca_pem)
    assert sim.attestation_mode == SimTdx.attestation_mode == "dstack-sim"


# --- what the quote says ---

def test_report_data_is_zero_padded_and_comes_back_verified(sim):
    assert verified_td(sim, sim.get_quote(b"\xab" * 10))["report_data"] == (b"\xab" * 10 + bytes(54)).hex()
    assert verified_td(sim, sim.get_quote(bytes(range(64))))["report_data"] == bytes(range(64)).hex()


@pytest.mark.parametrize("bad", [b"x" * 65, "text", None, 7])
def test_bad_report_data_is_refused(sim, bad):
    with pytest.raises(DstackError) as err:
        sim.get_quote(bad)
    assert err.value.field == "report_data"


def test_every_td_report_field_can_be_set(sim):
    fields = {"mr_td": b"\x01" * 48, "mr_config_id": b"\x02" * 48, "mr_owner": b"\x03" * 48,
              "mr_owner_config": b"\x04" * 48, "rtmr0": b"\x05" * 48, "rtmr1": b"\x06" * 48,
              "rtmr2": b"\x07" * 48, "rtmr3": "08" * 48, "mr_seam": b"\x09" * 48, "xfam": b"\xe7" + bytes(7),
              "tee_tcb_svn": bytes([7, 1, 4]) + bytes(13)}
    td = verified_td(sim, sim.get_quote(b"f", **fields))
    for name, value in fields.items():
        key = name.replace("rtmr", "rt_mr")
        assert td[key] == (value if isinstance(value, str) else value.hex()), name
    with pytest.raises(DstackError) as err:
        sim.get_quote(b"f", mr_td=b"\x01" * 47)
    assert err.value.field == "mr_td"
    with pytest.raises(DstackError) as err:
        sim.get_quote(b"f", mr_nonsense=b"\x01" * 48)
    assert err.value.field == "mr_nonsense"


def test_quote_layout_matches_our_parser_and_dcap(sim):
    quote = sim.get_quote(b"layout")
    parsed = tdx_quote.parse_quote(quote)
    assert parsed.to_bytes() == quote
    assert parsed.attestation_key == sim.attestation_public_key
    cert = parsed.certification
    assert cert.cert_type == tdx_quote.CERT_TYPE_PCK_CHAIN
    assert cert.qe_report.report_data == hashlib.sha256(sim.attestation_public_key + cert.qe_auth_data).digest() \
        + bytes(32)
    assert cert.pck_chain_pem.count(b"BEGIN CERTIFICATE") == 3
    assert parsed.report.report_data[:6] == b"layout"


def test_debug_sets_bit_0_of_td_attributes_and_dcap_refuses_it(sim):
    plain = tdx_quote.parse_quote(sim.get_quote(b"d"))
    debug_quote = sim.get_quote(b"d", debug=True)
    debug = tdx_quote.parse_quote(debug_quote)
    assert not plain.report.debug and debug.report.debug
    assert debug.report.td_attributes == bytes([1]) + plain.report.td_attributes[1:]
    assert dcap_qvl.parse_quote(debug_quote).report.td_attributes[0] & 1 == 1
    with pytest.raises(ValueError, match="[Dd]ebug"):
        verify(sim, debug_quote)


# --- failures a real quote would have ---

@pytest.mark.parametrize("offset", [12, 50, 200, 300, 530, 600, 631])
def test_a_flipped_byte_in_the_signed_region_fails(sim, offset):
    quote = bytearray(sim.get_quote(b"signed"))
    verify(sim, bytes(quote))
    quote[offset] ^= 0x01
    with pytest.raises(ValueError):
        verify(sim, bytes(quote))


def test_a_flipped_byte_in_the_qe_report_fails(sim):
    quote = bytearray(sim.get_quote(b"qe"))
    qe_report_offset = 48 + 584 + 4 + 64 + 64 + 6
    quote[qe_report_offset + 320 + 5] ^= 0x01  # in the QE report's report_data
    with pytest.raises(ValueError):
        verify(sim, bytes(quote))


def test_collateral_is_valid_around_now_only(sim):
    quote = sim.get_quote(b"t")
    verify(sim, quote, now=NOW + 29 * 24 * 3600)
    with pytest.raises(ValueError):
        verify(sim, quote, now=NOW + 31 * 24 * 3600)
    with pytest.raises(ValueError):
        verify(sim, quote, now=NOW - 2 * 3600)


def test_collateral_has_the_tdx_shape(sim):
    col = sim.collateral(now=NOW)
    tcb_info = json.loads(col["tcb_info"])
    assert (tcb_info["id"], tcb_info["version"], tcb_info["fmspc"]) == ("TDX", 3, sim.fmspc.hex().upper())
    assert tcb_info["tdxModuleIdentities"] and "tdxModule" in tcb_info
    assert all("tdxtcbcomponents" in level["tcb"] for level in tcb_info["tcbLevels"])
    qe_identity = json.loads(col["qe_identity"])
    assert (qe_identity["id"], qe_identity["version"]) == ("TD_QE", 2)
    assert len(bytes.fromhex(col["tcb_info_signature"])) == 64
    assert len(bytes.fromhex(col["qe_identity_signature"])) == 64
    assert x509.load_der_x509_crl(bytes.fromhex(col["root_ca_crl"])).is_signature_valid(
        x509.load_der_x509_certificate(sim.root_ca_der).public_key())


def test_a_tampered_tcb_info_fails(sim):
    col = sim.collateral(now=NOW)
    col["tcb_info"] = col["tcb_info"].replace('"tcbEvaluationDataNumber":17', '"tcbEvaluationDataNumber":18')
    with pytest.raises(ValueError):
        dcap_qvl.verify_with_root_ca(sim.get_quote(b"x"), dcap_qvl.QuoteCollateralV3.from_json(json.dumps(col)),
                                     sim.root_ca_der, NOW)


# --- TCB status and advisories on demand ---

def test_out_of_date_status_and_advisories_come_back(sim):
    quote = sim.get_quote(b"old")
    report = verify(sim, quote, tcb_status="OutOfDate", advisory_ids=["INTEL-SA-00837", "INTEL-SA-00960"])
    assert report.status == "OutOfDate"
    assert report.advisory_ids == ["INTEL-SA-00837", "INTEL-SA-00960"]
    report = verify(sim, quote, tcb_status="SWHardeningNeeded", advisory_ids=["INTEL-SA-00615"])
    assert (report.status, report.advisory_ids) == ("SWHardeningNeeded", ["INTEL-SA-00615"])


def test_strict_policy_refuses_out_of_date_and_allow_status_accepts(sim):
    quote = sim.get_quote(b"old")
    strict = dcap_qvl.QuotePolicy.strict
    kw = {"tcb_status": "OutOfDate", "advisory_ids": ["INTEL-SA-00837"], "tcb_date": NOW}
    with pytest.raises(ValueError, match="OutOfDate"):
        claims(sim, quote, strict(NOW), **kw)
    result = claims(sim, quote, strict(NOW).allow_status("OutOfDate"), **kw)
    assert result["tcb"]["status"] == "OutOfDate"
    assert result["tcb"]["advisory_ids"] == ["INTEL-SA-00837"]
    with pytest.raises(ValueError, match="INTEL-SA-00837"):
        claims(sim, quote, strict(NOW).allow_status("OutOfDate").reject_advisory("INTEL-SA-00837"), **kw)


def test_an_old_out_of_date_level_needs_a_platform_grace_period(sim):
    # The default tcbDate of an OutOfDate level is in the past, as Intel's are: dcap-qvl then
    # accepts the platform only within a platform grace period.
    quote = sim.get_quote(b"old")
    policy = dcap_qvl.QuotePolicy.strict(NOW).allow_status("OutOfDate")
    with pytest.raises(ValueError, match="too old"):
        claims(sim, quote, policy, tcb_status="OutOfDate")
    result = claims(sim, quote, policy.platform_grace_period(10 * 365 * 24 * 3600), tcb_status="OutOfDate")
    assert result["tcb"]["status"] == "OutOfDate"


@pytest.mark.parametrize("kw", [{"tcb_status": "Fine"}, {"advisory_ids": [3]}, {"tcb_date": "yesterday"},
                                {"now": "now"}])
def test_bad_collateral_options_are_refused(sim, kw):
    with pytest.raises(DstackError) as err:
        sim.collateral(**kw)
    assert err.value.field == next(iter(kw))


# --- RTMRs ---

def test_rtmr_extension_chains_sha384_and_persists(fresh):
    assert fresh.read_rtmrs() == [bytes(48)] * 4
    d1, d2 = hashlib.sha384(b"one").digest(), hashlib.sha384(b"two").digest()
    fresh.extend_rtmr(3, d1)
    fresh.extend_rtmr(3, d2)
    fresh.extend_rtmr(1, d1)
    expected3 = hashlib.sha384(hashlib.sha384(bytes(48) + d1).digest() + d2).digest()
    again = SimTdx(fresh.state_dir)
    assert again.read_rtmrs() == [bytes(48), hashlib.sha384(bytes(48) + d1).digest(), bytes(48), expected3]
    td = verified_td(again, again.get_quote(b"r"))
    assert (td["rt_mr1"], td["rt_mr3"]) == (hashlib.sha384(bytes(48) + d1).hexdigest(), expected3.hex())
    assert td["rt_mr0"] == td["rt_mr2"] == bytes(48).hex()
    assert verified_td(again, again.get_quote(b"r", rtmr3=b"\x11" * 48))["rt_mr3"] == (b"\x11" * 48).hex()


@pytest.mark.parametrize("index, digest, field", [(4, bytes(48), "rtmr"), (-1, bytes(48), "rtmr"),
                                                  (True, bytes(48), "rtmr"), (3, bytes(32), "digest"),
                                                  (3, "00" * 48, "digest")])
def test_bad_extends_are_refused(fresh, index, digest, field):
    with pytest.raises(DstackError) as err:
        fresh.extend_rtmr(index, digest)
    assert err.value.field == field
    assert fresh.read_rtmrs() == [bytes(48)] * 4


def _extend_many(state_dir, digest, count):
    sim = SimTdx(state_dir)
    for _round in range(count):
        sim.extend_rtmr(3, digest)


def test_concurrent_extends_are_never_lost(fresh):
    digest = hashlib.sha384(b"same").digest()
    count = 15
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_extend_many, args=(fresh.state_dir, digest, count))
               for _worker in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [worker.exitcode for worker in workers] == [0, 0, 0]
    expected = bytes(48)
    for _round in range(3 * count):
        expected = hashlib.sha384(expected + digest).digest()
    assert fresh.read_rtmrs()[3] == expected


def test_a_damaged_rtmr_file_is_refused_not_reset(fresh):
    path = os.path.join(fresh.state_dir, "rtmrs.json")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write('{"rtmr0": "00"}')
    with pytest.raises(DstackError) as err:
        fresh.read_rtmrs()
    assert err.value.field == "rtmrs.json"
    with pytest.raises(DstackError):
        fresh.extend_rtmr(0, bytes(48))
    with open(path, encoding="utf-8") as handle:
        assert handle.read() == '{"rtmr0": "00"}'


# --- the state directory ---

def test_keys_are_0600_and_the_directory_0700(fresh):
    assert stat.S_IMODE(os.stat(fresh.state_dir).st_mode) == 0o700
    for name in KEY_NAMES:
        assert stat.S_IMODE(os.stat(os.path.join(fresh.state_dir, name + ".key")).st_mode) == 0o600, name


def test_a_second_open_reuses_the_same_installation(fresh):
    quote = fresh.get_quote(b"one")
    again = SimTdx(fresh.state_dir)
    assert again.root_ca_der == fresh.root_ca_der
    assert again.ppid == fresh.ppid and again.fmspc == fresh.fmspc
    assert again.attestation_public_key == fresh.attestation_public_key
    # the first instance's quote, the second's collateral
    assert verify(again, quote).status == "UpToDate"


@pytest.mark.parametrize("name", ["pck.key", "root-ca.key", "attestation.key", "pck.crt", "platform.json"])
def test_a_damaged_file_is_refused_not_replaced(fresh, name):
    path = os.path.join(fresh.state_dir, name)
    with open(path, "wb") as handle:
        handle.write(b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    with pytest.raises(DstackError) as err:
        SimTdx(fresh.state_dir)
    assert err.value.field == name
    with open(path, "rb") as handle:
        assert handle.read().startswith(b"-----BEGIN PRIVATE KEY-----\nbm90")


def test_a_swapped_key_is_refused(fresh, tmp_path):
    other = SimTdx(str(tmp_path / "other"))
    with open(os.path.join(other.state_dir, "pck.key"), "rb") as src:
        data = src.read()
    with open(os.path.join(fresh.state_dir, "pck.key"), "wb") as dst:
        dst.write(data)
    with pytest.raises(DstackError) as err:
        SimTdx(fresh.state_dir)
    assert err.value.field == "pck.crt"


def test_a_missing_file_is_refused_not_regenerated(fresh):
    root_path = os.path.join(fresh.state_dir, "root-ca.crt")
    with open(root_path, "rb") as handle:
        root_before = handle.read()
    os.unlink(os.path.join(fresh.state_dir, "tcb-signing.key"))
    with pytest.raises(DstackError, match="tcb-signing.key"):
        SimTdx(fresh.state_dir)
    assert not os.path.exists(os.path.join(fresh.state_dir, "tcb-signing.key"))
    with open(root_path, "rb") as handle:
        assert handle.read() == root_before
