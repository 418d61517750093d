"""dstack.tee.env_encrypt run as Ansible runs it: signature checks, secrecy, idempotence, refusals."""

import pytest

from ansible_collections.dstack.tee.plugins.module_utils import env_crypt, kdf

APP_ID = "11" * 20
SECRET_VALUES = ("s3cr3t-value-one", "another-hidden-value")


@pytest.fixture
def signed(kms_state):
    """Module args carrying a fresh KMS-signed env public key for APP_ID."""
    answer = kms_state.env_pubkey_response(APP_ID)
    return {"public_key": answer["public_key"], "signature_v1": answer["signature_v1"],
            "timestamp": answer["timestamp"], "app_id": APP_ID,
            "kms_k256_pubkey": kms_state.k256_pubkey.hex()}


@pytest.fixture
def env_file(tmp_path):
    path = tmp_path / "secrets.env"
    path.write_text(f"A={SECRET_VALUES[0]}\nB=\"{SECRET_VALUES[1]}\"\nC=dropped\n")
    return path


def _no_secret(result):
    for value in SECRET_VALUES:
        assert value not in result.raw


def test_encrypts_to_the_app_key_and_decrypts_back(module, kms_state, signed, env_file, tmp_path):
    dest = tmp_path / "encrypted-env"
    args = dict(signed, env_file=str(env_file), dest=str(dest), allowed_envs=["A", "B"],
                fingerprint_key_file=str(tmp_path / "fp.key"))
    result = module("env_encrypt", args, diff=True)
    _no_secret(result)
    assert result["changed"] and result["signature"] == "v1"
    assert result["env_keys"] == ["A", "B"] and result["dropped_envs"] == ["C"]
    assert result["warnings"] == []  # C is named in dropped_envs: leaving it out is what allowed_envs asks
    secret = kdf.env_crypt_key(kms_state.ca_key, APP_ID)
    assert env_crypt.decrypt_env(dest.read_bytes(), secret) == [("A", SECRET_VALUES[0]), ("B", SECRET_VALUES[1])]
    assert result["encrypted_env"] == dest.read_bytes().hex()


def test_idempotent_and_check_mode(module, signed, env_file, tmp_path):
    dest = tmp_path / "encrypted-env"
    args = dict(signed, env_file=str(env_file), dest=str(dest), fingerprint_key_file=str(tmp_path / "fp.key"))
    assert module("env_encrypt", args, check=True)["changed"] and not dest.exists()
    assert module("env_encrypt", args)["changed"]
    blob = dest.read_bytes()
    assert module("env_encrypt", args, check=True)["changed"] is False
    assert module("env_encrypt", args)["changed"] is False and dest.read_bytes() == blob
    # A changed value is seen through the fingerprint, and the diff names keys, never values.
    env_file.write_text(f"A={SECRET_VALUES[0]}-changed\nB=x\nC=y\n")
    changed = module("env_encrypt", args, diff=True)
    assert changed["changed"] and dest.read_bytes() != blob
    assert '"A"' in changed["diff"]["after"] and SECRET_VALUES[0] not in changed.raw
    assert oct((tmp_path / "fp.key").stat().st_mode & 0o777) == "0o600"


def test_env_dict_values_are_no_log(module, signed):
    result = module("env_encrypt", dict(signed, env={"A": SECRET_VALUES[0], "B": SECRET_VALUES[1]}))
    _no_secret(result)
    assert result["env_keys"] == ["A", "B"] and len(result["encrypted_env"]) > 2 * 60


@pytest.mark.parametrize("change, field, reason", [
    ({"signature_v1": None}, "signature_v1", "missing"),
    ({"signature_v1": "00" * 65}, "signature_v1", ""),
    ({"timestamp": 1}, "timestamp", "stale"),
    ({"kms_k256_pubkey": None}, None, "are missing: kms_k256_pubkey"),
    ({"public_key": "ab" * 31}, "public_key", "must be 32 bytes"),
    ({"public_key": "not-hex" * 9}, "public_key", "not hex"),
    ({"app_id": "22" * 20}, "signature_v1", "not made by the trusted KMS key"),
])
def test_bad_or_missing_signatures_are_refused(module, signed, env_file, tmp_path, change, field, reason):
    dest = tmp_path / "encrypted-env"
    args = dict(signed, env_file=str(env_file), dest=str(dest))
    args.update({k: v for k, v in change.items() if v is not None})
    for key in [k for k, v in change.items() if v is None]:
        args.pop(key)
    result = module("env_encrypt", args)
    _no_secret(result)
    assert result.get("failed") is True
    if field:
        assert result["msg"].startswith(field + ":"), result["msg"]
    assert reason in result["msg"]
    assert not dest.exists()


def test_verify_signature_false_encrypts_with_a_warning(module, signed, tmp_path):
    args = {"public_key": signed["public_key"], "env": {"A": "1"}, "verify_signature": False}
    result = module("env_encrypt", args)
    assert result["signature"] == "not verified" and any("verify_signature" in w for w in result["warnings"])


@pytest.mark.parametrize("content, field, reason", [
    ("1BAD=x\n", "env_file.1BAD", "not a valid variable name"),
    ("BIG=" + "v" * (128 * 1024 + 1) + "\n", "env_file.BIG", "at most 131072"),
])
def test_bad_env_is_refused_without_values(module, signed, tmp_path, content, field, reason):
    path = tmp_path / "bad.env"
    path.write_text(content)
    result = module("env_encrypt", dict(signed, env_file=str(path), dest=str(tmp_path / "out")))
    assert result["failed"] and result["msg"].startswith(field + ":") and reason in result["msg"]
    assert "v" * 100 not in result.raw
    assert not (tmp_path / "out").exists()


def test_the_legacy_signature_is_accepted_with_a_warning(module, kms_state, signed):
    legacy = kms_state.env_pubkey_response(APP_ID)["signature"]
    args = dict(signed, signature=legacy, env={"A": "1"})
    args.pop("signature_v1")
    result = module("env_encrypt", args)
    assert result["signature"] == "legacy" and any("legacy" in w for w in result["warnings"])


def test_sdk_encrypted_and_module_encrypted_envs_both_decrypt(module, kms_state, signed):
    import dstack_sdk
    secret = kdf.env_crypt_key(kms_state.ca_key, APP_ID)
    # (a value long enough that no_log masking of it cannot touch the hex output)
    value = "a-longer-secret-value"
    theirs = bytes.fromhex(dstack_sdk.encrypt_env_vars_sync([dstack_sdk.EnvVar("A", value)], signed["public_key"]))
    ours = bytes.fromhex(module("env_encrypt", dict(signed, env={"A": value}))["encrypted_env"])
    assert env_crypt.decrypt_env(theirs, secret) == env_crypt.decrypt_env(ours, secret) == [("A", value)]
    # The ciphertexts differ (random ephemeral keys and IVs) but hold the same env.
    assert theirs != ours
