# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The CVM side of gateway registration (dstack's guest, dstack-reference 3.2).

GatewayClient(cache_path, get_tls_key, kms_root, trust, gateway_app_id).register(gateway_url):

1. credentials: a WireGuard key pair and the RA-TLS client certificate, kept together in a cache
   file (dstack's /run/dstack/gateway-cache.json; JSON, 0600, written atomically before the
   registration) and reused until RENEW_BEFORE_SECONDS before the certificate expires, so that a
   gateway outage does not make the CVM hammer the KMS. The certificate comes from `get_tls_key`,
   the guest agent's GetTlsKey (called with TLS_KEY_REQUEST: usage_ra_tls + usage_client_auth;
   its KmsCertSigner has the KMS sign it). A renewal keeps the WireGuard key (the interface keeps
   its key; the gateway keeps the instance's address either way). A damaged cache is replaced.
2. Gateway.RegisterCvm {client_public_key, port_policy?} over mutual TLS with that certificate.
   The gateway's server certificate is checked BEFORE the request is sent: OpenSSL against the
   KMS root, then ra_tls.Verifier for server authentication and the KMS's gateway_app_id, its
   quote verified (dstack only compares the app id, and skips even that for "any": its issue
   #607; here "any" is refused). The gateway's identity is the attested app, not a host name, so
   the host name is not checked.
3. the answer, and /etc/wireguard/dstack-wg0.conf's text from it (wireguard.render_wg_quick; it
   holds the private key: write it 0600).

Errors: ra_tls.Refused when the gateway is not the gateway app (field server_certificate,
app_id or attestation); prpc.Refused when the gateway says no (403, its reason); DstackError
naming gateway_url when it cannot be reached, or the answer's field when the answer is wrong.
No key appears in an error, a log line or a repr.
"""

import datetime
import http.client
import json
import logging
import os
import ssl
import tempfile
import threading
import urllib.parse
from dataclasses import dataclass, field

from ansible_collections.dstack.tee.plugins.module_utils import app_certs, json_limits, ra_tls, wireguard
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError, parse_hex
from ansible_collections.dstack.tee.plugins.module_utils.fileio import atomic_write
from ansible_collections.dstack.tee.plugins.module_utils.prpc import Refused as GatewayRefused

try:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
except ImportError:  # reported by callers through HAS_CRYPTOGRAPHY
    HAS_CRYPTOGRAPHY = False
else:
    HAS_CRYPTOGRAPHY = True

CACHE_VERSION = 1
RENEW_BEFORE_SECONDS = 10 * 86400   # a cached certificate is renewed 10 days before it expires
TIMEOUT_SECONDS = 10.0
MAX_ANSWER_BYTES = 256 * 1024
REGISTER_PATH = "/prpc/Gateway.RegisterCvm"
TLS_KEY_REQUEST = {"subject": "dstack-gateway-client", "usage_ra_tls": True, "usage_client_auth": True,
                   "usage_server_auth": False}

log = logging.getLogger("dstack.gateway_client")


@dataclass
class Credentials:
    """What the cache holds: the WireGuard private key, the TLS key and its certificate chain (PEM:
    leaf, app CA, KMS root). Keys are left out of the repr."""
    wg_private_key: str = field(repr=False)
    tls_key: str = field(repr=False)
    certificate_chain: list

    @property
    def wg_public_key(self):
        return wireguard.public_key(self.wg_private_key)

    @property
    def leaf(self):
        return x509.load_pem_x509_certificate(self.certificate_chain[0].encode())

    @property
    def not_after(self):
        return self.leaf.not_valid_after_utc

    def to_json(self):
        return json.dumps({"version": CACHE_VERSION, "wg_private_key": self.wg_private_key, "tls_key": self.tls_key,
                           "certificate_chain": self.certificate_chain}, sort_keys=True).encode()


@dataclass
class Registration:
    """RegisterCvm's answer, the wg-quick configuration made from it (it holds the WireGuard
    private key: left out of the repr) and the gateway's attested boot info."""
    answer: dict
    wg_quick: str = field(repr=False)
    gateway: dict

    @property
    def client_ip(self):
        return self.answer["wg"]["client_ip"]


