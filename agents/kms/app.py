# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The KMS HTTP API: routes at dstack's paths (/prpc/KMS.<Method>), JSON in and out.

create_app(config) builds the Flask app; `dstack-kms serve` runs it under gunicorn over HTTPS.
JSON POST and GET with query parameters both work (as dstack's pRPC does); errors are
{"error": "..."} with 400 for bad input, 403 for a refused release.
"""

import logging

from flask import Flask, jsonify

from ansible_collections.dstack.tee.agents.wsgi import add_prpc_routes, install_json_errors, remote_addr
from ansible_collections.dstack.tee.agents.kms.service import KmsService, Refused

MAX_REQUEST_BYTES = 256 * 1024
log = logging.getLogger("dstack.kms")


def create_app(config):
    """The KMS Flask app. `config` is the KMS configuration dict (see agents/kms/config.py)."""
    app = Flask("dstack-kms")
    app.config["MAX_CONTENT_LENGTH"] = int(config.get("max_request_bytes", MAX_REQUEST_BYTES))
    service = KmsService(config)
    app.extensions["dstack_kms"] = service

    add_prpc_routes(app, "/prpc/KMS.", {
        "GetMeta": lambda params: service.get_meta(),
        "GetAppEnvEncryptPubKey": lambda params: service.env_pubkey(params.get("app_id", "")),
        "GetNonce": lambda params: service.new_nonce(),
        "GetAppKey": lambda params: service.get_app_key(params, remote_addr()),
        "SignCert": lambda params: service.sign_cert(params, remote_addr()),
        "GetKmsKey": lambda params: service.get_kms_key(params, remote_addr()),
    }, direct=True)  # a key release is two requests: without Flask's request machinery (wsgi._DirectPrpc)

    @app.get("/health")
    def health():
        return jsonify({"status": "ok", "mode": service.mode})

    install_json_errors(app, log, {Refused: 403})
    return app
