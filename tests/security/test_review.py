"""What an attacker's review of issue 11's fixes found, each as found, now refused.

- SignCert embedded the RA-TLS attestation document's text as sent: fields nobody checked (a
  duplicate "quote", another app_id, "attestation_mode": "dstack-tdx" to a simulation KMS, a
  false vm_config, zero report_data) went into the leaf under the app's CA.
- An X25519 low-order point as ephemeral key: the nonce was used up and "release" audited, then
  sealing failed with a 500.
- SignCert validity windows that are empty once capped by the CA: a 500 or a 400 after the nonce
  was used up; not_before=0 was read as "not given".
- A csr that is no string, a lone surrogate ("\\ud800") in any JSON string, a non-ASCII bearer
  token, deep JSON given to dstack-verify: 500s or tracebacks.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ansible_collections.dstack.tee.plugins.module_utils import app_certs, key_release
from .test_kms_attacks import ALLOWED_IMAGE, image_kms, launched
from .test_vmm import COMPOSE_TEXT, _start, _stop

VERIFY = str(Path(sys.executable).parent / "dstack-verify")


def _csr():
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "r")]))
           .sign(key, hashes.SHA256()))
    return key, csr


def _sign_cert_request(sim, client, root_id, csr, **extra):
    nonce = client.call("GetNonce")["nonce"]
    request = {"nonce": nonce, "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
               "event_log": launched(sim, root_id, ALLOWED_IMAGE), "vm_config": "",
               "quote": sim.get_quote(key_release.sign_cert_report_data(
                   nonce, csr.public_bytes(serialization.Encoding.DER))).hex()}
    request.update(extra)
    return request


def _document(sim, csr, log, **fields):
    """The guest's attestation document over the CSR's key, with `fields` changed (None: left out)."""
    report_data = app_certs.ratls_report_data(csr.public_key())
    doc = {"version": app_certs.ATTESTATION_VERSION, "attestation_mode": "dstack-sim",
           "quote": sim.get_quote(report_data).hex(), "event_log": log, "report_data": report_data.hex(),
           "vm_config": ""}
    doc.update(fields)
    return json.dumps({k: v for k, v in doc.items() if v is not None})


@pytest.mark.parametrize("change, error", [
    (lambda doc: doc.replace('{"version"', '{"quote":"00","version"'), "has a field twice"),
    (lambda doc: doc[:-1] + ',"app_id":"' + "a1" * 20 + '"}', "must have exactly the fields"),
    (lambda doc: doc.replace('"attestation_mode": "dstack-sim"', '"attestation_mode": "dstack-tdx"'),
     "attestation.attestation_mode"),
    (lambda doc: doc.replace('"vm_config": ""', '"vm_config": "{\\"os_image_hash\\": \\"' + "44" * 32 + '\\"}"'),
     "attestation.vm_config"),
])
def test_sign_cert_embeds_only_what_it_checked(tmp_path, change, error):
    sim, app, client, root_id = image_kms(tmp_path)
    _key, csr = _csr()
    request = _sign_cert_request(sim, client, root_id, csr)
    honest = _document(sim, csr, request["event_log"])
    response = client.client.post("/prpc/KMS.SignCert", json=dict(request, attestation=change(honest)))
    assert response.status_code in (400, 403) and error in response.get_json()["error"], response.get_json()
    assert app.extensions["dstack_kms"].nonces.consumed_count() == 0
    # The honest document is embedded as the canonical document of the checked fields.
    response = client.client.post("/prpc/KMS.SignCert", json=dict(request, attestation=honest))
    assert response.status_code == 200, response.get_json()
    leaf = x509.load_pem_x509_certificate(response.get_json()["certificate_chain"][0].encode())
    embedded = leaf.extensions.get_extension_for_oid(x509.ObjectIdentifier(app_certs.OID_ATTESTATION)).value.value
    parsed = json.loads(honest)
    assert embedded == app_certs.attestation_document(
        "dstack-sim", bytes.fromhex(parsed["quote"]), parsed["event_log"], bytes.fromhex(parsed["report_data"]), "")


def test_sign_cert_refuses_report_data_that_is_not_the_keys(tmp_path):
    sim, _app, client, root_id = image_kms(tmp_path)
    _key, csr = _csr()
    request = _sign_cert_request(sim, client, root_id, csr)
    document = _document(sim, csr, request["event_log"], report_data="00" * 64)
    response = client.client.post("/prpc/KMS.SignCert", json=dict(request, attestation=document))
    assert response.status_code == 403 and "attestation.report_data" in response.get_json()["error"]


def test_a_low_order_ephemeral_key_is_refused_before_anything(tmp_path):
    sim, app, client, root_id = image_kms(tmp_path)
    nonce = client.call("GetNonce")["nonce"]
    low_order = "00" * 32
    response = client.client.post("/prpc/KMS.GetAppKey", json={
        "nonce": nonce, "ephemeral_public_key": low_order, "event_log": launched(sim, root_id, ALLOWED_IMAGE),
        "vm_config": "", "quote": sim.get_quote(key_release.key_release_report_data(nonce, low_order)).hex()})
    assert response.status_code == 403 and "ephemeral_public_key" in response.get_json()["error"]
    service = app.extensions["dstack_kms"]
    assert service.nonces.consumed_count() == 0
    assert [line["decision"] for line in service.audit.read()] == ["refuse"]


@pytest.mark.parametrize("times", [{"not_before": 253402300000}, {"not_before": 253402300000, "not_after": 253402300799}])
def test_empty_validity_windows_are_400s_that_use_no_nonce(tmp_path, times):
    sim, app, client, root_id = image_kms(tmp_path)
    _key, csr = _csr()
    response = client.client.post("/prpc/KMS.SignCert", json=_sign_cert_request(sim, client, root_id, csr, **times))
    assert response.status_code == 400 and response.get_json()["error"].startswith("not_after"), response.get_json()
    assert app.extensions["dstack_kms"].nonces.consumed_count() == 0


def test_not_before_zero_is_a_time(tmp_path):
    sim, _app, client, root_id = image_kms(tmp_path)
    _key, csr = _csr()
    response = client.client.post("/prpc/KMS.SignCert", json=_sign_cert_request(
        sim, client, root_id, csr, not_before=0, not_after=3600))
    assert response.status_code == 200, response.get_json()
    leaf = x509.load_pem_x509_certificate(response.get_json()["certificate_chain"][0].encode())
    assert leaf.not_valid_before_utc.timestamp() == 0 and leaf.not_valid_after_utc.timestamp() == 3600


@pytest.mark.parametrize("csr", [None, 5, True, ["x"], {"a": 1}, 1.5])
def test_a_csr_that_is_no_text_is_a_400(tmp_path, csr):
    _sim, _app, client, _root_id = image_kms(tmp_path)
    response = client.client.post("/prpc/KMS.SignCert", json={"nonce": client.call("GetNonce")["nonce"], "csr": csr})
    assert response.status_code == 400 and response.get_json()["error"].startswith("csr")


def test_lone_surrogates_are_400s_at_the_kms(tmp_path):
    sim, _app, client, root_id = image_kms(tmp_path)
    log = json.loads(launched(sim, root_id, ALLOWED_IMAGE))
    log[0]["event"] = "\ud800"
    nonce = client.call("GetNonce")["nonce"]
    _private, public = key_release.new_ephemeral_key()
    body = json.dumps({"nonce": nonce, "ephemeral_public_key": public.hex(), "vm_config": "", "event_log": json.dumps(log),
                       "quote": sim.get_quote(key_release.key_release_report_data(nonce, public)).hex()})
    response = client.client.post("/prpc/KMS.GetAppKey", data=body, content_type="application/json")
    assert response.status_code in (400, 403) and "Unicode" in response.get_json()["error"], response.get_json()


def test_lone_surrogates_are_400s_at_the_guest_agent(tmp_path):
    from ansible_collections.dstack.tee.agents.guest import cli  # pylint: disable=import-outside-toplevel
    from ansible_collections.dstack.tee.agents.guest.api import create_app  # pylint: disable=import-outside-toplevel
    ctx, _summary = cli.simulated_cvm(str(tmp_path / "cvm"))
    guest = create_app(ctx).test_client()
    for path, body in (("/EmitEvent", '{"event": "\\ud800", "payload": ""}'),
                       ("/GetKey", '{"path": "\\ud800", "purpose": "x"}'),
                       ("/prpc/Tappd.DeriveKey", '{"path": "\\ud800"}')):
        response = guest.post(path, data=body, content_type="application/json")
        assert response.status_code == 400 and "Unicode" in response.get_json()["error"], (path, response.get_json())


def test_vmm_surrogates_and_non_ascii_tokens(short_tmp):
    vmm = _start(short_tmp, "--token", "right-token")
    try:
        auth = {"Authorization": "Bearer right-token"}
        body = json.dumps({"name": "s", "compose_file": COMPOSE_TEXT, "user_config": "\ud800", "stopped": True})
        status, answer = vmm.request("POST", "/prpc/Vmm.CreateVm", body, {"Content-Type": "application/json", **auth})
        assert status == 400 and "Unicode" in answer["error"]
        status, answer = vmm.request("POST", "/prpc/Vmm.Status", "{}", {
            "Content-Type": "application/json", "Authorization": "Bearer \u00ff\u00fe"})
        assert status == 401
        status, answer = vmm.request("POST", "/prpc/Vmm.Status", "{}", {"Content-Type": "application/json", **auth})
        assert status == 200 and answer["vms"] == []
    finally:
        _stop(vmm, short_tmp)


def test_dstack_verify_names_deep_json_input(tmp_path):
    (tmp_path / "quote.json").write_text("{" + '"a":[' * 5000 + "1" + "]" * 5000 + "}")
    proc = subprocess.run([VERIFY, str(tmp_path / "quote.json"), "--collateral", str(tmp_path / "none.json")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and "QUOTE_FILE" in proc.stderr and "Traceback" not in proc.stderr
