"""KMS onboarding (KMS.GetKmsKey): a replica gets the root keys only with an attested boot that
the source's auth backend allows as a KMS, and never replaces keys it already holds.

In process: the real Flask KMS and a simulated TD. As processes: `dstack-guest-agent simulate`
is the replica's CVM, `dstack-kms serve` the source, `dstack-kms onboard` the replica.
"""

import json
import os
import re
import subprocess
import time

import pytest

from ansible_collections.dstack.tee.plugins.module_utils import root_keys
from ansible_collections.dstack.tee.plugins.module_utils import attestation, eventlog, key_release, tdx_quote
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.kms_client import KmsClient, KmsRefused
from conftest import VENV_BIN, free_port, run_playbook
from test_kms_server import KmsProcess
from test_kms import APP_ID, OS_IMAGE, VM_CONFIG, _Hook, boot, make_kms, sim, webhook  # noqa: F401  # pylint: disable=unused-import


def replica(sim, vm_config=VM_CONFIG):
    """The replica's attest(report_data) over a fresh simulated boot, and its boot info."""
    log = boot(sim)
    report = tdx_quote.parse_quote(sim.get_quote(b"\0" * 64)).report
    info = attestation.boot_info_from(report, eventlog.read_boot_log(log), sim.ppid, "", [], "")

    def attest(report_data):
        return {"quote": sim.get_quote(report_data).hex(), "event_log": log, "vm_config": vm_config}
    return attest, info


def allow_kms(path, mr_aggregated=(), devices=(), allow_any_device=False, os_images=(OS_IMAGE,)):
    path.write_text(json.dumps({"gatewayAppId": "", "osImages": ["0x" + h for h in os_images],
                                "kms": {"mrAggregated": ["0x" + m for m in mr_aggregated],
                                        "devices": ["0x" + d for d in devices], "allowAnyDevice": allow_any_device},
                                "apps": {"0x" + APP_ID: {"composeHashes": [], "allowAnyDevice": True}}}))


def test_an_allowed_replica_gets_the_same_root_keys(tmp_path, sim):
    attest, info = replica(sim)
    allow_kms(tmp_path / "auth-config.json", [info["mr_aggregated"]], allow_any_device=True)
    app, client = make_kms(tmp_path, sim)
    source = app.extensions["dstack_kms"]

    received = client.get_kms_key(attest)
    keys, changed = root_keys.install(str(tmp_path / "replica"), received["ca_key"].encode(),
                                      received["ca_cert"].encode(), bytes.fromhex(received["k256_key"]))
    assert changed and root_keys.pem_forms(keys) == root_keys.pem_forms(source.keys)
    assert keys.env_pubkey_response(APP_ID, now=1)["public_key"] == source.env_pubkey(APP_ID)["public_key"]
    assert os.stat(tmp_path / "replica" / root_keys.ROOT_CA_KEY).st_mode & 0o077 == 0
    # A second copy of the same keys is no change; the audit names the release, never the key.
    assert root_keys.install(str(tmp_path / "replica"), received["ca_key"].encode(),
                             received["ca_cert"].encode(), bytes.fromhex(received["k256_key"]))[1] is False
    entry = source.audit.read()[-1]
    assert entry["method"] == "GetKmsKey" and entry["decision"] == "release"
    assert entry["mr_aggregated"] == info["mr_aggregated"]
    assert received["k256_key"] not in (tmp_path / "kms" / "audit.log").read_text()


