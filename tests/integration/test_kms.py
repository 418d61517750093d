"""The KMS: attested key release with dstack's derivations, and a negative suite that gets nothing.

Most tests drive the Flask app in process (create_app + test client); test_kms_server.py runs
the real `dstack-kms serve` process over HTTPS.
"""

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dstack_sdk
import pytest

from ansible_collections.dstack.tee.agents.guest import measure
from ansible_collections.dstack.tee.plugins.module_utils import root_keys
from ansible_collections.dstack.tee.agents.kms.app import create_app
from ansible_collections.dstack.tee.plugins.module_utils import app_compose, eventlog, kdf, key_release, tdx_quote
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.kms_client import KmsClient, KmsRefused
from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx

COMPOSE = app_compose.build("services:\n  web:\n    image: nginx\n", "kms-test")
COMPOSE_HASH = app_compose.compose_hash(COMPOSE)
APP_ID = COMPOSE_HASH[:40]
INSTANCE_ID = "ab" * 20
OS_IMAGE = "11" * 32
KEY_FIELDS = ("disk_crypt_key", "env_crypt_key", "k256_key", "k256_signature")


class InProcessKms(KmsClient):
    """The real client protocol, sent through Flask's test client instead of a socket."""

    def __init__(self, app):
        super().__init__("http://kms.test")
        self.client = app.test_client()
        self.last_answers = []

    def call(self, method, params=None):
        response = self.client.post(f"/prpc/KMS.{method}", json=params or {})
        body = response.get_json()
        self.last_answers.append(body)
        if response.status_code == 403:
            raise KmsRefused("kms", f"{method} refused: {body['error']}")
        if response.status_code != 200:
            raise DstackError("kms", f"{method} failed with HTTP {response.status_code}: {body.get('error')}")
        return body


def allowlist(path, app_id=APP_ID, compose_hashes=(COMPOSE_HASH,), os_images=(OS_IMAGE,)):
    path.write_text(json.dumps({"gatewayAppId": "", "osImages": ["0x" + h for h in os_images],
                                "apps": {"0x" + app_id: {"composeHashes": ["0x" + h for h in compose_hashes],
                                                         "devices": [], "allowAnyDevice": True}}}))


@pytest.fixture
def sim(tmp_path):
    return SimTdx(str(tmp_path / "sim"))


# The key-provider id (root CA public key) of the KMS each simulated platform's CVMs use, by the
# simulator's state dir: make_kms and KmsProcess register theirs, boot() measures it.
KMS_ROOTS = {}


def boot(sim, app_id=APP_ID, compose_hash=COMPOSE_HASH, instance_id=INSTANCE_ID, extra=(), os_image=OS_IMAGE,
         key_provider_id=None):
    """Measure a fresh boot into the simulator, as the guest does (launch measurements of the OS
    image, then RTMR3 up to boot-mr-done, then `extra`); return the event log JSON."""
    sim.reset_rtmrs({"os_image_hash": os_image})
    provider_id = KMS_ROOTS.get(sim.state_dir, "") if key_provider_id is None else key_provider_id
    events = [eventlog.RuntimeEvent("system-preparing"),
              eventlog.RuntimeEvent("app-id", bytes.fromhex(app_id)),
              eventlog.RuntimeEvent("compose-hash", bytes.fromhex(compose_hash)),
              eventlog.RuntimeEvent("instance-id", bytes.fromhex(instance_id)),
              eventlog.RuntimeEvent("os-image-hash", bytes.fromhex(os_image)),
              eventlog.RuntimeEvent("key-provider", measure.key_provider_payload("kms", provider_id)),
              eventlog.RuntimeEvent("boot-mr-done"), *extra]
    for event in events:
        sim.extend_rtmr(3, event.digest())
    return json.dumps([e.to_log_entry() for e in events])


def make_kms(tmp_path, sim, **config):
    allow = tmp_path / "auth-config.json"
    if not allow.exists():
        allowlist(allow)
    base = {"state_dir": str(tmp_path / "kms"), "mode": "simulation", "sim_state_dir": sim.state_dir,
            "auth": {"type": "local", "path": str(allow)}}
    base.update(config)
    app = create_app(base)
    KMS_ROOTS[sim.state_dir] = app.extensions["dstack_kms"].key_provider_id()
    return app, InProcessKms(app)


