"""Issue 11, findings 1, 2, 4 and 8 (the KMS's part): each attack as it was found, now refused.

1. Cross-app key theft: code in app B's CVM, holding only B's dstack.sock and the KMS URL, emitted
   app A's identity events (EmitEvent), relabelled its own identity events and system-ready to
   another event_type (replayed from their digest, so RTMR3 still matched) and got app A's keys,
   a certificate under A's CA, and a dstack-verify report naming app A.
2. The OS image check trusted the request's vm_config: a CVM whose measured image was not allowed
   got keys by claiming an allowed one.
4. Nonce flood: 10,000 global outstanding nonces; one client filled them and honest CVMs got 429.
8. SignCert with not_after 10^30 or not_before "abc" was a 500, after the nonce was used up.

Real parts: the guest agent's boot and socket API (Flask app over the CVM's context), the KMS's
Flask app, the simulated TDX, the modules that make the config share, the dstack-verify command.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))

# pylint: disable=wrong-import-position
from ansible_collections.dstack.tee.agents.guest.api import create_app as guest_app  # noqa: E402
from ansible_collections.dstack.tee.agents.guest.boot import Boot  # noqa: E402
from ansible_collections.dstack.tee.agents.guest.context import GuestContext  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils import root_keys  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils import eventlog, kdf, key_release  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.kms_client import KmsRefused  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils import tdx_sim  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx  # noqa: E402
from test_guest_boot import OS_IMAGE, NoContainers, make_share  # noqa: E402
from test_kms import InProcessKms, make_kms  # noqa: E402

VERIFY = str(Path(sys.executable).parent / "dstack-verify")
# App A: another tenant's app. Its ids are public (its own attestation shows them).
A_ID, A_HASH, A_INSTANCE = "a1" * 20, "a2" * 32, "a3" * 20
IDENTITY = ("app-id", "compose-hash", "instance-id")
KEY_FIELDS = ("disk_crypt_key", "env_crypt_key", "k256_key")


def allow_both(path, app_b):
    path.write_text(json.dumps({"osImages": ["0x" + OS_IMAGE], "apps": {
        "0x" + A_ID: {"composeHashes": ["0x" + A_HASH], "allowAnyDevice": True},
        "0x" + app_b["app_id"]: {"composeHashes": ["0x" + app_b["compose_hash"]], "allowAnyDevice": True}}}))


@pytest.fixture
def app_b(tmp_path, module):
    """App B's CVM, booted for real through the KMS (both apps are allowed: B is a paying tenant)."""
    sim = SimTdx(str(tmp_path / "sim"))
    kms_app, kms = make_kms(tmp_path, sim)
    share, app = make_share(tmp_path, module, kms)
    allow_both(tmp_path / "auth-config.json", app)
    ctx = GuestContext.open(str(share), str(tmp_path / "work"), tee="sim", sim_state_dir=sim.state_dir)
    Boot(ctx, kms_client=kms, runner=NoContainers()).run()
    return {"sim": sim, "kms_app": kms_app, "kms": kms, "ctx": ctx, "guest": guest_app(ctx).test_client(),
            "app": app}


def relabel_own_identity(event_log):
    """The forger's step: B's own identity events and system-ready become another event_type (their
    digests stay, so the log still replays to RTMR3), leaving A's events as the ones a reader sees."""
    log = json.loads(event_log)
    seen = set()
    for entry in log:
        name = entry["event"]
        if name in IDENTITY + ("system-ready",) and name not in seen:
            seen.add(name)
            entry["event_type"] = 1
    return json.dumps(log)


def emit_a_identity(guest):
    return [guest.post("/EmitEvent", json={"event": name, "payload": value}).status_code
            for name, value in zip(IDENTITY, (A_ID, A_HASH, A_INSTANCE))]


def quote_over(guest, report_data):
    answer = guest.post("/GetQuote", json={"report_data": report_data.hex()})
    assert answer.status_code == 200, answer.json
    return answer.json


def a_releases(kms_app):
    return [line for line in kms_app.extensions["dstack_kms"].audit.read()
            if line.get("app_id") == A_ID and line["decision"] == "release"]


def steal_keys(world, kms=None, relabel=True):
    """GetAppKey with B's quote and (relabel) the relabelled event log: the attack of finding 1."""
    kms = kms or world["kms"]
    nonce = kms.call("GetNonce")["nonce"]
    _private, public = key_release.new_ephemeral_key()
    answer = quote_over(world["guest"], key_release.key_release_report_data(nonce, public))
    return kms.client.post("/prpc/KMS.GetAppKey", json={
        "nonce": nonce, "ephemeral_public_key": public.hex(), "quote": answer["quote"], "vm_config": answer["vm_config"],
        "event_log": relabel_own_identity(answer["event_log"]) if relabel else answer["event_log"]})


