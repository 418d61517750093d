# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The VMM HTTP surface: the JSON API at dstack's paths (/prpc/Vmm.<Method>), /logs, the host API
the guests report to, and the web UI at /.

Auth (dstack's [auth]): when tokens are configured, every route but the host API needs
`Authorization: Bearer <token>` or `X-Admin-Token: <token>`. The host API is authorized by the
per-VM token in its URL, which only that VM's config share holds.

A web page the operator visits must not drive or read the VMM (with no token on loopback, the
default, nothing else stops it). So every API call, /logs and the host API are POST with
`Content-Type: application/json` (what a page cannot send cross-site without a CORS preflight,
which the VMM never grants); the Host header must name this VMM (against DNS rebinding); and a
request from another origin (Origin, or Sec-Fetch-Site other than same-origin/none) is refused.
Only the static UI (/, /res/) and /health answer a GET.

POST /logs {"id", "ch", "lines", "follow", "service"} answers a CVM's log as text/plain:
    id       the VM's id (required)
    ch       stdout (default): the guest agent's stdout, where it writes the app's container output,
             each line prefixed with its container's compose name (`web-1  | ...`; see
             module_utils/service_log.py); stderr: the guest agent's own log; serial: a VM's
             serial console (libvirt backend)
    lines    the last N lines (default 200, at most 10000)
    follow   true: then new lines as they come, until the client closes
    service  only the lines of this compose service's containers (not in dstack's /logs)