VM_CONFIG = json.dumps({"os_image_hash": OS_IMAGE})


def test_release_gives_dstacks_keys(tmp_path, sim):
    app, client = make_kms(tmp_path, sim)
    keys = client.get_app_key(sim, boot(sim), VM_CONFIG)
    root = root_keys.load(str(tmp_path / "kms"))
    expected = kdf.derive_app_keys(root.ca_key, root.k256_key, APP_ID, INSTANCE_ID)
    for name in KEY_FIELDS:
        assert keys[name] == getattr(expected, name).hex(), name
    assert keys["os_image_hash"] == OS_IMAGE and keys["key_provider"]["name"] == "kms"
    # The sealed answer on the wire carries no key in clear.
    wire = json.dumps(client.last_answers[-1])
    assert all(keys[name] not in wire for name in KEY_FIELDS)
    audit = app.extensions["dstack_kms"].audit.read()
    assert audit[-1]["decision"] == "release" and audit[-1]["app_id"] == APP_ID
    assert audit[-1]["compose_hash"] == COMPOSE_HASH and audit[-1]["tcb_status"] == "UpToDate"
    assert not any(keys[name] in json.dumps(audit) for name in KEY_FIELDS)


def test_restart_gives_the_same_keys(tmp_path, sim):
    _app, client = make_kms(tmp_path, sim)
    first = client.get_app_key(sim, boot(sim), VM_CONFIG)
    _app2, client2 = make_kms(tmp_path, sim)  # a new KMS process on the same state directory
    second = client2.get_app_key(sim, boot(sim), VM_CONFIG)
    assert {k: first[k] for k in KEY_FIELDS if k != "k256_signature"} == \
        {k: second[k] for k in KEY_FIELDS if k != "k256_signature"}


def test_env_pubkey_verifies_with_the_sdk(tmp_path, sim):
    _app, client = make_kms(tmp_path, sim)
    meta = client.get_meta()
    answer = client.get_app_env_encrypt_pubkey(APP_ID)
    signer = dstack_sdk.verify_env_encrypt_public_key(bytes.fromhex(answer["public_key"]),
                                                      bytes.fromhex(answer["signature_v1"]), APP_ID,
                                                      answer["timestamp"])
    assert signer == "0x" + meta["k256_pubkey"]
    assert meta["mode"] == "simulation" and meta["attestation_mode"] == "dstack-sim"


# ---- the negative suite: each refused, with the reason audited and no key in the answer ----------

def _refused(app, client, run, reason):
    with pytest.raises(KmsRefused) as err:
        run()
    assert reason in str(err.value), str(err.value)
    answer = client.last_answers[-1]
    assert set(answer) == {"error"}
    last = app.extensions["dstack_kms"].audit.read()[-1]
    assert last["decision"] == "refuse" and reason in last["reason"]
    return last


class Rebinding:
    """A provider that puts report_data for another ephemeral key into the quote."""

    def __init__(self, sim):
        self.sim = sim

    def get_quote(self, report_data):
        return self.sim.get_quote(bytes(64) if report_data else report_data)


def test_replayed_nonce(tmp_path, sim):
    app, client = make_kms(tmp_path, sim)
    log = boot(sim)
    nonce = client.call("GetNonce")["nonce"]
    _priv, pub = key_release.new_ephemeral_key()
    request = {"nonce": nonce, "ephemeral_public_key": pub.hex(), "event_log": log, "vm_config": VM_CONFIG,
               "quote": sim.get_quote(key_release.key_release_report_data(nonce, pub)).hex()}
    client.call("GetAppKey", request)
    _refused(app, client, lambda: client.call("GetAppKey", request), "nonce: was already used")


def test_expired_nonce(tmp_path, sim):
    app, client = make_kms(tmp_path, sim, nonce_ttl=0)
    _refused(app, client, lambda: client.get_app_key(sim, boot(sim), VM_CONFIG), "nonce: expired")


def test_report_data_bound_to_another_key(tmp_path, sim):
    app, client = make_kms(tmp_path, sim)
    _refused(app, client, lambda: client.get_app_key(Rebinding(sim), boot(sim), VM_CONFIG), "report_data")