def steal_certificate(world):
    """SignCert for a key of B's under A's app CA, with the same forged log."""
    kms = world["kms"]
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a")]))
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    nonce = kms.call("GetNonce")["nonce"]
    der = x509.load_pem_x509_csr(csr).public_bytes(serialization.Encoding.DER)
    answer = quote_over(world["guest"], key_release.sign_cert_report_data(nonce, der))
    return kms.client.post("/prpc/KMS.SignCert", json={
        "nonce": nonce, "csr": csr.decode(), "quote": answer["quote"],
        "event_log": relabel_own_identity(answer["event_log"]), "vm_config": answer["vm_config"]})


def dstack_verify(tmp_path, world, answer):
    (tmp_path / "quote.json").write_text(json.dumps(answer))
    (tmp_path / "collateral.json").write_text(world["sim"].collateral_json())
    sim_dir = tmp_path / "verifier-sim"  # the verifier's own copy of the simulated platform's PKI
    shutil.copytree(world["sim"].state_dir, sim_dir, ignore=shutil.ignore_patterns("rtmrs.json*"))
    proc = subprocess.run([VERIFY, str(tmp_path / "quote.json"), "--collateral", str(tmp_path / "collateral.json"),
                           "--sim-state", str(sim_dir)], capture_output=True, text=True, timeout=60, check=False)
    return proc.returncode, json.loads(proc.stdout or "{}")


def test_finding_1_an_app_cannot_measure_another_apps_identity(app_b):
    # After the boot (system-ready), EmitEvent used to accept the boot's own names.
    assert emit_a_identity(app_b["guest"]) == [400, 400, 400]
    names = [e.name for e in app_b["ctx"].runtime_events()]
    assert names.count("app-id") == 1 and names[-1] == "system-ready"
    # App events with names of their own still work.
    assert app_b["guest"].post("/EmitEvent", json={"event": "app-ready", "payload": "01"}).status_code == 200


def test_finding_1_the_relabelled_log_gets_no_keys_no_certificate_and_no_verification(app_b, tmp_path):
    emit_a_identity(app_b["guest"])  # refused now; the forger goes on with what it has
    released = steal_keys(app_b)
    assert released.status_code == 403, released.json
    assert "event_log" in released.json["error"]
    signed = steal_certificate(app_b)
    assert signed.status_code == 403, signed.json
    assert a_releases(app_b["kms_app"]) == []
    # What anyone verifying the quote sees: refused, never "app A".
    answer = quote_over(app_b["guest"], b"verify")
    answer["event_log"] = relabel_own_identity(answer["event_log"])
    code, report = dstack_verify(tmp_path, app_b, answer)
    assert code == 1 and report["boot_info"]["app_id"] != A_ID
    assert [c["name"] for c in report["checks"] if not c["ok"]] == ["event_log"]


def test_finding_1_even_if_rtmr3_held_another_apps_events_they_are_not_identity(app_b, tmp_path):
    """Defence in depth: were a guest bug to let the app measure A's events after system-ready,
    neither the honest log (A's events after system-ready) nor a relabelled one names app A."""
    for name, value in zip(IDENTITY, (A_ID, A_HASH, A_INSTANCE)):
        app_b["ctx"].emit_event(name, bytes.fromhex(value))  # past the API, straight into RTMR3
    released = steal_keys(app_b)
    assert released.status_code == 403 and "event_log" in released.json["error"]
    response = steal_keys(app_b, relabel=False)
    assert response.status_code == 403 and "follows system-ready" in response.json["error"]
    assert a_releases(app_b["kms_app"]) == []
    code, report = dstack_verify(tmp_path, app_b, quote_over(app_b["guest"], b"verify"))
    assert code == 1 and report["boot_info"]["app_id"] != A_ID


def test_finding_1_a_cvm_that_measured_another_kms_gets_nothing_from_this_one(app_b, tmp_path):
    """The key-provider event (before boot-mr-done) names the KMS the CVM trusts: another KMS,
    holding other root keys, refuses it (and the guest refuses keys from a KMS it did not measure)."""
    (tmp_path / "other").mkdir()
    shutil.copy(tmp_path / "auth-config.json", tmp_path / "other" / "auth-config.json")
    other_app, other = make_kms(tmp_path / "other", app_b["sim"])
    response = steal_keys(app_b, kms=other, relabel=False)
    assert response.status_code == 403 and "key_provider" in response.json["error"]
    assert other_app.extensions["dstack_kms"].audit.read()[-1]["decision"] == "refuse"


