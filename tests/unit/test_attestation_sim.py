"""The one verifier on simulated quotes: same code path as real ones, only the trust root differs."""

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ansible_collections.dstack.tee.plugins.module_utils import attestation as at
from ansible_collections.dstack.tee.plugins.module_utils import eventlog
from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx

APP_ID, COMPOSE_HASH, INSTANCE_ID = b"\x0a" * 20, b"\x0c" * 32, b"\x01" * 20
KEY_PROVIDER = b'{"name":"kms","id":"3059"}'


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return SimTdx(str(tmp_path_factory.mktemp("sim")))


def measured_boot(sim, extra=()):
    """A full dstack boot measured into RTMR3; returns (event log JSON, events)."""
    sim.reset_rtmrs()
    events = [eventlog.RuntimeEvent(n, p) for n, p in [
        ("system-preparing", b""), ("app-id", APP_ID), ("compose-hash", COMPOSE_HASH),
        ("instance-id", INSTANCE_ID), ("os-image-hash", b"\x05" * 32), ("key-provider", KEY_PROVIDER),
        ("boot-mr-done", b""), ("mr-kms", b"\x0f" * 32), *extra, ("storage-fs", b"ext4"), ("system-ready", b"")]]
    for event in events:
        sim.extend_rtmr(3, event.digest())
    return json.dumps([e.to_log_entry() for e in events]), events


def test_sim_quote_verifies_under_the_sim_root_with_boot_info(sim):
    log, _events = measured_boot(sim)
    quote = sim.get_quote(b"nonce", mr_config_id=b"\x01" + COMPOSE_HASH + bytes(15))
    result = at.verify_quote(quote, sim.collateral(), sim.root_ca_der, event_log=log)
    assert result.ok, [c.to_dict() for c in result.failures]
    assert result.attestation_mode == "dstack-sim"
    info = result.boot_info
    assert (info["app_id"], info["compose_hash"], info["instance_id"]) == (APP_ID.hex(), COMPOSE_HASH.hex(),
                                                                           INSTANCE_ID.hex())
    assert info["device_id"] == hashlib.sha256(sim.ppid).hexdigest()
    assert info["os_image_hash"] == "05" * 32 and info["key_provider"] == KEY_PROVIDER.decode()
    report = result.quote.report
    # mr_aggregated includes mr_config_id, mr_owner, mr_owner_config when any is non-zero (7.4)
    assert info["mr_aggregated"] == hashlib.sha256(
        report.mr_td + report.rtmr0 + report.rtmr1 + report.rtmr2 + report.rtmr3 + report.mr_config_id
        + report.mr_owner + report.mr_owner_config).hexdigest()
    assert info["mr_system"] == hashlib.sha256(report.mr_td + report.rtmr0 + report.rtmr1 + report.rtmr2
                                               + hashlib.sha256(KEY_PROVIDER).digest()).hexdigest()
    names = [c.name for c in result.checks]
    assert names[:3] == ["quote_format", "debug", "dcap"] and "rtmr3_replay" in names


def test_mr_aggregated_without_config_ids(sim):
    log, _events = measured_boot(sim)
    result = at.verify_quote(sim.get_quote(b""), sim.collateral(), sim.root_ca_der, event_log=log)
    r = result.quote.report
    assert result.boot_info["mr_aggregated"] == hashlib.sha256(r.mr_td + r.rtmr0 + r.rtmr1 + r.rtmr2 + r.rtmr3).hexdigest()


def test_sim_quote_is_refused_under_intels_root(sim):
    result = at.verify_quote(sim.get_quote(b"x"), sim.collateral(), event_log=None)
    assert not result.ok and result.failures[0].name == "dcap" and result.attestation_mode == "dstack-tdx"


def test_debug_td_is_refused_by_the_default_policy(sim):
    result = at.verify_quote(sim.get_quote(b"x", debug=True), sim.collateral(), sim.root_ca_der)
    assert result.failures[0].name == "debug"


def test_out_of_date_tcb_is_refused_unless_the_policy_allows_it(sim):
    now = int(time.time())
    collateral = sim.collateral(now=now, tcb_status="OutOfDate", advisory_ids=["INTEL-SA-00837"], tcb_date=now)
    quote = sim.get_quote(b"x")
    default = at.verify_quote(quote, collateral, sim.root_ca_der, now=now)
    assert [c.name for c in default.failures] == ["tcb_status", "advisory_ids"]
    assert default.tcb_status == "OutOfDate" and default.advisory_ids == ["INTEL-SA-00837"]
    allowed = at.verify_quote(quote, collateral, sim.root_ca_der, now=now, policy=at.Policy(
        allowed_tcb_statuses=("UpToDate", "OutOfDate"), allowed_advisory_ids=("INTEL-SA-00837",)))
    assert allowed.ok, [c.to_dict() for c in allowed.failures]


def test_event_log_that_does_not_match_rtmr3_is_refused(sim):
    log, _events = measured_boot(sim)
    tampered = json.loads(log)
    tampered[2]["event_payload"] = "dd" * 32  # another compose hash than the one measured
    tampered[2]["digest"] = eventlog.event_digest("compose-hash", b"\xdd" * 32).hex()  # its digest restamped
    result = at.verify_quote(sim.get_quote(b"x"), sim.collateral(), sim.root_ca_der, event_log=json.dumps(tampered))
    assert [c.name for c in result.failures] == ["rtmr3_replay"]
    # ... and the boot info does not take the claimed hash: a log that does not replay names nothing.
    assert not result.ok and result.boot_info["compose_hash"] == ""