A follower streams: at most max_log_followers at once (429 beyond), each noticing at once that
its client closed, in gunicorn threads of their own so that the API and the host API always have
theirs (see cli.py); a log rotated under it (supervisord's 10 MB) is followed into the new file.
"""

import hmac
import ipaddress
import logging
import os
import select
import threading
import time
from urllib.parse import urlsplit

from flask import Flask, Response, jsonify, request, send_from_directory
from werkzeug.exceptions import Forbidden

from ansible_collections.dstack.tee.agents.wsgi import add_prpc_routes, install_json_errors, request_params
from ansible_collections.dstack.tee.agents.vmm.service import VERSION, NotFound, VmmService, guest_url
from ansible_collections.dstack.tee.plugins.module_utils import service_log
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError

MAX_REQUEST_BYTES = 2 * 1024 * 1024
MAX_LOG_FOLLOWERS = 8
# What answers a plain GET from anywhere: the static UI (no secret in it) and the health check.
PUBLIC_PATHS = ("/", "/health")
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
log = logging.getLogger("dstack.vmm")


def create_app(config, backend):
    app = Flask("dstack-vmm", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = int(config.get("max_request_bytes", MAX_REQUEST_BYTES))
    service = VmmService(config, backend)
    app.extensions["dstack_vmm"] = service
    tokens = [t for t in (config.get("auth_tokens") or []) if t]
    hosts = ServedHosts(config, guest_host_address=backend.guest_host_address)
    followers = FollowerSlots(config.get("max_log_followers", MAX_LOG_FOLLOWERS))
    app.extensions["dstack_vmm_followers"] = followers

    @app.before_request
    def refuse_other_sites():
        # Before the token check: a forged request learns nothing, not even whether a token is set.
        given = request.headers.get("Host", "")
        if not hosts.serves(given):
            raise Forbidden(f"Host {given[:100]!r} is not a name this VMM serves (its listen address, "
                            "localhost, or one of server_names)")
        if request.method in ("GET", "HEAD") and (request.path in PUBLIC_PATHS or request.path.startswith("/res/")):
            return None
        origin = request.headers.get("Origin")
        if origin is not None and not hosts.serves_origin(origin):
            raise Forbidden(f"Origin {origin[:100]!r} is another site: this VMM answers only its own pages")
        fetch_site = request.headers.get("Sec-Fetch-Site", "same-origin").lower()
        if fetch_site not in ("same-origin", "none"):
            raise Forbidden(f"Sec-Fetch-Site {fetch_site[:20]!r}: this VMM answers only its own pages")
        return None

    @app.before_request
    def check_token():
        # The page and its static files hold no secret and a browser cannot send a token for a
        # page load: the UI asks for the token and sends it with every API call.
        if (not tokens or request.path in ("/", "/health")
                or request.path.startswith(("/host-api/", "/res/"))):
            return None
        given = request.headers.get("X-Admin-Token", "")
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            given = auth[7:]
        # Compared as bytes: a header with non-ASCII characters is just a wrong token.
        given = given.encode("utf-8", "surrogateescape")
        if not any(hmac.compare_digest(given, t.encode("utf-8")) for t in tokens):
            return jsonify({"error": "unauthorized: a valid bearer token is required"}), 401
        return None

    add_prpc_routes(app, "/prpc/Vmm.", {
        "CreateVm": service.create_vm,
        "StartVm": lambda p: service.start_vm(p.get("id")),
        "StopVm": lambda p: service.stop_vm(p.get("id"), force=True),
        "ShutdownVm": lambda p: service.stop_vm(p.get("id"), force=False),
        "RemoveVm": lambda p: service.remove_vm(p.get("id")),
        "UpdateVm": service.update_vm,
        "UpgradeApp": service.update_vm,
        "Status": service.status,
        "GetInfo": lambda p: service.get_info(p.get("id")),
        "GetMeta": lambda p: service.get_meta(),
        "ListImages": lambda p: service.list_images(),
        "GetComposeHash": service.get_compose_hash,
        "GetAppEnvEncryptPubKey": lambda p: service.get_app_env_encrypt_pubkey(p.get("app_id", "")),
        "Version": lambda p: {"version": VERSION, "rev": ""},
    }, endpoint_prefix="vmm_", strict=True)

    @app.post("/host-api/<vm_id>/<token>/Notify")
    def host_notify(vm_id, token):
        body = request_params(strict=True)
        return jsonify(service.host_notify(vm_id, token, body.get("event"), body.get("payload", "")))

    @app.post("/logs")
    def logs():
        path, lines, follow, wanted = service.log_request(request_params(strict=True))
        keep = None if wanted is None else (lambda line: service_log.service_of(line) == wanted)
        if not follow:
            return Response(_tail(path, lines, keep=keep), mimetype="text/plain")
        if not followers.take():
            return jsonify({"error": f"too many log followers: at most {followers.limit} at once "
                                     "(max_log_followers); try again when one closes"}), 429
        try:
            response = Response(_tail(path, lines, follow=True, client=request.environ.get("gunicorn.socket"), keep=keep),
                                mimetype="text/plain", headers={"X-Accel-Buffering": "no"})
        except BaseException:
            followers.give_back()
            raise
        response.call_on_close(followers.give_back)  # gunicorn closes the response when the stream ends
        return response

    @app.get("/health")
    def health():
        return jsonify({"status": "ok", "version": VERSION})

    @app.get("/")
    def index():
        return send_from_directory(STATIC_DIR, "index.html")

    @app.get("/res/<path:name>")
    def resource(name):
        return send_from_directory(STATIC_DIR, name)

    @app.errorhandler(405)
    def method_not_allowed(exc):
        if request.path == "/logs" or request.path.startswith(("/prpc/", "/host-api/")):
            return jsonify({"error": "only POST with a JSON body (Content-Type: application/json) is served here"}), 405
        return jsonify({"error": exc.description}), 405

    install_json_errors(app, log, {NotFound: 404})

    @app.after_request
    def security_headers(response):
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Content-Security-Policy", "frame-ancestors 'none'")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response
    return app


class ServedHosts:
    """The Host header values (and so the origins) this VMM answers to.

    Its listen HOST:PORT; localhost, 127.0.0.1 and [::1] with that port; the host of its host API
    URL; and server_names (a name alone matches it with no port or the listen port, as behind a
    reverse proxy; NAME:PORT matches that port, and NAME alone for port 80 or 443). When listening on 0.0.0.0 or ::, any IP address
    with the listen port: a DNS rebinding needs a name, and an IP literal Host means the browser
    reached this VMM at that address.
    """

    def __init__(self, config, guest_host_address=None):
        listen = str(config.get("listen") or "127.0.0.1:9080")
        host, _sep, self.port = listen.rpartition(":")
        host = host.strip("[]").lower()
        self.wildcard = host in ("0.0.0.0", "::")
        self.names = {_host_port(name, self.port) for name in (host, "localhost", "127.0.0.1", "::1")}
        names = config.get("server_names") or []
        if isinstance(names, str) or not isinstance(names, list):
            raise DstackError("server_names", "must be a list of host names")
        for pos, entry in enumerate(names):
            if not isinstance(entry, str) or not entry or "/" in entry:
                raise DstackError(f"server_names[{pos}]", "must be a host name or HOST:PORT")
            name, port = _split_host(entry.lower())
            self.names.add(_host_port(name, port) if port else name)
            if not port:
                self.names.add(_host_port(name, self.port))
            elif port in ("80", "443"):
                self.names.add(name)  # browsers leave a scheme's default port out of Host and Origin
        host_api_base = str(config.get("host_api_base") or "")
        # The host API as the VMs reach it too (a VM on QEMU's user network: 10.0.2.2:PORT).
        for url in (host_api_base, guest_url(host_api_base, guest_host_address)):
            netloc = urlsplit(url).netloc
            if netloc:
                self.names.add(netloc.lower())

    def serves(self, value):
        value = (value or "").lower()
        if value in self.names:
            return True
        name, port = _split_host(value)
        if self.wildcard and port == self.port:
            try:
                ipaddress.ip_address(name)
                return True
            except ValueError:
                return False
        return False

    def serves_origin(self, origin):
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and not parts.path and self.serves(parts.netloc)


def _split_host(value):
    """'name:port', '[v6]:port', 'name' -> (name without brackets, port or '')."""
    if value.startswith("["):
        name, _sep, rest = value[1:].partition("]")
        return name, rest[1:] if rest.startswith(":") else ""
    name, sep, port = value.rpartition(":")
    return (name, port) if sep and ":" not in name else (value, "")


def _host_port(name, port):
    return f"[{name}]:{port}" if ":" in name else f"{name}:{port}"


class FollowerSlots:
    """At most `limit` /logs followers at once; a slot is given back when its response closes."""

    def __init__(self, limit):
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise DstackError("max_log_followers", "must be a positive integer")
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)

    def take(self):
        return self._slots.acquire(blocking=False)

    def give_back(self):
        self._slots.release()


def _last_lines(handle, lines, keep=None, block=64 * 1024, most=8 * 1024 * 1024):
    """The last `lines` lines of a file (those `keep` keeps, when given), read from its end, at
    most `most` bytes of it; leaves the handle at the end."""
    end = handle.seek(0, os.SEEK_END)
    start, head, picked = end, b"", []
    while start > 0 and len(picked) < lines and end - start < most:
        step = min(block, start)
        start -= step
        handle.seek(start)
        pieces = _split_lines(handle.read(step) + head)
        # The first piece may be the end of a line that begins further back (unless at the start).
        head = pieces.pop(0) if start > 0 and pieces else b""
        picked[:0] = [piece for piece in pieces if keep is None or keep(piece)]
    if start == 0 and head and (keep is None or keep(head)):
        picked.insert(0, head)
    handle.seek(end)
    return b"".join(picked[-lines:])


def _split_lines(data):
    """data as lines, each with its b"\\n" (the last without one when data does not end a line)."""
    pieces = data.split(b"\n")
    last = pieces.pop()
    return [piece + b"\n" for piece in pieces] + ([last] if last else [])


def _reopened(handle, path):
    """A handle on `path` when the file there is another than `handle`'s (the log was rotated:
    supervisord renamed it and began a new one), else None."""
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return None  # between the rename and the new file, or removed with its VM
    if current.st_ino == os.fstat(handle.fileno()).st_ino:
        return None
    try:
        return open(path, "rb")  # pylint: disable=consider-using-with
    except FileNotFoundError:
        return None


def _tail(path, lines, follow=False, client=None, poll=0.5, heartbeat=60.0, keep=None):
    """The last `lines` lines of a log (those `keep` keeps), then (follow) new lines as they come.

    Following ends as soon as the client closes its connection (its socket turns readable: no
    request can follow this one on it) or the log file is removed with its VM; a rotated log is
    followed into its new file (what the old one got meanwhile first). Without the client's
    socket (another server than gunicorn) a heartbeat line every minute finds a closed client by
    the failed write instead. With `keep`, only whole lines are sent (a partial one waits for its
    end, up to 64 KiB).
    """
    try:
        handle = open(path, "rb")  # pylint: disable=consider-using-with
    except FileNotFoundError:
        yield b""
        return
    try:
        yield _last_lines(handle, lines, keep)
        if not follow:
            return
        quiet_since = time.monotonic()
        partial = b""
        while True:
            chunk = handle.read(64 * 1024)
            if chunk:
                quiet_since = time.monotonic()
                if keep is None:
                    yield chunk
                    continue
                pieces = _split_lines(partial + chunk)
                partial = pieces.pop() if not pieces[-1].endswith(b"\n") and len(pieces[-1]) < 64 * 1024 else b""
                kept = b"".join(piece for piece in pieces if keep(piece))
                if kept:
                    yield kept
                continue
            if os.fstat(handle.fileno()).st_nlink == 0:
                return
            rotated = _reopened(handle, path)
            if rotated is not None:
                handle.close()
                handle = rotated
                continue
            if client is not None:
                if select.select([client], [], [], poll)[0]:
                    return
            elif time.monotonic() - quiet_since > heartbeat:
                yield b"[vmm heartbeat]\n"
                quiet_since = time.monotonic()
            else:
                time.sleep(poll)
    finally:
        handle.close()
