# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""dstack's pRPC over HTTP(S) with JSON (dstack-reference 1.3): POST /prpc/<Service>.<Method>.

The one HTTP client the collection's modules and agents use to talk to the KMS and the VMM.
Errors name what failed: the URL that cannot be reached, or the method and the server's reason.

A client object keeps its HTTP/1.1 connection open between calls (a key release's GetNonce and
GetAppKey go over one TLS connection), with the CA certificate loaded once into its SSL context.
Each thread that uses a client gets a connection of its own (thread-local), so a client can be
shared by threads without a lock and without their calls waiting for each other. A kept
connection the server has dropped meanwhile (its keep-alive timeout) is reopened once, for a
request that found the connection closed before any answer came.
"""

import contextlib
import http.client
import json
import socket
import ssl
import threading
from urllib.parse import urlsplit

from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError


class Refused(DstackError):
    """The server answered 403: it understood and said no."""


class Unauthorized(DstackError):
    """The server answered 401: the token is missing or wrong."""


# What a kept-alive connection closed by the server looks like when it is used again.
_DROPPED = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError,
            ssl.SSLEOFError, ssl.SSLZeroReturnError)


class PrpcClient:
    def __init__(self, url, service, field="url", ca_cert=None, token=None, timeout=30.0, validate_certs=True):
        """ca_cert: a CA certificate file to check HTTPS against (the system's trust store when None);
        validate_certs=False checks no certificate at all."""
        self.url = url.rstrip("/")
        self.service = service
        self.field = field
        self.ca_cert = ca_cert
        self.token = token
        self.timeout = timeout
        self.validate_certs = validate_certs
        self._context = None
        self._local = threading.local()

    def _ssl_context(self):
        if self._context is None:
            if not self.validate_certs:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            else:
                try:
                    context = ssl.create_default_context(cafile=self.ca_cert)
                except (OSError, ValueError) as exc:
                    raise DstackError(self.field, f"cannot load the CA certificate {self.ca_cert} to check the "
                                                  f"{self.service} at {self.url}: {exc}") from None
            self._context = context
        return self._context

    def _connection(self):
        """(this thread's connection, whether it served a request before)."""
        held = getattr(self._local, "conn", None)
        if held is not None:
            return held, True
        parts = urlsplit(self.url)
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=self.timeout,
                                               context=self._ssl_context())
        elif parts.scheme == "http":
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=self.timeout)
        else:
            raise DstackError(self.field, f"must be an http:// or https:// URL, not {self.url[:60]!r}")
        self._local.conn = conn
        return conn, False

    def close(self):
        """Close this thread's connection (the next call opens a new one)."""
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def _round_trip(self, path, body, headers):
        """(status, body bytes) of one POST over the kept connection, reopened once if it was dropped."""
        for attempt in (1, 2):
            conn, reused = self._connection()
            try:
                if conn.sock is None:
                    conn.connect()
                with _one_segment(conn.sock):   # http.client sends the head and the body in two writes
                    conn.request("POST", path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()  # read whole: the connection is then free for the next call
            except _DROPPED:
                self.close()
                if reused and attempt == 1:
                    continue  # the server closed the idle connection: one new one
                raise
            except BaseException:
                self.close()  # a connection in an unknown state is not used again
                raise
            if response.will_close:
                self.close()
            return response.status, response.reason, data
        raise AssertionError("unreachable")

    def call(self, method, params=None):
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        path = f"{urlsplit(self.url).path}/prpc/{self.service}.{method}"
        try:
            status, reason, data = self._round_trip(path, json.dumps(params or {}).encode("utf-8"), headers)
        except DstackError:
            raise
        except (OSError, http.client.HTTPException, ValueError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, ssl.SSLError) \
                else (str(exc) or type(exc).__name__)
            raise DstackError(self.field, f"cannot reach the {self.service} at {self.url}: {detail}") from None
        if status >= 400:
            try:
                reason = json.loads(data).get("error", "") or reason
            except (ValueError, AttributeError):
                pass
            if status == 401:
                raise Unauthorized(self.field, f"{method}: {reason or 'unauthorized'} (check the token)")
            if status == 403:
                raise Refused(self.service.lower(), f"{method} refused: {reason}")
            raise DstackError(self.service.lower(), f"{method} failed with HTTP {status}: {reason}")
        try:
            return json.loads(data)
        except ValueError:
            raise DstackError(self.service.lower(), f"{method} did not answer JSON") from None


@contextlib.contextmanager
def _one_segment(sock):
    """The writes made meanwhile leave as one TCP segment where they fit (Linux TCP_CORK): a request's
    head and body reach the server together, read and parsed once, not in two wake-ups."""
    cork = getattr(socket, "TCP_CORK", None)
    if cork is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        yield
        return
    sock.setsockopt(socket.IPPROTO_TCP, cork, 1)
    try:
        yield
    finally:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, cork, 0)   # uncorking sends what is held
        except OSError:
            pass   # the socket was closed meanwhile (the error that closed it is the one raised)
