# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Serving a Flask app with gunicorn, the one way every agent does it (KMS, VMM, guest agent,
gateway), and what their JSON APIs share: the request parser, the pRPC routes, the JSON errors."""

import contextvars
import re

from ansible_collections.dstack.tee.plugins.module_utils import json_limits
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError


# How long a client may leave a read or a write of its connection waiting (the TLS handshake,
# a header line, a piece of the body, or a response it does not read) before it is closed.
CLIENT_IO_TIMEOUT = 10


def deadline_worker_class():
    """gunicorn's threaded worker, with a deadline on each read and write of a client connection.

    gunicorn reads a request (TLS handshake, headers, body) with blocking reads that have no
    deadline: a client that sent half a request and went quiet held a worker thread for good, and
    8 of them stopped the KMS. Here a client socket's "blocking" mode is a timeout of
    CLIENT_IO_TIMEOUT seconds (for TLS too: the SSL socket class of the context does the same), so
    a silent client's read or write fails and gunicorn closes the connection.
    """
    import socket  # pylint: disable=import-outside-toplevel
    import ssl  # pylint: disable=import-outside-toplevel
    from gunicorn.workers.gthread import ThreadWorker  # pylint: disable=import-outside-toplevel

    class DeadlineSocket(socket.socket):
        __slots__ = ()

        def setblocking(self, flag):
            self.settimeout(CLIENT_IO_TIMEOUT if flag else 0.0)

    class DeadlineSSLSocket(ssl.SSLSocket):
        def setblocking(self, flag):
            self.settimeout(CLIENT_IO_TIMEOUT if flag else 0.0)

    class DeadlineThreadWorker(ThreadWorker):
        def enqueue_req(self, conn):
            if type(conn.sock) is socket.socket:  # pylint: disable=unidiomatic-typecheck  # a new connection
                sock = conn.sock
                conn.sock = DeadlineSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
                conn.sock.setblocking(False)
            super().enqueue_req(conn)

    return DeadlineThreadWorker, DeadlineSSLSocket


def deadline_asgi_worker_class():
    """gunicorn's asyncio (ASGI) worker, with the deadlines of deadline_worker_class and a cap.

    Its protocol reads a request with no deadline (a client that sent half a request and went
    quiet kept its connection for good) and counts connections without capping them. Here a
    request must arrive whole within CLIENT_IO_TIMEOUT seconds of its first byte (the first
    request: of the connection; a pipelined one: of its headers), and a connection past the
    worker's worker_connections is closed at once. So is, after CLIENT_IO_TIMEOUT seconds, a client
    that leaves its TLS handshake unfinished (asyncio waits 60 s, and counts the connection only
    once it is done), its answers unread (their writes waited for good) or a close unfinished (TLS:
    30 s for its close_notify; plain: for good while the last answer is unread). A request gunicorn's
    parser fails on with a ValueError (a Content-Length past Python's 4300 digits) is a 400, not a
    traceback in the error log.

    The direct pRPC routes' plain POSTs are parsed and answered by the protocol itself (asgi_app's
    FastPrpc), under the same deadlines, keepalive timer and write flow control; a connection
    goes to gunicorn's parser for good at its first request of any other kind.
    """
    import functools  # pylint: disable=import-outside-toplevel
    from gunicorn.asgi.protocol import ASGIProtocol  # pylint: disable=import-outside-toplevel
    # The bytes gunicorn's protocol puts in each answer, so that the fast path's answers are the same.
    from gunicorn.asgi.protocol import (  # pylint: disable=import-outside-toplevel
        _CACHED_SERVER_HEADER as SERVER_HEADER, _get_cached_date_header as date_header,
        _get_cached_status_line as status_line, HIGH_WATER_LIMIT)
    from gunicorn.workers import gasgi  # pylint: disable=import-outside-toplevel

    class DeadlineProtocol(ASGIProtocol):
        deadline = None         # the request being read arrives whole before it
        write_deadline = None   # the client reads enough of its answers before it
        close_deadline = None   # a close is done before it
        fast = None             # asgi_app's FastPrpc while this connection is on its fast path
        fast_buffer = b""       # bytes read on the fast path, not yet answered
        fast_busy = False       # an answer on the pool's threads: the next request waits for it
        fast_remote = ""
        fast_wanted = 0         # bytes the request being read needs in fast_buffer, once its head is known
        fast_held = ()          # answers made, waiting for FastPrpc.flush: [(answer, path, headers, before)]
        fast_held_bytes = 0     # the size of their bodies: past the write buffer's limit, no more are made

        def connection_made(self, transport):
            super().connection_made(transport)
            if self.worker.nr_conns > self.worker.worker_connections:
                transport.abort()
                return
            self._arm_deadline()
            fast = getattr(self.app, "fast_prpc", None)
            if fast is not None and self._callback_parser is not None and self.reader is None \
                    and self._proxy_protocol == "off":
                self.fast, self.fast_held = fast, []
                peer = transport.get_extra_info("peername")
                self.fast_remote = str(peer[0]) if peer else ""

        def data_received(self, data):
            if self.deadline is None:
                self._arm_deadline()
            if self.fast is not None:
                self._cancel_keepalive_timer()
                self.fast_buffer += data
                self._fast_serve()
                return
            super().data_received(data)

        def _fast_serve(self):
            """Answer the plain pRPC POSTs at the head of fast_buffer (FastPrpc.parse), in order; the
            first request that is anything else hands the connection, with every byte not yet
            answered, to gunicorn's own parser for good."""
            while self.fast is not None and self.fast_buffer and not self.fast_busy and not self._closed:
                if self._flow_control.write_paused:   # answers unread: read no more (resume_writing goes on)
                    self.transport.pause_reading()
                    return
                if self.fast_held_bytes > HIGH_WATER_LIMIT:
                    return   # held answers are written without flow control: make more once they are (send_held)
                if len(self.fast_buffer) < self.fast_wanted:
                    return   # a body still arriving (the deadline runs)
                parsed = self.fast.parse(self.fast_buffer)
                if isinstance(parsed, int):
                    self.fast_wanted = parsed
                    return   # a request still arriving (the deadline runs)
                self.fast_wanted = 0
                if parsed is FAST_FALLBACK:
                    if self.fast_held:
                        return   # handed over once the answers before it are sent (send_held)
                    buffered, self.fast, self.fast_buffer = self.fast_buffer, None, b""
                    super().data_received(buffered)
                    return
                handler, path, headers, start, end = parsed
                raw, self.fast_buffer = bytes(self.fast_buffer[start:end]), self.fast_buffer[end:]
                self._disarm_deadline()
                if self.fast.pool is None:
                    before = []
                    token = _BEFORE_ANSWER.set(before)
                    try:
                        answer = self.fast.direct.answer(handler, path, self.fast_remote, raw)
                    finally:
                        _BEFORE_ANSWER.reset(token)
                    if before or self.fast_held:   # sent in order, once FastPrpc.flush has done `before`
                        self.fast_held.append((answer, path, headers, before))
                        self.fast_held_bytes += len(answer[1])
                        self.fast.hold(self)
                    else:
                        self._fast_answer(answer, path, headers)
                    continue
                self.fast_busy = True
                self.transport.pause_reading()   # the next request is read once this one is answered
                future = self.worker.loop.run_in_executor(self.fast.pool, self.fast.direct.answer, handler, path,
                                                          self.fast_remote, raw)
                future.add_done_callback(functools.partial(self._fast_done, path, headers))

        def send_held(self, failed):
            """FastPrpc.flush: send the answers held for it (`failed`: never; the connection is closed)."""
            held, self.fast_held, self.fast_held_bytes = self.fast_held, [], 0
            if self._closed:
                return
            if failed:
                self.transport.abort()
                return
            for answer, path, headers, _before in held:
                if self._closed:
                    return
                self._fast_answer(answer, path, headers)
            if not self._closed:
                self._fast_serve()

        def _fast_done(self, path, headers, future):
            self.fast_busy = False
            if self._closed or future.cancelled():
                return
            self._fast_answer(future.result(), path, headers)
            if not self._closed:
                self.transport.resume_reading()
                self._fast_serve()

        def _fast_answer(self, answer, path, headers):
            """Write one answer as gunicorn's protocol would (status line, Server, Date), then wait for
            the next request: the keepalive timer when nothing is buffered, else its deadline."""
            status, body = answer
            code = int(status[:3])
            self.worker.nr += 1
            if self.worker.nr >= self.worker.max_requests:
                self.log.info("Autorestarting worker after current request.")
                self.worker.alive = False
            close = not self.worker.alive or not self._keepalive
            self._safe_write(b"".join((
                status_line((1, 1), code), b"content-type: application/json\r\ncontent-length: ",
                str(len(body)).encode(), b"\r\n", SERVER_HEADER, date_header(),
                b"Connection: close\r\n\r\n" if close else b"\r\n", body)))
            if self.fast.access is not None:
                self.fast.access.write({"client": (self.fast_remote,), "method": "POST", "path": path}, headers,
                                       code, len(body))
            if close:
                self._close_transport()
                self._request_ready.set()   # gunicorn's connection task ends too
            elif self.fast_buffer:
                if self.deadline is None:   # never two: the one left over would close the connection later
                    self._arm_deadline()   # a pipelined request: it too arrives whole in time
            else:
                self._arm_keepalive_timer()

        def _on_headers_complete(self):
            # A pipelined request is parsed from bytes read with the one before it, no
            # data_received armed its deadline: its body has CLIENT_IO_TIMEOUT from here.
            if self.deadline is None:
                self._arm_deadline()
            return super()._on_headers_complete()

        def _on_message_complete(self):
            self._disarm_deadline()
            super()._on_message_complete()

        def _feed_callback_parser(self, data):
            try:
                return super()._feed_callback_parser(data)
            except ValueError:  # int() of a Content-Length of 4301+ digits; the parser's own errors are caught above
                self._send_error_response(400, "Invalid request")
                self._close_transport()
                return False

        def pause_writing(self):
            super().pause_writing()
            if self.write_deadline is None:
                self.write_deadline = self.worker.loop.call_later(CLIENT_IO_TIMEOUT, self.transport.abort)

        def resume_writing(self):
            if self.write_deadline is not None:
                self.write_deadline.cancel()
                self.write_deadline = None
            super().resume_writing()
            if self.fast is not None and not self._closed and not self.fast_busy:
                self.transport.resume_reading()
                self._fast_serve()

        def _close_transport(self):
            super()._close_transport()
            if self.close_deadline is None and self.transport is not None and not self._conn_lost_handled:
                self.close_deadline = self.worker.loop.call_later(CLIENT_IO_TIMEOUT, self.transport.abort)

        def connection_lost(self, exc):
            self._disarm_deadline()
            for handle in (self.write_deadline, self.close_deadline):
                if handle is not None:
                    handle.cancel()
            super().connection_lost(exc)

        def _arm_deadline(self):
            self.deadline = self.worker.loop.call_later(CLIENT_IO_TIMEOUT, self.transport.abort)

        def _disarm_deadline(self):
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

    class DeadlineASGIWorker(gasgi.ASGIWorker):
        def run(self):
            # The worker makes its connections' protocol by this module-level name (gasgi._serve).
            gasgi.ASGIProtocol = DeadlineProtocol
            if self.cfg.is_ssl:
                # gasgi._serve passes no handshake timeout: asyncio's is 60 s.
                self.loop.create_server = functools.partial(self.loop.create_server,
                                                            ssl_handshake_timeout=CLIENT_IO_TIMEOUT)
            super().run()

    return DeadlineASGIWorker


