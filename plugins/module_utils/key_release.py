# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The attested key-release protocol between a CVM and the KMS: one home for both sides.

1. The CVM asks the KMS for a nonce (KMS.GetNonce): 32 random bytes, single use, short-lived.
2. It makes an ephemeral X25519 key and gets a quote whose report_data binds both:
       report_data = SHA-512( "dstack-kms-key-release-v1:" || nonce(32) || ephemeral_public_key(32) )
   (for SignCert the preimage is "dstack-kms-sign-cert-v1:" || nonce || SHA-256(CSR DER); for
   GetKmsKey, a KMS replica onboarding, "dstack-kms-get-kms-key-v1:" || nonce || ephemeral key).
3. It presents the quote, its event log, the nonce and the ephemeral public key (KMS.GetAppKey).
   The KMS verifies the quote with that report_data expected, replays the event log, consumes
   the nonce, asks its auth backend, and only then answers with the keys sealed to the ephemeral
   key: X25519(kms_ephemeral, cvm_ephemeral) -> HKDF-SHA256(salt = nonce, info =
   "dstack-kms-key-release-v1") -> AES-256-GCM over the JSON of the keys, AAD = the nonce.
A replayed nonce, another key in report_data, or a quote from another boot gets nothing.
"""

import hashlib
import json
import os

from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError, parse_hex

try:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
except ImportError:
    HAS_CRYPTOGRAPHY = False
else:
    HAS_CRYPTOGRAPHY = True

KEY_RELEASE_TAG = b"dstack-kms-key-release-v1"
SIGN_CERT_TAG = b"dstack-kms-sign-cert-v1"
KMS_KEY_TAG = b"dstack-kms-get-kms-key-v1"
NONCE_SIZE = 32


def key_release_report_data(nonce, ephemeral_public_key, tag=KEY_RELEASE_TAG):
    """The 64-byte report_data a key-release quote must carry (tag KMS_KEY_TAG for GetKmsKey)."""
    nonce = parse_hex(nonce, "nonce", length=NONCE_SIZE)
    pub = parse_hex(ephemeral_public_key, "ephemeral_public_key", length=32)
    return hashlib.sha512(tag + b":" + nonce + pub).digest()


def sign_cert_report_data(nonce, csr_der):
    """The 64-byte report_data a SignCert quote must carry."""
    nonce = parse_hex(nonce, "nonce", length=NONCE_SIZE)
    return hashlib.sha512(SIGN_CERT_TAG + b":" + nonce + hashlib.sha256(csr_der).digest()).digest()


def new_ephemeral_key():
    """(private key, raw public key bytes) for one key release."""
    key = X25519PrivateKey.generate()
    return key, key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _aead_key(shared, nonce):
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=nonce, info=KEY_RELEASE_TAG).derive(shared)


class Sealer:
    """The KMS side of one release, its key agreement made when the request is read: the KMS's
    ephemeral key and the AEAD key, so that seal() after the checks only encrypts. A requester key
    no key can be agreed with (a low-order point gives an all-zero shared secret: sealing to it
    would fail after the checks, or seal to a key everyone knows) is refused here, before the
    quote is verified or the nonce used up; the release's own agreement finds it out, no probe
    exchange is needed."""

    def __init__(self, nonce, requester_public_key, field="ephemeral_public_key"):
        self.nonce = parse_hex(nonce, "nonce", length=NONCE_SIZE)
        self.requester_public_key = parse_hex(requester_public_key, field, length=32)
        kms_key, self.kms_public_key = new_ephemeral_key()
        try:
            shared = kms_key.exchange(X25519PublicKey.from_public_bytes(self.requester_public_key))
        except ValueError:
            raise DstackError(field, "is not a usable X25519 public key (a low-order point)") from None
        self._aead = AESGCM(_aead_key(shared, self.nonce))

    def seal(self, payload):
        """Encrypt a JSON-able payload to the requester's ephemeral key."""
        iv = os.urandom(12)
        sealed = self._aead.encrypt(iv, json.dumps(payload, sort_keys=True).encode("utf-8"), self.nonce)
        return {"kms_public_key": self.kms_public_key.hex(), "iv": iv.hex(), "ciphertext": sealed.hex()}


def seal(payload, nonce, requester_public_key):
    """The KMS side: encrypt a JSON-able payload to the requester's ephemeral key."""
    return Sealer(nonce, requester_public_key).seal(payload)


def open_sealed(answer, nonce, private_key):
    """The requester side: decrypt the KMS's sealed answer with the ephemeral private key."""
    nonce = parse_hex(nonce, "nonce", length=NONCE_SIZE)
    try:
        kms_pub = X25519PublicKey.from_public_bytes(parse_hex(answer["kms_public_key"], "kms_public_key", length=32))
        iv = parse_hex(answer["iv"], "iv", length=12)
        sealed = parse_hex(answer["ciphertext"], "ciphertext")
    except (KeyError, TypeError):
        raise DstackError("answer", "is not a sealed key-release answer {kms_public_key, iv, ciphertext}") from None
    try:
        plain = AESGCM(_aead_key(private_key.exchange(kms_pub), nonce)).decrypt(iv, sealed, nonce)
    except InvalidTag:
        raise DstackError("answer", "does not decrypt: not sealed to this key and nonce, or tampered") from None
    return json.loads(plain)
