"""The guest agent's socket API: the real `dstack-guest-agent simulate` process, on a real unix
socket, driven by the real dstack SDK (DstackClient and the legacy TappdClient); edge cases through
Flask's test client."""

import concurrent.futures
import hashlib
import json
import os
import select
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dstack_sdk
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from conftest import stop_process_group
from ansible_collections.dstack.tee.agents.guest import cli, server
from ansible_collections.dstack.tee.agents.guest.api import ATTESTATION_VERSION, TAPPD_HASHES, create_app
from ansible_collections.dstack.tee.agents.guest.context import GuestContext
from ansible_collections.dstack.tee.plugins.module_utils import root_keys
from ansible_collections.dstack.tee.plugins.module_utils import attestation, kdf, tdx_quote
from ansible_collections.dstack.tee.plugins.module_utils.app_certs import OID_ATTESTATION
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx

AGENT = str(Path(sys.executable).parent / "dstack-guest-agent")
pytestmark = pytest.mark.filterwarnings("ignore:.*(TappdClient|derive_key|tdx_quote).*deprecated:DeprecationWarning")


class Agent:
    """A `dstack-guest-agent simulate` process in a short temp folder (unix socket paths are short)."""

    def __init__(self, base):
        self.base = Path(base)
        self.socket, self.tappd = self.base / "dstack.sock", self.base / "tappd.sock"
        self.state = self.base / "state"
        self.proc = self.line = None
        self.stderr_path = self.base / "stderr.txt"

    def start(self, *extra, expect_ready=True):
        with open(self.stderr_path, "w", encoding="utf-8") as errors:
            self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
                [AGENT, "simulate", "--socket", str(self.socket), "--state-dir", str(self.state), *extra],
                stdout=subprocess.PIPE, stderr=errors, text=True, start_new_session=True)
        if not expect_ready:
            self.proc.wait(timeout=30)
            return self
        ready, _unused, _unused2 = select.select([self.proc.stdout], [], [], 30)
        self.line = self.proc.stdout.readline() if ready else ""
        assert self.line, f"the simulator printed nothing; stderr:\n{self.stderr}"
        return self

    @property
    def stderr(self):
        return self.stderr_path.read_text(encoding="utf-8") if self.stderr_path.exists() else ""

    def stop(self):
        stop_process_group(self.proc)
        return self.proc.returncode if self.proc else None

    # what the simulated CVM is made of, read as an outside verifier would
    def tdx(self):
        return SimTdx(str(self.state / "tdx-sim"), rtmr_state=str(self.base / "verifier-rtmrs.json"))

    def kms_root(self):
        return root_keys.load(str(self.state / "kms"))

    def app_compose_bytes(self):
        return (self.state / "config" / "app-compose.json").read_bytes()

    def app_keys(self):
        return json.loads((self.state / "work" / ".appkeys.json").read_text())

    def client(self):
        return dstack_sdk.DstackClient(str(self.socket))

    def tappd_client(self):
        return dstack_sdk.TappdClient(str(self.tappd))


def short_dir():
    return tempfile.mkdtemp(prefix="dga-", dir="/tmp")


@pytest.fixture(scope="module")
def agent():
    base = short_dir()
    sim = Agent(base).start()
    yield sim
    sim.stop()
    shutil.rmtree(base, ignore_errors=True)


def verify(sim, quote_response, report_data):
    """The quote verified as a KMS would: dcap-qvl under the simulated root, report_data, RTMR3 replay."""
    tdx = sim.tdx()
    result = attestation.verify_quote(quote_response.decode_quote(), tdx.collateral(), tdx.root_ca_der,
                                      attestation.Policy(expected_report_data=report_data, require_event_log=True),
                                      quote_response.event_log)
    assert result.ok, [c.to_dict() for c in result.failures]
    return result


# ---- the real process, the real SDK -------------------------------------------------------------