def test_a_duplicated_compose_hash_event_is_refused(sim):
    log, _events = measured_boot(sim, extra=[("compose-hash", b"\xee" * 32)])
    result = at.verify_quote(sim.get_quote(b"x"), sim.collateral(), sim.root_ca_der, event_log=log)
    assert [c.name for c in result.failures] == ["event_log"]
    assert "compose-hash" in result.failures[0].detail


def test_expected_report_data(sim):
    quote = sim.get_quote(b"\x01" * 64)
    assert at.verify_quote(quote, sim.collateral(), sim.root_ca_der,
                           policy=at.Policy(expected_report_data=b"\x01" * 64)).ok
    assert not at.verify_quote(quote, sim.collateral(), sim.root_ca_der,
                               policy=at.Policy(expected_report_data=b"\x02" * 64)).ok


VERIFY = str(Path(sys.executable).parent / "dstack-verify")


def test_dstack_verify_takes_a_get_quote_response(sim, tmp_path):
    log, _events = measured_boot(sim)
    quote = sim.get_quote(b"hi")
    (tmp_path / "collateral.json").write_text(sim.collateral_json())
    (tmp_path / "resp.json").write_text(json.dumps({"quote": quote.hex(), "event_log": log,
                                                    "report_data": b"hi".ljust(64, b"\0").hex(), "vm_config": "{}"}))
    ok = subprocess.run([VERIFY, str(tmp_path / "resp.json"), "--collateral", str(tmp_path / "collateral.json"),
                         "--sim-state", sim.state_dir, "--report-data", b"hi".hex() + "00" * 62],
                        capture_output=True, text=True, timeout=60, check=False)
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert out["ok"] and out["boot_info"]["compose_hash"] == COMPOSE_HASH.hex()
    assert {c["name"] for c in out["checks"]} >= {"dcap", "rtmr3_replay", "report_data", "event_log"}
    # Raw bytes and hex work too; under Intel's default root the same quote fails, named.
    (tmp_path / "q.bin").write_bytes(quote)
    (tmp_path / "q.hex").write_text(quote.hex())
    for name in ("q.bin", "q.hex"):
        refused = subprocess.run([VERIFY, str(tmp_path / name), "--collateral", str(tmp_path / "collateral.json")],
                                 capture_output=True, text=True, timeout=60, check=False)
        assert refused.returncode == 1 and "FAILED dcap" in refused.stderr
    bad = subprocess.run([VERIFY, str(tmp_path / "missing"), "--collateral", "x"], capture_output=True, text=True,
                         timeout=60, check=False)
    assert bad.returncode == 2 and "QUOTE_FILE: cannot read" in bad.stderr


def test_dstack_verify_a_simulated_quote_with_only_sim_state(sim, tmp_path):
    """As the README says: `dstack-verify QUOTE --sim-state DIR`, nothing else (the simulator's own
    collateral); the same quote under Intel's root says it is the simulator's; input is bounded."""
    log, _events = measured_boot(sim)
    (tmp_path / "resp.json").write_text(json.dumps({"quote": sim.get_quote(b"hi").hex(), "event_log": log}))
    ok = subprocess.run([VERIFY, str(tmp_path / "resp.json"), "--sim-state", sim.state_dir],
                        capture_output=True, text=True, timeout=60, check=False)
    assert ok.returncode == 0 and json.loads(ok.stdout)["boot_info"]["compose_hash"] == COMPOSE_HASH.hex(), ok.stderr
    (tmp_path / "collateral.json").write_text(sim.collateral_json())
    intel = subprocess.run([VERIFY, str(tmp_path / "resp.json"), "--collateral", str(tmp_path / "collateral.json")],
                           capture_output=True, text=True, timeout=60, check=False)
    assert intel.returncode == 1 and "this quote is from the dstack.tee simulator" in intel.stderr
    assert "--sim-state DIR" in intel.stderr
    none = subprocess.run([VERIFY, str(tmp_path / "resp.json")], capture_output=True, text=True, timeout=60, check=False)
    assert none.returncode == 2 and "--collateral: is required" in none.stderr and "--sim-state" in none.stderr
    (tmp_path / "huge").write_bytes(b"0" * (4 * 1024 * 1024 + 1))
    huge = subprocess.run([VERIFY, str(tmp_path / "huge"), "--sim-state", sim.state_dir], capture_output=True,
                          text=True, timeout=60, check=False)
    assert huge.returncode == 2 and "more than 4194304 bytes" in huge.stderr
    # A folder with no simulated TDX is refused, and nothing is made there.
    wrong = subprocess.run([VERIFY, str(tmp_path / "resp.json"), "--sim-state", str(tmp_path / "not-a-sim")],
                           capture_output=True, text=True, timeout=60, check=False)
    assert wrong.returncode == 2 and "--sim-state: " in wrong.stderr and "holds no simulated TDX" in wrong.stderr
    assert not (tmp_path / "not-a-sim").exists()
