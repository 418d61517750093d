# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The gateway's HTTP APIs at dstack's paths, JSON in and out.

create_app(config): the control API, served over mutual TLS (the CVM's RA-TLS client
certificate is optional at the TLS layer, required by RegisterCvm and GetPeers):
    /prpc/Gateway.RegisterCvm {client_public_key, port_policy?}
    /prpc/Gateway.Info, /prpc/Gateway.GetPeers, /prpc/Gateway.AcmeInfo, /health
create_admin_app(config, service): the Admin API on its own listener, every route behind
`Authorization: Bearer <admin.token>`:
    /prpc/Admin.Status, Admin.GetInfo {id}, Admin.GetMeta, Admin.RemoveInstance {id},
    Admin.SetPortPolicy {app_id, policy}, Admin.RenewCert {name?} -> {renewed} (the wildcard, or a declared custom domain's), Admin.SetCaa {} -> {}
    (the last two with [core.certbot]: agents/gateway/acme.py)
serve_both(control, admin, admin_port): one WSGI app that hands each request to the app of the
listener it arrived on (one gunicorn, two binds).

Errors: {"error": "..."}; 400 bad input, 401 no or a wrong admin token, 403 refused (the check
named), 503 the gateway cannot now (no free address, WireGuard hub), 500 only its type.

The client certificate: under gunicorn the WSGI environ holds the TLS socket
("gunicorn.socket"); its verified chain (the leaf first) is read there. Any other server (and a
test client) may put the DER chain in environ["dstack.peer_cert_chain"]; a client cannot set
environ keys, only headers.
"""

import hmac
import logging
import ssl

from flask import Flask, jsonify, request

from ansible_collections.dstack.tee.agents.gateway.service import GatewayService, Refused, Unavailable
from ansible_collections.dstack.tee.agents.wsgi import add_prpc_routes, install_json_errors
from ansible_collections.dstack.tee.plugins.module_utils import ra_tls

MAX_REQUEST_BYTES = 64 * 1024
PEER_CHAIN_ENVIRON = "dstack.peer_cert_chain"
log = logging.getLogger("dstack.gateway")


def client_certificate_chain(environ):
    """The TLS client's certificates as DER bytes, the leaf first ([] when it sent none)."""
    given = environ.get(PEER_CHAIN_ENVIRON)
    if given is not None:
        return [bytes(der) for der in given]
    sock = environ.get("gunicorn.socket")
    return ra_tls.peer_chain(sock) if isinstance(sock, ssl.SSLSocket) else []


def _errors(app):
    install_json_errors(app, log, {Refused: 403, Unavailable: 503})


def create_app(config, service=None, hub=None):
    """The control API (Gateway.*). `config`: agents/gateway/config.py's load_config result."""
    app = Flask("dstack-gateway")
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    service = service or GatewayService(config, hub=hub)
    app.extensions["dstack_gateway"] = service

    def peer_chain():
        return client_certificate_chain(request.environ)

    add_prpc_routes(app, "/prpc/Gateway.", {
        "RegisterCvm": lambda params: service.register_cvm(peer_chain(), params)}, methods=["POST"])
    add_prpc_routes(app, "/prpc/Gateway.", {
        "Info": lambda params: service.info(),
        "GetPeers": lambda params: service.get_peers(peer_chain()),
        "AcmeInfo": lambda params: service.acme_info(),
    })

    @app.get("/health")
    def health():
        return jsonify({"status": "ok"})

    _errors(app)
    return app


def create_admin_app(config, service):
    """The Admin API; every route needs the bearer token admin.token."""
    app = Flask("dstack-gateway-admin")
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    token = config["admin"]["token"]
    app.extensions["dstack_gateway"] = service

    @app.before_request
    def check_token():
        given = request.headers.get("Authorization", "")
        scheme, _sep, value = given.partition(" ")
        if not token or scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            return jsonify({"error": "unauthorized: the Admin API needs Authorization: Bearer <admin.token>"}), 401
        return None

    add_prpc_routes(app, "/prpc/Admin.", {
        "Status": lambda params: service.status(),
        "GetInfo": service.get_info,
        "GetMeta": lambda params: service.get_meta(),
        "RemoveInstance": service.remove_instance,
        "SetPortPolicy": service.set_port_policy,
        "RenewCert": service.renew_cert,
        "SetCaa": service.set_caa,
    })
    _errors(app)
    return app


def serve_both(control, admin, admin_port):
    """One WSGI app for two listeners: requests that arrived on admin_port go to `admin`, the rest
    to `control` (the listener is the accepted socket's own port, which no client can choose)."""
    def application(environ, start_response):
        sock = environ.get("gunicorn.socket")
        try:
            port = sock.getsockname()[1] if sock is not None else None
        except OSError:
            port = None
        target = admin if admin is not None and port == admin_port else control
        return target(environ, start_response)
    return application
