# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""dstack key derivation (dstack-reference section 8), byte for byte.

derive_key = HKDF-SHA256(salt "RATLS", info = the plain concatenation of the context parts).
derive_p256 takes the parent's 32-byte P-256 scalar as IKM; derive_dh_secret is SHA-256 of the
PKCS#8 DER of the derived P-256 key. secp256k1 signatures are 65 bytes r||s||v, v in {0, 1}.
"""

import hashlib
import time
from dataclasses import dataclass

from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError, parse_hex
from ansible_collections.dstack.tee.plugins.module_utils.signatures import keccak

try:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
except ImportError:  # reported by callers through HAS_CRYPTOGRAPHY
    HAS_CRYPTOGRAPHY = False
else:
    HAS_CRYPTOGRAPHY = True

# secp256k1 through libsecp256k1 (coincurve): what eth-keys itself uses when coincurve is there, so
# the same bytes (RFC 6979 signatures, low s), imported in 15 ms where eth-keys takes 0.4-0.6 s, which
# every module, agent and boot that imports this file paid.
try:
    import coincurve
except ImportError:  # reported by callers through HAS_SECP256K1
    HAS_SECP256K1 = False
else:
    HAS_SECP256K1 = True

SALT = b"RATLS"
ENV_PUBKEY_PREFIX = b"dstack-env-encrypt-pubkey"
KMS_ISSUED_PREFIX = b"dstack-kms-issued"
# The SDK verifier's window for signature_v1 (dstack_sdk.verify_env_encrypt_public_key).
ENV_PUBKEY_MAX_AGE = 300
ENV_PUBKEY_FUTURE_SKEW = 60
KEY_ALGORITHMS = ("secp256k1", "k256", "ed25519")
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def _bytes(part):
    return part.encode("utf-8") if isinstance(part, str) else bytes(part)


def derive_key(ikm, context, length=32):
    """HKDF-SHA256 with salt "RATLS" and info = b"".join(context)."""
    info = b"".join(_bytes(p) for p in context)
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=SALT, info=info).derive(_bytes(ikm))


def p256_scalar(key):
    """The 32-byte big-endian secret scalar of a P-256 private key."""
    return key.private_numbers().private_value.to_bytes(32, "big")


def p256_from_scalar(secret):
    return ec.derive_private_key(int.from_bytes(secret, "big"), ec.SECP256R1())


def p256_pkcs8_der(key):
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def derive_p256(parent, context):
    """A child P-256 key: HKDF over the parent's scalar (parent: a P-256 key or its 32-byte scalar)."""
    ikm = parent if isinstance(parent, (bytes, bytearray)) else p256_scalar(parent)
    return p256_from_scalar(derive_key(ikm, context, 32))


def derive_dh_secret(parent, context):
    """SHA-256 of the PKCS#8 DER of derive_p256(parent, context)."""
    return hashlib.sha256(p256_pkcs8_der(derive_p256(parent, context))).digest()


# ---- secp256k1 --------------------------------------------------------------------------------

def keccak256(data):
    return keccak(data, 256)


def k256_public_key(secret, compressed=True):
    """SEC1 public key (33 bytes compressed, or 65 bytes uncompressed) of a 32-byte secret."""
    return coincurve.PrivateKey(secret).public_key.format(compressed=compressed)


def k256_sign(secret, msg_hash):
    """65-byte recoverable signature r||s||v (v = recovery id 0/1) over a 32-byte hash."""
    return coincurve.PrivateKey(secret).sign_recoverable(msg_hash, hasher=None)


def k256_recover(msg_hash, signature, field="signature"):
    """The compressed public key that made a 65-byte r||s||v signature over msg_hash."""
    if len(signature) != 65:
        raise DstackError(field, f"must be 65 bytes (r||s||v), got {len(signature)}")
    # Refused as eth-keys refuses them: v other than 0/1, r or s not below the curve order.
    r, s, v = (int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:64], "big"), signature[64])
    if v not in (0, 1) or not (r < SECP256K1_N and s < SECP256K1_N):
        raise DstackError(field, "is not a valid secp256k1 signature")
    try:
        return coincurve.PublicKey.from_signature_and_message(signature, msg_hash, hasher=None).format()
    except ValueError:
        raise DstackError(field, "is not a valid secp256k1 signature") from None


