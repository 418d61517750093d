"""The `dstack-kms` command: root keys made once with 0600, kept, refused when damaged."""

import json
import stat
import subprocess
import sys
from pathlib import Path

import dstack_sdk

from ansible_collections.dstack.tee.plugins.module_utils import env_crypt

KMS = str(Path(sys.executable).parent / "dstack-kms")
APP_ID = "ab" * 20


def kms(*args):
    return subprocess.run([KMS, *args], capture_output=True, text=True, timeout=60, check=False)


def test_init_makes_keys_once_with_0600(tmp_path):
    state = tmp_path / "kms"
    first = kms("init", "--state-dir", str(state))
    assert first.returncode == 0, first.stderr
    meta = json.loads(first.stdout)
    assert meta["created"] is True and len(bytes.fromhex(meta["k256_pubkey"])) == 33
    for name in ("root-ca.key", "root-k256.key"):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    again = json.loads(kms("init", "--state-dir", str(state)).stdout)
    assert again["created"] is False and again["k256_pubkey"] == meta["k256_pubkey"]


def test_env_pubkey_answer_verifies_with_the_sdk(tmp_path):
    state = str(tmp_path / "kms")
    meta = json.loads(kms("init", "--state-dir", state).stdout)
    answer = json.loads(kms("env-pubkey", "--state-dir", state, "--app-id", APP_ID).stdout)
    signer = dstack_sdk.verify_env_encrypt_public_key(
        bytes.fromhex(answer["public_key"]), bytes.fromhex(answer["signature_v1"]), APP_ID, answer["timestamp"])
    assert signer == "0x" + meta["k256_pubkey"]


def test_decrypt_env_filters_and_compares_by_name(tmp_path):
    state = str(tmp_path / "kms")
    kms("init", "--state-dir", state)
    answer = json.loads(kms("env-pubkey", "--state-dir", state, "--app-id", APP_ID).stdout)
    (tmp_path / "src.env").write_text("A=one-secret\nB=two-secret\n")
    (tmp_path / "enc").write_bytes(env_crypt.encrypt_env([("A", "one-secret"), ("B", "two-secret")],
                                                         answer["public_key"]))
    out = kms("decrypt-env", "--state-dir", state, "--app-id", APP_ID, "--in", str(tmp_path / "enc"),
              "--out-dir", str(tmp_path / "guest"), "--allowed-envs", "A",
              "--expect-env-file", str(tmp_path / "src.env"))
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["env_keys"] == ["A"] and result["dropped_envs"] == ["B"]
    assert result["round_trip"] == {"equal": ["A"], "different": [], "missing": []}
    assert "one-secret" not in out.stdout + out.stderr and "dropped B" in out.stderr
    assert (tmp_path / "guest" / ".decrypted-env").read_text() == "A=one-secret\n"
    assert stat.S_IMODE((tmp_path / "guest" / ".decrypted-env.json").stat().st_mode) == 0o600


def test_damaged_state_is_refused_and_not_overwritten(tmp_path):
    state = tmp_path / "kms"
    kms("init", "--state-dir", str(state))
    (state / "root-k256.key").write_bytes(b"short")
    out = kms("init", "--state-dir", str(state))
    assert out.returncode == 2 and "root-k256.key: is corrupt" in out.stderr
    assert (state / "root-k256.key").read_bytes() == b"short"
    (state / "root-k256.key").unlink()
    out = kms("meta", "--state-dir", str(state))
    assert out.returncode == 2 and "root-k256.key: is missing" in out.stderr
    (state / "root-ca.key").write_text("garbage")
    assert "root-ca.key: is corrupt" in kms("meta", "--state-dir", str(state)).stderr


def test_bad_app_id_is_named(tmp_path):
    state = str(tmp_path / "kms")
    kms("init", "--state-dir", state)
    out = kms("env-pubkey", "--state-dir", state, "--app-id", "xyz")
    assert out.returncode == 2 and "app_id: is not hex" in out.stderr