def test_simulator_says_where_it_listens(agent):
    assert f"DSTACK_SIMULATOR_ENDPOINT={agent.socket}" in agent.line
    assert f"TAPPD_SIMULATOR_ENDPOINT={agent.tappd}" in agent.line
    for path in (agent.socket, agent.tappd):
        assert stat.S_ISSOCK(path.stat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o666
    assert stat.S_IMODE((agent.state / "work" / ".appkeys.json").stat().st_mode) == 0o600
    assert agent.client().is_reachable()
    assert agent.client().version().version


@pytest.mark.parametrize("algorithm", ["secp256k1", "ed25519"])
def test_get_key_chain_verifies_up_to_the_kms_root(agent, algorithm):
    client = agent.client()
    answer = client.get_key("wallet/eth", "mainnet", algorithm=algorithm)
    app_id = client.info().app_id
    app_pub = kdf.verify_key_chain(answer.key, "mainnet", algorithm, answer.signature_chain, app_id,
                                   agent.kms_root().k256_pubkey)
    assert app_pub == kdf.k256_public_key(bytes.fromhex(agent.app_keys()["k256_key"]))
    assert client.get_key("wallet/eth", "mainnet", algorithm=algorithm).key == answer.key
    assert client.get_key("wallet/other", "mainnet", algorithm=algorithm).key != answer.key
    with pytest.raises(DstackError, match="signature_chain"):
        kdf.verify_key_chain(answer.key, "another-purpose", algorithm, answer.signature_chain, app_id,
                             agent.kms_root().k256_pubkey)


def test_get_quote_verifies_and_replays(agent):
    data = b"caller nonce 42"
    answer = agent.client().get_quote(data)
    assert answer.report_data == data.ljust(64, b"\0").hex()
    result = verify(agent, answer, data)
    assert result.attestation_mode == "dstack-sim"
    assert answer.replay_rtmrs()[3] == result.quote.report.rtmr3.hex()
    assert [e.event for e in answer.decode_event_log()][:7] == [
        "system-preparing", "app-id", "compose-hash", "instance-id", "os-image-hash", "key-provider", "boot-mr-done"]
    compose_hash = hashlib.sha256(agent.app_compose_bytes()).hexdigest()
    assert result.boot_info["compose_hash"] == compose_hash and result.boot_info["app_id"] == compose_hash[:40]
    assert json.loads(answer.vm_config)["os_image_hash"] == result.boot_info["os_image_hash"]
    # The same quote does not verify under Intel's root: the simulation is never mistaken for TDX.
    tdx = agent.tdx()
    assert not attestation.verify_quote(answer.decode_quote(), tdx.collateral()).ok


def test_info_parses_and_matches_the_share(agent):
    info = agent.client().info()
    compose_bytes = agent.app_compose_bytes()
    assert info.compose_hash == info.tcb_info.compose_hash == hashlib.sha256(compose_bytes).hexdigest()
    assert info.app_id == info.compose_hash[:40]
    assert info.tcb_info.app_compose == compose_bytes.decode()
    assert info.app_name == json.loads(compose_bytes)["name"]
    assert info.device_id == info.tcb_info.device_id == hashlib.sha256(agent.tdx().ppid).hexdigest()
    assert json.loads(info.key_provider_info)["name"] == "kms"
    instance = json.loads((agent.state / "work" / "instance.json").read_text())
    assert info.instance_id == instance["instance_id"] and len(info.instance_id) == 40
    quote = agent.client().get_quote(b"x")
    result = verify(agent, quote, b"x")
    assert info.tcb_info.rtmr3 == result.quote.report.rtmr3.hex()
    assert info.mr_aggregated == result.boot_info["mr_aggregated"]
    assert info.app_cert.startswith("-----BEGIN CERTIFICATE-----")
    legacy = agent.tappd_client().info()
    assert legacy.tcb_info.mrtd == info.tcb_info.mrtd and legacy.app_id == info.app_id


def test_emit_event_extends_rtmr3(agent):
    client = agent.client()
    before = client.get_quote(b"before")
    client.emit_event("app-started", b"version 1.2.3")
    after = client.get_quote(b"after")
    result = verify(agent, after, b"after")
    assert after.replay_rtmrs()[3] == result.quote.report.rtmr3.hex() != before.replay_rtmrs()[3]
    last = after.decode_event_log()[-1]
    assert (last.event, bytes.fromhex(last.event_payload)) == ("app-started", b"version 1.2.3")
    assert client.info().tcb_info.rtmr3 == result.quote.report.rtmr3.hex()


def test_concurrent_events_and_quotes_stay_consistent(agent):
    # An EmitEvent between a quote and its event log would make the log replay to another RTMR3.
    def emit(i):
        agent.client().emit_event(f"burst-{i}", b"")

    def quote(i):
        answer = agent.client().get_quote(str(i).encode())
        return answer.replay_rtmrs()[3] == tdx_quote.parse_quote(answer.decode_quote()).report.rtmr3.hex()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        emitted = [pool.submit(emit, i) for i in range(12)]
        quoted = [pool.submit(quote, i) for i in range(12)]
        assert all(f.result() for f in quoted) and all(f.result() is None for f in emitted)


def _certs(chain):
    return [x509.load_pem_x509_certificate(pem.encode()) for pem in chain]


def test_get_tls_key_chain_of_three(agent):
    answer = agent.client().get_tls_key(subject="app.example", alt_names=["app.example", "api.app.example"],
                                        usage_client_auth=True)
    leaf, app_ca, root = _certs(answer.certificate_chain)
    leaf.verify_directly_issued_by(app_ca)
    app_ca.verify_directly_issued_by(root)
    assert root == agent.kms_root().ca_cert
    key = serialization.load_pem_private_key(answer.key.encode(), password=None)
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == ["app.example", "api.app.example"]
    assert set(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    # Two calls, two fresh keys.
    assert agent.client().get_tls_key(subject="app.example").key != answer.key


def test_get_tls_key_ra_tls_carries_a_quote_bound_to_the_key(agent):
    answer = agent.client().get_tls_key(subject="ratls", usage_ra_tls=True)
    leaf = _certs(answer.certificate_chain)[0]
    ext = leaf.extensions.get_extension_for_oid(x509.ObjectIdentifier(OID_ATTESTATION)).value.value
    doc = json.loads(ext)
    assert doc["version"] == ATTESTATION_VERSION
    spki = leaf.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    verify(agent, dstack_sdk.GetQuoteResponse(**{k: doc[k] for k in ("quote", "event_log")}),
           hashlib.sha512(b"ratls-cert:" + spki).digest())


@pytest.mark.parametrize("algorithm", ["ed25519", "secp256k1", "secp256k1_prehashed"])
def test_sign_and_verify(agent, algorithm):
    client = agent.client()
    data = hashlib.sha256(b"message").digest() if algorithm == "secp256k1_prehashed" else b"message to sign"
    signed = client.sign(algorithm, data)
    assert signed.signature_chain[0] == signed.signature and len(signed.signature_chain) == 3
    sig, pub = signed.decode_signature(), signed.decode_public_key()
    assert client.verify(algorithm, data, sig, pub).valid
    tampered = (b"X" + data[1:]) if algorithm != "secp256k1_prehashed" else hashlib.sha256(b"other").digest()
    assert not client.verify(algorithm, tampered, sig, pub).valid
    # The signing key is GetKey(path "vms", purpose "signing"), chained to the KMS root.
    key_algorithm = "ed25519" if algorithm == "ed25519" else "secp256k1"
    vms = client.get_key("vms", "signing", algorithm=key_algorithm)
    assert signed.signature_chain[1:] == vms.signature_chain
    assert kdf.key_public_hex(vms.decode_key(), key_algorithm) == signed.public_key
    kdf.verify_key_chain(vms.key, "signing", key_algorithm, vms.signature_chain, client.info().app_id,
                         agent.kms_root().k256_pubkey)


def test_attest_is_a_verifiable_document(agent):
    answer = agent.client().attest(b"attest me")
    doc = json.loads(answer.decode_attestation())
    assert doc["version"] == ATTESTATION_VERSION and doc["attestation_mode"] == "dstack-sim"
    verify(agent, dstack_sdk.GetQuoteResponse(quote=doc["quote"], event_log=doc["event_log"]), b"attest me")


def test_tappd_client(agent):
    tappd = agent.tappd_client()
    quote = tappd.tdx_quote(b"legacy data", "sha512")
    verify(agent, quote, hashlib.sha512(b"app-data:legacy data").digest())
    raw = tappd.tdx_quote(b"short", "raw")  # TappdClient left-pads raw input to 64 bytes
    verify(agent, raw, b"short".rjust(64, b"\0"))
    derived = tappd.derive_key("my/path", "my.subject", ["my.subject"])
    expected = kdf.derive_p256(bytes.fromhex(agent.app_keys()["k256_key"]), [b"my/path"])
    key = serialization.load_pem_private_key(derived.key.encode(), password=None)
    assert key.private_numbers() == expected.private_numbers()
    leaf, app_ca, root = _certs(derived.certificate_chain)
    leaf.verify_directly_issued_by(app_ca)
    app_ca.verify_directly_issued_by(root)
    assert leaf.public_key().public_numbers() == expected.public_key().public_numbers()
    assert tappd.info().tcb_info.rtmr3


def _raw(sim, path, **kwargs):
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sim.socket)), base_url="http://localhost") as http:
        return http.post(path, **kwargs)


