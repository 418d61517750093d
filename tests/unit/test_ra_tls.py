"""ra_tls.Verifier, the one RA-TLS certificate verifier: what it accepts and each refusal.

Real parts without a server: KMS root keys (module_utils/root_keys.py), app CAs and leaves made as
the KMS's SignCert makes them (app_certs), quotes from the simulated TDX over a measured boot,
and the verifier's QuoteTrust under the simulator's root. Every refusal below has its control:
the same certificate with the one thing changed back passes (test_a_genuine_certificate_passes).
"""

import datetime
import json
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

# pylint: disable=wrong-import-position
from test_kms import COMPOSE_HASH, OS_IMAGE, boot  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils import root_keys  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils import app_certs, attestation, eventlog, ra_tls  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx  # noqa: E402

APP_ID = COMPOSE_HASH[:40]
OTHER_APP_ID = "ee" * 20
INSTANCE_ID = "ab" * 20
VM_CONFIG = json.dumps({"os_image_hash": OS_IMAGE})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("ra-tls")
    sim = SimTdx(str(base / "sim"))
    kms, _created = root_keys.load_or_create(str(base / "kms"))
    other, _created = root_keys.load_or_create(str(base / "other-kms"))
    trust = attestation.QuoteTrust({"mode": "simulation", "sim_state_dir": sim.state_dir}, str(base))
    return {"sim": sim, "kms": kms, "other": other, "trust": trust}


def attestation_of(world, key, app_id=APP_ID, instance_id=INSTANCE_ID, key_provider_root=None):
    """The guest's attestation document over `key`: a boot measured (this app, its KMS as key
    provider), then a quote with report_data = SHA-512("ratls-cert:" || SPKI)."""
    root = key_provider_root or world["kms"]
    event_log = boot(world["sim"], app_id=app_id, instance_id=instance_id,
                     key_provider_id=app_certs.key_provider_id(root.ca_cert))
    report_data = app_certs.ratls_report_data(key.public_key())
    quote = world["sim"].get_quote(report_data)
    return app_certs.attestation_document(attestation.MODE_SIM, quote, event_log, report_data, VM_CONFIG)


def chain(world, document=None, key=None, root=None, app_id=APP_ID, client=True, server=False, **boot_args):
    """[leaf, app CA, root] as DER: the leaf for `key` under root's app CA for app_id, with the
    attestation `document` (by default a genuine one over the leaf's key; b"" for none)."""
    root = root or world["kms"]
    key = key or ec.generate_private_key(ec.SECP256R1())
    if document is None:
        document = attestation_of(world, key, app_id=app_id, **boot_args)
    ca_key, ca_cert = app_certs.app_ca(root.ca_key, root.ca_cert, app_id)
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ra-tls-test")])).sign(key, hashes.SHA256()))
    leaf = app_certs.issue_leaf(ca_key, ca_cert, csr, app_id, usage_server_auth=server, usage_client_auth=client,
                                attestation=document or None)
    return [c.public_bytes(serialization.Encoding.DER) for c in (leaf, ca_cert, root.ca_cert)]


def verifier(world, **options):
    return ra_tls.Verifier(world["kms"].ca_cert, world["trust"], **options)


def refused(verify, certs, field, **kwargs):
    with pytest.raises(ra_tls.Refused) as err:
        verify.verify(certs, **kwargs)
    assert err.value.field == field, str(err.value)
    return err.value.reason


def test_a_genuine_certificate_passes(world):
    boot_info = verifier(world).verify(chain(world))
    assert (boot_info["app_id"], boot_info["instance_id"], boot_info["compose_hash"]) == (APP_ID, INSTANCE_ID, COMPOSE_HASH)
    assert boot_info["os_image_hash"] == OS_IMAGE and boot_info["attestation_mode"] == attestation.MODE_SIM
    server = verifier(world, usage=ra_tls.SERVER_AUTH, app_id=APP_ID).verify(chain(world, client=False, server=True))
    assert server["app_id"] == APP_ID


def test_another_kms_root_is_refused(world):
    # A genuine CVM of the same app whose certificate another KMS issued (it measured that KMS).
    foreign = chain(world, root=world["other"], key_provider_root=world["other"])
    assert "does not chain" in refused(verifier(world), foreign, "client_certificate")
    # Even presenting our root on top, or our app CA's subject: the signatures do not check.
    assert "does not chain" in refused(verifier(world), foreign[:2] + chain(world)[2:], "client_certificate")
    # A verifier pinned to the other KMS refuses ours the same way.
    assert "does not chain" in refused(ra_tls.Verifier(world["other"].ca_cert, world["trust"]), chain(world),
                                       "client_certificate")
    # A leaf alone cannot be checked.
    assert "does not chain" in refused(verifier(world), chain(world)[:1], "client_certificate")


def test_a_cvm_that_measured_another_kms_is_refused(world):
    # Our KMS's certificate, but the CVM's key-provider event names the other KMS.
    certs = chain(world, key_provider_root=world["other"])
    assert "key provider" in refused(verifier(world), certs, "attestation")


def test_the_wrong_usage_is_refused(world):
    server_only = chain(world, client=False, server=True)
    client_only = chain(world)
    assert "client authentication" in refused(verifier(world), server_only, "client_certificate")
    assert "server authentication" in refused(verifier(world, usage=ra_tls.SERVER_AUTH), client_only,
                                              "server_certificate")
    with pytest.raises(DstackError) as err:
        verifier(world, usage="both")
    assert err.value.field == "usage"


