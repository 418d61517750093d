# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one verifier of RA-TLS certificates: a KMS-issued certificate whose key is bound to an
attested CVM. Used by the gateway (RegisterCvm's client certificate), by the CVM (the gateway's
server certificate: it must be the KMS's gateway_app_id, which dstack does not check, its issue
#607) and by whoever checks an app's certificate.

What makes such a certificate, and what Verifier.verify checks, in order:

1. the chain: leaf <- app CA <- the KMS root CA the caller pins; each signature, validity period
   and CA flag checked here (whatever the TLS layer did); the app CA carries the usage "app:ca"
   (OID .1.4) and the leaf's app-id extension (.1.3) equals its app CA's; the leaf is for the
   usage asked (client or server authentication, GetTlsKey usage_client_auth /
   usage_server_auth); when an app_id is expected, the leaf is that app's;
2. the leaf's attestation extension (.1.8), the attestation document of
   app_certs.parse_attestation_document: its report_data is SHA-512("ratls-cert:" || the leaf's
   SPKI), and its quote and event log pass the caller's attestation.QuoteTrust (dcap-qvl under
   the trust root, TCB policy, debug refused, the event log required and replayed, identity
   only from before boot-mr-done: eventlog.read_boot_log);
3. the boot: the attested app_id is the certificate's, it has a compose hash, the CVM measured
   this KMS as its key provider; optionally a non-empty instance_id.

