# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The guest agent's public Worker API (dstack's `Worker` service, its agent port 8090).

It listens on WORKER_PORT of the CVM's own network namespace (`dstack-guest-agent run --netns`),
so the gateway reaches it as `https://<app-id>-8090.<base_domain>` through the WireGuard tunnel.
Anyone may call it: it answers only what is public, never a key.

    GET  /                           a short JSON summary (app name and ids, version, the routes)
    POST|GET /prpc/Worker.Info       dstack's AppInfo, as the socket API's Info computes it, with
                                     tcb_info and vm_config "" unless app-compose's public_tcbinfo
                                     is true (dstack's get_info(external=true))
    POST|GET /prpc/Worker.Version    {version, rev}
    POST /prpc/Worker.Attest {"nonce": hex, 16-64 bytes}
                                     {quote, event_log, report_data, vm_config}: a fresh quote, as
                                     GetQuote answers, over report_data =
                                     attestation.worker_report_data(nonce) (SHA-512 of a label and
                                     the nonce), so a caller can never obtain the report_data of an
                                     RA-TLS certificate, a GetQuote or a KMS request
    GET  /logs/<container>?tail=N&timestamps=true&since=UNIX
                                     the last N lines (default 200, at most 10000) of one of the
                                     app's containers (or its service's), text; only when
                                     app-compose's public_logs is true (else 404), as dstack's
                                     (no follow: one answer, bounded)
    GET  /metrics                    the CVM's system info in Prometheus text (dstack's metric
                                     names, agents/guest/sysinfo.py), only when app-compose's
                                     public_sysinfo is true (else 404)

Anything else is 404 (the socket API's methods are not served here). Errors are JSON, as the
socket API's (api.install_errors): 400 naming the field, 413 too large, 503 not ready, 500/502.
"""

import logging

from ansible_collections.dstack.tee.agents.guest import sysinfo
from ansible_collections.dstack.tee.agents.guest.api import GuestApi, ServerFailure, install_errors
from ansible_collections.dstack.tee.agents.guest.context import VERSION
from ansible_collections.dstack.tee.agents.wsgi import request_params, run_gunicorn
from ansible_collections.dstack.tee.plugins.module_utils import attestation, compose_runner
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError, parse_hex

WORKER_PORT = 8090  # dstack's agent_port, the one the gateway's <app-id>-8090 names reach
MAX_REQUEST_BYTES = 64 * 1024  # a nonce; nothing here takes more
DEFAULT_THREADS = 8
GRACEFUL_TIMEOUT = 5
ROUTES = ("/prpc/Worker.Info", "/prpc/Worker.Version", "/prpc/Worker.Attest", "/logs/<container>", "/metrics")
log = logging.getLogger("dstack.guest.worker")


def _public(context, flag):
    """app-compose's public_tcbinfo / public_logs; only a literal true opens it (missing is false, as in dstack)."""
    try:
        return context.app_compose().get(flag) is True
    except DstackError as exc:
        raise ServerFailure(str(exc)) from None


def _query_int(name, default, low, high):
    from flask import request  # pylint: disable=import-outside-toplevel
    text = request.args.get(name)
    if text is None:
        return default
    if not text.isdigit() or not low <= int(text) <= high:
        raise DstackError(name, f"must be a whole number from {low} to {high}")
    return int(text)


def create_worker_app(context, config=None, runner=None):
    """The Worker's Flask app over a GuestContext. config: {"max_request_bytes": int} (optional);
    runner: a callable giving the app's ComposeRunner (for /logs), or None (no logs)."""
    # Flask only where the app is made: `dstack-guest-agent run` imports this module for its
    # constants, and forks the Worker API's child before that child imports Flask (beside the boot).
    from flask import Flask, Response, jsonify, request  # pylint: disable=import-outside-toplevel
    config = config or {}
    app = Flask("dstack-guest-worker")
    app.config["MAX_CONTENT_LENGTH"] = int(config.get("max_request_bytes") or MAX_REQUEST_BYTES)
    api = GuestApi(context)
    app.extensions["dstack_guest"] = api

    @app.route("/", methods=["GET"])
    def index():
        try:
            instance, name = context.instance(), str(context.app_compose().get("name", ""))
        except DstackError as exc:
            raise ServerFailure(str(exc)) from None
        return jsonify({"service": "dstack-guest-agent Worker", "app_name": name,
                        "app_id": instance.get("app_id", ""), "instance_id": instance.get("instance_id", ""),
                        "version": VERSION, "routes": list(ROUTES)})

    @app.route("/prpc/Worker.Info", methods=["GET", "POST"])
    def info():
        request_params()  # a body, if any, must still be a JSON object
        answer = api.info({})
        if not _public(context, "public_tcbinfo"):
            answer.update(tcb_info="", vm_config="")
        return jsonify(answer)

    @app.route("/prpc/Worker.Version", methods=["GET", "POST"])
    def version():
        request_params()
        return jsonify(api.version({}))

    @app.route("/prpc/Worker.Attest", methods=["POST"])
    def attest():
        nonce = parse_hex(request_params().get("nonce", ""), "nonce")
        return jsonify(api.get_quote({"report_data": attestation.worker_report_data(nonce).hex()}))

    @app.route("/logs/<container>", methods=["GET"])
    def logs(container):
        if runner is None or not _public(context, "public_logs"):
            return jsonify({"error": "not found: this app's logs are not public (app-compose public_logs)"}), 404
        tail = _query_int("tail", compose_runner.LOG_TAIL_DEFAULT, 1, compose_runner.LOG_TAIL_MAX)
        since = _query_int("since", None, 0, 2 ** 40)
        timestamps = request.args.get("timestamps", "false").lower() in ("1", "true", "yes")
        try:
            text = runner().logs(container, tail=tail, timestamps=timestamps, since=since)
        except DstackError as exc:
            if exc.field == "container":
                return jsonify({"error": f"not found: {exc.reason}"}), 404
            raise
        return Response(text, mimetype="text/plain")

    @app.route("/metrics", methods=["GET"])
    def metrics():
        if not _public(context, "public_sysinfo"):
            return jsonify({"error": "not found: this CVM's system info is not public (app-compose public_sysinfo)"}), 404
        return Response(sysinfo.prometheus(sysinfo.collect(("/", context.paths.work_dir))),
                        mimetype="text/plain; version=0.0.4")

    install_errors(app)
    return app


def serve(app, fd, threads=DEFAULT_THREADS, on_ready=None):
    """Serve the Worker app on an already listening TCP socket (file descriptor `fd`, bound by the
    parent in the CVM's namespace) until SIGTERM or SIGINT; returns only through SystemExit.
    Threaded workers with a deadline on each client read and write (wsgi.run_gunicorn): the port is public."""
    def when_ready(server):  # pylint: disable=unused-argument
        if on_ready:
            on_ready()

    run_gunicorn(app, bind=[f"fd://{fd}"], workers=1, threads=threads, timeout=60, graceful_timeout=GRACEFUL_TIMEOUT,
                 errorlog="-", loglevel="warning", proc_name="dstack-guest-worker", when_ready=when_ready)