def test_another_app_than_the_expected_one_is_refused(world):
    other_app = chain(world, app_id=OTHER_APP_ID, client=False, server=True)
    gateway_check = verifier(world, usage=ra_tls.SERVER_AUTH, app_id=APP_ID)
    assert OTHER_APP_ID in refused(gateway_check, other_app, "app_id")
    assert verifier(world, usage=ra_tls.SERVER_AUTH, app_id=OTHER_APP_ID).verify(other_app)["app_id"] == OTHER_APP_ID


def test_no_attestation_is_refused(world):
    assert "no attestation extension" in refused(verifier(world), chain(world, document=b""), "attestation")


def _genuine(world, key):
    return attestation_of(world, key)


def test_tampered_attestations_are_refused(world):
    key = ec.generate_private_key(ec.SECP256R1())
    genuine = _genuine(world, key)
    doc = json.loads(genuine)
    check = verifier(world)
    assert check.verify(chain(world, document=genuine, key=key))["app_id"] == APP_ID  # the control
    # One byte of the quote.
    quote = bytearray.fromhex(doc["quote"])
    quote[200] ^= 1
    assert "dcap" in refused(check, chain(world, document=app_certs.attestation_document(
        doc["attestation_mode"], quote, doc["event_log"], bytes.fromhex(doc["report_data"]), doc["vm_config"]), key=key),
        "attestation")
    # The genuine document of another key, on a new key's leaf.
    assert "another key" in refused(check, chain(world, document=genuine), "attestation.report_data")
    # The event log's instance-id changed: its digest no longer matches; recomputed, the log no
    # longer replays to the quote's RTMR3.
    log = json.loads(doc["event_log"])
    where = next(i for i, e in enumerate(log) if e["event"] == "instance-id")
    log[where]["event_payload"] = "cd" * 20
    relogged = json.dumps(dict(doc, event_log=json.dumps(log))).encode()
    assert "event_log" in refused(check, chain(world, document=relogged, key=key), "attestation")
    log[where] = eventlog.RuntimeEvent("instance-id", bytes.fromhex("cd" * 20)).to_log_entry()
    relogged = json.dumps(dict(doc, event_log=json.dumps(log))).encode()
    assert "rtmr3_replay" in refused(check, chain(world, document=relogged, key=key), "attestation")
    # The attested app is not the certificate's (app A's attestation under another app's CA).
    assert "app_id" in refused(check, chain(world, document=genuine, key=key, app_id=OTHER_APP_ID), "attestation")
    # The document claims another attestation mode than its quote's.
    relabelled = json.dumps(dict(doc, attestation_mode=attestation.MODE_TDX)).encode()
    refused(check, chain(world, document=relabelled, key=key), "attestation.attestation_mode")


def test_malformed_attestation_documents_are_refused(world):
    """The document format is app_certs.parse_attestation_document's: a field twice (a reader
    taking the last one would see the genuine value) or an unknown field is refused."""
    key = ec.generate_private_key(ec.SECP256R1())
    genuine = _genuine(world, key)
    check = verifier(world)
    duplicated = b'{"quote":"00",' + genuine[1:]
    assert "twice" in refused(check, chain(world, document=duplicated, key=key), "attestation")
    extra = genuine[:-1] + b',"app_id":"' + OTHER_APP_ID.encode() + b'"}'
    assert "exactly the fields" in refused(check, chain(world, document=extra, key=key), "attestation")
    assert refused(check, chain(world, document=b"[1, 2]", key=key), "attestation")
    assert refused(check, chain(world, document=b"\xff\xfe", key=key), "attestation")


def test_an_empty_instance_id_is_refused_when_required(world):
    certs = chain(world, instance_id="")
    assert verifier(world).verify(certs)["instance_id"] == ""
    assert "no_instance_id" in refused(verifier(world, require_instance_id=True), certs, "instance_id")


def test_dates_garbage_and_nothing_are_refused(world):
    certs = chain(world)
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=app_certs.LEAF_DEFAULT_DAYS + 1)
    assert "validity period" in refused(verifier(world), certs, "client_certificate", now=later)
    assert "none presented" in refused(verifier(world), [], "client_certificate")
    assert "DER" in refused(verifier(world), [b"\x30\x03\x02\x01\x01"], "client_certificate")
    # The app CA itself offered as the leaf.
    assert refused(verifier(world), certs[1:], "client_certificate")


def test_load_kms_root(tmp_path, world):
    pem = tmp_path / "root.pem"
    pem.write_bytes(world["kms"].ca_cert.public_bytes(serialization.Encoding.PEM))
    der = tmp_path / "root.der"
    der.write_bytes(world["kms"].ca_cert.public_bytes(serialization.Encoding.DER))
    assert ra_tls.load_kms_root(str(pem)) == ra_tls.load_kms_root(str(der)) == world["kms"].ca_cert
    (tmp_path / "junk").write_bytes(b"junk")
    for path in (tmp_path / "junk", tmp_path / "missing"):
        with pytest.raises(DstackError) as err:
            ra_tls.load_kms_root(str(path), field="kms_root")
        assert err.value.field == "kms_root"
