# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The KMS root keys: made once, stored 0600, checked on every load, never overwritten. The KMS
(agents/kms) keeps them in its state directory; `dstack-guest-agent simulate` keeps its local
KMS's the same way.

Files in the state directory (dstack's names, dstack-reference 5.1):
  root-ca.key              P-256 root CA key, PKCS#8 PEM (0600)
  root-ca.crt              its self-signed certificate ("Dstack KMS CA")
  root-k256.key            secp256k1 root key, raw 32 bytes (0600)
  root-keys.manifest.json  the key set: SHA-256 of each of the three files, the CA's public key
                           hash, the CA certificate's hash and the k256 public key (0600)

The manifest is written last, whenever keys are made, installed (onboarding, restore) or first
found without one (a state directory from before manifests: checked as far as the files allow,
then adopted). Every load compares the files with it, so a flipped bit or another KMS's key file
is refused by name instead of loading as a different key. It guards against damage and mix-ups,
not against someone who can write the state directory (they can read the keys too).

New keys are made only in a directory that never held any: a manifest, an audit log, an rpc
certificate or a nonce database left in it prove this KMS had keys, and a restore from backup
is then the way back (restore()).
"""

import datetime
import functools
import glob
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass

from ansible_collections.dstack.tee.plugins.module_utils import app_certs, env_crypt, kdf
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError, parse_hex
from ansible_collections.dstack.tee.plugins.module_utils.fileio import atomic_write, read_bytes
from ansible_collections.dstack.tee.plugins.module_utils.signatures import is_k256_secret

try:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
except ImportError:  # reported by callers through HAS_CRYPTOGRAPHY
    HAS_CRYPTOGRAPHY = False
else:
    HAS_CRYPTOGRAPHY = True

ROOT_CA_KEY = "root-ca.key"
ROOT_CA_CERT = "root-ca.crt"
ROOT_K256_KEY = "root-k256.key"
MANIFEST = "root-keys.manifest.json"
KEY_FILES = (ROOT_CA_KEY, ROOT_CA_CERT, ROOT_K256_KEY)  # also the order they are checked in
SECRET_FILES = (ROOT_CA_KEY, ROOT_K256_KEY)
MANIFEST_FORMAT = "dstack-kms-root-keys/1"
AUDIT_LOG = "audit.log"
RPC_KEY = "rpc.key"  # the KMS's HTTPS key and certificate, issued from the root CA (agents/kms/tls.py)
RPC_CERT = "rpc.crt"
NONCE_DB_GLOB = "nonces*.sqlite3*"
CA_VALIDITY_DAYS = 3650
APP_CACHE_SIZE = 4096  # apps whose derived keys a KMS process keeps in memory

log = logging.getLogger("dstack.kms.root_keys")


@dataclass(frozen=True)
class RootKeys:
    # The types as strings: the module imports without cryptography (HAS_CRYPTOGRAPHY).
    ca_key: "ec.EllipticCurvePrivateKey"
    ca_cert: "x509.Certificate"
    k256_key: bytes

    # What never changes for a key set is computed once (cached_property: the dataclass is frozen
    # but keeps a __dict__), and what an app's requests share is kept per app in a bounded cache.
    # The values are those of the functions called: test_kms_vectors checks them byte for byte.

    @functools.cached_property
    def k256_pubkey(self):
        """The compressed SEC1 public key that signs env keys and app keys (hex in GetMeta)."""
        return kdf.k256_public_key(self.k256_key)

    @functools.cached_property
    def ca_scalar(self):
        """The root CA key's 32-byte scalar: the IKM of every derivation from it."""
        return kdf.p256_scalar(self.ca_key)

    @functools.cached_property
    def ca_cert_pem(self):
        return self.ca_cert.public_bytes(serialization.Encoding.PEM).decode()

    @functools.cached_property
    def key_provider_id(self):
        """The key-provider id CVMs measure for this KMS: its root CA public key (SPKI DER), hex."""
        return app_certs.key_provider_id(self.ca_cert)

    @functools.cached_property
    def _app_cache(self):
        @functools.lru_cache(maxsize=APP_CACHE_SIZE)
        def app_level(app):
            """(env_crypt_key, k256_key, k256_signature, env public key, legacy env signature)."""
            env, k256, signature = kdf.app_level_keys(self.ca_scalar, self.k256_key, app)
            public_key = env_crypt.x25519_public_key(env)
            legacy = kdf.k256_sign(self.k256_key, kdf.env_pubkey_hash(app, public_key))
            return env, k256, signature, public_key, legacy
        return app_level

    def app_keys(self, app_id, instance_id):
        """kdf.derive_app_keys for these root keys, the app's part from the cache."""
        app = parse_hex(app_id, "app_id", length=20)
        return kdf.derive_app_keys(self.ca_scalar, self.k256_key, app, instance_id,
                                   app_level=self._app_cache(app)[:3])

    def app_key_payload(self, app_id, instance_id, os_image_hash, gateway_app_id=""):
        """GetAppKey's answer before it is sealed: the instance's keys (hex), the root CA, the measured
        OS image and this KMS as key provider (what a CVM checks against its key-provider event)."""
        keys = self.app_keys(app_id, instance_id)
        return {
            "disk_crypt_key": keys.disk_crypt_key.hex(),
            "env_crypt_key": keys.env_crypt_key.hex(),
            "k256_key": keys.k256_key.hex(),
            "k256_signature": keys.k256_signature.hex(),
            "gateway_app_id": gateway_app_id,
            "tproxy_app_id": gateway_app_id,
            "ca_cert": self.ca_cert_pem,
            "os_image_hash": os_image_hash,
            "key_provider": {"name": "kms", "id": self.key_provider_id},
        }

    def env_pubkey_response(self, app_id, now=None):
        """GetAppEnvEncryptPubKey: {public_key, signature, timestamp, signature_v1}, hex bytes.
        signature_v1 signs the timestamp, so it is made for each answer; the rest is the app's."""
        app = parse_hex(app_id, "app_id", length=20)
        timestamp = int(time.time()) if now is None else int(now)
        _env, _k256, _signature, public_key, signature = self._app_cache(app)
        signature_v1 = kdf.k256_sign(self.k256_key, kdf.env_pubkey_hash(app, public_key, timestamp))
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


def _restore_hint(state_dir):
    return (f"stop the KMS and restore the root keys from a backup: dstack-kms restore --state-dir {state_dir} "
            "--backup BACKUP_DIR (README: KMS, backup and restore)")


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


# ---- the three files, parsed -------------------------------------------------------------------

def _ca_key(ca_key_pem, where):
    try:
        ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    except (ValueError, TypeError):
        raise DstackError(where + ROOT_CA_KEY, "is corrupt: not a PEM private key") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or ca_key.curve.name != "secp256r1":
        raise DstackError(where + ROOT_CA_KEY, "is not a P-256 key")
    return ca_key


def _ca_cert_only(ca_cert_pem, where):
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
        ca_cert.public_key()  # a damaged key inside a well-formed certificate fails only here
    except ValueError:
        raise DstackError(where + ROOT_CA_CERT, "is corrupt: not a PEM certificate with a readable key") from None
    return ca_cert


def _ca_cert(ca_cert_pem, ca_key, where):
    ca_cert = _ca_cert_only(ca_cert_pem, where)
    if ca_cert.public_key().public_numbers() != ca_key.public_key().public_numbers():
        raise DstackError(where + ROOT_CA_CERT, f"does not belong to {ROOT_CA_KEY}")
    return ca_cert


def _k256(k256, where):
    if len(k256) != 32:
        raise DstackError(where + ROOT_K256_KEY, f"is corrupt: {len(k256)} bytes, expected 32")
    if not is_k256_secret(k256):
        raise DstackError(where + ROOT_K256_KEY, "is corrupt: not a valid secp256k1 private key")
    return bytes(k256)


def parse(ca_key_pem, ca_cert_pem, k256, where=""):
    """RootKeys from their stored forms; refuse, naming the file, what is corrupt or mismatched."""
    ca_key = _ca_key(ca_key_pem, where)
    return RootKeys(ca_key, _ca_cert(ca_cert_pem, ca_key, where), _k256(k256, where))


def pem_forms(keys):
    """(CA key PKCS#8 PEM, CA certificate PEM, k256 raw): what is stored, and what onboarding copies."""
    return (keys.ca_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()),
            keys.ca_cert.public_bytes(serialization.Encoding.PEM), keys.k256_key)