def _checked_credentials(wg_private_key, tls_key, chain, where):
    """Credentials from their parts, each checked (the key pair matches, the chain parses)."""
    wireguard.parse_key(wg_private_key, f"{where}.wg_private_key")
    if not isinstance(tls_key, str) or not isinstance(chain, list) or len(chain) < 2 or \
            not all(isinstance(c, str) for c in chain):
        raise DstackError(where, "must hold the TLS key and its certificate chain (PEM: leaf, app CA, ...)")
    try:
        key = serialization.load_pem_private_key(tls_key.encode(), None)
        certs = [x509.load_pem_x509_certificate(c.encode()) for c in chain]
    except (ValueError, TypeError):
        raise DstackError(where, "holds a TLS key or certificate that is not PEM") from None
    if app_certs.spki_der(key.public_key()) != app_certs.spki_der(certs[0].public_key()):
        raise DstackError(where, "its certificate is not for its TLS key")
    return Credentials(wg_private_key, tls_key, list(chain))


def _gateway_url(url):
    """(host, port, path prefix) of an https:// gateway URL."""
    if not isinstance(url, str):
        raise DstackError("gateway_url", "must be an https:// URL")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or 443
    except ValueError:
        raise DstackError("gateway_url", "is not a URL with a valid port") from None
    if parts.scheme != "https" or not parts.hostname:
        raise DstackError("gateway_url", "must be an https:// URL (RegisterCvm is mutual TLS)")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise DstackError("gateway_url", "must be https://host[:port][/path], without query, fragment or user")
    return parts.hostname, port, parts.path.rstrip("/")