# ---- what the KMS derives for an app ----------------------------------------------------------

@dataclass(frozen=True)
class AppKeys:
    """The keys the KMS releases to an app instance (GetAppKey), all raw bytes."""
    disk_crypt_key: bytes
    env_crypt_key: bytes
    k256_key: bytes
    k256_signature: bytes


def app_k256_key(root_k256, app_id):
    return derive_key(root_k256, [app_id, b"app-key"], 32)


def k256_issued_signature(root_k256, app_id, app_k256_pubkey):
    """The root k256 key's signature over Keccak256("dstack-kms-issued:" || app_id || app pubkey)."""
    return k256_sign(root_k256, keccak256(KMS_ISSUED_PREFIX + b":" + app_id + app_k256_pubkey))


def env_crypt_key(root_ca_key, app_id):
    """The app's X25519 env secret: derive_dh_secret(rootCA, [app_id, "env-encrypt-key"])."""
    return derive_dh_secret(root_ca_key, [parse_hex(app_id, "app_id", length=20), b"env-encrypt-key"])


def derive_app_keys(root_ca_key, root_k256, app_id, instance_id, app_level=None):
    """disk, env and k256 keys (and the k256 signature) for app_id / instance_id (raw or hex).

    root_ca_key: the root CA key or its 32-byte scalar (the same keys either way). app_level: the
    app's (env_crypt_key, k256_key, k256_signature) as app_level_keys gave them, when the caller
    keeps them (the KMS caches them per app); only the disk key depends on the instance.
    """
    app = parse_hex(app_id, "app_id", length=20)
    inst = parse_hex(instance_id, "instance_id", length=(0, 20), allow_empty=True)
    env, k256, signature = app_level or app_level_keys(root_ca_key, root_k256, app)
    return AppKeys(disk_crypt_key=disk_crypt_key(root_ca_key, app, inst), env_crypt_key=env, k256_key=k256,
                   k256_signature=signature)


def app_level_keys(root_ca_key, root_k256, app_id):
    """(env_crypt_key, k256_key, k256_signature) of an app: what derive_app_keys gives every instance."""
    app = parse_hex(app_id, "app_id", length=20)
    k256 = app_k256_key(root_k256, app)
    return env_crypt_key(root_ca_key, app), k256, k256_issued_signature(root_k256, app, k256_public_key(k256))


def disk_crypt_key(root_ca_key, app_id, instance_id):
    """An instance's disk key: derive_dh_secret(rootCA, [app_id, instance_id, "app-disk-crypt-key"])."""
    app = parse_hex(app_id, "app_id", length=20)
    inst = parse_hex(instance_id, "instance_id", length=(0, 20), allow_empty=True)
    return derive_dh_secret(root_ca_key, [app, inst, b"app-disk-crypt-key"])


def app_ca_key(root_ca_key, app_id):
    """The per-app CA key: derive_p256(rootCA, [app_id, "app-ca"])."""
    return derive_p256(root_ca_key, [parse_hex(app_id, "app_id", length=20), b"app-ca"])


def seed_app_keys(seed):
    """Keys for the `local` and `none` key providers, from the provider's seed."""
    return {
        "app_key": derive_p256(seed, [b"app-key"]),
        "disk_crypt_key": hashlib.sha256(p256_pkcs8_der(derive_p256(seed, [b"app-disk-key"]))).digest(),
        "k256_key": derive_key(seed, [b"app-k256-key"], 32),
    }


# ---- the env-encrypt public key signatures ----------------------------------------------------

def env_pubkey_hash(app_id, public_key, timestamp=None):
    ts = b"" if timestamp is None else int(timestamp).to_bytes(8, "big")
    return keccak256(ENV_PUBKEY_PREFIX + b":" + app_id + ts + public_key)


def sign_env_pubkey(root_k256, app_id, public_key, timestamp):
    """(signature, signature_v1) over an app's env public key, as GetAppEnvEncryptPubKey returns."""
    app = parse_hex(app_id, "app_id", length=20)
    pub = parse_hex(public_key, "public_key", length=32)
    return (k256_sign(root_k256, env_pubkey_hash(app, pub)),
            k256_sign(root_k256, env_pubkey_hash(app, pub, timestamp)))