@pytest.mark.parametrize("allowlist, reason", [
    (dict(mr_aggregated=[]), "KMS aggregated MR is not allowed"),      # empty list: onboarding is opt-in
    (dict(mr_aggregated=["00" * 32], allow_any_device=True), "KMS aggregated MR is not allowed"),
    (dict(os_images=["22" * 32], allow_any_device=True), "OS image is not allowed"),
    (dict(devices=["33" * 32]), "KMS device is not allowed"),
])
def test_a_replica_the_allowlist_does_not_name_gets_nothing(tmp_path, sim, allowlist, reason):  # noqa: F811
    attest, info = replica(sim)
    allowlist.setdefault("mr_aggregated", [info["mr_aggregated"]])
    allow_kms(tmp_path / "auth-config.json", **allowlist)
    app, client = make_kms(tmp_path, sim)
    with pytest.raises(KmsRefused, match=reason):
        client.get_kms_key(attest)
    assert client.last_answers[-1] == {"error": f"auth: {reason}"}
    assert app.extensions["dstack_kms"].audit.read()[-1]["decision"] == "refuse"


def test_a_quote_made_for_getappkey_cannot_onboard(tmp_path, sim):
    """GetKmsKey's report_data has its own tag: a key-release quote for the same nonce and key is refused."""
    attest, info = replica(sim)
    allow_kms(tmp_path / "auth-config.json", [info["mr_aggregated"]], allow_any_device=True)
    _app, client = make_kms(tmp_path, sim)
    nonce = bytes.fromhex(client.call("GetNonce")["nonce"])
    _key, public_key = key_release.new_ephemeral_key()
    evidence = attest(key_release.key_release_report_data(nonce, public_key))
    with pytest.raises(KmsRefused, match="report_data"):
        client.call("GetKmsKey", dict(evidence, nonce=nonce.hex(), ephemeral_public_key=public_key.hex()))


def test_the_webhook_is_asked_at_bootauth_kms(tmp_path, sim, webhook):  # noqa: F811 (fixture)
    _Hook.behaviour = "allow"
    attest, info = replica(sim)
    _app, client = make_kms(tmp_path, sim, auth={"type": "webhook", "url": webhook})
    assert client.get_kms_key(attest)["k256_key"]
    path, body = _Hook.seen[-1]
    assert path == "/bootAuth/kms" and body["mrAggregated"] == info["mr_aggregated"]


def test_install_checks_the_keys_and_never_replaces_others(tmp_path):
    keys, _created = root_keys.load_or_create(str(tmp_path / "a"))
    other, _created = root_keys.load_or_create(str(tmp_path / "b"))
    ca_key, ca_cert, k256 = root_keys.pem_forms(keys)
    with pytest.raises(DstackError, match="already holds other root keys"):
        root_keys.install(str(tmp_path / "b"), ca_key, ca_cert, k256)
    assert root_keys.pem_forms(root_keys.load(str(tmp_path / "b"))) == root_keys.pem_forms(other)
    with pytest.raises(DstackError, match="does not belong"):
        root_keys.install(str(tmp_path / "c"), ca_key, root_keys.pem_forms(other)[1], k256)
    with pytest.raises(DstackError, match="32"):
        root_keys.install(str(tmp_path / "c"), ca_key, ca_cert, k256[:31])
    assert not (tmp_path / "c").exists()


# ---- as processes: dstack-guest-agent simulate is the replica's CVM ---------------------------