Every refusal is a Refused naming the check; the answer is the attested boot info (app_id,
instance_id, compose_hash, device_id, ...).
"""

import datetime

from ansible_collections.dstack.tee.plugins.module_utils import app_certs, attestation
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError, parse_hex
from ansible_collections.dstack.tee.plugins.module_utils.fileio import read_bytes

try:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.x509.oid import ExtendedKeyUsageOID
except ImportError:  # reported by callers through HAS_CRYPTOGRAPHY
    HAS_CRYPTOGRAPHY = False
else:
    HAS_CRYPTOGRAPHY = True

CLIENT_AUTH = "client_auth"
SERVER_AUTH = "server_auth"
USAGES = (CLIENT_AUTH, SERVER_AUTH)


class Refused(DstackError):
    """The certificate is not the attested identity asked for: the field names the check."""


def load_certificate(data, field):
    """One X.509 certificate from PEM or DER bytes."""
    try:
        return x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)
    except ValueError:
        raise DstackError(field, "is not a PEM or DER certificate") from None


def load_kms_root(path, field="rpc.kms_root_ca"):
    """The KMS root CA certificate a verifier pins, from a PEM or DER file."""
    data = read_bytes(path, field)
    try:
        return load_certificate(data, field)
    except DstackError:
        raise DstackError(field, f"{path} is not a PEM or DER certificate") from None


def peer_chain(sock):
    """The TLS peer's certificates as DER bytes, the leaf first ([] when it sent none): OpenSSL's
    verified chain when there is one, else what the peer sent. `sock`: an ssl.SSLSocket."""
    import ssl  # pylint: disable=import-outside-toplevel
    leaf = sock.getpeercert(binary_form=True)
    if not leaf:
        return []
    # Python 3.13 has SSLSocket.get_verified_chain(); before, the same call is on the SSL object.
    source = sock if hasattr(sock, "get_verified_chain") else getattr(sock, "_sslobj", None)
    for name in ("get_verified_chain", "get_unverified_chain"):
        getter = getattr(source, name, None)
        chain = [c if isinstance(c, bytes) else c.public_bytes(ssl._ssl.ENCODING_DER)  # pylint: disable=protected-access
                 for c in (getter() or []) if c is not None] if getter else []
        if chain and chain[0] == leaf:
            return chain
    return [leaf]


def _extension(cert, oid):
    try:
        return cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid)).value.value
    except x509.ExtensionNotFound:
        return None


def _is_ca(cert):
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _issued_by(cert, issuer):
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


class Verifier:
    """RA-TLS certificates issued under one KMS root, verified as the module docstring says.

    kms_root    the KMS root CA certificate (load_kms_root) the chain must end at
    trust       an attestation.QuoteTrust (the trust root, collateral and TCB policy of quotes)
    usage       CLIENT_AUTH (a CVM presenting itself, e.g. to RegisterCvm) or SERVER_AUTH (a
                server, e.g. the gateway's control API, checked by its client)
    app_id      when given (hex), only that app's certificates pass (the CVM's check that the
                gateway is the KMS's gateway_app_id)
    require_instance_id
                refuse a CVM with an empty instance_id (an app with no_instance_id)
    """

    def __init__(self, kms_root, trust, usage=CLIENT_AUTH, app_id=None, require_instance_id=False):
        if usage not in USAGES:
            raise DstackError("usage", f"must be one of {', '.join(USAGES)}")
        self.kms_root = kms_root
        self.kms_key_provider_id = app_certs.key_provider_id(kms_root)
        self.trust = trust
        self.usage = usage
        self.app_id = parse_hex(app_id, "app_id", length=20).hex() if app_id is not None else None
        self.require_instance_id = require_instance_id
        self.field = "client_certificate" if usage == CLIENT_AUTH else "server_certificate"

    def verify(self, chain_der, now=None):
        """chain_der: the peer's certificates as DER bytes, the leaf first (the TLS layer's chain;
        a root among them is ignored: the pinned one is used). Returns the boot info of the
        attested CVM; Refused otherwise."""
        field = self.field
        if not chain_der:
            raise Refused(field, "none presented: an RA-TLS certificate the KMS issued to a CVM is needed "
                                 + ("(mutual TLS)" if self.usage == CLIENT_AUTH else "(the server's TLS certificate)"))
        try:
            certs = [x509.load_der_x509_certificate(bytes(der)) for der in chain_der]
        except (ValueError, TypeError):
            raise Refused(field, "is not a DER X.509 certificate") from None
        now = datetime.datetime.now(datetime.timezone.utc) if now is None else now
        leaf = certs[0]
        app_ca = next((c for c in certs[1:] if c.subject == leaf.issuer and c != self.kms_root), None)
        if app_ca is None or not _issued_by(leaf, app_ca) or not _is_ca(app_ca) or \
                _extension(app_ca, app_certs.OID_CERT_USAGE) != b"app:ca" or not _issued_by(app_ca, self.kms_root):
            raise Refused(field, "does not chain to the pinned KMS root CA (leaf <- app CA <- KMS root)")
        for cert, what in ((leaf, "certificate"), (app_ca, "app CA certificate"), (self.kms_root, "KMS root CA certificate")):
            if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
                raise Refused(field, f"the {what} is outside its validity period")
        if _is_ca(leaf):
            raise Refused(field, "is a CA certificate, not a leaf")
        self._check_usage(leaf)
        cert_app_id = _extension(leaf, app_certs.OID_APP_ID)
        if not cert_app_id or len(cert_app_id) != 20 or _extension(app_ca, app_certs.OID_APP_ID) != cert_app_id:
            raise Refused(field, "its app-id extension is missing or differs from its app CA's")
        if self.app_id is not None and cert_app_id.hex() != self.app_id:
            raise Refused("app_id", f"the certificate is app {cert_app_id.hex()}'s, not the expected app {self.app_id}")
        boot = self._attested_boot(leaf)
        if boot.get("app_id") != cert_app_id.hex():
            raise Refused("attestation", "the attested app_id is not the certificate's app id")
        if len(boot.get("compose_hash", "")) != 64:
            raise Refused("attestation", "the event log has no compose-hash event before boot-mr-done")
        if not attestation.measured_kms(boot, self.kms_key_provider_id):
            raise Refused("attestation", "the CVM did not measure this KMS as its key provider")
        if self.require_instance_id and not boot.get("instance_id"):
            raise Refused("instance_id", "is empty: an app with no_instance_id cannot use the gateway")
        return boot

    def _check_usage(self, leaf):
        try:
            usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            usages = []
        if self.usage == CLIENT_AUTH and ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
            raise Refused(self.field, "is not for client authentication (GetTlsKey usage_client_auth)")
        if self.usage == SERVER_AUTH and ExtendedKeyUsageOID.SERVER_AUTH not in usages:
            raise Refused(self.field, "is not for server authentication (GetTlsKey usage_server_auth)")

    def _attested_boot(self, leaf):
        return attested_boot(leaf, self.trust)


def attested_boot(leaf, trust):
    """The boot info a certificate's attestation extension (.1.8) proves, checked as Verifier's
    step 2: report_data is SHA-512("ratls-cert:" || the leaf's SPKI), the quote and event log pass
    `trust` (an attestation.QuoteTrust), the document's attestation_mode is the quote's, production
    refuses simulated quotes. The chain and the app-id extension are the caller's to check
    (Verifier, or verify_app's TLS check under its own CA). Refused otherwise, naming the check."""
    raw = _extension(leaf, app_certs.OID_ATTESTATION)
    if raw is None:
        raise Refused("attestation", "the certificate has no attestation extension (GetTlsKey usage_ra_tls)")
    try:
        doc = app_certs.parse_attestation_document(raw)
    except DstackError as exc:
        raise Refused(exc.field, exc.reason) from None
    expected = app_certs.ratls_report_data(leaf.public_key())
    if doc["report_data"] != expected:
        raise Refused("attestation.report_data", "is not SHA-512(\"ratls-cert:\" || this certificate's key): "
                                                 "the attestation is of another key")
    result = trust.verify(doc["quote"], doc["event_log"], expected)
    if not result.ok:
        failed = result.failures[0]
        raise Refused("attestation", f"{failed.name}: {failed.detail}")
    if doc["attestation_mode"] != result.attestation_mode:
        raise Refused("attestation.attestation_mode", f"says {doc['attestation_mode'][:20]!r}; the quote is "
                                                      f"{result.attestation_mode}")
    if trust.mode == "production" and result.attestation_mode != attestation.MODE_TDX:
        raise Refused("attestation", "production refuses quotes that chain to a simulated root")
    return dict(result.boot_info)
