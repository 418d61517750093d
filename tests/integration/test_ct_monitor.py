"""`dstack-ct-monitor` (agents/gateway/ct_monitor.py) run as a command against real parts:

- the gateway's acme-info served over HTTPS by a small real server, its quotes made by a booted
  simulated CVM's guest agent (GetQuote, the answer as acme.py stores it) over keys made here:
  report_data = SHA-512("zt-cert:" || SPKI DER) and SHA-512("acme-account:" || URI);
- certificates issued by a real ACME server (Pebble, by DNS-01 through BIND9: acme_fixtures) with
  certbot to CSRs of those keys: one for a key the gateway attested, one for a key it never did;
  older certificates of a local CA;
- crt.sh's JSON API served by the same small server (its query and per-id answers), over HTTPS.

The monitor verifies every quote with the project's verifier under the simulator's root
(--sim-state, as dstack-verify takes it) and flags every certificate whose key is not attested.
"""

import datetime
import hashlib
import http.server
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent))

# pylint: disable=wrong-import-position
from acme_fixtures import acme_world  # noqa: E402,F401  pylint: disable=unused-import
from test_gateway_acme import gateway_cvm, issued  # noqa: E402,F401  pylint: disable=unused-import
from acme_fixtures import ZONE, needs_acme_world  # noqa: E402
from conftest import run_module  # noqa: E402
from test_gateway_control import _allow, _boot  # noqa: E402
from test_guest_boot import make_share  # noqa: E402
from test_kms import make_kms  # noqa: E402
from ansible_collections.dstack.tee.agents.gateway import ct_monitor  # noqa: E402
from ansible_collections.dstack.tee.agents.guest.api import create_app as guest_app  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.app_certs import spki_der  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx  # noqa: E402

pytestmark = needs_acme_world
ACCOUNT_URI = "https://127.0.0.1:14000/my-account/1"
CERTBOT_MAIN = "import sys; from certbot.main import main; sys.exit(main())"


def _name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