# ---- finding 2: the OS image ---------------------------------------------------------------------

ALLOWED_IMAGE, OTHER_IMAGE = "11" * 32, "44" * 32


def launched(sim, kms_root_id, measured_image, launch_image=None, app_id=A_ID, compose_hash=A_HASH):
    """A CVM whose guest measured measured_image into RTMR3, up to boot-mr-done; returns the event
    log JSON. With launch_image, the simulated firmware measured that image into MRTD/RTMR0-2
    (otherwise they are zero: a simulation KMS pins nothing by default)."""
    if launch_image:
        sim.reset_rtmrs({"os_image_hash": launch_image})
    else:
        sim.reset_rtmrs()
    events = [eventlog.RuntimeEvent(n, p) for n, p in (
        ("system-preparing", b""), ("app-id", bytes.fromhex(app_id)), ("compose-hash", bytes.fromhex(compose_hash)),
        ("instance-id", bytes.fromhex(A_INSTANCE)), ("os-image-hash", bytes.fromhex(measured_image)),
        ("key-provider", json.dumps({"name": "kms", "id": kms_root_id}, separators=(",", ":")).encode()),
        ("boot-mr-done", b""))]
    for event in events:
        sim.extend_rtmr(3, event.digest())
    return json.dumps([e.to_log_entry() for e in events])


def image_kms(tmp_path, **config):
    sim = SimTdx(str(tmp_path / "sim"))
    (tmp_path / "auth-config.json").write_text(json.dumps({"osImages": ["0x" + ALLOWED_IMAGE], "apps": {
        "0x" + A_ID: {"composeHashes": ["0x" + A_HASH], "allowAnyDevice": True}}}))
    app, client = make_kms(tmp_path, sim, **config)
    return sim, app, client, app.extensions["dstack_kms"].key_provider_id()


def test_finding_2_a_cvm_cannot_claim_an_allowed_os_image(tmp_path):
    sim, app, client, root_id = image_kms(tmp_path)
    log = launched(sim, root_id, OTHER_IMAGE)
    # As found: the request's vm_config named the allowed image, and its value replaced the measured one.
    with pytest.raises(KmsRefused, match="os_image_hash"):
        client.get_app_key(sim, log, json.dumps({"os_image_hash": ALLOWED_IMAGE}))
    # Without the claim, the measured image is what is checked: not allowed.
    with pytest.raises(KmsRefused, match="OS image is not allowed"):
        client.get_app_key(sim, log, "")
    assert [line["decision"] for line in app.extensions["dstack_kms"].audit.read()] == ["refuse", "refuse"]
    assert app.extensions["dstack_kms"].audit.read()[-1]["os_image_hash"] == OTHER_IMAGE
    # The allowed image, measured, gets its keys.
    keys = client.get_app_key(sim, launched(sim, root_id, ALLOWED_IMAGE), json.dumps({"os_image_hash": ALLOWED_IMAGE}))
    assert keys["os_image_hash"] == ALLOWED_IMAGE


def test_finding_2_pinned_measurements_bind_the_image_to_mrtd_and_rtmr0_2(tmp_path):
    pins = {k.replace("mr_td", "mrtd"): v.hex() for k, v in tdx_sim.launch_measurements({"os_image_hash": ALLOWED_IMAGE}).items()
            if k != "rtmr0"}
    sim, _app, client, root_id = image_kms(tmp_path, policy={"os_image_measurements": {ALLOWED_IMAGE: pins}})
    assert client.get_app_key(sim, launched(sim, root_id, ALLOWED_IMAGE, launch_image=ALLOWED_IMAGE), "")["k256_key"]
    # A guest that measures the allowed image's name while another image was launched: MRTD differs.
    with pytest.raises(KmsRefused, match="mrtd: differs from the value pinned"):
        client.get_app_key(sim, launched(sim, root_id, ALLOWED_IMAGE, launch_image=OTHER_IMAGE), "")
    # Production's default: no pin, no keys (here asked of a simulation KMS with the same setting).
    (tmp_path / "strict").mkdir()
    sim2, _app2, strict, root2 = image_kms(tmp_path / "strict", policy={"require_os_image_measurements": True})
    with pytest.raises(KmsRefused, match="no MRTD and RTMR0-2 are pinned"):
        strict.get_app_key(sim2, launched(sim2, root2, ALLOWED_IMAGE), "")


# ---- finding 4: nonces -------------------------------------------------------------------------