def asgi_app(app, inline=True, threads=4, access_log=False):
    """The Flask app `app` as an ASGI app, for gunicorn's asyncio worker (run_gunicorn(asgi=...)).

    Its direct pRPC routes (add_prpc_routes(direct=True)) are answered by the same _DirectPrpc
    rules and bytes as under WSGI, on the event loop when `inline` (handlers that answer from
    memory and the local disk: a thread handoff per request cost more CPU than a key release's
    HTTP), else on a pool of `threads` threads (handlers that wait on the network). Everything else
    goes to Flask on a2wsgi's threads. access_log: a line per request on stdout, in gunicorn's
    default format (AccessLine; gunicorn's own costs more than the HTTP of a request here).
    The returned app carries fast_prpc (FastPrpc), which deadline_asgi_worker_class's protocol
    uses to answer those routes' plain POSTs without gunicorn's per-request machinery.
    """
    import asyncio  # pylint: disable=import-outside-toplevel
    from concurrent.futures import ThreadPoolExecutor  # pylint: disable=import-outside-toplevel
    from a2wsgi import WSGIMiddleware  # pylint: disable=import-outside-toplevel
    from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge  # pylint: disable=import-outside-toplevel

    direct = app.extensions.get("dstack.direct_prpc")

    def flask_wsgi(environ, start_response):
        # A chunked body has no Content-Length: a2wsgi's input ends where the body does, but says
        # not so (gunicorn's WSGI workers did), and Werkzeug would read it as empty.
        if "HTTP_TRANSFER_ENCODING" in environ:
            environ["wsgi.input_terminated"] = True
        return app(environ, start_response)
    flask_app = WSGIMiddleware(flask_wsgi, workers=threads)
    pool = None if inline else ThreadPoolExecutor(threads, thread_name_prefix="prpc")
    access = AccessLine() if access_log else None
    json_headers = [(b"content-type", b"application/json")]

    async def read_body(receive, length):
        parts, size = [], 0
        while size < length:
            message = await receive()
            if message["type"] != "http.request":
                break      # http.disconnect
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if not message.get("more_body"):
                break
        raw = b"".join(parts)
        return raw if len(raw) == length else ClientDisconnected()

    async def serve(scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        handler = direct.routes.get(scope.get("path")) if direct is not None and scope["type"] == "http" else None
        headers = dict(scope.get("headers", ())) if handler or access else {}
        if handler is None or not direct.accepts(scope["method"], scope["query_string"], b"transfer-encoding" in headers,
                                                 headers.get(b"content-length", b"0").decode("latin-1")):
            if access is None or scope["type"] != "http":
                await flask_app(scope, receive, send)
                return
            answered = [500, 0]

            async def send_counted(message):
                if message["type"] == "http.response.start":
                    answered[0] = message["status"]
                elif message["type"] == "http.response.body":
                    answered[1] += len(message.get("body", b""))
                await send(message)
            try:
                await flask_app(scope, receive, send_counted)
            finally:
                access.write(scope, headers, *answered)
            return
        path, remote = scope["path"], (scope.get("client") or ("",))[0]
        length = int(headers.get(b"content-length", b"0"))
        raw = RequestEntityTooLarge() if direct.too_large(length) else await read_body(receive, length)
        if pool is None:
            status, body = direct.answer(handler, path, remote, raw)
        else:
            status, body = await asyncio.get_running_loop().run_in_executor(pool, direct.answer, handler, path, remote, raw)
        await send({"type": "http.response.start", "status": int(status.split(" ", 1)[0]),
                    "headers": json_headers + [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        if access is not None:
            access.write(scope, headers, status[:3], len(body))

    serve.fast_prpc = FastPrpc(direct, pool, access) if direct is not None else None
    return serve


FAST_FALLBACK = object()


class FastPrpc:
    """The fast path of deadline_asgi_worker_class's protocol: the direct pRPC routes' plain POSTs
    (what our own clients send: prpc.PrpcClient's request line and headers) parsed and answered by
    the protocol itself, without gunicorn's per-request parser, ASGI scope, tasks and messages
    (~0.15 ms of CPU per request, two per key release: a fifth of a release's server CPU).

    Only a strict subset of HTTP/1.1 is taken here: `POST <direct route> HTTP/1.1`, CRLF line
    ends, at most these few headers, each once (names as tokens, no space before the colon, no
    control characters in values), a Content-Length of digits within MAX_CONTENT_LENGTH, no
    Transfer-Encoding, Expect, Upgrade or other header, Connection only keep-alive, an app with no
    request hooks (_DirectPrpc.accepts). Anything else, and everything after it on that connection,
    goes to gunicorn's parser as before (its checks, errors, 413s and Flask): a request is never
    read two ways. The answers are _DirectPrpc.answer's bytes, on the loop or the pool as
    asgi_app's, with gunicorn's status line, Server and Date headers; the deadlines, the keepalive
    timer and the write flow control stay the protocol's.
    """

    HEADERS = frozenset((b"host", b"content-length", b"content-type", b"accept", b"accept-encoding", b"user-agent",
                         b"connection", b"referer"))
    MAX_HEAD = 8190   # gunicorn's limit_request_field_size: a longer head is its parser's to refuse

    def __init__(self, direct, pool, access):
        self.direct = direct
        self.pool = pool
        self.access = access
        self.holding = []   # protocols with answers waiting for flush

    def hold(self, protocol):
        """A protocol holds answers: flush once the loop has read what is ready (one per loop turn)."""
        if not self.holding:
            protocol.worker.loop.call_soon(self.flush)
        if protocol not in self.holding:
            self.holding.append(protocol)

    def flush(self):
        """Do what the held answers wait for (defer_until_answered), then send them; if any of it
        fails, send none of them."""
        import logging  # pylint: disable=import-outside-toplevel

        holding, self.holding = self.holding, []
        failed = False
        try:
            for protocol in holding:
                for _answer, _path, _headers, before in protocol.fast_held:
                    for done in before:
                        done()
        except Exception:  # pylint: disable=broad-exception-caught  # no answer leaves before its work is done
            logging.getLogger("dstack.wsgi").exception("work an answer waited for failed; its connections are closed")
            failed = True
        for protocol in holding:
            protocol.send_held(failed)

    def parse(self, buf):
        """(handler, path, headers, body start, body end) of the plain POST at the head of `buf`; while
        it may still become one, the number of bytes to wait for (0: unknown, its head is not whole);
        or FAST_FALLBACK."""
        end = buf.find(b"\r\n\r\n", 0, self.MAX_HEAD + 4)
        head = buf if end < 0 else buf[:end]
        if end < 0:
            # Not whole yet: wait only while what came can still be a plain POST's head.
            line_ends = head.count(b"\n")
            if len(buf) > self.MAX_HEAD or line_ends != head.count(b"\r\n") \
                    or b"\r" in head.removesuffix(b"\r").replace(b"\r\n", b"") or not (head[:5] == b"POST "[:len(head[:5])]):
                return FAST_FALLBACK
            if line_ends == 0:
                return 0
            head = head[:head.rfind(b"\r\n")]   # check the whole lines now, not a request later
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or parts[0] != b"POST" or parts[2] != b"HTTP/1.1":
            return FAST_FALLBACK
        try:
            path = parts[1].decode("ascii")
        except UnicodeDecodeError:
            return FAST_FALLBACK
        handler = self.direct.routes.get(path)
        if handler is None:
            return FAST_FALLBACK
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            name = name.lower()
            if not colon or name not in self.HEADERS or name in headers or not _HEADER_VALUE.fullmatch(value):
                return FAST_FALLBACK
            headers[name] = value.strip(b" \t")
        if end < 0:
            return 0
        if headers.get(b"connection", b"keep-alive").lower() != b"keep-alive":
            return FAST_FALLBACK
        length = headers.get(b"content-length", b"")
        if not (length.isdigit() and len(length) <= 9) or self.direct.too_large(int(length)) \
                or not self.direct.accepts("POST", b"", False, length.decode("ascii")):
            return FAST_FALLBACK
        start = end + 4
        if len(buf) < start + int(length):
            return start + int(length)
        return handler, path, headers, start, start + int(length)


# A header value as the fast path takes it: visible ASCII and latin-1, spaces and tabs (no CR, LF, NUL or
# other control character).
_HEADER_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")


class AccessLine:
    """An access line per request, as gunicorn's default access_log_format writes it
    (`host - - [time] "request line" status bytes "referer" "user agent"`), with one write(2) of
    the whole line on stdout (lines of several workers never interleave), the time text made
    once a second, and the client's bytes escaped (no control character reaches the log)."""

    # C0, DEL and C1 (the client's latin-1 bytes 0x80-0x9f: U+0085 ends a line for str.splitlines,
    # U+009B starts a terminal escape).
    ESCAPES = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7f, 0xa0))} \
        | {ord('"'): '\\"', ord("\\"): "\\\\"}

    def __init__(self, fd=1):
        self.fd = fd
        self.second = None
        self.stamp = ""

    def text(self, raw):
        return raw.decode("latin-1").translate(self.ESCAPES)

    def write(self, scope, headers, status, size):
        import os  # pylint: disable=import-outside-toplevel
        import time  # pylint: disable=import-outside-toplevel

        now = int(time.time())
        if now != self.second:
            self.second, self.stamp = now, time.strftime("[%d/%b/%Y:%H:%M:%S %z]", time.localtime(now))
        target = scope.get("raw_path") or scope.get("path", "").encode("utf-8")
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        line = (f'{(scope.get("client") or ("-",))[0]} - - {self.stamp} "{scope.get("method", "-")} '
                f'{self.text(target)} HTTP/{scope.get("http_version", "1.1")}" {status} {size} '
                f'"{self.text(headers.get(b"referer", b"-"))}" "{self.text(headers.get(b"user-agent", b"-"))}"\n')
        try:
            os.write(self.fd, line.encode("utf-8", "backslashreplace"))
        except OSError:
            pass   # a closed stdout loses the access line, never the answer


def run_gunicorn(app, asgi=None, **settings):
    """Serve `app` with these gunicorn settings until SIGTERM/SIGINT (returns via SystemExit).

    Settings this gunicorn does not know are skipped (so a newer setting can be passed safely);
    gunicorn's control socket (on by default in gunicorn 25+, under $HOME) is always off: two
    agents of one user would otherwise fight over it, and none needs it. Workers are threaded with
    a deadline on each client read and write (deadline_worker_class) unless a worker_class is given.
    asgi={"inline": bool, "threads": N}: the app served on gunicorn's asyncio worker instead, as
    asgi_app(app, **asgi), with deadline_asgi_worker_class's deadlines; its access lines (accesslog
    "-") are asgi_app's.
    """
    from gunicorn.app.base import BaseApplication  # pylint: disable=import-outside-toplevel

    settings = dict(settings, control_socket_disable=True)
    if asgi is not None:
        app = asgi_app(app, access_log=settings.pop("accesslog", None) == "-", **asgi)
        settings.pop("threads", None)
        settings.setdefault("worker_class", deadline_asgi_worker_class())
        settings.setdefault("asgi_loop", "uvloop")
    elif "worker_class" not in settings:
        worker, ssl_socket_class = deadline_worker_class()
        settings["worker_class"] = worker
        given_context = settings.get("ssl_context")

        def ssl_context(conf, default_factory):
            context = given_context(conf, default_factory) if given_context else default_factory()
            context.sslsocket_class = ssl_socket_class
            return context
        settings["ssl_context"] = ssl_context

    class Server(BaseApplication):  # pylint: disable=abstract-method
        def load_config(self):
            for name, value in settings.items():
                if name in self.cfg.settings:
                    self.cfg.set(name, value)

        def load(self):
            return app

    Server().run()


def request_params(list_fields=(), strict=False):
    """A pRPC request's parameters.

    Lenient (the KMS and the guest agent, as dstack's pRPC and its clients use them): GET query
    parameters and the JSON object body, merged (the body wins); the body is read as JSON
    whatever its Content-Type (dstack's clients do not all set one).

    strict (the VMM, which a browser can reach): only a POST with `Content-Type:
    application/json` and the parameters in its body. What a web page can send without a CORS
    preflight (GET, <img>, <form>, text/plain or form-encoded bodies) is refused: 405, 415, or
    400 for a query string.

    Either way the body must be a JSON object of at most json_limits.MAX_JSON_DEPTH levels (checked
    before parsing); anything else is a DstackError naming the request. The app's
    MAX_CONTENT_LENGTH bounds its size (413).
    """
    from flask import request  # pylint: disable=import-outside-toplevel
    from werkzeug.exceptions import MethodNotAllowed, UnsupportedMediaType  # pylint: disable=import-outside-toplevel

    if strict:
        if request.method != "POST":
            raise MethodNotAllowed(["POST"], "only POST with a JSON body is served here")
        if request.mimetype != "application/json" or request.mimetype_params.get("charset", "utf-8").lower() != "utf-8":
            raise UnsupportedMediaType("the body must be JSON, sent as Content-Type: application/json")
        if request.query_string:
            raise DstackError("request", "parameters go in the JSON body, not in the URL")
        params = {}
    else:
        params = request.args.to_dict()
        for name in list_fields:
            if name in request.args:
                params[name] = request.args.getlist(name)
    if request.method == "POST":
        params.update(_body_params(request.get_data(cache=False)))
    return params


def _body_params(raw):
    """A request body's parameters: {} for no body, else a JSON object (depth checked first)."""
    if not raw.strip():
        return {}
    body = json_limits.loads(raw, "request", hint=" (only JSON is served, not protobuf)")
    if not isinstance(body, dict):
        raise DstackError("request", "the body must be a JSON object")
    return body


# The client address of the request a direct pRPC route is serving (None: ask Flask's request).
_DIRECT_REMOTE = contextvars.ContextVar("dstack_direct_remote", default=None)
# While the asyncio worker's fast path answers on its event loop: the list of what must be done before
# that answer is sent (defer_until_answered).
_BEFORE_ANSWER = contextvars.ContextVar("dstack_before_answer", default=None)


def defer_until_answered(done):
    """Whether `done` (a function) will be called before the answer being made now is sent; False
    when there is no such answer (the caller must do that work itself, now).

    The asyncio worker's fast path, answering on its event loop, sends no answer before every
    `done` of it has returned, and calls them once per loop turn for all the answers made in it
    (a group commit: one fdatasync for the audit lines of several releases); if one raises, those
    answers are never sent (their connections are closed)."""
    pending = _BEFORE_ANSWER.get()
    if pending is None:
        return False
    pending.append(done)
    return True


def remote_addr():
    """The address of the client whose request is being served, on a Flask route or a direct one."""
    direct = _DIRECT_REMOTE.get()
    if direct is not None:
        return direct
    from flask import request  # pylint: disable=import-outside-toplevel
    return request.remote_addr or ""


def add_prpc_routes(app, prefix, handlers, *, endpoint_prefix="", list_fields=(), strict=False, methods=None,
                    direct=False):
    """One route per pRPC method, the way every agent serves them: `prefix + name` answers
    jsonify(handler(params)), params from request_params(list_fields, strict).

    handlers maps method names to handler(params); the endpoint is endpoint_prefix + name. GET and
    POST are served, POST only when strict (what request_params(strict=True) accepts) or as methods says.

    direct=True (lenient routes only): a plain POST with a Content-Length and no query string is
    answered without Flask's request machinery (see _DirectPrpc), the same bytes and statuses;
    handlers that need the client's address call remote_addr(), not flask.request.
    """
    from flask import jsonify  # pylint: disable=import-outside-toplevel

    methods = list(methods or (["POST"] if strict else ["GET", "POST"]))
    if direct and not strict and "POST" in methods:
        direct_routes = app.extensions.get("dstack.direct_prpc")
        if direct_routes is None:
            direct_routes = app.extensions["dstack.direct_prpc"] = _DirectPrpc(app)
        direct_routes.routes.update({prefix + name: handler for name, handler in handlers.items()})

    def view_of(endpoint, handler):
        def view():
            return jsonify(handler(request_params(list_fields, strict)))
        view.__name__ = endpoint
        return view

    for name, handler in handlers.items():
        endpoint = endpoint_prefix + name
        app.add_url_rule(prefix + name, endpoint, view_of(endpoint, handler), methods=methods)


def install_json_errors(app, log, statuses=None):
    """JSON errors for every failure: {"error": "..."} with the right status, never a traceback.

    A DstackError (bad input, named) is 400; an HTTP error keeps its status; anything else is a
    500 that says only its type (the detail, which could hold a secret, goes to the log).
    statuses maps the agent's own exception classes (a refusal 403, not ready 503, ...) to their
    status, or to a function of the exception giving it; each answers {"error": str(exc)} and is
    logged with the path and the client (a warning; an error for a 5xx the agent must fix, 503
    "not now" aside). The most specific class wins (as Flask picks its handlers), so a DstackError
    subclass listed there wins over the 400. Direct pRPC routes answer through the same function.
    """
    from flask import jsonify, request  # pylint: disable=import-outside-toplevel
    from werkzeug.exceptions import HTTPException  # pylint: disable=import-outside-toplevel

    answer = _json_error_answer(log, statuses or {})
    app.extensions["dstack.json_errors"] = answer

    def flask_answer(exc):
        payload, code = answer(exc, request.path, request.remote_addr)
        return jsonify(payload), code

    for exception_class in (*(statuses or {}), DstackError, HTTPException, Exception):
        app.register_error_handler(exception_class, flask_answer)


def _json_error_answer(log, statuses):
    """answer(exc, path, remote) -> ({"error": ...}, status): install_json_errors' rules, in one place."""
    from werkzeug.exceptions import HTTPException  # pylint: disable=import-outside-toplevel

    def answer(exc, path, remote):
        for klass in type(exc).__mro__:
            if klass in statuses:
                status = statuses[klass]
                code = status(exc) if callable(status) else status
                level = log.error if code >= 500 and code != 503 else log.warning
                level("%s %s from %s: %s", code, path, remote, exc)
                return {"error": str(exc)}, code
            if klass is DstackError:
                return {"error": str(exc)}, 400
            if klass is HTTPException:
                return {"error": exc.description or exc.name}, exc.code
        log.exception("internal error on %s", path)
        return {"error": f"internal error ({type(exc).__name__})"}, 500
    return answer


class _DirectPrpc:
    """WSGI middleware in front of a Flask app: the pRPC routes added with direct=True, answered
    without Flask's request context, URL map, response object and signals.

    Only what these routes always get is taken here: a POST with a Content-Length (no chunked body)
    and no query string, on an app with no before/after/teardown request functions; everything
    else (GET, query strings, other paths, an app with hooks) goes to Flask unchanged. The answer
    is what Flask gives: jsonify's bytes (app.json, compact, a newline), the JSON errors of
    install_json_errors, 413 past MAX_CONTENT_LENGTH. It saves about a third of a millisecond per
    request, which a key release (two requests) pays twice. asgi_app serves the same routes on an
    event loop, through the same accepts/answer.
    """

    def __init__(self, app):
        self.app = app
        self.routes = {}
        self.flask_wsgi_app = app.wsgi_app
        app.wsgi_app = self

    def accepts(self, method, query, chunked, content_length):
        """Whether a request of this method, query string, framing and Content-Length is answered here."""
        app = self.app
        return (method == "POST" and not query and not chunked and str(content_length).isdigit()
                and "dstack.json_errors" in app.extensions
                and not any(app.before_request_funcs.values()) and not any(app.after_request_funcs.values())
                and not any(app.teardown_request_funcs.values()) and not any(app.url_value_preprocessors.values()))

    def too_large(self, length):
        limit = self.app.config.get("MAX_CONTENT_LENGTH")
        return limit is not None and length > limit

    def answer(self, handler, path, remote, raw):
        """(status line, body bytes) of handler(params of the body `raw`), or of the exception
        `raw` is (a body too large or cut short): as Flask would answer."""
        from werkzeug.http import HTTP_STATUS_CODES  # pylint: disable=import-outside-toplevel

        token = _DIRECT_REMOTE.set(remote)
        try:
            if isinstance(raw, Exception):
                raise raw
            value, code = handler(_body_params(raw)), 200
        except Exception as exc:  # pylint: disable=broad-exception-caught  # as Flask's handlers: a JSON answer
            value, code = self.app.extensions["dstack.json_errors"](exc, path, remote)
        finally:
            _DIRECT_REMOTE.reset(token)
        provider = self.app.json  # jsonify's layout: indented only when Flask's would be
        layout = {"indent": 2} if (provider.compact is None and self.app.debug) or provider.compact is False \
            else {"separators": (",", ":")}
        body = (provider.dumps(value, **layout) + "\n").encode("utf-8")
        return f"{code} {HTTP_STATUS_CODES.get(code, 'UNKNOWN').upper()}", body

    def __call__(self, environ, start_response):
        from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge  # pylint: disable=import-outside-toplevel

        path = environ.get("PATH_INFO", "")
        handler = self.routes.get(path)
        if handler is None or not self.accepts(environ.get("REQUEST_METHOD"), environ.get("QUERY_STRING"),
                                               "HTTP_TRANSFER_ENCODING" in environ,
                                               environ.get("CONTENT_LENGTH", "0")):
            return self.flask_wsgi_app(environ, start_response)
        length = int(environ.get("CONTENT_LENGTH") or 0)
        if self.too_large(length):
            raw = RequestEntityTooLarge()
        else:
            raw = _read_exactly(environ["wsgi.input"], length)
            if len(raw) < length:
                raw = ClientDisconnected()
        status, body = self.answer(handler, path, environ.get("REMOTE_ADDR") or "", raw)
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]


def _read_exactly(stream, length):
    """Up to `length` bytes of a WSGI input stream (fewer only when the client stopped sending)."""
    parts, left = [], length
    while left > 0:
        part = stream.read(left)
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)
