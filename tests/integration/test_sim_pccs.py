"""`dstack-verify serve-pccs`: the simulated platform's collateral over Intel's PCCS API, read by the
same code as a real PCCS (dcap-qvl's fetch in attestation.CollateralCache) for `dstack-verify
--pccs-url` and the KMS's pccs_url; its cache filled once and reused; a tampered answer refused."""

import datetime
import hashlib
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import NameOID

from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx
from conftest import ROOT, free_port, stop_process_group
from test_guest_api import Agent, short_dir
from test_kms import VM_CONFIG, boot, make_kms

VERIFY = str(Path(sys.executable).parent / "dstack-verify")
ROUTES = ("/sgx/certification/v4/pckcrl", "/tdx/certification/v4/tcb", "/tdx/certification/v4/qe/identity",
          "/sgx/certification/v4/rootcacrl")


class PccsProcess:
    """A real `dstack-verify serve-pccs` process; its access log (stdout) counts the requests."""

    def __init__(self, sim_state, log_path, *extra):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        with open(log_path, "w", encoding="utf-8") as log:
            self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
                [VERIFY, "serve-pccs", "--sim-state", str(sim_state), "--listen", f"127.0.0.1:{self.port}", *extra],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("serve-pccs exited:\n" + self.log())
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("serve-pccs did not listen within 30 s:\n" + self.log())

    def log(self):
        return Path(self.log_path).read_text(encoding="utf-8")

    def requests(self):
        return [line.split('"GET ', 1)[1].split("?")[0].split(" ")[0] for line in self.log().splitlines()
                if '"GET ' in line]

    def stop(self):
        stop_process_group(self.proc)


@pytest.fixture
def sim(tmp_path):
    return SimTdx(str(tmp_path / "sim"))


@pytest.fixture
def pccs(sim, tmp_path):
    server = PccsProcess(sim.state_dir, tmp_path / "pccs.log")
    yield server
    server.stop()


def get_quote_file(sim, path):
    """A simulated CVM's GetQuote answer (quote + event log of a measured boot), as a file."""
    event_log = boot(sim)
    path.write_text(json.dumps({"quote": sim.get_quote(b"sim-pccs").hex(), "event_log": event_log}))
    return path


def verify(quote_file, *args):
    return subprocess.run([VERIFY, str(quote_file), *args], capture_output=True, text=True, timeout=60, check=False)


