# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Signatures and the Keccak hash, one home for the agents and module_utils.

    sign_data / verify_data   dstack's Sign and Verify algorithms (the guest agent's socket API):
                              ed25519; secp256k1, ECDSA over SHA-256(data); secp256k1_prehashed,
                              ECDSA over a 32-byte digest. secp256k1 signatures are r || s (low s),
                              public keys SEC1-compressed.
    raw_ecdsa_signature       ECDSA / SHA-256 as r || s, 32 bytes each (DCAP quotes and collateral)
    low_s                     s or n - s, whichever is lower (both verify)
    keccak                    Keccak-256/384/512 as Ethereum uses it (the original padding, not SHA-3)
    is_k256_secret            whether 32 bytes are a valid secp256k1 private key

The recoverable secp256k1 signatures of dstack's key derivation (r || s || v) are kdf.py's.
"""

from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError

try:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature, encode_dss_signature
except ImportError:  # keccak, low_s and is_k256_secret need no cryptography; the signing functions do
    pass

SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
SIGN_ALGORITHMS = ("ed25519", "secp256k1", "secp256k1_prehashed")
PREHASHED_SIZE = 32


def keccak(data, bits=256):
    """Keccak (Ethereum's, not SHA-3) of `data`, bits 256, 384 or 512."""
    # Imported on first use: pycryptodome loads cffi and pycparser (30-50 ms), which most importers
    # of this file (every module that reads an app-compose) never need.
    try:
        from Crypto.Hash import keccak as pycryptodome_keccak  # pylint: disable=import-outside-toplevel
    except ImportError:
        raise DstackError("keccak", "needs the pycryptodome package") from None
    return pycryptodome_keccak.new(digest_bits=bits, data=bytes(data)).digest()


def low_s(s_value, order):
    """s reduced modulo the curve order, then min(s, n - s): (r, s) and (r, n - s) both verify."""
    s_value %= order
    return min(s_value, (order - s_value) % order)


def is_k256_secret(secret):
    """Whether `secret` (32 bytes) is a secp256k1 private key: 0 < value < the curve order."""
    return len(secret) == 32 and 0 < int.from_bytes(secret, "big") < SECP256K1_ORDER


def raw_ecdsa_signature(private_key, data, prehashed=False, order=None):
    """ECDSA with SHA-256 over `data` (or over the 32-byte digest `data` itself when prehashed) as
    r || s, 32 bytes each, big-endian; with `order`, s is made low (low_s)."""
    algorithm = ec.ECDSA(Prehashed(hashes.SHA256()) if prehashed else hashes.SHA256())
    r_value, s_value = decode_dss_signature(private_key.sign(data, algorithm))
    if order is not None:
        s_value = low_s(s_value, order)
    return r_value.to_bytes(32, "big") + s_value.to_bytes(32, "big")


def _check_prehashed(algorithm, data, verb):
    if algorithm == "secp256k1_prehashed" and len(data) != PREHASHED_SIZE:
        raise DstackError("data", f"secp256k1_prehashed {verb} a 32-byte digest, got {len(data)} bytes")


def sign_data(algorithm, key, data):
    """(signature, public key) of `data` with the 32-byte private `key` (algorithms: SIGN_ALGORITHMS)."""
    _check_prehashed(algorithm, data, "signs")
    if algorithm == "ed25519":
        private = ed25519.Ed25519PrivateKey.from_private_bytes(key)
        return private.sign(data), private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    private = ec.derive_private_key(int.from_bytes(key, "big"), ec.SECP256K1())
    signature = raw_ecdsa_signature(private, data, prehashed=algorithm == "secp256k1_prehashed", order=SECP256K1_ORDER)
    public = private.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
    return signature, public


def verify_data(algorithm, data, signature, public_key):
    """True when `signature` is a valid signature of `data` under `public_key` (see sign_data); a
    malformed key or signature is a DstackError naming it."""
    if algorithm == "ed25519":
        if len(public_key) != 32:
            raise DstackError("public_key", f"must be 32 bytes for ed25519, got {len(public_key)}")
        if len(signature) != 64:
            raise DstackError("signature", f"must be 64 bytes for ed25519, got {len(signature)}")
        try:
            ed25519.Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
        except InvalidSignature:
            return False
        return True
    try:
        public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), public_key)
    except ValueError:
        raise DstackError("public_key", "is not a SEC1 secp256k1 public key (33 or 65 bytes)") from None
    if len(signature) not in (64, 65):
        raise DstackError("signature", f"must be 64 bytes r||s (or 65 with a recovery id), got {len(signature)}")
    _check_prehashed(algorithm, data, "verifies")
    prehashed = algorithm == "secp256k1_prehashed"
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:64], "big"))
    try:
        public.verify(der, data, ec.ECDSA(Prehashed(hashes.SHA256()) if prehashed else hashes.SHA256()))
    except InvalidSignature:
        return False
    return True