def test_forged_quote_from_another_simulator(tmp_path, sim):
    app, client = make_kms(tmp_path, sim)
    other = SimTdx(str(tmp_path / "other-sim"))
    log = boot(other)
    sent = []

    class Recording:
        def get_quote(self, report_data):
            sent.append(other.get_quote(report_data))
            return sent[-1]

    last = _refused(app, client, lambda: client.get_app_key(Recording(), log, VM_CONFIG), "dcap")
    # The audit line names the quote by its signed parts (one quote, however its bytes are laid out).
    assert last["quote_identity"] == tdx_quote.quote_identity(sent[-1] + bytes(16))


def test_bit_flipped_quote(tmp_path, sim):
    app, client = make_kms(tmp_path, sim)

    class Flipping:
        def get_quote(self, report_data):
            quote = bytearray(sim.get_quote(report_data))
            quote[200] ^= 0x01  # inside mr_td, a signed field
            return bytes(quote)

    _refused(app, client, lambda: client.get_app_key(Flipping(), boot(sim), VM_CONFIG), "dcap")


def test_debug_td(tmp_path, sim):
    app, client = make_kms(tmp_path, sim)

    class Debug:
        def get_quote(self, report_data):
            return sim.get_quote(report_data, debug=True)

    _refused(app, client, lambda: client.get_app_key(Debug(), boot(sim), VM_CONFIG), "debug")


def test_out_of_date_tcb_under_the_default_policy(tmp_path, sim):
    (tmp_path / "collateral.json").write_text(sim.collateral_json(tcb_status="OutOfDate",
                                                                  advisory_ids=["INTEL-SA-00837"]))
    (tmp_path / "root.crt").write_bytes(sim.root_ca_pem)
    app, client = make_kms(tmp_path, sim, sim_state_dir=None, root_ca=str(tmp_path / "root.crt"),
                           collateral=str(tmp_path / "collateral.json"))
    _refused(app, client, lambda: client.get_app_key(sim, boot(sim), VM_CONFIG), "OutOfDate")


def test_tampered_event_log(tmp_path, sim):
    app, client = make_kms(tmp_path, sim)
    log = json.loads(boot(sim))
    log[2]["event_payload"] = "00" * 32  # claim another compose hash than the one measured
    _refused(app, client, lambda: client.get_app_key(sim, json.dumps(log), VM_CONFIG), "is not the digest")
    log[2]["digest"] = eventlog.event_digest("compose-hash", bytes(32)).hex()  # and restamp its digest
    _refused(app, client, lambda: client.get_app_key(sim, json.dumps(log), VM_CONFIG), "rtmr3_replay")


def test_compose_hash_not_allowed(tmp_path, sim):
    allowlist(tmp_path / "auth-config.json", compose_hashes=("22" * 32,))
    app, client = make_kms(tmp_path, sim)
    _refused(app, client, lambda: client.get_app_key(sim, boot(sim), VM_CONFIG), "compose hash not allowed")


def test_unknown_app(tmp_path, sim):
    app, client = make_kms(tmp_path, sim)
    log = boot(sim, app_id="33" * 20)
    _refused(app, client, lambda: client.get_app_key(sim, log, VM_CONFIG), "app not registered")


def test_os_image_not_allowed(tmp_path, sim):
    app, client = make_kms(tmp_path, sim)
    _refused(app, client, lambda: client.get_app_key(sim, boot(sim, os_image="44" * 32),
                                                     json.dumps({"os_image_hash": "44" * 32})),
             "OS image is not allowed")


def test_simulated_quote_sent_to_a_production_kms(tmp_path, sim):
    app, client = make_kms(tmp_path, sim, mode="production", sim_state_dir=None,
                           collateral=sim.collateral_json())
    assert client.get_meta()["attestation_mode"] == "dstack-tdx"
    last = _refused(app, client, lambda: client.get_app_key(sim, boot(sim), VM_CONFIG), "dcap")
    assert last["kms_mode"] == "production"


def test_production_refuses_a_simulated_trust_root(tmp_path, sim):
    with pytest.raises(DstackError, match="production trusts Intel's SGX Root CA only"):
        make_kms(tmp_path, sim, mode="production")