def verify_env_pubkey(public_key, app_id, kms_k256_pubkey, signature_v1=None, timestamp=None,
                      signature=None, now=None, max_age=ENV_PUBKEY_MAX_AGE):
    """Check that the KMS whose k256 public key is `kms_k256_pubkey` signed this env public key.

    signature_v1 with its timestamp is preferred (it is refused when older than max_age seconds
    or more than 60 s in the future); the legacy signature has no timestamp and no replay
    protection. Returns "v1" or "legacy"; raises DstackError with the reason otherwise.
    """
    app = parse_hex(app_id, "app_id", length=20)
    pub = parse_hex(public_key, "public_key", length=32)
    trusted = parse_hex(kms_k256_pubkey, "kms_k256_pubkey", length=(33, 65))
    if len(trusted) == 65:
        try:
            trusted = coincurve.PublicKey(trusted).format()
        except ValueError:
            raise DstackError("kms_k256_pubkey", "is not a point of secp256k1") from None
    if signature_v1:
        if timestamp is None:
            raise DstackError("timestamp", "is required with signature_v1")
        now = int(time.time()) if now is None else int(now)
        age = now - int(timestamp)
        if age > max_age:
            raise DstackError("timestamp", f"is stale: the signature is {age} s old (at most {max_age} s allowed)")
        if age < -ENV_PUBKEY_FUTURE_SKEW:
            raise DstackError("timestamp", f"is {-age} s in the future")
        sig = parse_hex(signature_v1, "signature_v1", length=65)
        signer = k256_recover(env_pubkey_hash(app, pub, timestamp), sig, "signature_v1")
        field, kind = "signature_v1", "v1"
    elif signature:
        sig = parse_hex(signature, "signature", length=65)
        signer = k256_recover(env_pubkey_hash(app, pub), sig, "signature")
        field, kind = "signature", "legacy"
    else:
        raise DstackError("signature_v1", "is missing: the env public key cannot be trusted without the KMS signature")
    if signer != trusted:
        raise DstackError(field, "was not made by the trusted KMS key (kms_k256_pubkey) for this app_id and public key")
    return kind


# ---- GetKey (the guest agent) -----------------------------------------------------------------

def get_key(app_k256, path, purpose="", algorithm="secp256k1"):
    """(key, signature_chain) for GetKey: key = HKDF(app_k256, [path]); chain[0] signs the purpose.

    chain[1], the KMS's k256_signature over the app key, is appended by the caller that holds it.
    """
    if algorithm not in KEY_ALGORITHMS:
        raise DstackError("algorithm", f"unknown value {str(algorithm)[:32]!r} (expected one of {', '.join(KEY_ALGORITHMS)})")
    key = derive_key(app_k256, [path], 32)
    pub_hex = key_public_hex(key, algorithm)
    chain0 = k256_sign(app_k256, keccak256(f"{purpose}:{pub_hex}".encode("utf-8")))
    return key, chain0


def key_public_hex(key, algorithm):
    """The public key as GetKey signs it: SEC1-compressed hex (k256) or 32-byte hex (ed25519)."""
    if algorithm == "ed25519":
        return Ed25519PrivateKey.from_private_bytes(key).public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    return k256_public_key(key).hex()


def verify_key_chain(key, purpose, algorithm, signature_chain, app_id, kms_k256_pubkey):
    """Walk a GetKey chain up to the KMS root k256 key; return the app's k256 public key."""
    if len(signature_chain) != 2:
        raise DstackError("signature_chain", f"must hold 2 signatures, got {len(signature_chain)}")
    chain0 = parse_hex(signature_chain[0], "signature_chain[0]", length=65)
    chain1 = parse_hex(signature_chain[1], "signature_chain[1]", length=65)
    pub_hex = key_public_hex(parse_hex(key, "key", length=32), algorithm)
    app_pub = k256_recover(keccak256(f"{purpose}:{pub_hex}".encode("utf-8")), chain0, "signature_chain[0]")
    app = parse_hex(app_id, "app_id", length=20)
    root = k256_recover(keccak256(KMS_ISSUED_PREFIX + b":" + app + app_pub), chain1, "signature_chain[1]")
    if root != parse_hex(kms_k256_pubkey, "kms_k256_pubkey", length=33):
        raise DstackError("signature_chain[1]", "was not made by the trusted KMS root key")
    return app_pub