@pytest.mark.parametrize("path,body,status,message", [
    ("/GetQuote", {"report_data": "00" * 65}, 400, "report_data: is 65 bytes; at most 64"),
    ("/GetQuote", {"report_data": "zz"}, 400, "report_data: is not hex"),
    ("/GetKey", {"path": "a", "algorithm": "rsa"}, 400, "algorithm: unknown value 'rsa'"),
    ("/Sign", {"algorithm": "p256", "data": "00"}, 400, "algorithm: unknown value 'p256'"),
    ("/prpc/Tappd.TdxQuote", {"report_data": "00", "hash_algorithm": "md5"}, 400, "hash_algorithm: unknown value"),
    ("/GetQuote", b'{"report_data": ', 400, "not valid JSON"),
    ("/NoSuchMethod", {}, 404, ""),
])
def test_bad_input_gets_a_json_error_over_the_socket(agent, path, body, status, message):
    kwargs = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    answer = _raw(agent, path, **kwargs)
    assert answer.status_code == status
    assert answer.headers["content-type"] == "application/json"
    assert message in answer.json()["error"] and "Traceback" not in answer.text


def test_sdk_sees_errors_as_http_errors(agent):
    with pytest.raises(httpx.HTTPStatusError) as caught:
        agent.client().get_key("a", "b", algorithm="rsa")
    assert caught.value.response.status_code == 400
    assert caught.value.response.json()["error"].startswith("algorithm: unknown value")


