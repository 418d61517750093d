"""module_utils/signatures.py: Keccak against published vectors and eth-hash, dstack's Sign/Verify
algorithms checked with cryptography's own verifier, low s, and the secp256k1 key range."""

import hashlib
import os

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from eth_hash.auto import keccak as eth_keccak

from ansible_collections.dstack.tee.plugins.module_utils import signatures
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError

# Keccak of the empty string (the Keccak team's known answers; not SHA-3's, whose padding differs).
KECCAK_EMPTY = {
    256: "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470",
    384: "2c23146a63a29acf99e73b88f8c24eaa7dc60aa771780ccc006afbfa8fe2479b2dd2b21362337441ac12b515911957ff",
    512: "0eab42de4c3ceb9235fc91acffe746b29c29a8c366b7c60e4e67c466f36a4304c00fa9caf9d87976ba469bcbe06713b435f0"
         "91ef2769fb160cdab33d3670680e",
}


@pytest.mark.parametrize("bits", sorted(KECCAK_EMPTY))
def test_keccak_known_answers(bits):
    assert signatures.keccak(b"", bits).hex() == KECCAK_EMPTY[bits]
    assert signatures.keccak(b"", bits) != getattr(hashlib, f"sha3_{bits}")(b"").digest()


def test_keccak256_is_ethereums():
    data = os.urandom(100)
    assert signatures.keccak(data) == eth_keccak(data)


def _secp256k1_verifies(public, signature, data, prehashed):
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), public)
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    key.verify(der, data, ec.ECDSA(Prehashed(hashes.SHA256()) if prehashed else hashes.SHA256()))  # raises if not


@pytest.mark.parametrize("algorithm", signatures.SIGN_ALGORITHMS)
def test_sign_then_verify(algorithm):
    key = os.urandom(32)
    data = hashlib.sha256(b"message").digest() if algorithm == "secp256k1_prehashed" else b"message"
    signature, public = signatures.sign_data(algorithm, key, data)
    assert signatures.verify_data(algorithm, data, signature, public)
    assert not signatures.verify_data(algorithm, data[:-1] + b"?", signature, public)
    if algorithm == "ed25519":
        ed25519.Ed25519PublicKey.from_public_bytes(public).verify(signature, data)
    else:
        assert len(public) == 33 and len(signature) == 64
        assert int.from_bytes(signature[32:], "big") <= signatures.SECP256K1_ORDER // 2  # low s
        _secp256k1_verifies(public, signature, data, algorithm == "secp256k1_prehashed")


def test_a_high_s_signature_still_verifies():
    key = os.urandom(32)
    signature, public = signatures.sign_data("secp256k1", key, b"m")
    high = signatures.SECP256K1_ORDER - int.from_bytes(signature[32:], "big")
    assert signatures.verify_data("secp256k1", b"m", signature[:32] + high.to_bytes(32, "big"), public)
    assert signatures.low_s(high, signatures.SECP256K1_ORDER) == int.from_bytes(signature[32:], "big")


@pytest.mark.parametrize("call, field", [
    (lambda: signatures.sign_data("secp256k1_prehashed", os.urandom(32), b"x" * 31), "data"),
    (lambda: signatures.verify_data("secp256k1_prehashed", b"x" * 33, b"\0" * 64, bytes.fromhex(
        "0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798")), "data"),
    (lambda: signatures.verify_data("secp256k1", b"x", b"\0" * 64, b"\x05" * 33), "public_key"),
    (lambda: signatures.verify_data("ed25519", b"x", b"\0" * 63, b"\0" * 32), "signature"),
    (lambda: signatures.verify_data("ed25519", b"x", b"\0" * 64, b"\0" * 31), "public_key"),
])
def test_malformed_input_names_the_field(call, field):
    with pytest.raises(DstackError) as caught:
        call()
    assert caught.value.field == field


def test_k256_secret_range():
    order = signatures.SECP256K1_ORDER
    assert signatures.is_k256_secret((1).to_bytes(32, "big"))
    assert signatures.is_k256_secret((order - 1).to_bytes(32, "big"))
    for bad in (bytes(32), order.to_bytes(32, "big"), b"\xff" * 32, b"\x01" * 31):
        assert not signatures.is_k256_secret(bad)


def test_raw_ecdsa_signature_is_r_and_s():
    key = ec.generate_private_key(ec.SECP256R1())
    signature = signatures.raw_ecdsa_signature(key, b"quote body")
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    key.public_key().verify(der, b"quote body", ec.ECDSA(hashes.SHA256()))
