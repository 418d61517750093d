"""Key derivation: the known-answer vector, env-pubkey signatures against the SDK, GetKey chains."""

import hashlib
import os
import time

import dstack_sdk
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives import hashes
from eth_hash.auto import keccak

from ansible_collections.dstack.tee.plugins.module_utils import env_crypt, kdf
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError

# dstack's test_derive_dh_secret_stable_output (its kms crate's tests): the root key and the secret it derives.
VECTOR_ROOT_DER = bytes.fromhex(
    "308187020100301306072a8648ce3d020106082a8648ce3d030107046d306b0201010420f57527cea4ab7ffb49af"
    "99b158cdc0e3ec06398f528349ea236b7d2afe19cec1a1440342000491f50522407ce29dce3ed7d31a15d80c1c42"
    "f13a23552d2b33a0ce09ee11e47bce95936f3e7f80d195f879e28e1b144ef37ac9ab8e36a690cbf930b775897b27")
VECTOR_SECRET = "663afd58820be8ad645f9c035e93199d114ab16f738db62393bc1d7d623e8813"
APP_ID = bytes(range(1, 21))


@pytest.fixture(scope="module")
def root_ca():
    return serialization.load_der_private_key(VECTOR_ROOT_DER, None)


def test_derive_dh_secret_vector(root_ca):
    assert kdf.derive_dh_secret(root_ca, [b"context one", b"context two"]).hex() == VECTOR_SECRET
    # The context is a plain concatenation: splitting it differently gives the same secret.
    assert kdf.derive_dh_secret(root_ca, [b"context onecontext two"]).hex() == VECTOR_SECRET
    assert kdf.derive_dh_secret(root_ca, [b"context one", b"context three"]).hex() != VECTOR_SECRET


def test_derive_key_is_hkdf_sha256_with_ratls_salt():
    expected = HKDF(hashes.SHA256(), 32, b"RATLS", b"ab").derive(b"k" * 32)
    assert kdf.derive_key(b"k" * 32, [b"a", "b"]) == expected


def test_app_keys_follow_the_reference(root_ca):
    root_k256 = hashlib.sha256(b"root").digest()
    inst = bytes(range(20))
    keys = kdf.derive_app_keys(root_ca, root_k256, APP_ID.hex(), inst.hex())
    scalar = root_ca.private_numbers().private_value.to_bytes(32, "big")

    def dh(ctx):
        child = HKDF(hashes.SHA256(), 32, b"RATLS", ctx).derive(scalar)
        key = kdf.p256_from_scalar(child)
        return hashlib.sha256(key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption())).digest()

    assert keys.disk_crypt_key == dh(APP_ID + inst + b"app-disk-crypt-key")
    assert keys.env_crypt_key == dh(APP_ID + b"env-encrypt-key")
    assert keys.k256_key == HKDF(hashes.SHA256(), 32, b"RATLS", APP_ID + b"app-key").derive(root_k256)
    signer = kdf.k256_recover(keccak(b"dstack-kms-issued:" + APP_ID + kdf.k256_public_key(keys.k256_key)),
                              keys.k256_signature)
    assert signer == kdf.k256_public_key(root_k256)
    assert len(keys.k256_signature) == 65 and keys.k256_signature[64] in (0, 1)


def _signed(root_k256, timestamp):
    pub = env_crypt.x25519_public_key(os.urandom(32))
    sig, sig_v1 = kdf.sign_env_pubkey(root_k256, APP_ID, pub, timestamp)
    return pub, sig, sig_v1


def test_env_pubkey_signatures_verify_with_the_sdk():
    root_k256 = os.urandom(32)
    trusted = "0x" + kdf.k256_public_key(root_k256).hex()
    now = int(time.time())
    pub, sig, sig_v1 = _signed(root_k256, now)
    assert dstack_sdk.verify_env_encrypt_public_key(pub, sig_v1, APP_ID.hex(), now) == trusted
    with pytest.warns(DeprecationWarning):
        assert dstack_sdk.verify_env_encrypt_public_key_legacy(pub, sig, APP_ID.hex()) == trusted
    assert kdf.verify_env_pubkey(pub, APP_ID, trusted, signature_v1=sig_v1, timestamp=now) == "v1"
    assert kdf.verify_env_pubkey(pub, APP_ID, trusted, signature=sig) == "legacy"


@pytest.mark.parametrize("position", [0, 10, 31, 40, 63])
def test_a_flipped_signature_byte_fails(position):
    root_k256 = os.urandom(32)
    trusted = kdf.k256_public_key(root_k256)
    now = int(time.time())
    pub, _legacy, sig_v1 = _signed(root_k256, now)
    bad = bytearray(sig_v1)
    bad[position] ^= 0x01
    assert dstack_sdk.verify_env_encrypt_public_key(pub, bytes(bad), APP_ID.hex(), now) != "0x" + trusted.hex()
    with pytest.raises(DstackError) as err:
        kdf.verify_env_pubkey(pub, APP_ID, trusted, signature_v1=bytes(bad), timestamp=now)
    assert err.value.field == "signature_v1"


