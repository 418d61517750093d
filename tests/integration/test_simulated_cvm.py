"""`dstack-guest-agent simulate`'s CVM (cli.simulated_cvm): the real boot (agents/guest/boot.py)
against the local KMS (module_utils/local_kms.py), in process.

Real parts: the simulated TDX, the boot's steps, the KMS root keys on disk, dcap-qvl. Expected keys
are recomputed with kdf from the root keys read back from disk, not taken from the code under test.
"""

import json
import os

import pytest

from ansible_collections.dstack.tee.agents.guest import cli
from ansible_collections.dstack.tee.plugins.module_utils import attestation, kdf, root_keys
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.local_kms import LocalKmsClient

OTHER_COMPOSE = "services:\n  other:\n    image: busybox:1.36\n"


def _trust(state):
    return attestation.QuoteTrust({"mode": "simulation", "sim_state_dir": os.path.join(state, "tdx-sim")},
                                  os.path.join(state, "work"))


def test_the_real_boot_runs_with_the_local_kms(tmp_path):
    state = str(tmp_path / "sim")
    ctx, summary = cli.simulated_cvm(state)
    assert summary["made"]
    boot_state = json.loads((tmp_path / "sim" / "work" / "boot.json").read_text())
    assert boot_state["done"] and boot_state["stage"] == "running" and not boot_state["error"]
    progress = [e["payload"].split(":")[0] for e in boot_state["events"] if e["event"] == "boot.progress"]
    assert progress == ["read-config", "instance-id", "measure", "keys", "measure-system", "env", "gateway",
                        "containers", "running"]
    # The keys are the local KMS's for the measured app and instance (kdf from the stored root keys).
    root = root_keys.load(os.path.join(state, "kms"))
    keys = ctx.app_keys()
    expected = kdf.derive_app_keys(root.ca_key, root.k256_key, summary["app_id"], summary["instance_id"])
    assert keys["disk_crypt_key"] == expected.disk_crypt_key.hex() and keys["k256_key"] == expected.k256_key.hex()
    assert keys["key_provider"] == {"Kms": {"url": f"local:{state}/kms", "pubkey": root.key_provider_id}}
    # The measured boot names this KMS, and its quote verifies under the simulated root.
    quote, event_log = ctx.quote(b"check")
    result = _trust(state).verify(quote, event_log, b"check".ljust(64, b"\0"))
    assert result.ok, [(c.name, c.detail) for c in result.failures]
    assert attestation.measured_kms(result.boot_info, root.key_provider_id)
    assert result.boot_info["app_id"] == summary["app_id"] and result.boot_info["instance_id"] == summary["instance_id"]


def test_a_restart_is_a_power_on_of_the_same_cvm_and_a_new_compose_a_new_app(tmp_path):
    state = str(tmp_path / "sim")
    first_ctx, first = cli.simulated_cvm(state)
    first_keys, first_rtmr3 = first_ctx.app_keys(), first_ctx.read_rtmrs()[3]
    first_ctx.emit_event("app-event", b"before the restart")
    again_ctx, again = cli.simulated_cvm(state)
    assert not again["made"] and {k: again[k] for k in ("app_id", "instance_id", "compose_hash")} == \
        {k: first[k] for k in ("app_id", "instance_id", "compose_hash")}
    # Measured afresh (the app's event is gone), to the same RTMR3 and keys.
    assert again_ctx.app_keys() == first_keys and again_ctx.read_rtmrs()[3] == first_rtmr3
    assert "app-event" not in [e.name for e in again_ctx.runtime_events()]
    other_ctx, other = cli.simulated_cvm(state, OTHER_COMPOSE)
    assert other["made"] and other["app_id"] != first["app_id"] and other_ctx.app_keys()["k256_key"] != first_keys["k256_key"]


def test_the_local_kms_refuses_what_the_kms_refuses(tmp_path):
    state = str(tmp_path / "sim")
    ctx, _summary = cli.simulated_cvm(state)
    event_log = json.dumps(ctx.event_log())
    own = root_keys.load(os.path.join(state, "kms"))
    assert LocalKmsClient(own, _trust(state)).get_app_key(ctx.provider, event_log)["key_provider"]["id"] == \
        own.key_provider_id
    # Another KMS's root: the CVM measured this one as its key provider, not that one.
    other, _created = root_keys.load_or_create(str(tmp_path / "other-kms"))
    with pytest.raises(DstackError) as caught:
        LocalKmsClient(other, _trust(state)).get_app_key(ctx.provider, event_log)
    assert caught.value.field == "key_provider"
    # An event log that does not replay to the quote's RTMR3.
    forged = json.loads(event_log)
    forged[1]["event_payload"] = "00" * 20
    with pytest.raises(DstackError) as caught:
        LocalKmsClient(own, _trust(state)).get_app_key(ctx.provider, json.dumps(forged))
    assert caught.value.field == "event_log"