class Site(http.server.BaseHTTPRequestHandler):
    """The gateway's /.dstack/acme-info and crt.sh's JSON API, over HTTPS (server.world holds
    the answers; server.asked counts the per-certificate fetches)."""

    def do_GET(self):  # pylint: disable=invalid-name
        world, parts = self.server.world, urlsplit(self.path)
        query = parse_qs(parts.query)
        if parts.path == "/.dstack/acme-info":
            body = json.dumps(world["acme_info"]).encode()
        elif parts.path == "/" and "q" in query and query.get("output") == ["json"]:
            pattern = query["q"][0]
            body = json.dumps([{"id": cert_id, "issuer_name": "C=XX", "name_value": "\n".join(names)}
                               for cert_id, (names, _pem_text) in world["crtsh"].items()
                               if any(n == pattern or (pattern.startswith("%.") and n.endswith(pattern[1:]))
                                      for n in names)]).encode()
        elif parts.path == "/" and "d" in query and int(query["d"][0]) in world["crtsh"]:
            cert_id = int(query["d"][0])
            self.server.asked.append(cert_id)
            body = world["crtsh"][cert_id][1]
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class World:
    """The keys, quotes, certificates and the HTTPS server of the module's documentation."""

    def __init__(self, base, acme):
        self.base = base
        # A simulated CVM (the gateway's), booted by the guest agent against a real KMS.
        self.sim = SimTdx(str(base / "sim"))
        _kms_app, kms = make_kms(base, self.sim)
        (base / "gw").mkdir()
        share, self.app = make_share(base / "gw", run_module, kms)
        _allow(base / "auth-config.json", self.app)
        self.agent = guest_app(_boot(base, "gateway-cvm", share, self.sim, kms)).test_client()
        self.keys = {name: ec.generate_private_key(ec.SECP256R1()) for name in ("old", "current", "foreign", "mismatched")}
        self.spki = {name: spki_der(key.public_key()) for name, key in self.keys.items()}
        self.certs = base / "certs"
        self.certs.mkdir()
        self._local_ca()
        self.write_cert("old", self._local_cert("old"))
        self.write_cert("mismatched", self._local_cert("mismatched"))
        for name in ("current", "foreign"):
            self.write_cert(name, self._issue_by_pebble(name, acme))
        self._https_server()
        self.acme_info = self.good_acme_info()

    # -- quotes ---------------------------------------------------------------------------------

    def quote(self, tag, payload):
        """The guest agent's GetQuote answer as compact JSON (acme.Quoter's form), report_data as dstack
        makes it: SHA-512(tag || ":" || payload)."""
        report_data = hashlib.sha512(tag.encode() + b":" + payload).digest()
        answer = self.agent.post("/GetQuote", json={"report_data": report_data.hex()})
        assert answer.status_code == 200, answer.json
        return json.dumps(answer.json, separators=(",", ":"))

    def key_entry(self, name, quoted=None):
        return {"public_key": self.spki[name].hex(), "quote": self.quote("zt-cert", self.spki[quoted or name]),
                "attestation": ""}

    def good_acme_info(self):
        return {"account_uri": ACCOUNT_URI, "quoted_hist_keys": [self.key_entry("old"), self.key_entry("current")],
                "account_quote": self.quote("acme-account", ACCOUNT_URI.encode()), "account_attestation": ""}

    # -- certificates ---------------------------------------------------------------------------

    def _local_ca(self):
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.ca = (x509.CertificateBuilder().subject_name(_name("ct test CA")).issuer_name(_name("ct test CA"))
                   .public_key(self.ca_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=9))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(self.ca_key, hashes.SHA256()))

    def _local_cert(self, name, names=(f"*.{ZONE}", ZONE), key=None):
        now = datetime.datetime.now(datetime.timezone.utc)
        public = key.public_key() if key else self.keys[name].public_key()
        return (x509.CertificateBuilder().subject_name(_name(names[0])).issuer_name(self.ca.subject)
                .public_key(public).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
                .sign(self.ca_key, hashes.SHA256()))

    def _issue_by_pebble(self, name, acme):
        """certbot certonly --csr through Pebble, DNS-01 on BIND9: the ACME server's certificate."""
        folder = self.base / f"certbot-{name}"
        csr = (x509.CertificateSigningRequestBuilder().subject_name(_name(f"*.{ZONE}"))
               .add_extension(x509.SubjectAlternativeName([x509.DNSName(f"*.{ZONE}"), x509.DNSName(ZONE)]),
                              critical=False).sign(self.keys[name], hashes.SHA256()))
        folder.mkdir()
        (folder / "csr.pem").write_bytes(csr.public_bytes(serialization.Encoding.PEM))
        credentials, pebble = acme.credentials(folder / "rfc2136.ini"), acme.pebble
        done = subprocess.run(
            [sys.executable, "-c", CERTBOT_MAIN, "certonly", "--non-interactive", "--agree-tos",
             "--register-unsafely-without-email", "--server", pebble.directory,
             "--config-dir", str(folder / "config"), "--work-dir", str(folder / "work"),
             "--logs-dir", str(folder / "logs"), "--dns-rfc2136", "--dns-rfc2136-credentials", credentials,
             "--dns-rfc2136-propagation-seconds", "1", "--csr", str(folder / "csr.pem"),
             "--cert-path", str(folder / "cert.pem"), "--fullchain-path", str(folder / "fullchain.pem"),
             "--chain-path", str(folder / "chain.pem")],
            capture_output=True, text=True, timeout=180, check=False,
            env=dict(os.environ, REQUESTS_CA_BUNDLE=pebble.ca_bundle))
        assert done.returncode == 0, done.stdout + done.stderr
        return x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())

    def write_cert(self, name, cert):
        (self.certs / f"{name}.pem").write_bytes(_pem(cert))
        setattr(self, f"cert_{name}", cert)

    # -- the gateway's acme-info and crt.sh, over HTTPS ---------------------------------------------

    def _https_server(self):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._local_cert("site", names=("gateway.dstack.localhost", "crtsh.localhost"), key=key)
        (self.base / "site.pem").write_bytes(_pem(cert))
        (self.base / "site.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                               serialization.PrivateFormat.PKCS8,
                                                               serialization.NoEncryption()))
        (self.base / "ca.pem").write_bytes(_pem(self.ca))
        self.ca_file = str(self.base / "ca.pem")
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Site)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.base / "site.pem", self.base / "site.key")
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.server.world, self.server.asked = {"acme_info": {}, "crtsh": {}}, []
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def acme_info(self):
        return self.server.world["acme_info"]

    @acme_info.setter
    def acme_info(self, value):
        self.server.world["acme_info"] = value

    @property
    def gateway_url(self):
        return f"https://gateway.dstack.localhost:{self.port}"

    @property
    def crtsh_url(self):
        return f"https://crtsh.localhost:{self.port}"

    def log_to_crtsh(self, cert_id, name):
        cert = getattr(self, f"cert_{name}")
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)
        self.server.world["crtsh"][cert_id] = (names, _pem(cert))