def _wait(check, what, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    pytest.fail(f"{what} did not come up")


def _kms_cli(*args):
    return subprocess.run([str(VENV_BIN / "dstack-kms"), *args], capture_output=True, text=True, timeout=120, check=False)


def test_dstack_kms_onboard_from_a_simulated_cvm(short_tmp):
    sim_root, sock = short_tmp / "sim", short_tmp / "d.sock"
    cvm = subprocess.Popen([str(VENV_BIN / "dstack-guest-agent"), "simulate", "--socket", str(sock),
                            "--tappd-socket", "", "--state-dir", str(sim_root), "--name", "dstack-kms"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    port = free_port()
    source_dir = short_tmp / "source"
    source = None
    try:
        _wait(sock.exists, "the simulated CVM's socket")
        info = _kms_cli("attestation-info", "--guest-socket", str(sock))
        assert info.returncode == 0, info.stderr
        attestation_info = json.loads(info.stdout)
        assert len(attestation_info["mr_aggregated"]) == 64 and len(attestation_info["device_id"]) == 64

        source_dir.mkdir(mode=0o700)
        allow_kms(source_dir / "auth-config.json", os_images=[attestation_info["os_image_hash"]])
        source = KmsProcess(source_dir, port, "--sim-state", str(sim_root / "tdx-sim")).start()
        ca = source_dir / "root-ca.crt"
        onboard = ["onboard", "--state-dir", str(short_tmp / "replica"), "--source-url", f"https://127.0.0.1:{port}",
                   "--source-ca", str(ca), "--guest-socket", str(sock)]

        refused = _kms_cli(*onboard)
        assert refused.returncode == 2 and "KMS aggregated MR is not allowed" in refused.stderr, refused.stderr
        assert not (short_tmp / "replica").exists()

        allow_kms(source_dir / "auth-config.json", [attestation_info["mr_aggregated"]],
                  [attestation_info["device_id"]], os_images=[attestation_info["os_image_hash"]])
        done = _kms_cli(*onboard)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        source_meta = json.loads(_kms_cli("meta", "--state-dir", str(source_dir)).stdout)
        assert result["changed"] and result["k256_pubkey"] == source_meta["k256_pubkey"]
        assert json.loads(_kms_cli("meta", "--state-dir", str(short_tmp / "replica")).stdout) == source_meta
        again = _kms_cli(*onboard)
        assert again.returncode == 0 and json.loads(again.stdout)["changed"] is False
        other_keys = root_keys.pem_forms(root_keys.load_or_create(str(short_tmp / "other"))[0])
        other = _kms_cli(*onboard[:2], str(short_tmp / "other"), *onboard[3:])
        assert other.returncode == 2 and "already holds other root keys" in other.stderr, other.stderr
        assert root_keys.pem_forms(root_keys.load(str(short_tmp / "other"))) == other_keys
        assert "root-ca.key" not in done.stdout + done.stderr and source_meta["k256_pubkey"] in done.stdout

        # The kms role does the same for a replica it brings up (dstack_kms_onboard_url), once.
        role_port = free_port()
        playbook = short_tmp / "replica.yml"
        playbook.write_text("- hosts: localhost\n  gather_facts: false\n  roles: [dstack.tee.kms]\n")
        extra = ["-e", json.dumps({
            "dstack_root": str(short_tmp), "dstack_kms_state_dir": str(short_tmp / "role"),
            "dstack_kms_listen": f"127.0.0.1:{role_port}", "dstack_kms_workers": 1,
            "dstack_kms_onboard_url": f"https://127.0.0.1:{port}", "dstack_kms_onboard_ca_cert": str(ca),
            "dstack_kms_guest_socket": str(sock)})]
        first = run_playbook(playbook, *extra)
        assert first.returncode == 0, first.stdout[-3000:]
        assert "Take the root keys from the source KMS" in first.stdout
        served = KmsClient(f"https://127.0.0.1:{role_port}", ca_cert=str(ca)).get_meta()
        assert served["k256_pubkey"] == source_meta["k256_pubkey"]
        second = run_playbook(playbook, *extra)
        assert second.returncode == 0 and re.search(r"changed=0\s", second.stdout), second.stdout[-3000:]
    finally:
        services = short_tmp / "services" / "supervisord.conf"
        if services.exists():
            subprocess.run([str(VENV_BIN / "supervisorctl"), "-c", str(services), "shutdown"],
                           capture_output=True, check=False)
        if source is not None:
            source.stop()
        cvm.terminate()
        cvm.wait(timeout=30)


def test_onboard_names_an_unreachable_source(tmp_path):
    result = _kms_cli("onboard", "--state-dir", str(tmp_path / "replica"),
                      "--source-url", f"https://127.0.0.1:{free_port()}")
    assert result.returncode == 2 and "--source-url: cannot reach the KMS" in result.stderr, result.stderr
    assert not (tmp_path / "replica").exists()