# ---- the manifest ----------------------------------------------------------------------------------

def _ca_public_key_sha256(ca_key):
    return _sha256(ca_key.public_key().public_bytes(serialization.Encoding.DER,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo))


def _identity(keys):
    """What names a key set, from public parts only: the same keys in other bytes have the same identity."""
    return {"ca_public_key_sha256": _ca_public_key_sha256(keys.ca_key),
            "ca_cert_sha256": _sha256(keys.ca_cert.public_bytes(serialization.Encoding.DER)),
            "k256_pubkey": keys.k256_pubkey.hex()}


def _read_manifest(folder, where=""):
    """The manifest as a dict, None when there is none; refused, naming it, when unreadable or malformed."""
    data = read_bytes(os.path.join(folder, MANIFEST), where + MANIFEST, missing_ok=True)
    if data is None:
        return None
    try:
        manifest = json.loads(data)
    except ValueError:
        manifest = None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (not isinstance(files, dict) or manifest.get("format") != MANIFEST_FORMAT
            or not all(isinstance(files.get(n), str) and len(files[n]) == 64 for n in KEY_FILES)
            or not all(isinstance(manifest.get(k), str) for k in ("ca_public_key_sha256", "ca_cert_sha256",
                                                                  "k256_pubkey"))):
        raise DstackError(where + MANIFEST, f"is corrupt: not a {MANIFEST_FORMAT} manifest")
    return manifest