def test_restart_keeps_the_cvm_and_cleans_its_sockets():
    base = short_dir()
    first = Agent(base).start("--socket-mode", "0660")
    try:
        assert stat.S_IMODE(first.socket.stat().st_mode) == 0o660
        key = first.client().get_key("k", "p").key
        # A second agent on a socket that answers is refused, and leaves the first one alone.
        second = Agent(base).start(expect_ready=False)
        assert second.proc.returncode == 2 and "is in use" in second.stderr
        assert first.client().is_reachable()
    finally:
        assert first.stop() == 0, first.stderr
    assert not first.socket.exists() and not first.tappd.exists()
    # A crash leaves a stale socket file: the next start removes it, and serves the same CVM.
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(first.socket))
    again = Agent(base).start()
    try:
        assert "reusing simulated CVM" in again.stderr
        assert again.client().get_key("k", "p").key == key
    finally:
        again.stop()
        shutil.rmtree(base, ignore_errors=True)


# ---- edge cases through Flask's test client -------------------------------------------------------

@pytest.fixture(scope="module")
def local():
    base = short_dir()
    ctx, summary = cli.simulated_cvm(os.path.join(base, "state"))
    app = create_app(ctx, {"max_request_bytes": 4096})
    yield app.test_client(), ctx, summary
    shutil.rmtree(base, ignore_errors=True)


def test_get_with_query_parameters(local):
    client = local[0]
    answer = client.get("/GetQuote?report_data=abcd")
    assert answer.status_code == 200 and answer.json["report_data"] == "abcd" + "00" * 62
    key = client.get("/GetKey?path=a&purpose=b&algorithm=ed25519").json
    assert key == client.post("/GetKey", json={"path": "a", "purpose": "b", "algorithm": "ed25519"}).json