def test_finding_4_a_nonce_flood_does_not_stop_honest_cvms(tmp_path):
    sim, app, client, root_id = image_kms(tmp_path)
    # As found: one client took 10,000 nonces (the global cap) and every honest CVM got 429.
    flood = app.test_client()
    for _i in range(10_050):
        response = flood.post("/prpc/KMS.GetNonce", json={})
        assert response.status_code == 200
    assert client.get_app_key(sim, launched(sim, root_id, ALLOWED_IMAGE), "")["k256_key"]
    assert app.extensions["dstack_kms"].nonces.consumed_count() == 1


def test_finding_4_replicas_with_the_same_root_keys_check_each_others_nonces(tmp_path):
    sim, first_app, first, root_id = image_kms(tmp_path)
    # A replica: the same root keys (as onboarding gives it), its own state directory.
    keys = first_app.extensions["dstack_kms"].keys
    ca_key, ca_cert, k256 = root_keys.pem_forms(keys)
    root_keys.install(str(tmp_path / "replica"), ca_key, ca_cert, k256)
    replica_app, _replica = make_kms(tmp_path, sim, state_dir=str(tmp_path / "replica"))
    replica = InProcessKms(replica_app)
    nonce = first.call("GetNonce")["nonce"]
    private, public = key_release.new_ephemeral_key()
    request = {"nonce": nonce, "ephemeral_public_key": public.hex(), "vm_config": "",
               "event_log": launched(sim, root_id, ALLOWED_IMAGE),
               "quote": sim.get_quote(key_release.key_release_report_data(nonce, public)).hex()}
    sealed = replica.call("GetAppKey", request)
    released = key_release.open_sealed(sealed, bytes.fromhex(nonce), private)
    expected = kdf.derive_app_keys(keys.ca_key, keys.k256_key, A_ID, A_INSTANCE)
    assert released["k256_key"] == expected.k256_key.hex()
    with pytest.raises(KmsRefused, match="already used"):
        replica.call("GetAppKey", request)


# ---- finding 8: SignCert input ---------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("not_after", 10 ** 30), ("not_before", "abc"), ("alt_names", "x"),
                                          ("usage_client_auth", "maybe")])
def test_finding_8_bad_sign_cert_fields_are_400_and_use_no_nonce(tmp_path, field, value):
    sim, app, client, root_id = image_kms(tmp_path)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a")]))
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    nonce = client.call("GetNonce")["nonce"]
    der = x509.load_pem_x509_csr(csr).public_bytes(serialization.Encoding.DER)
    log = launched(sim, root_id, ALLOWED_IMAGE)
    request = {"nonce": nonce, "csr": csr.decode(), "event_log": log,
               "vm_config": json.dumps({"os_image_hash": ALLOWED_IMAGE}),
               "quote": sim.get_quote(key_release.sign_cert_report_data(nonce, der)).hex()}
    bad = client.client.post("/prpc/KMS.SignCert", json=dict(request, **{field: value}))
    assert bad.status_code == 400 and bad.get_json()["error"].startswith(field), bad.get_json()
    assert app.extensions["dstack_kms"].nonces.consumed_count() == 0
    good = client.client.post("/prpc/KMS.SignCert", json=request)  # the same nonce, still good
    assert good.status_code == 200 and len(good.get_json()["certificate_chain"]) == 3


@pytest.mark.parametrize("method, field", [("GetAppKey", "vm_config"), ("GetAppKey", "event_log"),
                                           ("SignCert", "attestation"), ("SignCert", "event_log")])
def test_finding_8_deep_json_inside_a_field_is_refused_not_a_500(tmp_path, method, field):
    """JSON carried in a string field is parsed with the same depth limit as the request body."""
    sim, _app, client, root_id = image_kms(tmp_path)
    nonce = client.call("GetNonce")["nonce"]
    log = launched(sim, root_id, ALLOWED_IMAGE)
    _private, public = key_release.new_ephemeral_key()
    request = {"nonce": nonce, "ephemeral_public_key": public.hex(), "event_log": log, "vm_config": "",
               "quote": sim.get_quote(key_release.key_release_report_data(nonce, public)).hex()}
    if method == "SignCert":
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a")]))
               .sign(key, hashes.SHA256()))
        request["csr"] = csr.public_bytes(serialization.Encoding.PEM).decode()
        request["quote"] = sim.get_quote(key_release.sign_cert_report_data(
            nonce, csr.public_bytes(serialization.Encoding.DER))).hex()
    request[field] = "[" * 100_000
    response = client.client.post(f"/prpc/KMS.{method}", json=request)
    assert response.status_code in (400, 403), response.get_json()
    error = response.get_json()["error"]
    assert "deeper than" in error or error.startswith(f"{field}: is not"), error