def _write_manifest(state_dir, files, keys, origin):
    manifest = {"format": MANIFEST_FORMAT, "files": {name: _sha256(files[name]) for name in KEY_FILES},
                **_identity(keys), "origin": origin,
                "written": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    atomic_write(os.path.join(state_dir, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n",
                 mode=0o600)


def _changed_reason(name, data, manifest):
    """Why a file whose hash is not the manifest's is refused: corrupt, another key, or other bytes."""
    try:
        if name == ROOT_K256_KEY:
            public_key = kdf.k256_public_key(_k256(data, "")).hex()
            other = public_key != manifest["k256_pubkey"]
            what = f"another k256 key than this KMS's (public key {public_key}; {MANIFEST} names " \
                   f"{manifest['k256_pubkey']})"
        elif name == ROOT_CA_KEY:
            other = _ca_public_key_sha256(_ca_key(data, "")) != manifest["ca_public_key_sha256"]
            what = f"another CA key than the one {MANIFEST} names"
        else:
            cert = _ca_cert_only(data, "")
            other = _sha256(cert.public_bytes(serialization.Encoding.DER)) != manifest["ca_cert_sha256"]
            what = f"another certificate than the one {MANIFEST} names"
    except DstackError as exc:
        return f"{exc.reason} (its SHA-256 is not the one {MANIFEST} records)"
    if other:
        return f"holds {what}"
    return f"changed since {MANIFEST} was written (same key, other bytes)"


def _read_files(folder, where=""):
    """{name: bytes} of the key files present in folder; unreadable ones are refused by name."""
    files = {name: read_bytes(os.path.join(folder, name), where + name, missing_ok=True) for name in KEY_FILES}
    return {name: data for name, data in files.items() if data is not None}


def _check(folder, files, manifest, where, hint):
    """RootKeys from files, each first compared with the manifest (when there is one); refusals name the file."""
    for name in KEY_FILES:
        if name not in files:
            listed = f" ({MANIFEST} lists it)" if manifest else ""
            raise DstackError(where + name, f"is missing from {folder}{listed}; {hint}")
        if manifest is not None and _sha256(files[name]) != manifest["files"][name]:
            raise DstackError(where + name, f"{_changed_reason(name, files[name], manifest)}; {hint}")
    try:
        keys = parse(files[ROOT_CA_KEY], files[ROOT_CA_CERT], files[ROOT_K256_KEY], where)
    except DstackError as exc:
        raise DstackError(exc.field, f"{exc.reason}; {hint}") from None
    if manifest is not None and any(manifest[k] != v for k, v in _identity(keys).items()):
        raise DstackError(where + MANIFEST, f"names other keys than its file hashes (edited?); {hint}")
    return keys


def _check_modes(state_dir):
    for name in SECRET_FILES:
        path = os.path.join(state_dir, name)
        mode = os.stat(path).st_mode & 0o777
        if mode & 0o077:
            raise DstackError(name, f"has mode {mode:04o}: a root key must be readable by the KMS's user only; "
                                    f"chmod 600 {path} (and treat the key as exposed if others could read it)")


def _check_rpc_cert(state_dir, keys, hint):
    """An rpc certificate left in the state directory must come from this root CA: keys from another
    KMS are refused. An unreadable certificate proves nothing either way (it is reissued at start)."""
    path = os.path.join(state_dir, RPC_CERT)
    try:
        cert = x509.load_pem_x509_certificate(read_bytes(path, RPC_CERT))
    except (DstackError, ValueError):  # missing or unreadable (DstackError), or not a certificate
        return
    try:
        cert.verify_directly_issued_by(keys.ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise DstackError(RPC_CERT, f"in {state_dir} was issued by another root CA: these root keys are not "
                                    f"the ones this KMS served with; {hint}") from None


# ---- the state directory ---------------------------------------------------------------------------

def load(state_dir):
    """Load the root keys, checked against the manifest. Refused, naming the file, when one is
    missing, unreadable, changed, corrupt or readable by others (in this order: root-ca.key,
    root-ca.crt, root-k256.key). A state directory from before manifests gets one (once, logged)."""
    hint = _restore_hint(state_dir)
    manifest = _read_manifest(state_dir)
    if manifest is None and not history(state_dir):
        hint += ("; or, if this KMS never served (no audit log, rpc certificate or nonce database here), its "
                 "first start was interrupted: remove the root key files and start it again")
    files = _read_files(state_dir)
    keys = _check(state_dir, files, manifest, "", hint)
    _check_modes(state_dir)
    if manifest is None:
        _adopt(state_dir, files, keys, hint)
    return keys


def _adopt(state_dir, files, keys, hint):
    """Write the manifest of keys that predate manifests, after the checks the files allow: the CA
    certificate belongs to root-ca.key (done by parse) and an rpc certificate left here comes from it.
    Nothing local vouches for root-k256.key: the log names its public key to compare with records."""
    _check_rpc_cert(state_dir, keys, hint)
    _write_manifest(state_dir, files, keys, "adopted")
    log.warning("root keys in %s had no %s (made before manifests, or a first start was interrupted): checked "
                "that %s belongs to %s and wrote the manifest; k256 public key %s (compare it with GetMeta's "
                "k256_pubkey you recorded). From now on a changed key file refuses to start.",
                state_dir, MANIFEST, ROOT_CA_CERT, ROOT_CA_KEY, keys.k256_pubkey.hex())


def holds_keys(state_dir):
    """Whether the state directory has any root key file (a partial set counts: it is never completed)."""
    return any(os.path.exists(os.path.join(state_dir, name)) for name in KEY_FILES)


def history(state_dir, also=()):
    """The files that prove a state directory held root keys: its manifest, audit log, rpc
    certificate or nonce database (and `also`, e.g. an audit log kept elsewhere)."""
    names = [os.path.join(state_dir, n) for n in (MANIFEST, AUDIT_LOG, RPC_CERT, RPC_KEY)]
    names += sorted(glob.glob(os.path.join(glob.escape(state_dir), NONCE_DB_GLOB)))
    names += [p for p in also if p]
    return [p for p in dict.fromkeys(names) if os.path.exists(p)]


def other_keys_error(state_dir, field="state_dir"):
    """The refusal when onboarding meets a state directory with root keys of another KMS."""
    return DstackError(field, f"{state_dir} already holds other root keys; onboarding never replaces them "
                              "(use an empty state directory if this KMS must join another cluster)")


def _store(state_dir, keys, origin):
    """Write the three files, then the manifest: a directory with keys but no manifest can only be
    an interrupted write of consistent files (adopted on the next load)."""
    ca_key_pem, ca_cert_pem, k256 = pem_forms(keys)
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    atomic_write(os.path.join(state_dir, ROOT_K256_KEY), k256, mode=0o600)
    atomic_write(os.path.join(state_dir, ROOT_CA_KEY), ca_key_pem, mode=0o600)
    atomic_write(os.path.join(state_dir, ROOT_CA_CERT), ca_cert_pem, mode=0o644)
    _write_manifest(state_dir, {ROOT_CA_KEY: ca_key_pem, ROOT_CA_CERT: ca_cert_pem, ROOT_K256_KEY: k256},
                    keys, origin)


def install(state_dir, ca_key_pem, ca_cert_pem, k256):
    """Store root keys received from another KMS (onboarding) or a backup (restore). Returns (RootKeys, changed).

    The keys are checked first (a bad set writes nothing). Keys already in the state directory are
    never replaced: the same keys again are no change, other keys are refused. A manifest left in
    the directory names the only keys it takes (and then missing or damaged files are rewritten);
    an rpc certificate left in it must come from the received root CA.
    """
    keys = parse(ca_key_pem, ca_cert_pem, k256, where="received ")
    hint = _restore_hint(state_dir)
    manifest = _read_manifest(state_dir)
    if manifest is not None:
        identity = _identity(keys)
        if any(manifest[k] != v for k, v in identity.items()):
            if holds_keys(state_dir):
                raise other_keys_error(state_dir)
            raise DstackError("state_dir", f"{state_dir}/{MANIFEST} names other root keys (k256 public key "
                                           f"{manifest['k256_pubkey']}) than these ({keys.k256_pubkey.hex()}): "
                                           "they are not this KMS's keys; nothing was written")
        try:
            return load(state_dir), False
        except DstackError:
            pass  # missing or damaged files: the manifest says these keys belong here
    elif holds_keys(state_dir):
        current = load(state_dir)
        if pem_forms(current) == pem_forms(keys):
            return current, False
        raise other_keys_error(state_dir)
    else:
        _check_rpc_cert(state_dir, keys, hint)
    _store(state_dir, keys, "installed")
    return load(state_dir), True


def restore(state_dir, backup_dir):
    """Install the root keys of a backup directory (its three key files, checked against its manifest
    when it has one; a backup from before manifests is checked as far as the files allow)."""
    hint = f"the backup in {backup_dir} is incomplete or damaged: use another copy"
    files = _read_files(backup_dir, where="backup ")
    keys = _check(backup_dir, files, _read_manifest(backup_dir, where="backup "), "backup ", hint)
    return install(state_dir, *pem_forms(keys))


def load_or_create(state_dir, also_history=()):
    """(RootKeys, created): load the keys, or make them in a state directory that never held any.

    A partial set is refused rather than completed, and a directory whose manifest, audit log, rpc
    certificate or nonce database (or a file in `also_history`) shows that it served with keys is
    refused rather than given new ones: every app's keys would silently change.
    """
    if holds_keys(state_dir):
        return load(state_dir), False
    proof = history(state_dir, also_history)
    if proof:
        raise DstackError("state_dir", f"{state_dir} holds no root keys, but {', '.join(proof)} show that this KMS "
                                       f"had some: refusing to make new ones (every app's keys would change); "
                                       f"{_restore_hint(state_dir)}; a new KMS starts in an empty state directory")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    k256 = os.urandom(32)
    while not is_k256_secret(k256):  # astronomically unlikely
        k256 = os.urandom(32)
    _store(state_dir, RootKeys(ca_key, _self_signed_ca(ca_key), k256), "created")
    return load(state_dir), True