@pytest.mark.parametrize("name", sorted(TAPPD_HASHES) + ["", "raw"])
def test_tappd_hash_algorithms(local, name):
    client = local[0]
    data = b"\x01" * 64
    answer = client.post("/prpc/Tappd.TdxQuote", json={"report_data": data.hex(), "hash_algorithm": name, "prefix": "p"})
    assert answer.status_code == 200, answer.json
    report = tdx_quote.parse_quote(bytes.fromhex(answer.json["quote"])).report
    if name == "raw":
        expected = data
    else:
        expected = TAPPD_HASHES[name or "sha512"](b"p:" + data).ljust(64, b"\0")
    assert report.report_data == expected
    spot = {"sha256": hashlib.sha256, "sha3-512": hashlib.sha3_512}
    if name in spot:
        assert expected.startswith(spot[name](b"p:" + data).digest())
    if name == "keccak256":
        assert expected.startswith(kdf.keccak256(b"p:" + data))


@pytest.mark.parametrize("path,body,status,message", [
    ("/prpc/Tappd.TdxQuote", {"report_data": "00" * 10, "hash_algorithm": "raw"}, 400, "exactly 64 bytes"),
    ("/prpc/Tappd.RawQuote", {"report_data": "00" * 65}, 400, "exactly 64 bytes"),
    ("/Sign", {"algorithm": "secp256k1_prehashed", "data": "00" * 31}, 400, "32-byte digest"),
    ("/Verify", {"algorithm": "secp256k1", "data": "00", "signature": "00" * 64, "public_key": "05" * 33}, 400, "public_key"),
    ("/Verify", {"algorithm": "ed25519", "data": "00", "signature": "00" * 63, "public_key": "00" * 32}, 400, "signature"),
    ("/GetKey", {"path": 7}, 400, "path: must be a string"),
    ("/GetTlsKey", {"subject": "x" * 65}, 400, "subject"),
    ("/GetTlsKey", {"alt_names": "a.example"}, 400, "alt_names: must be a list"),
    ("/GetTlsKey", {"alt_names": ["\u00fcber.example"]}, 400, "A-labels"),
    ("/GetTlsKey", {"not_after": 2 ** 62}, 400, "before the year 10000"),
    ("/GetTlsKey", {"not_before": 20, "not_after": 10}, 400, "not_after: must be after not_before"),
    ("/GetTlsKey", {"usage_server_auth": "maybe"}, 400, "usage_server_auth: must be true or false"),
    ("/EmitEvent", {"event": "", "payload": ""}, 400, "event: must be a non-empty name"),
    ("/GetQuote", [1, 2], 400, "must be a JSON object"),
    ("/GetQuote", {"report_data": "00" * 4096}, 413, ""),
])
def test_edge_cases(local, path, body, status, message):
    answer = local[0].post(path, json=body)
    assert answer.status_code == status, answer.json
    assert message in answer.json["error"]


def test_method_not_allowed_is_json(local):
    answer = local[0].put("/GetQuote")
    assert answer.status_code == 405 and answer.json["error"]


def test_not_ready_before_the_boot(local, tmp_path):
    ctx = local[1]
    config, work = tmp_path / "config", tmp_path / "work"
    config.mkdir()
    shutil.copy(ctx.paths.app_compose, config / "app-compose.json")
    early = GuestContext.open(str(config), str(work), tee="sim", sim_state_dir=ctx.provider.state_dir)
    client = create_app(early).test_client()
    for path, body in (("/GetKey", {"path": "a"}), ("/Sign", {"algorithm": "ed25519", "data": "00"}),
                       ("/GetTlsKey", {}), ("/EmitEvent", {"event": "too-early"})):
        answer = client.post(path, json=body)
        assert answer.status_code == 503, (path, answer.json)
    # Quotes and Info work before the boot: they say what is (not yet) measured.
    assert client.post("/GetQuote", json={"report_data": "00"}).status_code == 200
    info = client.post("/Info", json={}).json
    assert info["compose_hash"] == hashlib.sha256((config / "app-compose.json").read_bytes()).hexdigest()
    assert info["instance_id"] == "" and info["app_cert"] == ""


class RefusingSigner:
    """A certificate signer like the KMS's: it cannot embed an attestation, and here it says no."""

    def sign(self, csr_pem, **options):
        raise DstackError("kms", f"SignCert refused: not allowed ({len(csr_pem)} byte CSR, {sorted(options)})")