def test_a_flipped_public_key_or_other_app_fails():
    root_k256 = os.urandom(32)
    trusted = kdf.k256_public_key(root_k256)
    now = int(time.time())
    pub, _legacy, sig_v1 = _signed(root_k256, now)
    with pytest.raises(DstackError, match="not made by the trusted KMS"):
        kdf.verify_env_pubkey(bytes([pub[0] ^ 1]) + pub[1:], APP_ID, trusted, signature_v1=sig_v1, timestamp=now)
    with pytest.raises(DstackError, match="not made by the trusted KMS"):
        kdf.verify_env_pubkey(pub, bytes(20), trusted, signature_v1=sig_v1, timestamp=now)
    with pytest.raises(DstackError, match="not made by the trusted KMS"):
        kdf.verify_env_pubkey(pub, APP_ID, kdf.k256_public_key(os.urandom(32)), signature_v1=sig_v1, timestamp=now)


def test_a_stale_or_future_timestamp_fails():
    root_k256 = os.urandom(32)
    trusted = kdf.k256_public_key(root_k256)
    old = int(time.time()) - 301
    pub, _legacy, sig_v1 = _signed(root_k256, old)
    assert dstack_sdk.verify_env_encrypt_public_key(pub, sig_v1, APP_ID.hex(), old) is None
    with pytest.raises(DstackError, match="stale") as err:
        kdf.verify_env_pubkey(pub, APP_ID, trusted, signature_v1=sig_v1, timestamp=old)
    assert err.value.field == "timestamp"
    future = int(time.time()) + 120
    pub, _legacy, sig_v1 = _signed(root_k256, future)
    with pytest.raises(DstackError, match="future"):
        kdf.verify_env_pubkey(pub, APP_ID, trusted, signature_v1=sig_v1, timestamp=future)
    with pytest.raises(DstackError, match="missing"):
        kdf.verify_env_pubkey(pub, APP_ID, trusted)


@pytest.mark.parametrize("algorithm", ["secp256k1", "k256", "ed25519"])
def test_get_key_chain_verifies_up_to_the_kms_root(root_ca, algorithm):
    root_k256 = os.urandom(32)
    keys = kdf.derive_app_keys(root_ca, root_k256, APP_ID, b"")
    key, chain0 = kdf.get_key(keys.k256_key, "wallet/0", "signing", algorithm)
    assert key == HKDF(hashes.SHA256(), 32, b"RATLS", b"wallet/0").derive(keys.k256_key)
    chain = [chain0, keys.k256_signature]
    app_pub = kdf.verify_key_chain(key, "signing", algorithm, chain, APP_ID, kdf.k256_public_key(root_k256))
    assert app_pub == kdf.k256_public_key(keys.k256_key)
    with pytest.raises(DstackError):
        kdf.verify_key_chain(key, "other-purpose", algorithm, chain, APP_ID, kdf.k256_public_key(root_k256))
    with pytest.raises(DstackError, match="trusted KMS root"):
        kdf.verify_key_chain(key, "signing", algorithm, chain, APP_ID, kdf.k256_public_key(os.urandom(32)))


def test_unknown_algorithm_is_refused():
    with pytest.raises(DstackError, match="^algorithm:"):
        kdf.get_key(os.urandom(32), "p", "x", "rsa")


def test_seed_keys_for_local_and_none_providers():
    seed = os.urandom(32)
    keys = kdf.seed_app_keys(seed)
    assert keys["k256_key"] == HKDF(hashes.SHA256(), 32, b"RATLS", b"app-k256-key").derive(seed)
    assert keys["disk_crypt_key"] == kdf.derive_dh_secret(seed, [b"app-disk-key"])


def test_secp256k1_gives_eth_keys_bytes_and_refuses_what_it_refuses():
    """kdf's secp256k1 is coincurve directly (eth-keys' import cost 0.4-0.6 s a process): the same
    public keys, signatures and recovered signers as eth-keys, and the same malformed signatures refused."""
    from eth_keys import keys as eth_keys  # pylint: disable=import-outside-toplevel
    for i in range(1, 41):
        secret = hashlib.sha256(b"secret %d" % i).digest()
        msg_hash = hashlib.sha256(b"message %d" % i).digest()
        eth_private = eth_keys.PrivateKey(secret)
        assert kdf.k256_public_key(secret) == eth_private.public_key.to_compressed_bytes()
        assert kdf.k256_public_key(secret, compressed=False) == b"\x04" + eth_private.public_key.to_bytes()
        signature = kdf.k256_sign(secret, msg_hash)
        assert signature == eth_private.sign_msg_hash(msg_hash).to_bytes()
        assert kdf.k256_recover(msg_hash, signature) == eth_private.public_key.to_compressed_bytes()
    order = kdf.SECP256K1_N.to_bytes(32, "big")
    for bad in (signature[:64] + b"\x02", signature[:64] + b"\x1b", order + signature[32:], signature[:32] + order + b"\x00",
                bytes(64) + b"\x00", signature[:64]):
        with pytest.raises(DstackError, match="signature"):
            kdf.k256_recover(msg_hash, bad)


def test_an_uncompressed_kms_key_that_is_not_a_point_is_refused():
    public_key, app_id = bytes(32), bytes(20)
    with pytest.raises(DstackError, match="kms_k256_pubkey"):
        kdf.verify_env_pubkey(public_key, app_id, b"\x04" + bytes(64), signature=bytes(65))
