# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The KMS root keys: made once, stored 0600, loaded on every start, never overwritten.

Files in the state directory (dstack's names, dstack-reference 5.1):
  root-ca.key    P-256 root CA key, PKCS#8 PEM
  root-ca.crt    its self-signed certificate ("Dstack KMS CA")
  root-k256.key  secp256k1 root key, raw 32 bytes
"""

import datetime
import os
import time
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ansible_collections.dstack.tee.plugins.module_utils import env_crypt, kdf
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError, parse_hex
from ansible_collections.dstack.tee.plugins.module_utils.fileio import atomic_write

ROOT_CA_KEY = "root-ca.key"
ROOT_CA_CERT = "root-ca.crt"
ROOT_K256_KEY = "root-k256.key"
CA_VALIDITY_DAYS = 3650


@dataclass(frozen=True)
class RootKeys:
    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate
    k256_key: bytes

    @property
    def k256_pubkey(self):
        """The compressed SEC1 public key that signs env keys and app keys (hex in GetMeta)."""
        return kdf.k256_public_key(self.k256_key)

    def env_pubkey_response(self, app_id, now=None):
        """GetAppEnvEncryptPubKey: {public_key, signature, timestamp, signature_v1}, hex bytes."""
        app = parse_hex(app_id, "app_id", length=20)
        timestamp = int(time.time()) if now is None else int(now)
        public_key = env_crypt.x25519_public_key(kdf.env_crypt_key(self.ca_key, app))
        signature, signature_v1 = kdf.sign_env_pubkey(self.k256_key, app, public_key, timestamp)
        return {"public_key": public_key.hex(), "signature": signature.hex(),
                "timestamp": timestamp, "signature_v1": signature_v1.hex()}


def _self_signed_ca(key):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Dstack KMS CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_VALIDITY_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))


def _read(path, field):
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise DstackError(field, f"cannot read {path}: {exc.strerror}") from None


def _ca_key(ca_key_pem, where):
    try:
        ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    except (ValueError, TypeError):
        raise DstackError(where + ROOT_CA_KEY, "is corrupt: not a PEM private key") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or ca_key.curve.name != "secp256r1":
        raise DstackError(where + ROOT_CA_KEY, "is not a P-256 key")
    return ca_key


def _ca_cert(ca_cert_pem, ca_key, where):
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    except ValueError:
        raise DstackError(where + ROOT_CA_CERT, "is corrupt: not a PEM certificate") from None
    if ca_cert.public_key().public_numbers() != ca_key.public_key().public_numbers():
        raise DstackError(where + ROOT_CA_CERT, f"does not belong to {ROOT_CA_KEY}")
    return ca_cert


def _k256(k256, where):
    if len(k256) != 32:
        raise DstackError(where + ROOT_K256_KEY, f"is corrupt: {len(k256)} bytes, expected 32")
    kdf.k256_public_key(k256)  # refuses an invalid scalar
    return bytes(k256)


def parse(ca_key_pem, ca_cert_pem, k256, where=""):
    """RootKeys from their stored forms; refuse, naming the file, what is corrupt or mismatched."""
    ca_key = _ca_key(ca_key_pem, where)
    return RootKeys(ca_key, _ca_cert(ca_cert_pem, ca_key, where), _k256(k256, where))


def load(state_dir):
    """Load the root keys; refuse, naming the file, when one is missing, corrupt or unreadable
    (checked in this order: root-ca.key, root-ca.crt, root-k256.key)."""
    ca_key = _ca_key(_read(os.path.join(state_dir, ROOT_CA_KEY), ROOT_CA_KEY), "")
    ca_cert = _ca_cert(_read(os.path.join(state_dir, ROOT_CA_CERT), ROOT_CA_CERT), ca_key, "")
    return RootKeys(ca_key, ca_cert, _k256(_read(os.path.join(state_dir, ROOT_K256_KEY), ROOT_K256_KEY), ""))


def _paths(state_dir):
    return [os.path.join(state_dir, name) for name in (ROOT_CA_KEY, ROOT_CA_CERT, ROOT_K256_KEY)]


def holds_keys(state_dir):
    """Whether the state directory has any root key file (a partial set counts: it is never completed)."""
    return any(os.path.exists(p) for p in _paths(state_dir))


def other_keys_error(state_dir, field="state_dir"):
    """The refusal when onboarding meets a state directory with root keys of another KMS."""
    return DstackError(field, f"{state_dir} already holds other root keys; onboarding never replaces them "
                              "(move them away first if this KMS must join another cluster)")


def _store(state_dir, ca_key_pem, ca_cert_pem, k256):
    ca_key_path, ca_cert_path, k256_path = _paths(state_dir)
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    atomic_write(k256_path, k256, mode=0o600)
    atomic_write(ca_key_path, ca_key_pem, mode=0o600)
    atomic_write(ca_cert_path, ca_cert_pem, mode=0o644)


def pem_forms(keys):
    """(CA key PKCS#8 PEM, CA certificate PEM, k256 raw): what is stored, and what onboarding copies."""
    return (keys.ca_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()),
            keys.ca_cert.public_bytes(serialization.Encoding.PEM), keys.k256_key)


def install(state_dir, ca_key_pem, ca_cert_pem, k256):
    """Store root keys received from another KMS (onboarding). Returns (RootKeys, changed).

    The keys are checked first (a bad set writes nothing). A state directory that already holds
    root keys is never overwritten: the same keys again are no change, other keys are refused.
    """
    keys = parse(ca_key_pem, ca_cert_pem, k256, where="received ")
    if holds_keys(state_dir):
        current = load(state_dir)
        if pem_forms(current) == pem_forms(keys):
            return current, False
        raise other_keys_error(state_dir)
    _store(state_dir, *pem_forms(keys))
    return load(state_dir), True


def load_or_create(state_dir):
    """(RootKeys, created): load the keys, or make them when the state directory has none at all.

    A state directory with some of the files but not all is refused rather than completed, so
    a lost file is never silently replaced by a new key.
    """
    if holds_keys(state_dir):
        return load(state_dir), False
    ca_key = ec.generate_private_key(ec.SECP256R1())
    k256 = os.urandom(32)
    kdf.k256_public_key(k256)  # refuses the (astronomically unlikely) invalid scalar before storing
    _store(state_dir, ca_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()),
           _self_signed_ca(ca_key).public_bytes(serialization.Encoding.PEM), k256)
    return load(state_dir), True
