# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The VMM HTTP surface: the JSON API at dstack's paths (/prpc/Vmm.<Method>), /logs, the host API
the guests report to, and the web UI at /.

Auth (dstack's [auth]): when tokens are configured, every route but the host API needs
`Authorization: Bearer <token>` or `X-Admin-Token: <token>`. The host API is authorized by the
per-VM token in its URL, which only that VM's config share holds.
"""

import hmac
import logging
import os
import time

from flask import Flask, Response, jsonify, request, send_from_directory

from ansible_collections.dstack.tee.agents.wsgi import install_json_errors, request_params
from ansible_collections.dstack.tee.agents.vmm.service import VERSION, NotFound, VmmService

MAX_REQUEST_BYTES = 2 * 1024 * 1024
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
log = logging.getLogger("dstack.vmm")


def create_app(config, backend):
    app = Flask("dstack-vmm", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = int(config.get("max_request_bytes", MAX_REQUEST_BYTES))
    service = VmmService(config, backend)
    app.extensions["dstack_vmm"] = service
    tokens = [t for t in (config.get("auth_tokens") or []) if t]

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
        if not any(hmac.compare_digest(given, t) for t in tokens):
            return jsonify({"error": "unauthorized: a valid bearer token is required"}), 401
        return None

    def route(name, handler):
        def view():
            return jsonify(handler(request_params()))
        view.__name__ = "vmm_" + name
        app.add_url_rule(f"/prpc/Vmm.{name}", view.__name__, view, methods=["GET", "POST"])

    route("CreateVm", service.create_vm)
    route("StartVm", lambda p: service.start_vm(p.get("id")))
    route("StopVm", lambda p: service.stop_vm(p.get("id"), force=True))
    route("ShutdownVm", lambda p: service.stop_vm(p.get("id"), force=False))
    route("RemoveVm", lambda p: service.remove_vm(p.get("id")))
    route("UpdateVm", service.update_vm)
    route("UpgradeApp", service.update_vm)
    route("Status", service.status)
    route("GetInfo", lambda p: service.get_info(p.get("id")))
    route("GetMeta", lambda p: service.get_meta())
    route("GetComposeHash", service.get_compose_hash)
    route("GetAppEnvEncryptPubKey", lambda p: service.get_app_env_encrypt_pubkey(p.get("app_id", "")))
    route("Version", lambda p: {"version": VERSION, "rev": ""})

    @app.post("/host-api/<vm_id>/<token>/Notify")
    def host_notify(vm_id, token):
        body = request_params()
        return jsonify(service.host_notify(vm_id, token, body.get("event"), body.get("payload", "")))

    @app.get("/logs")
    def logs():
        path = service.log_path(request.args.get("id", ""), request.args.get("ch", "stdout"))
        lines = min(int(request.args.get("lines") or 200), 10000)
        follow = request.args.get("follow", "false").lower() in ("1", "true", "yes")
        return Response(_tail(path, lines, follow), mimetype="text/plain")

    @app.get("/health")
    def health():
        return jsonify({"status": "ok", "version": VERSION})

    @app.get("/")
    def index():
        return send_from_directory(STATIC_DIR, "index.html")

    @app.get("/res/<path:name>")
    def resource(name):
        return send_from_directory(STATIC_DIR, name)

    @app.errorhandler(NotFound)
    def not_found(exc):
        return jsonify({"error": str(exc)}), 404

    install_json_errors(app, log)

    @app.after_request
    def security_headers(response):
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Content-Security-Policy", "frame-ancestors 'none'")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response
    return app


def _tail(path, lines, follow, heartbeat=60.0):
    """The last `lines` lines of a log, then (follow) new lines as they come, with heartbeats."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
            yield b"".join(data.splitlines(keepends=True)[-lines:])
            if not follow:
                return
            last = time.monotonic()
            while True:
                chunk = handle.read()
                if chunk:
                    yield chunk
                    last = time.monotonic()
                elif time.monotonic() - last > heartbeat:
                    yield b"[vmm heartbeat]\n"
                    last = time.monotonic()
                else:
                    time.sleep(0.5)
    except FileNotFoundError:
        yield b""
