# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Serving a Flask app with gunicorn, the one way every agent does it (KMS, VMM, guest agent,
gateway), and what their JSON APIs share: the request parser, the pRPC routes, the JSON errors."""

import contextvars

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


def run_gunicorn(app, **settings):
    """Serve `app` with these gunicorn settings until SIGTERM/SIGINT (returns via SystemExit).

    Settings this gunicorn does not know are skipped (so a newer setting can be passed safely);
    gunicorn's control socket (on by default in gunicorn 25+, under $HOME) is always off: two
    agents of one user would otherwise fight over it, and none needs it. Workers are threaded with
    a deadline on each client read and write (deadline_worker_class) unless a worker_class is given.
    """
    from gunicorn.app.base import BaseApplication  # pylint: disable=import-outside-toplevel

    settings = dict(settings, control_socket_disable=True)
    if "worker_class" not in settings:
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
    request, which a key release (two requests) pays twice.
    """

    def __init__(self, app):
        self.app = app
        self.routes = {}
        self.flask_wsgi_app = app.wsgi_app
        app.wsgi_app = self

    def _direct(self, environ):
        app = self.app
        return (environ.get("REQUEST_METHOD") == "POST" and not environ.get("QUERY_STRING")
                and "HTTP_TRANSFER_ENCODING" not in environ and str(environ.get("CONTENT_LENGTH", "0")).isdigit()
                and "dstack.json_errors" in app.extensions
                and not any(app.before_request_funcs.values()) and not any(app.after_request_funcs.values())
                and not any(app.teardown_request_funcs.values()) and not any(app.url_value_preprocessors.values()))

    def __call__(self, environ, start_response):
        from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge  # pylint: disable=import-outside-toplevel
        from werkzeug.http import HTTP_STATUS_CODES  # pylint: disable=import-outside-toplevel

        path = environ.get("PATH_INFO", "")
        handler = self.routes.get(path)
        if handler is None or not self._direct(environ):
            return self.flask_wsgi_app(environ, start_response)
        remote = environ.get("REMOTE_ADDR") or ""
        token = _DIRECT_REMOTE.set(remote)
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
            limit = self.app.config.get("MAX_CONTENT_LENGTH")
            if limit is not None and length > limit:
                raise RequestEntityTooLarge()
            raw = _read_exactly(environ["wsgi.input"], length)
            if len(raw) < length:
                raise ClientDisconnected()
            value, code = handler(_body_params(raw)), 200
        except Exception as exc:  # pylint: disable=broad-exception-caught  # as Flask's handlers: a JSON answer
            value, code = self.app.extensions["dstack.json_errors"](exc, path, remote)
        finally:
            _DIRECT_REMOTE.reset(token)
        provider = self.app.json  # jsonify's layout: indented only when Flask's would be
        layout = {"indent": 2} if (provider.compact is None and self.app.debug) or provider.compact is False \
            else {"separators": (",", ":")}
        body = (provider.dumps(value, **layout) + "\n").encode("utf-8")
        start_response(f"{code} {HTTP_STATUS_CODES.get(code, 'UNKNOWN').upper()}",
                       [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
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