def fetch(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_dstack_verify_through_the_simulated_pccs_fills_and_reuses_the_cache(sim, pccs, tmp_path):
    quote_file = get_quote_file(sim, tmp_path / "quote.json")
    cache = tmp_path / "cache"
    args = ("--sim-state", sim.state_dir, "--pccs-url", pccs.url, "--cache-dir", str(cache))
    first = verify(quote_file, *args)
    assert first.returncode == 0, first.stderr
    assert "OK (dstack-sim, TCB UpToDate)" in first.stderr
    report = json.loads(first.stdout)
    assert report["ok"] and report["boot_info"]["device_id"] and report["boot_info"]["app_id"]
    assert sorted(pccs.requests()) == sorted(ROUTES)  # all four collateral routes, once each
    assert [p.name for p in cache.iterdir()] == [f"{sim.fmspc.hex()}-platform.json"]
    # The second run reads the cache: no request reaches the server.
    second = verify(quote_file, *args)
    assert second.returncode == 0, second.stderr
    assert len(pccs.requests()) == len(ROUTES)
    # Without a cache folder (a new one) the server is asked again.
    third = verify(quote_file, "--sim-state", sim.state_dir, "--pccs-url", pccs.url,
                   "--cache-dir", str(tmp_path / "other-cache"))
    assert third.returncode == 0, third.stderr
    assert len(pccs.requests()) == 2 * len(ROUTES)


def test_a_quote_from_dstack_guest_agent_simulate_verifies_through_the_pccs(tmp_path):
    """The README's path: a simulated CVM, a quote through the dstack SDK, `dstack-verify --sim-state`
    alone, then through --pccs-url."""
    base = short_dir()
    agent = Agent(base).start()
    server = None
    try:
        report_data = os.urandom(32)
        answer = agent.client().get_quote(report_data)
        quote_file = tmp_path / "quote.json"
        quote_file.write_text(json.dumps({"quote": answer.quote, "event_log": answer.event_log}))
        sim_state = agent.state / "tdx-sim"
        # Exactly the README's line (the simulate row; DIR its --state-dir), with the placeholders filled in.
        readme_line = "dstack-verify QUOTE_FILE --sim-state DIR/tdx-sim"
        assert f"`{readme_line}`" in (ROOT / "README.md").read_text(encoding="utf-8")
        filled = {"QUOTE_FILE": str(quote_file), "DIR/tdx-sim": str(sim_state)}
        alone = subprocess.run([VERIFY, *(filled.get(word, word) for word in readme_line.split()[1:])],
                               capture_output=True, text=True, timeout=60, check=False)
        assert alone.returncode == 0, alone.stderr
        assert json.loads(alone.stdout)["boot_info"]["compose_hash"] == hashlib.sha256(agent.app_compose_bytes()).hexdigest()
        server = PccsProcess(sim_state, tmp_path / "pccs.log")
        result = verify(quote_file, "--sim-state", str(sim_state), "--pccs-url", server.url,
                        "--cache-dir", str(tmp_path / "cache"), "--report-data", report_data.hex(),
                        "--require-event-log")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["boot_info"]["compose_hash"] == hashlib.sha256(agent.app_compose_bytes()).hexdigest()
        assert {c["name"] for c in report["checks"] if c["ok"]} >= {"dcap", "report_data", "rtmr3_replay"}
        assert sorted(server.requests()) == sorted(ROUTES)
    finally:
        if server:
            server.stop()
        agent.stop()
        shutil.rmtree(base, ignore_errors=True)


def self_signed(tmp_path):
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sim-pccs")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (tmp_path / "tls.crt").write_bytes(cert.public_bytes(Encoding.PEM))
    (tmp_path / "tls.key").write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    return tmp_path / "tls.crt", tmp_path / "tls.key"


def test_serve_pccs_over_https(sim, tmp_path):
    cert, key = self_signed(tmp_path)
    server = PccsProcess(sim.state_dir, tmp_path / "pccs.log", "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        url = server.url.replace("http://", "https://")
        quote_file = get_quote_file(sim, tmp_path / "quote.json")
        args = ("--sim-state", sim.state_dir, "--pccs-url", url, "--cache-dir", str(tmp_path / "cache"))
        # dcap-qvl checks the server's certificate under the system's trust store (SSL_CERT_FILE).
        refused = verify(quote_file, *args)
        assert refused.returncode == 2 and "pccs_url: could not fetch collateral" in refused.stderr
        env = dict(os.environ, SSL_CERT_FILE=str(cert))
        trusted = subprocess.run([VERIFY, str(quote_file), *args], capture_output=True, text=True, timeout=60,
                                 check=False, env=env)
        assert trusted.returncode == 0, trusted.stderr
    finally:
        server.stop()


def test_the_routes_answer_as_intels_pccs_does(sim, pccs):
    fmspc = sim.fmspc.hex().upper()
    status, headers, body = fetch(f"{pccs.url}/tdx/certification/v4/tcb?fmspc={fmspc.lower()}")
    assert status == 200 and json.loads(body)["tcbInfo"]["fmspc"] == fmspc
    chain = x509.load_pem_x509_certificates(unquote(headers["TCB-Info-Issuer-Chain"]).encode())
    assert chain[-1].public_bytes(Encoding.DER) == sim.root_ca_der
    status, headers, body = fetch(f"{pccs.url}/tdx/certification/v4/qe/identity")
    assert status == 200 and json.loads(body)["enclaveIdentity"]["id"] == "TD_QE"
    assert "SGX-Enclave-Identity-Issuer-Chain" in headers
    status, headers, body = fetch(f"{pccs.url}/sgx/certification/v4/pckcrl?ca=platform")
    assert status == 200 and x509.load_pem_x509_crl(body).is_signature_valid(
        x509.load_pem_x509_certificates(unquote(headers["SGX-PCK-CRL-Issuer-Chain"]).encode())[0].public_key())
    status, _headers, body = fetch(f"{pccs.url}/sgx/certification/v4/rootcacrl")
    assert status == 200 and x509.load_der_x509_crl(bytes.fromhex(body.decode())).issuer == \
        x509.load_der_x509_certificate(sim.root_ca_der).subject
    # What this platform does not have is a 404, a malformed question a 400; both JSON, named.
    for query, code, named in ((f"/tdx/certification/v4/tcb?fmspc={'00' * 6}", 404, "fmspc: no TCB info for"),
                               ("/tdx/certification/v4/tcb?fmspc=zz", 400, "fmspc: must be 12 hex digits"),
                               ("/tdx/certification/v4/tcb", 400, "fmspc: must be"),
                               ("/sgx/certification/v4/pckcrl?ca=processor", 404, "ca: this simulated platform has no"),
                               ("/sgx/certification/v4/pckcrl?ca=other", 400, "ca: must be processor or platform"),
                               ("/sgx/certification/v4/pckcrl?ca=platform&encoding=x", 400, "encoding: must be"),
                               ("/tdx/certification/v4/qe/identity?update=later", 400, "update: must be"),
                               ("/sgx/certification/v4/pckcert", 404, "")):
        status, _headers, body = fetch(pccs.url + query)
        assert status == code and json.loads(body)["error"].startswith(named), (query, body)


class TamperingProxy:
    """Forwards to the PCCS and flips one byte of the TCB info it returns (an on-path attacker)."""

    def __init__(self, upstream):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                status, headers, body = fetch(upstream + self.path)
                if self.path.startswith("/tdx/certification/v4/tcb"):
                    at = body.index(b'"issueDate":"') + len(b'"issueDate":"2000-01-01T00:00:0')
                    body = body[:at] + bytes([body[at] ^ 1]) + body[at + 1:]  # a second's digit: still valid JSON
                self.send_response(status)
                for name in ("Content-Type", "TCB-Info-Issuer-Chain", "SGX-Enclave-Identity-Issuer-Chain",
                             "SGX-PCK-CRL-Issuer-Chain"):
                    if name in headers:
                        self.send_header(name, headers[name])
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_a_tampered_tcb_info_fails_verification_by_name_and_is_not_cached(sim, pccs, tmp_path):
    quote_file = get_quote_file(sim, tmp_path / "quote.json")
    cache = tmp_path / "cache"
    proxy = TamperingProxy(pccs.url)
    try:
        tampered = verify(quote_file, "--sim-state", sim.state_dir, "--pccs-url", proxy.url, "--cache-dir", str(cache))
    finally:
        proxy.close()
    assert tampered.returncode == 1, tampered.stderr
    assert "FAILED dcap: " in tampered.stderr and "tcb_info" in tampered.stderr, tampered.stderr
    assert not json.loads(tampered.stdout)["ok"]
    # Collateral that did not verify the quote is not kept: the honest PCCS is asked next time.
    assert not list(cache.glob("*.json"))
    honest = verify(quote_file, "--sim-state", sim.state_dir, "--pccs-url", pccs.url, "--cache-dir", str(cache))
    assert honest.returncode == 0, honest.stderr
    assert [p.name for p in cache.iterdir()] == [f"{sim.fmspc.hex()}-platform.json"]


def test_the_kms_verifies_a_cvm_through_the_simulated_pccs(sim, pccs, tmp_path):
    # Simulation mode with the simulator's root only (no sim_state_dir: its collateral would be used
    # directly); the collateral comes from the PCCS, as in production.
    app, client = make_kms(tmp_path, sim, sim_state_dir=None, root_ca=os.path.join(sim.state_dir, "root-ca.crt"),
                           pccs_url=pccs.url)
    keys = client.get_app_key(sim, boot(sim), VM_CONFIG)
    assert len(bytes.fromhex(keys["env_crypt_key"])) == 32
    assert app.extensions["dstack_kms"].audit.read()[-1]["decision"] == "release"
    assert sorted(pccs.requests()) == sorted(ROUTES)
    assert [p.name for p in (tmp_path / "kms" / "collateral").iterdir()] == [f"{sim.fmspc.hex()}-platform.json"]
    client.get_app_key(sim, boot(sim), VM_CONFIG)  # the second CVM boot: from the KMS's cache
    assert len(pccs.requests()) == len(ROUTES)


def test_an_unreachable_pccs_is_exit_2_naming_it(sim, tmp_path):
    # Run a few times: dcap-qvl's answer thread once crashed a process that exited right after it.
    quote_file = get_quote_file(sim, tmp_path / "quote.json")
    url = f"http://127.0.0.1:{free_port()}"
    for attempt in range(4):
        result = verify(quote_file, "--sim-state", sim.state_dir, "--pccs-url", url, "--cache-dir", str(tmp_path / "c"))
        assert result.returncode == 2, (attempt, result.returncode, result.stderr)
        assert f"error: pccs_url: could not fetch collateral from {url}" in result.stderr


def test_serve_pccs_refuses_a_bad_start(tmp_path):
    def serve(*args):
        return subprocess.run([VERIFY, "serve-pccs", *args], capture_output=True, text=True, timeout=60, check=False)

    empty = tmp_path / "no-sim"
    result = serve("--sim-state", str(empty), "--listen", f"127.0.0.1:{free_port()}")
    assert result.returncode == 2 and "--sim-state: " in result.stderr and "holds no simulated TDX" in result.stderr
    assert not empty.exists()  # no new simulated installation made in its place
    sim = SimTdx(str(tmp_path / "sim"))
    result = serve("--sim-state", sim.state_dir, "--listen", "0.0.0.0:8081")
    assert result.returncode == 2 and "--tls-cert: is required when listening on 0.0.0.0" in result.stderr
    result = serve("--sim-state", sim.state_dir, "--listen", "8081")
    assert result.returncode == 2 and "--listen: must be HOST:PORT" in result.stderr