class _Hook(BaseHTTPRequestHandler):
    behaviour = "garbage"
    seen = []

    def do_POST(self):  # noqa: N802 (the http.server name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.seen.append((self.path, json.loads(body)))
        if _Hook.behaviour == "slow":
            time.sleep(2)
        self.send_response(200)
        self.end_headers()
        self.wfile.write({"garbage": b"<html>not json", "allow": b'{"isAllowed": true, "reason": "ok"}'}.get(
            _Hook.behaviour, b"{}"))

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Hook.seen.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("behaviour, reason", [("slow", "timed out"), ("garbage", "auth webhook failed")])
def test_webhook_that_times_out_or_returns_garbage(tmp_path, sim, webhook, behaviour, reason):
    _Hook.behaviour = behaviour
    app, client = make_kms(tmp_path, sim, auth={"type": "webhook", "url": webhook, "timeout": 0.5})
    _refused(app, client, lambda: client.get_app_key(sim, boot(sim), VM_CONFIG), reason)


def test_webhook_allows_and_gets_dstacks_fields(tmp_path, sim, webhook):
    _Hook.behaviour = "allow"
    _app, client = make_kms(tmp_path, sim, auth={"type": "webhook", "url": webhook})
    assert client.get_app_key(sim, boot(sim), VM_CONFIG)["k256_key"]
    path, body = _Hook.seen[-1]
    assert path == "/bootAuth/app"
    assert set(body) == {"attestationMode", "mrAggregated", "osImageHash", "mrSystem", "appId", "composeHash",
                         "instanceId", "deviceId", "keyProviderInfo", "tcbStatus", "advisoryIds"}
    assert body["appId"] == APP_ID and body["composeHash"] == COMPOSE_HASH and body["attestationMode"] == "dstack-sim"
    assert body["deviceId"] == sim.device_id.hex()


def test_nonces_are_issued_without_state_and_checked_by_their_mac(tmp_path, sim):
    app, client = make_kms(tmp_path, sim)
    store = app.extensions["dstack_kms"].nonces
    nonces = {client.call("GetNonce")["nonce"] for _i in range(200)}
    assert len(nonces) == 200 and store.consumed_count() == 0  # issuing stores nothing
    # A nonce another KMS issued (other root keys, so another MAC key) is refused.
    (tmp_path / "other").mkdir()
    other_app, other = make_kms(tmp_path / "other", sim)
    foreign = other.call("GetNonce")["nonce"]
    _priv, pub = key_release.new_ephemeral_key()
    request = {"nonce": foreign, "ephemeral_public_key": pub.hex(), "event_log": boot(sim), "vm_config": VM_CONFIG,
               "quote": sim.get_quote(key_release.key_release_report_data(foreign, pub)).hex()}
    _refused(app, client, lambda: client.call("GetAppKey", request), "nonce: was not issued by this KMS")
    # A forged expiry (the MAC covers it) is refused too.
    forged = (int(foreign[:16], 16) + 3600).to_bytes(8, "big").hex() + foreign[16:]
    request.update(nonce=forged, quote=sim.get_quote(key_release.key_release_report_data(forged, pub)).hex())
    _refused(app, client, lambda: client.call("GetAppKey", request), "nonce: was not issued by this KMS")
    assert other_app.extensions["dstack_kms"].nonces.consumed_count() == 0


def test_bad_requests_get_json_errors(tmp_path, sim):
    _app, client = make_kms(tmp_path, sim)
    assert client.client.post("/prpc/KMS.GetAppEnvEncryptPubKey", json={"app_id": "zz"}).get_json() == {
        "error": "app_id: is not hex: it has characters outside 0-9 and a-f"}
    assert client.client.post("/prpc/KMS.GetMeta", data="{not json", content_type="application/json").status_code == 400
    assert client.client.get("/prpc/KMS.Nope").status_code == 404
    big = client.client.post("/prpc/KMS.GetAppKey", data=b"x" * (300 * 1024), content_type="application/json")
    assert big.status_code == 413 and "error" in big.get_json()
    assert client.client.get("/prpc/KMS.GetAppEnvEncryptPubKey?app_id=" + APP_ID).get_json()["public_key"]
    assert os.stat(os.path.join(str(tmp_path / "kms"), "root-k256.key")).st_mode & 0o077 == 0


