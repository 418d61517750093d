"""The KMS's pRPC routes served directly (wsgi.add_prpc_routes(direct=True), without Flask's request
machinery): the same status, headers and bytes as the Flask route for every kind of answer, the
client's address still in the audit log, and an app with request hooks never bypassed."""

import json

import flask
import pytest
from werkzeug.test import Client

from ansible_collections.dstack.tee.agents.kms.app import create_app
from ansible_collections.dstack.tee.plugins.module_utils.json_limits import MAX_JSON_DEPTH


@pytest.fixture(name="app")
def fixture_app(tmp_path):
    state = tmp_path / "kms"
    return create_app({"state_dir": str(state), "mode": "simulation", "sim_state_dir": str(tmp_path / "tdx-sim"),
                       "audit_log": str(tmp_path / "audit.log"),
                       "auth": {"type": "local", "path": str(tmp_path / "allow.json")}, "max_request_bytes": 4096})


def _answer(client, path, body, **kwargs):
    response = client.post(path, data=body, **kwargs)
    return response.status, response.headers.get("Content-Type"), response.get_data()


REQUESTS = [
    ("/prpc/KMS.GetMeta", b""),
    ("/prpc/KMS.GetMeta", b"{}"),
    ("/prpc/KMS.GetMeta", b"[1]"),                                        # not an object: 400
    ("/prpc/KMS.GetMeta", b"{not json"),                                  # 400
    ("/prpc/KMS.GetMeta", b"[" * (MAX_JSON_DEPTH + 1)),                  # too deep: 400
    ("/prpc/KMS.GetMeta", b'{"x": "' + b"a" * 5000 + b'"}'),              # past max_request_bytes: 413
    ("/prpc/KMS.GetAppEnvEncryptPubKey", b'{"app_id": "zz"}'),           # bad field: 400
    ("/prpc/KMS.GetAppKey", b'{"nonce": "00"}'),                          # refused (Refused): 403
    ("/prpc/KMS.GetAppKey", json.dumps({"nonce": "ab" * 32, "ephemeral_public_key": "00" * 32}).encode()),
    ("/prpc/KMS.SignCert", b'{"nonce": "ab"}'),                           # 400
    ("/prpc/KMS.GetKmsKey", b"{}"),                                       # 403
]


@pytest.mark.parametrize("path,body", REQUESTS)
def test_direct_answers_are_the_flask_answers(app, path, body):
    direct = app.test_client()
    through_flask = Client(app.extensions["dstack.direct_prpc"].flask_wsgi_app, flask.Response)
    answer = _answer(direct, path, body)
    assert answer == _answer(through_flask, path, body)
    assert answer[1] == "application/json"
    assert "error" in json.loads(answer[2]) or answer[0] == "200 OK"


def test_an_internal_error_is_the_same_500(app, monkeypatch):
    service = app.extensions["dstack_kms"]
    monkeypatch.setattr(service, "get_meta", lambda: {}["secret detail"])
    direct = _answer(app.test_client(), "/prpc/KMS.GetMeta", b"{}")
    assert direct == _answer(Client(app.extensions["dstack.direct_prpc"].flask_wsgi_app, flask.Response),
                             "/prpc/KMS.GetMeta", b"{}")
    assert direct[0] == "500 INTERNAL SERVER ERROR"
    assert json.loads(direct[2]) == {"error": "internal error (KeyError)"}


def test_a_plain_post_skips_flask_and_the_rest_goes_through_it(app):
    dispatched = []

    def started(sender, **_extra):
        dispatched.append(sender)

    flask.request_started.connect(started, app)
    try:
        client = app.test_client()
        assert client.post("/prpc/KMS.GetNonce", data=b"{}").status_code == 200
        assert not dispatched
        assert client.get("/prpc/KMS.GetNonce").status_code == 200          # GET: Flask
        assert client.post("/prpc/KMS.GetNonce?x=1", data=b"{}").status_code == 200  # a query: Flask
        assert client.get("/health").status_code == 200
        assert len(dispatched) == 3
    finally:
        flask.request_started.disconnect(started, app)


def test_the_client_address_reaches_the_audit_log(app):
    response = app.test_client().post("/prpc/KMS.GetAppKey", data=b'{"nonce": "00"}',
                                      environ_base={"REMOTE_ADDR": "10.1.2.3"})
    assert response.status_code == 403
    line = app.extensions["dstack_kms"].audit.read()[-1]
    assert line["remote_addr"] == "10.1.2.3"
    assert line["decision"] == "refuse"


def test_an_app_with_a_request_hook_is_never_bypassed(app):
    @app.before_request
    def no_entry():
        return flask.jsonify({"error": "hook"}), 401

    response = app.test_client().post("/prpc/KMS.GetNonce", data=b"{}")
    assert response.status_code == 401
    assert response.get_json() == {"error": "hook"}