@pytest.fixture(scope="module")
def world(acme_world, tmp_path_factory):  # pylint: disable=redefined-outer-name
    made = World(tmp_path_factory.mktemp("ct-monitor"), acme_world)
    yield made
    made.server.shutdown()


@pytest.fixture
def monitor(world):
    world.acme_info = world.good_acme_info()

    def run(*args, certs=None, timeout=120):
        argv = [sys.executable, "-m", "ansible_collections.dstack.tee.agents.gateway.ct_monitor",
                "--gateway", world.gateway_url, "--ca-cert", world.ca_file, "--sim-state", world.sim.state_dir,
                "--domain", ZONE, "--json", *(["--certs", str(certs)] if certs else []), *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        report = json.loads(done.stdout) if done.stdout.strip() else None
        return done.returncode, report, done.stderr
    return run


def _only(world, tmp_path, *names):
    """A folder with only these certificates."""
    folder = tmp_path / "-".join(names)
    folder.mkdir()
    for name in names:
        (folder / f"{name}.pem").write_bytes((world.certs / f"{name}.pem").read_bytes())
    return folder


def test_the_attested_certificates_pass(monitor, world, tmp_path):
    status, report, log = monitor(certs=_only(world, tmp_path, "old", "current"))
    assert status == 0, log
    assert report["ok"] and report["unknown"] == 0
    assert [c["attested"] for c in report["certificates"]] == [True, True]
    assert [k["ok"] for k in report["attested_keys"]] == [True, True] and report["account"]["ok"]
    assert {k["app_id"] for k in report["attested_keys"]} == {world.app["app_id"]}
    # The current certificate is the ACME server's (Pebble's), issued to the key the gateway quoted.
    current = next(c for c in report["certificates"] if c["source"].endswith("current.pem"))
    assert current["issuer"].startswith("Pebble") and set(current["names"]) == {f"*.{ZONE}", ZONE}
    assert f"OK: 2 certificate(s) for {ZONE}, all for the 2 key(s) the gateway attested (ACME account " \
           f"{ACCOUNT_URI} attested)" in log
    assert "ERROR" not in log


def test_a_certificate_for_a_key_never_attested_is_flagged(monitor, world):
    status, report, log = monitor(certs=world.certs)
    assert status == 1, log
    flagged = [c for c in report["certificates"] if not c["attested"]]
    # The ACME server's certificate for the foreign key, and the local one for the key whose quote is wrong
    # (the acme-info does not list it at all here).
    assert sorted(Path(c["source"]).name for c in flagged) == ["foreign.pem", "mismatched.pem"]
    assert report["unknown"] == 2 and not report["ok"]
    foreign = next(c for c in flagged if c["source"].endswith("foreign.pem"))
    assert foreign["public_key_sha256"] == ct_monitor.key_id(world.spki["foreign"])
    assert set(foreign["names"]) == {f"*.{ZONE}", ZONE} and foreign["issuer"].startswith("Pebble")
    assert (f"ERROR unknown certificate: {world.certs / 'foreign.pem'} for {', '.join(foreign['names'])}, serial "
            f"{foreign['serial']}, issued by {foreign['issuer']}: its public key (SPKI SHA-256 "
            f"{foreign['public_key_sha256'][:16]}) is not one the gateway attested") in log
    assert sorted(Path(c["source"]).name for c in report["certificates"] if c["attested"]) == ["current.pem", "old.pem"]


def test_a_quote_whose_report_data_does_not_match_its_key_fails(monitor, world, tmp_path):
    # The key is listed, but its quote is over another key: it attests nothing.
    world.acme_info["quoted_hist_keys"].append(world.key_entry("mismatched", quoted="foreign"))
    status, report, log = monitor(certs=_only(world, tmp_path, "current", "mismatched"))
    assert status == 1, log
    bad = report["attested_keys"][2]
    assert not bad["ok"] and bad["public_key_sha256"] == ct_monitor.key_id(world.spki["mismatched"])
    assert bad["failures"] == ["report_data: differs from the expected value"]
    assert "attested key #2 (SPKI SHA-256 " in log and "its quote does not attest it: report_data: differs" in log
    assert [c["attested"] for c in report["certificates"]] == [True, False]
    # An account quote over another URI fails too (the certificates themselves all attested).
    world.acme_info = world.good_acme_info()
    world.acme_info["account_uri"] = ACCOUNT_URI + "0"
    status, report, log = monitor(certs=_only(world, tmp_path, "current"))
    assert status == 1 and report["unknown"] == 0 and not report["account"]["ok"], log
    assert f"ACME account {ACCOUNT_URI}0: its quote does not attest it: report_data" in log


def test_every_quote_must_name_the_gateways_app_with_app_id(monitor, world, tmp_path):
    certs = _only(world, tmp_path, "current")
    status, report, log = monitor("--app-id", world.app["app_id"], certs=certs)
    assert status == 0 and report["ok"], log
    other = "ab" * 20
    status, report, log = monitor("--app-id", other, certs=certs)
    assert status == 1 and report["unknown"] == 1, log
    assert report["attested_keys"][0]["failures"] == [
        f"app_id: the quote's event log names app {world.app['app_id']}, not {other}"]


def test_crtsh_json_api_and_the_interval(world, monitor):
    """crt.sh's path: the entries for the domain and under it, each certificate fetched once by id;
    with --interval, rounds go on and a certificate logged later is flagged in its round."""
    world.server.world["crtsh"].clear()
    world.log_to_crtsh(101, "old")
    world.log_to_crtsh(102, "current")
    argv = [sys.executable, "-m", "ansible_collections.dstack.tee.agents.gateway.ct_monitor", "--gateway",
            world.gateway_url, "--ca-cert", world.ca_file, "--sim-state", world.sim.state_dir, "--domain", ZONE,
            "--crtsh-url", world.crtsh_url, "--crtsh-ca-cert", world.ca_file, "--json"]
    status, report, log = monitor("--crtsh-url", world.crtsh_url, "--crtsh-ca-cert", world.ca_file)
    assert status == 0, log
    assert [c["source"] for c in report["certificates"]] == ["crt.sh id 101", "crt.sh id 102"]
    world.server.asked.clear()
    with subprocess.Popen(argv + ["--interval", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,  # noqa: S603
                          text=True) as proc:
        try:
            first = json.loads(proc.stdout.readline())
            assert first["ok"] and first["unknown"] == 0
            world.log_to_crtsh(103, "foreign")        # a certificate nobody attested appears in the log
            while True:
                later = json.loads(proc.stdout.readline())
                if later["unknown"]:
                    break
            assert [c["source"] for c in later["certificates"] if not c["attested"]] == ["crt.sh id 103"]
            # Each certificate was fetched once, over the rounds.
            assert sorted(world.server.asked) == [101, 102, 103]
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(20) == 130
        assert "unknown certificate: crt.sh id 103 for" in proc.stderr.read()


@pytest.mark.parametrize("args, field", [
    (["--gateway", "http://gateway.dstack.localhost"], "--gateway: must be an https:// URL"),
    (["--sim-state", "/nonexistent/sim"], "--sim-state"),
    (["--crtsh-url", "http://crt.sh"], "--crtsh-url: must be an https:// URL"),
])
def test_bad_options_are_named(monitor, args, field):
    status, report, log = monitor(*args)
    assert status == 2 and report is None and f"dstack-ct-monitor: error: {field}" in log, log


def test_what_cannot_be_checked_exits_2(world, tmp_path):
    base = [sys.executable, "-m", "ansible_collections.dstack.tee.agents.gateway.ct_monitor"]
    for argv, said in (
            # crt.sh needs the domain; production trust needs collateral; nothing answers on port 1.
            (["--gateway", world.gateway_url, "--sim-state", world.sim.state_dir], "--domain: is required"),
            (["--gateway", world.gateway_url, "--domain", ZONE], "--collateral: is required"),
            (["--gateway", "https://gateway.dstack.localhost:1", "--sim-state", world.sim.state_dir, "--certs",
              str(world.certs)], "--gateway: cannot reach https://gateway.dstack.localhost:1/.dstack/acme-info"),
            (["--gateway", world.gateway_url, "--sim-state", world.sim.state_dir, "--certs",
              str(tmp_path / "none")], "--certs: "),
            (["--gateway", world.gateway_url, "--sim-state", world.sim.state_dir, "--certs", str(world.certs)],
             "does not validate under the system's trust store"),   # no --ca-cert for the site's CA
    ):
        done = subprocess.run(base + argv, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 2 and said in done.stderr, (argv, done.stderr)


def test_collateral_from_a_pccs_as_dstack_verify_takes_it(monitor, world, tmp_path):
    """--sim-state with --pccs-url: the simulator's root, the collateral from `dstack-verify serve-pccs`
    (Intel's PCCS API), cached in --cache-dir as dstack-verify caches it."""
    from test_sim_pccs import PccsProcess  # pylint: disable=import-outside-toplevel
    pccs = PccsProcess(world.sim.state_dir, tmp_path / "pccs.log")
    try:
        status, report, log = monitor("--pccs-url", pccs.url, "--cache-dir", str(tmp_path / "cache"),
                                      certs=_only(world, tmp_path, "current"))
    finally:
        pccs.stop()
    assert status == 0 and report["ok"], log
    assert "/tdx/certification/v4/tcb" in pccs.requests() and list((tmp_path / "cache").iterdir())


def test_the_gateways_own_acme_info_and_certificate(world, tmp_path, issued, gateway_cvm):  # pylint: disable=redefined-outer-name
    """End to end with the gateway's own ACME flow (test_gateway_acme's `issued`: `dstack-gateway
    renew-cert` through Pebble, keys and the account quoted by the gateway CVM's guest agent): its
    acme-info as the data plane serves it, its certificate passes; the foreign one is flagged."""
    from test_gateway_acme import _certificate, _store  # pylint: disable=import-outside-toplevel
    from ansible_collections.dstack.tee.agents.gateway import acme  # pylint: disable=import-outside-toplevel
    config, _answer = issued
    world.acme_info = acme.acme_info(_store(config))
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "gateway.pem").write_text(_certificate(config).chain)     # the leaf first, then its issuers
    (certs / "foreign.pem").write_bytes((world.certs / "foreign.pem").read_bytes())
    done = subprocess.run(
        [str(Path(sys.executable).parent / "dstack-ct-monitor"), "--gateway", world.gateway_url, "--ca-cert",
         world.ca_file, "--sim-state", str(gateway_cvm / "state" / "tdx-sim"), "--domain", ZONE, "--certs", str(certs),
         "--json"], capture_output=True, text=True, timeout=120, check=False)
    report = json.loads(done.stdout)
    assert done.returncode == 1, done.stderr
    assert report["account"]["ok"] and all(k["ok"] for k in report["attested_keys"]), report
    leaf = next(c for c in report["certificates"] if c["source"].endswith("gateway.pem#0"))
    assert leaf["attested"] and leaf["issuer"].startswith("Pebble")
    # The chain's issuers and the foreign certificate are for keys the gateway never attested;
    # the issuers name no name of the domain, so --domain leaves them out.
    assert [Path(c["source"]).name for c in report["certificates"] if not c["attested"]] == ["foreign.pem"]