def test_certificate_signer_failures(local):
    ctx = local[1]
    client = create_app(GuestContext(ctx.paths, ctx.provider, cert_signer=RefusingSigner())).test_client()
    answer = client.post("/GetTlsKey", json={"subject": "x", "usage_ra_tls": True})
    assert answer.status_code == 501 and "cannot embed an attestation" in answer.json["error"]
    answer = client.post("/GetTlsKey", json={"subject": "x"})
    assert answer.status_code == 502 and "SignCert refused" in answer.json["error"]
    assert client.post("/Info", json={}).json["app_cert"] == ""  # Info still answers


def test_socket_preparation(tmp_path):
    assert server.parse_mode("0660") == 0o660 and server.parse_mode("666") == 0o666
    with pytest.raises(DstackError, match="octal"):
        server.parse_mode("rw-rw-rw-")
    path = Path(short_dir()) / "a.sock"
    try:
        with socket.socket(socket.AF_UNIX) as stale:
            stale.bind(str(path))
        assert server.prepare_socket(str(path)) == str(path) and not path.exists()
        with socket.socket(socket.AF_UNIX) as live:
            live.bind(str(path))
            live.listen(1)
            with pytest.raises(DstackError, match="in use"):
                server.prepare_socket(str(path))
        assert path.exists()
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)
    regular = tmp_path / "file.sock"
    regular.write_text("not a socket")
    with pytest.raises(DstackError, match="not a socket"):
        server.prepare_socket(str(regular))
    with pytest.raises(DstackError, match="longer than"):
        server.prepare_socket("/tmp/" + "x" * 120)


def test_sdk_refuses_what_the_agent_would_refuse(agent):
    # The SDK checks report_data itself; the agent checks it again for other clients (curl, old SDKs).
    with pytest.raises(ValueError, match="less than 64 bytes"):
        agent.client().get_quote(b"x" * 65)
    started = time.monotonic()
    assert agent.client().is_reachable() and time.monotonic() - started < 3


def test_ra_tls_certificate_through_the_kms(local, tmp_path):
    """GetTlsKey usage_ra_tls with the KMS as signer: the KMS checks the CVM's attestation over the
    leaf key and embeds it; the chain ends at the KMS root."""
    from ansible_collections.dstack.tee.plugins.module_utils.kms_client import KmsCertSigner
    from test_kms import InProcessKms, make_kms
    _client, ctx, _summary = local
    info = create_app(ctx).test_client().post("/Info", json={}).json
    (tmp_path / "auth-config.json").write_text(json.dumps({
        "osImages": ["0x" + info["os_image_hash"]],
        "apps": {"0x" + info["app_id"]: {"composeHashes": ["0x" + info["compose_hash"]], "allowAnyDevice": True}}}))
    # The KMS this CVM measured as its key provider: the simulator's local KMS (its root keys).
    kms_app, _kms_client = make_kms(tmp_path, ctx.provider, state_dir=str(Path(ctx.provider.state_dir).parent / "kms"))
    signed = GuestContext(ctx.paths, ctx.provider)
    signed.cert_signer = KmsCertSigner(InProcessKms(kms_app), signed)
    answer = create_app(signed).test_client().post("/GetTlsKey", json={"subject": "ratls", "usage_ra_tls": True})
    assert answer.status_code == 200, answer.json
    leaf, app_ca, root = _certs(answer.json["certificate_chain"])
    leaf.verify_directly_issued_by(app_ca)
    app_ca.verify_directly_issued_by(root)
    assert root == kms_app.extensions["dstack_kms"].keys.ca_cert
    doc = json.loads(leaf.extensions.get_extension_for_oid(x509.ObjectIdentifier(OID_ATTESTATION)).value.value)
    spki = leaf.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    tdx = ctx.provider
    result = attestation.verify_quote(bytes.fromhex(doc["quote"]), tdx.collateral(), tdx.root_ca_der,
                                      attestation.Policy(expected_report_data=hashlib.sha512(b"ratls-cert:" + spki).digest(),
                                                         require_event_log=True), doc["event_log"])
    assert result.ok and result.boot_info["app_id"] == info["app_id"]
