# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""App certificates: the per-app CA (derived from the KMS root, dstack-reference 8) and the leaf
certificates it issues for GetTlsKey, from a CSR.

dstack's custom extensions (OID arc 1.3.6.1.4.1.62397.1) are written where a verifier reads
them: app id (.3), certificate usage (.4: "app:ca" on the app CA), attestation (.8).
"""

import datetime
import hashlib
import ipaddress
import json

from ansible_collections.dstack.tee.plugins.module_utils import json_limits, kdf
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError, parse_hex

try:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
except ImportError:
    HAS_CRYPTOGRAPHY = False
else:
    HAS_CRYPTOGRAPHY = True

OID_APP_ID = "1.3.6.1.4.1.62397.1.3"
OID_CERT_USAGE = "1.3.6.1.4.1.62397.1.4"
OID_ATTESTATION = "1.3.6.1.4.1.62397.1.8"
RATLS_PREFIX = b"ratls-cert:"
APP_CA_DAYS = 3650
LEAF_DEFAULT_DAYS = 365


def subject_alt_names(names):
    """A SubjectAlternativeName of `names`: an IP address as one, anything else as a DNS name
    (empty names left out, each name once)."""
    entries = []
    for name in dict.fromkeys(n for n in names if n):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _ext(oid, value):
    return x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value)


def spki_der(public_key):
    """SubjectPublicKeyInfo DER of a public key."""
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_provider_id(ca_cert):
    """A KMS's key-provider id (the key-provider event's "id", GetAppKey's key_provider.id): its root
    CA's SubjectPublicKeyInfo DER, hex. ca_cert: a certificate, or its PEM (str or bytes)."""
    if isinstance(ca_cert, (str, bytes)):
        try:
            ca_cert = x509.load_pem_x509_certificate(ca_cert.encode() if isinstance(ca_cert, str) else ca_cert)
        except ValueError:
            raise DstackError("ca_cert", "is not a PEM certificate") from None
    return spki_der(ca_cert.public_key()).hex()


ATTESTATION_VERSION = "dstack.tee/attestation-json/v1"
ATTESTATION_FIELDS = ("attestation_mode", "event_log", "quote", "report_data", "version", "vm_config")


def attestation_document(attestation_mode, quote, event_log, report_data, vm_config):
    """The RA-TLS attestation document (the JSON an RA-TLS leaf embeds in OID .1.8): canonical bytes."""
    doc = {"version": ATTESTATION_VERSION, "attestation_mode": attestation_mode, "quote": bytes(quote).hex(),
           "event_log": event_log, "report_data": bytes(report_data).hex(), "vm_config": vm_config}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def parse_attestation_document(document, field="attestation"):
    """The fields of an attestation document, checked for shape: a JSON object with exactly
    ATTESTATION_FIELDS, each once, version ATTESTATION_VERSION, the quote and report_data hex, the
    event log and vm_config strings. What they say is the verifier's to check."""
    if not isinstance(document, (str, bytes)):
        raise DstackError(field, "must be the attestation document's JSON text")
    json_limits.check_depth(document if isinstance(document, str) else document.decode("utf-8", "replace"), field)

    def no_duplicates(pairs):
        keys = [k for k, _v in pairs]
        if len(keys) != len(set(keys)):
            raise DstackError(field, "has a field twice")
        return dict(pairs)
    try:
        doc = json.loads(document, object_pairs_hook=no_duplicates)
    except DstackError:
        raise
    except ValueError:
        raise DstackError(field, "is not an attestation document {version, quote, event_log, ...}") from None
    if not isinstance(doc, dict) or sorted(doc) != sorted(ATTESTATION_FIELDS):
        raise DstackError(field, f"must have exactly the fields {', '.join(ATTESTATION_FIELDS)}")
    if doc["version"] != ATTESTATION_VERSION:
        raise DstackError(f"{field}.version", f"must be {ATTESTATION_VERSION}")
    for name in ("attestation_mode", "event_log", "vm_config"):
        if not isinstance(doc[name], str):
            raise DstackError(f"{field}.{name}", "must be a string")
    doc["quote"] = parse_hex(doc["quote"], f"{field}.quote")
    doc["report_data"] = parse_hex(doc["report_data"], f"{field}.report_data", length=64)
    return doc


def ratls_report_data(public_key):
    """The report_data of an RA-TLS certificate's quote: SHA-512("ratls-cert:" || SPKI DER)."""
    return hashlib.sha512(RATLS_PREFIX + spki_der(public_key)).digest()


def pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def app_ca(root_ca_key, root_ca_cert, app_id):
    """(key, certificate) of an app's CA: derive_p256(rootCA, [app_id, "app-ca"]), signed by the root CA."""
    app = parse_hex(app_id, "app_id", length=20)
    key = kdf.app_ca_key(root_ca_key, app)
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Dstack App CA {app.hex()[:16]}")]))
            .issuer_name(root_ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(min(now + datetime.timedelta(days=APP_CA_DAYS), root_ca_cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(_ext(OID_APP_ID, app), critical=False)
            .add_extension(_ext(OID_CERT_USAGE, b"app:ca"), critical=False)
            .sign(root_ca_key, hashes.SHA256()))
    return key, cert


def load_csr(csr_pem):
    """A CSR from PEM (text or bytes), its self-signature checked."""
    if not isinstance(csr_pem, (str, bytes)):
        raise DstackError("csr", f"must be a PEM text, not {type(csr_pem).__name__}")
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode() if isinstance(csr_pem, str) else csr_pem)
    except ValueError:
        raise DstackError("csr", "is not a PEM certificate signing request") from None
    if not csr.is_signature_valid:
        raise DstackError("csr", "its signature does not verify")
    return csr


MAX_ALT_NAMES = 64
MAX_CERT_TIME = 253402300799  # 9999-12-31T23:59:59Z, the last time X.509 can state


def param_flag(params, name, default=False):
    """A request's boolean (true/false, or the strings a query string carries)."""
    value = params.get(name)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off", ""):
        return value.lower() in ("true", "1", "yes", "on")
    raise DstackError(name, "must be true or false")


def param_seconds(params, name):
    """A request's time in seconds since the UNIX epoch (None when absent)."""
    value = params.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_CERT_TIME:
        raise DstackError(name, "must be a number of seconds since the UNIX epoch, before the year 10000")
    return value


def param_names(params, name):
    """A request's list of DNS names."""
    value = params.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        raise DstackError(name, "must be a list of strings")
    if len(value) > MAX_ALT_NAMES:
        raise DstackError(name, f"has {len(value)} names; at most {MAX_ALT_NAMES} are allowed")
    for item in value:
        if len(item) > 253 or not item.isascii():
            raise DstackError(name, "holds DNS names of at most 253 ASCII characters (IDNA A-labels: xn--...)")
    return [n for n in value if n]


def leaf_options(params, server_auth_default=True, ca_not_after=None):
    """issue_leaf's options from a GetTlsKey or SignCert request, every field checked first: the
    validity window issue_leaf will give (ca_not_after, a datetime, caps its end) must not be empty."""
    not_before, not_after = param_seconds(params, "not_before"), param_seconds(params, "not_after")
    start, end = leaf_validity(not_before, not_after, ca_not_after)
    if end <= start:
        raise DstackError("not_after", "must be after not_before (and before the app CA expires)"
                          if ca_not_after is not None and end == ca_not_after else "must be after not_before")
    return {"alt_names": param_names(params, "alt_names"),
            "usage_server_auth": param_flag(params, "usage_server_auth", server_auth_default),
            "usage_client_auth": param_flag(params, "usage_client_auth"),
            "not_before": not_before, "not_after": not_after}


def leaf_validity(not_before=None, not_after=None, ca_not_after=None):
    """(start, end) datetimes of a leaf: the given times (Unix seconds; 0 is a time too), else from
    5 minutes ago for LEAF_DEFAULT_DAYS; the end never after the issuing CA's (ca_not_after)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    start = datetime.datetime.fromtimestamp(not_before, datetime.timezone.utc) if not_before is not None else \
        now - datetime.timedelta(minutes=5)
    end = datetime.datetime.fromtimestamp(not_after, datetime.timezone.utc) if not_after is not None else \
        now + datetime.timedelta(days=LEAF_DEFAULT_DAYS)
    if ca_not_after is not None:
        end = min(end, ca_not_after)
    return start, end


def issue_leaf(ca_key, ca_cert, csr, app_id, alt_names=(), usage_server_auth=True, usage_client_auth=False,
               not_before=None, not_after=None, attestation=None):
    """A leaf certificate for the CSR's key, issued by the app CA; the subject is the CSR's."""
    start, end = leaf_validity(not_before, not_after, ca_cert.not_valid_after_utc)
    if end <= start:
        raise DstackError("not_after", "must be after not_before (and before the app CA expires)")
    builder = (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(ca_cert.subject)
               .public_key(csr.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(_ext(OID_APP_ID, parse_hex(app_id, "app_id", length=20)), critical=False))
    names = [x509.DNSName(n) for n in alt_names if n]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if usage_server_auth else []) + \
        ([ExtendedKeyUsageOID.CLIENT_AUTH] if usage_client_auth else [])
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if attestation:
        builder = builder.add_extension(_ext(OID_ATTESTATION, attestation), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


class LocalCertSigner:
    """Signs CSRs with an app CA derived from root keys held locally (the simulator's GetTlsKey)."""

    def __init__(self, root_ca_key, root_ca_cert, app_id):
        self.root_ca_cert = root_ca_cert
        self.app_id = app_id
        self.ca_key, self.ca_cert = app_ca(root_ca_key, root_ca_cert, app_id)

    def sign(self, csr_pem, **options):
        leaf = issue_leaf(self.ca_key, self.ca_cert, load_csr(csr_pem), self.app_id, **options)
        return [pem(leaf), pem(self.ca_cert), pem(self.root_ca_cert)]