def _csr(common_name="app.example"):
    return _key_and_csr(common_name)[1]


def test_sign_cert_for_an_attested_cvm(tmp_path, sim):
    from cryptography import x509
    app, client = make_kms(tmp_path, sim)
    log = boot(sim)
    chain = client.sign_cert(sim, lambda: log, _csr(), VM_CONFIG, alt_names=["app.example"])
    leaf, app_ca, root = [x509.load_pem_x509_certificate(p.encode()) for p in chain]
    leaf.verify_directly_issued_by(app_ca)
    app_ca.verify_directly_issued_by(root)
    assert root == app.extensions["dstack_kms"].keys.ca_cert
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == ["app.example"]
    # The app CA key is the one dstack derives: derive_p256(rootCA, [app_id, "app-ca"]).
    root_keys_ = app.extensions["dstack_kms"].keys
    assert app_ca.public_key().public_numbers() == kdf.app_ca_key(root_keys_.ca_key, APP_ID).public_key().public_numbers()


def test_sign_cert_refuses_a_quote_bound_to_another_csr(tmp_path, sim):
    app, client = make_kms(tmp_path, sim)
    log = boot(sim)

    class OtherCsr:
        def get_quote(self, report_data):
            return sim.get_quote(key_release.sign_cert_report_data(b"\0" * 32, b"other"))

    _refused(app, client, lambda: client.sign_cert(OtherCsr(), lambda: log, _csr(), VM_CONFIG), "report_data")


def _ra_tls(sim, log, public_key):
    """The guest's attestation document over a leaf key (agents/guest/api.py makes the same)."""
    from ansible_collections.dstack.tee.plugins.module_utils.app_certs import ratls_report_data
    return json.dumps({"version": "dstack.tee/attestation-json/v1", "attestation_mode": "dstack-sim",
                       "quote": sim.get_quote(ratls_report_data(public_key)).hex(), "event_log": log,
                       "report_data": ratls_report_data(public_key).hex(), "vm_config": VM_CONFIG},
                      sort_keys=True, separators=(",", ":"))


def _key_and_csr(common_name="ratls"):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])).sign(key, hashes.SHA256()))
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


def test_sign_cert_embeds_a_checked_ra_tls_attestation(tmp_path, sim):
    from cryptography import x509
    from ansible_collections.dstack.tee.plugins.module_utils.app_certs import OID_ATTESTATION
    _app, client = make_kms(tmp_path, sim)
    log = boot(sim)
    key, csr = _key_and_csr()
    document = _ra_tls(sim, log, key.public_key())
    leaf = x509.load_pem_x509_certificate(client.sign_cert(sim, lambda: log, csr, VM_CONFIG,
                                                           attestation=document)[0].encode())
    assert leaf.extensions.get_extension_for_oid(x509.ObjectIdentifier(OID_ATTESTATION)).value.value == document.encode()
    plain = x509.load_pem_x509_certificate(client.sign_cert(sim, lambda: log, csr, VM_CONFIG)[0].encode())
    assert OID_ATTESTATION not in [e.oid.dotted_string for e in plain.extensions]


def test_sign_cert_refuses_an_attestation_it_cannot_vouch_for(tmp_path, sim):
    app, client = make_kms(tmp_path, sim)
    key, csr = _key_and_csr()
    other_key, _other_csr = _key_and_csr()
    # Over another key: the certificate would claim a quote that is not about its key.
    log = boot(sim)
    _refused(app, client, lambda: client.sign_cert(sim, lambda: log, csr, VM_CONFIG,
                                                   attestation=_ra_tls(sim, log, other_key.public_key())),
             "attestation: report_data")
    # From another CVM (another app's boot on the same platform), then SignCert from this one.
    other_log = boot(sim, app_id="cd" * 20)
    foreign = _ra_tls(sim, other_log, key.public_key())
    log = boot(sim)
    _refused(app, client, lambda: client.sign_cert(sim, lambda: log, csr, VM_CONFIG, attestation=foreign),
             "attestation: is from another CVM than the SignCert quote (app_id differs)")
    _refused(app, client, lambda: client.sign_cert(sim, lambda: log, csr, VM_CONFIG, attestation="not json"),
             "attestation: is not an attestation document")