class GatewayClient:
    """A CVM's registration with its gateway, as the module docstring says.

    cache_path      the cache file (dstack: /run/dstack/gateway-cache.json); its folder is made 0700
    get_tls_key     callable(params) -> {"key": PEM, "certificate_chain": [PEM, ...]}: the guest
                    agent's GetTlsKey (called with TLS_KEY_REQUEST)
    kms_root        the KMS root CA (a certificate, or its PEM: .appkeys.json's ca_cert)
    trust           the attestation.QuoteTrust quotes are verified under
    gateway_app_id  the gateway's app id, hex (.appkeys.json's gateway_app_id, from the KMS)
    """

    def __init__(self, cache_path, get_tls_key, kms_root, trust, gateway_app_id, timeout=TIMEOUT_SECONDS,
                 renew_before=RENEW_BEFORE_SECONDS):
        if gateway_app_id in (None, "", "any"):
            raise DstackError("gateway_app_id", "is required: the app id of the gateway this CVM registers with "
                                                "(the KMS gives it with the app keys); \"any\" is not accepted, the "
                                                "gateway's attested identity is always checked")
        app_id = parse_hex(gateway_app_id, "gateway_app_id", length=20).hex()
        if isinstance(kms_root, (str, bytes)):
            kms_root = ra_tls.load_certificate(kms_root.encode() if isinstance(kms_root, str) else kms_root, "kms_root")
        self.cache_path = cache_path
        self.get_tls_key = get_tls_key
        self.kms_root = kms_root
        self.verifier = ra_tls.Verifier(kms_root, trust, usage=ra_tls.SERVER_AUTH, app_id=app_id)
        self.timeout = timeout
        self.renew_before = datetime.timedelta(seconds=renew_before)
        self._lock = threading.Lock()

    # ---- the cache -------------------------------------------------------------------------------

    def _load_cache(self):
        """The cached credentials, or None (no cache; a damaged one is logged and replaced)."""
        try:
            with open(self.cache_path, "rb") as handle:
                data = handle.read(MAX_ANSWER_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("gateway cache %s unreadable (%s): making new credentials", self.cache_path, exc.strerror)
            return None
        try:
            cached = json_limits.loads(data, "gateway_cache")
            if not isinstance(cached, dict) or cached.get("version") != CACHE_VERSION:
                raise DstackError("gateway_cache", f"is not a version {CACHE_VERSION} cache")
            return _checked_credentials(cached.get("wg_private_key"), cached.get("tls_key"),
                                        cached.get("certificate_chain"), "gateway_cache")
        except DstackError as exc:
            log.warning("gateway cache %s is damaged (%s): making new credentials", self.cache_path, exc)
            return None

    def _new_certificate(self, wg_private_key):
        answer = self.get_tls_key(dict(TLS_KEY_REQUEST))
        if not isinstance(answer, dict):
            raise DstackError("get_tls_key", "must answer {key, certificate_chain}")
        return _checked_credentials(wg_private_key, answer.get("key"), answer.get("certificate_chain"), "get_tls_key")

    def credentials(self, now=None):
        """The cached credentials while the certificate has more than renew_before left; else a new
        certificate (the WireGuard key kept), saved before it is used. When getting one fails, a
        cached certificate that is still valid is used (a KMS outage must not stop registration)."""
        now = datetime.datetime.now(datetime.timezone.utc) if now is None else now
        with self._lock:
            cached = self._load_cache()
            if cached is not None and now < cached.not_after - self.renew_before and cached.leaf.not_valid_before_utc <= now:
                return cached
            wg_private_key = cached.wg_private_key if cached is not None else wireguard.generate_private_key()
            try:
                fresh = self._new_certificate(wg_private_key)
            except DstackError as exc:
                if cached is None or not cached.leaf.not_valid_before_utc <= now < cached.not_after:
                    raise
                # The KMS is down while the cached certificate is still valid: use it, renew next time.
                log.warning("gateway certificate not renewed (%s): the cached one is valid until %s", exc,
                            cached.not_after.isoformat())
                return cached
            folder = os.path.dirname(os.path.abspath(self.cache_path))
            os.makedirs(folder, mode=0o700, exist_ok=True)
            atomic_write(self.cache_path, fresh.to_json(), mode=0o600)
            log.info("gateway credentials %s: certificate valid until %s", "renewed" if cached else "made",
                     fresh.not_after.isoformat())
            return fresh

    # ---- RegisterCvm -------------------------------------------------------------------------------

    def _context(self, credentials):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.check_hostname = False  # the identity is the attested app (ra_tls), not a name
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=self.kms_root.public_bytes(serialization.Encoding.PEM).decode())
        # ssl loads a key only from a file: a private temporary one next to the cache (same secrecy), removed at once.
        fd, path = tempfile.mkstemp(prefix=".tls-", dir=os.path.dirname(os.path.abspath(self.cache_path)))
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(credentials.tls_key + "".join(credentials.certificate_chain[:2]))
            context.load_cert_chain(path)
        finally:
            os.unlink(path)
        return context

    def register(self, gateway_url, port_policy=None, now=None):
        """RegisterCvm with the gateway at gateway_url (https://host[:port]); a Registration."""
        host, port, prefix = _gateway_url(gateway_url)
        credentials = self.credentials(now)
        body = {"client_public_key": credentials.wg_public_key}
        if port_policy is not None:
            body["port_policy"] = port_policy
        connection = http.client.HTTPSConnection(host, port, context=self._context(credentials), timeout=self.timeout)
        try:
            try:
                connection.connect()
            except ssl.SSLCertVerificationError as exc:
                raise ra_tls.Refused("server_certificate", f"the gateway at {host}:{port} presented a certificate "
                                                           f"that does not chain to the KMS root CA "
                                                           f"({exc.verify_message})") from None
            except (OSError, ssl.SSLError) as exc:
                raise DstackError("gateway_url", f"cannot reach the gateway at {host}:{port}: {exc}") from None
            # Before anything is sent: the server must be the attested gateway app.
            gateway = self.verifier.verify(ra_tls.peer_chain(connection.sock))
            try:
                connection.request("POST", prefix + REGISTER_PATH, json.dumps(body).encode(),
                                   {"Content-Type": "application/json"})
                response = connection.getresponse()
                data = response.read(MAX_ANSWER_BYTES + 1)
            except (OSError, http.client.HTTPException) as exc:
                raise DstackError("gateway_url", f"RegisterCvm to {host}:{port} failed: {exc}") from None
        finally:
            connection.close()
        answer = _answer(response.status, data)
        return Registration(answer, _wg_quick(credentials, answer), gateway)


def _answer(status, data):
    if len(data) > MAX_ANSWER_BYTES:
        raise DstackError("gateway", f"RegisterCvm answered more than {MAX_ANSWER_BYTES} bytes")
    try:
        answer = json_limits.loads(data, "gateway")
    except DstackError:
        answer = None
    reason = str(answer.get("error", "")) if isinstance(answer, dict) else ""
    if status == 403:
        raise GatewayRefused("gateway", f"RegisterCvm refused: {reason[:500]}")
    if status != 200:
        raise DstackError("gateway", f"RegisterCvm failed with HTTP {status}: {reason[:500]}")
    if not isinstance(answer, dict) or not isinstance(answer.get("wg"), dict):
        raise DstackError("gateway", "RegisterCvm's answer is not {wg: {client_ip, servers}, agent, gateways}")
    return answer


def _wg_quick(credentials, answer):
    wg = answer["wg"]
    try:
        return wireguard.render_wg_quick(credentials.wg_private_key, wg.get("client_ip"), wg.get("servers"))
    except DstackError as exc:
        raise DstackError(f"answer.wg.{exc.field}", exc.reason) from None
