# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""HTTPS to an app through the gateway, as an outsider (a browser, curl) reaches it.

dstack's app URLs: `https://<id>[-<port>[s|g]].<base_domain>[:port]`, `<id>` an app_id or an
instance_id (20 bytes, hex); parse_app_url reads one and names the Worker's URL of the same id
(`<id>-8090.<base_domain>`, the guest agent's public Worker API).

fetch() is the one HTTPS request: the TLS context from a CA file (the system's trust store when
none), the certificate checked for the URL's host name, SNI and Host the URL's name, names under
`.localhost` connected at 127.0.0.1 (RFC 6761: curl and browsers do so, and no resolver is needed
for the demo's dstack.localhost), a bound on the answer's size, a timeout on each socket
operation, and retries while the URL does not answer yet (refused connection, a handshake the
gateway refuses for an id not registered yet, 502/503/504) for at most wait_timeout seconds. A
certificate that does not validate is never retried: TlsRefused at once. The answer carries the
certificates the server presented.
"""

import http.client
import re
import socket
import ssl
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ansible_collections.dstack.tee.plugins.module_utils import json_limits
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.ra_tls import peer_chain

WORKER_PORT = 8090
MAX_RESPONSE_BYTES = 4 * 1024 * 1024   # a quote and its event log are tens of KiB
RETRY_STATUSES = (502, 503, 504)
_ID_RE = re.compile(r"\A[0-9a-f]{40}\Z")
_SUFFIX_RE = re.compile(r"\A([0-9]{1,5})([sg]?)\Z")


class TlsRefused(DstackError):
    """The server's certificate does not validate for the host name under the trusted CA."""


class Unreachable(DstackError):
    """No HTTP answer came (within wait_timeout)."""


@dataclass(frozen=True)
class AppUrl:
    """A dstack app URL, read: https://<id>[-<suffix>].<base_domain>[:port]/"""
    url: str
    id: str            # 40 hex, lower case: an app_id or an instance_id
    suffix: str        # "" or what followed the dash: "8080", "443s", "50051g"
    base_domain: str
    port: int          # the gateway's port (443 when the URL has none)

    @property
    def host(self):
        return f"{self.id}-{self.suffix}.{self.base_domain}" if self.suffix else f"{self.id}.{self.base_domain}"

    def for_label(self, suffix):
        """The URL of the same id and gateway with another suffix ("8090": the Worker)."""
        host = f"{self.id}-{suffix}.{self.base_domain}" if suffix else f"{self.id}.{self.base_domain}"
        return f"https://{host}" + ("" if self.port == 443 else f":{self.port}")

    @property
    def worker_url(self):
        return self.for_label(str(WORKER_PORT))


def parse_app_url(url, field="app_url"):
    """An AppUrl, or DstackError naming the field and what is wrong."""
    if not isinstance(url, str) or not url:
        raise DstackError(field, "is required: https://<app-id>.<base_domain>[:port]")
    try:
        parts = urlsplit(url.strip())
        port = parts.port or 443
    except ValueError:
        raise DstackError(field, "is not a URL (https://<app-id>.<base_domain>[:port])") from None
    if parts.scheme != "https":
        raise DstackError(field, "must be an https:// URL: the gateway serves apps over TLS")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise DstackError(field, "must be the app's root, https://<id>.<base_domain>[:port]/, with no path, "
                                 "query or user")
    host = (parts.hostname or "").rstrip(".")
    label, dot, base = host.partition(".")
    if not dot or not base:
        raise DstackError(field, f"{host[:80]!r} is not <id>.<base_domain>")
    ident, dash, suffix = label.partition("-")
    if not _ID_RE.match(ident):
        raise DstackError(field, f"the first label's id {ident[:64]!r} is not an app_id or instance_id "
                                 "(40 hex digits)")
    if dash:
        match = _SUFFIX_RE.match(suffix)
        if not match or not 0 < int(match.group(1)) < 65536:
            raise DstackError(field, f"{label[:80]!r} is not <id>-<port>[s|g]")
    return AppUrl(url=url.strip(), id=ident, suffix=suffix, base_domain=base, port=port)


def connect_address(host):
    """Where to connect for a host name: 127.0.0.1 for localhost and names under it (RFC 6761
    section 6.3), the name itself otherwise (the system resolver)."""
    host = host.rstrip(".").lower()
    return "127.0.0.1" if host == "localhost" or host.endswith(".localhost") else host


def ssl_context(ca_cert=None, field="ca_cert"):
    """A client TLS context that checks the certificate and the host name under ca_cert (a PEM
    file, several certificates allowed), or under the system's trust store when ca_cert is None."""
    try:
        context = ssl.create_default_context(cafile=ca_cert)
    except (OSError, ValueError, ssl.SSLError) as exc:
        raise DstackError(field, f"cannot load the CA certificate {ca_cert}: "
                                 f"{getattr(exc, 'strerror', None) or exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


@dataclass
class Response:
    url: str
    status: int
    reason: str
    body: bytes = b""
    headers: dict = field(default_factory=dict)   # lower-case names
    peer_chain: list = field(default_factory=list)  # DER, the leaf first

    def json(self, field_name):
        """The body as JSON (nesting bounded), or DstackError naming field_name."""
        if self.status != 200:
            reason = ""
            try:
                reason = json_limits.loads(self.body, field_name).get("error", "")
            except (DstackError, AttributeError, ValueError):
                pass
            raise DstackError(field_name, f"{self.url} answered HTTP {self.status} {self.reason}"
                                          + (f": {str(reason)[:200]}" if reason else ""))
        try:
            return json_limits.loads(self.body, field_name)
        except ValueError:
            raise DstackError(field_name, f"{self.url} did not answer JSON") from None


def _connection(url, context, timeout, connect_to=None):
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or 443
    conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    address = connect_to or connect_address(host)
    if address != host:
        # http.client connects through this hook; the TLS layer still gets `host` for SNI and
        # the certificate check, and the Host header stays the URL's.
        conn._create_connection = lambda _addr, *args: socket.create_connection((address, port), *args)  # pylint: disable=protected-access
    return conn


def _once(url, method, body, headers, context, timeout, max_bytes, connect_to):
    conn = _connection(url, context, timeout, connect_to)
    try:
        conn.connect()
        chain = peer_chain(conn.sock)  # now: http.client may drop its socket once the answer is read
        parts = urlsplit(url)
        conn.request(method, (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), body=body,
                     headers=headers or {})
        response = conn.getresponse()
        length = response.getheader("Content-Length")
        if max_bytes is None:
            data = b""
        elif length and length.isdigit() and int(length) > max_bytes:
            raise DstackError("response", f"{url} answered {length} bytes, more than the {max_bytes} allowed")
        else:
            data = response.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise DstackError("response", f"{url} answered more than the {max_bytes} bytes allowed")
        return Response(url, response.status, response.reason, data,
                        {k.lower(): v for k, v in response.getheaders()}, chain)
    finally:
        conn.close()


def _detail(exc):
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def fetch(url, method="GET", body=None, headers=None, ca_cert=None, context=None, timeout=30.0, wait_timeout=0.0,
          max_bytes=MAX_RESPONSE_BYTES, field="app_url", ca_field="ca_cert", connect_to=None):
    """One HTTPS request as the module docstring says. body: bytes or None. max_bytes=None reads no
    body (only the status). connect_to: the address to connect to instead of the URL's host (as
    curl's --connect-to; SNI, the certificate check and Host stay the URL's). Raises TlsRefused
    (never retried), Unreachable, or DstackError("response")."""
    context = context or ssl_context(ca_cert, ca_field)
    host = urlsplit(url).hostname
    deadline = time.monotonic() + max(0.0, float(wait_timeout or 0))
    delay = 0.25
    while True:
        try:
            answer = _once(url, method, body, headers, context, timeout, max_bytes, connect_to)
        except ssl.SSLCertVerificationError as exc:
            trusted = ca_cert or "the system's trust store"
            raise TlsRefused("tls", f"the certificate {host} served does not validate under {trusted}: "
                                    f"{exc.verify_message or exc.reason}") from None
        except (OSError, http.client.HTTPException) as exc:
            if time.monotonic() + delay > deadline:
                waited = f" (retried for {wait_timeout:g} s)" if wait_timeout else ""
                raise Unreachable(field, f"cannot reach {url}{waited}: {_detail(exc)}") from None
        else:
            if answer.status not in RETRY_STATUSES or time.monotonic() + delay > deadline:
                return answer
        time.sleep(delay)
        delay = min(delay * 2, 2.0)
