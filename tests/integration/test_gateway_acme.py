"""The gateway's ACME certificates (agents/gateway/acme.py) with real parts only: Pebble (the Let's
Encrypt test server) validating DNS-01 against BIND9 (RFC 2136 updates under a TSIG key), certbot
with certbot-dns-rfc2136 as the ACME client, a simulated CVM's guest agent (`dstack-guest-agent
simulate`) quoting the keys, `dstack-verify` checking the quotes, `dig` reading the CAA records,
and `dstack-gateway renew-cert`, `set-caa` and `serve` as an operator runs them.

One gateway state is issued once for the module (the `issued` fixture) and shared by the tests that
only read it or renew it; the race and the bad-secret tests each start from an empty state.
"""

import base64
import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

sys.path.insert(0, str(Path(__file__).resolve().parent))

# pylint: disable=wrong-import-position,redefined-outer-name,unused-import
from acme_fixtures import acme_world, needs_acme_world, ZONE  # noqa: E402,F401
from conftest import free_port, stop_process_group  # noqa: E402
from dns_fixtures import TSIG_NAME, free_port as free_tcp_udp_port  # noqa: E402
from etcd_fixtures import etcd_cluster, needs_etcd  # noqa: E402,F401
from ansible_collections.dstack.tee.agents.gateway import acme  # noqa: E402
from ansible_collections.dstack.tee.agents.gateway.app import create_app  # noqa: E402
from ansible_collections.dstack.tee.agents.gateway.store import Store, open_store  # noqa: E402
from ansible_collections.dstack.tee.agents.gateway.store_etcd import EtcdClient  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils import wireguard  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.app_certs import parse_attestation_document, spki_der  # noqa: E402

pytestmark = needs_acme_world

BIN = Path(sys.executable).parent
PID = os.getpid()
ADMIN_TOKEN = "acme-test-admin-token-0123456789"
CA_NAME = "pebble.test"
WILDCARD = [f"*.{ZONE}", ZONE]


# ---- the gateway's own CVM (its guest agent quotes) and its configuration ------------------------------

@pytest.fixture(scope="module")
def gateway_cvm():
    """`dstack-guest-agent simulate`: the gateway CVM's guest agent, its simulated TDX and local KMS."""
    base = Path(tempfile.mkdtemp(prefix="gwa-", dir="/tmp"))
    proc = subprocess.Popen(  # pylint: disable=consider-using-with
        [str(BIN / "dstack-guest-agent"), "simulate", "--socket", str(base / "dstack.sock"), "--state-dir",
         str(base / "state")], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert "simulating" in proc.stdout.readline()
        yield base
    finally:
        stop_process_group(proc)
        shutil.rmtree(base, ignore_errors=True)


def _toml(values):
    return "".join(f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items()) + "\n"
                   for name, table in values.items())


def gateway_config(folder, world, cvm, credentials=None, **extra):
    """A gateway.toml in `folder` with [core.certbot] on, against the world's Pebble and BIND9."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    values = {
        "core": {"state_dir": str(folder / "state")},
        "core.wg": {"private_key": wireguard.generate_private_key(), "endpoint": "127.0.0.1:51820"},
        "core.proxy": {"base_domain": ZONE},
        "core.certbot": {"enabled": True, "acme_url": world.pebble.directory,
                         "acme_ca_bundle": world.pebble.ca_bundle,
                         "credentials": credentials or world.credentials(folder / "dns.ini"),
                         "dns_propagation_seconds": 0, "renew_timeout": "120s", "ca_name": CA_NAME},
        "rpc": {"guest_agent": str(cvm / "dstack.sock"), "kms_root_ca": str(cvm / "state" / "kms" / "root-ca.crt")},
        "attestation": {"mode": "simulation", "sim_state_dir": str(cvm / "state" / "tdx-sim")},
    }
    for name, table in extra.items():
        values.setdefault(name, {}).update(table)
    (folder / "gateway.toml").write_text(_toml(values))
    return folder / "gateway.toml"


def gateway_cli(config, *args, timeout=180):
    return subprocess.run([str(BIN / "dstack-gateway"), *args, "--config", str(config)], capture_output=True,
                          text=True, timeout=timeout, check=False)


def _store(config):
    return Store(str(Path(config).parent / "state"), "10.0.0.0/25", "10.0.0.1/24")


def _certificate(config):
    data = _store(config).get_blob(acme.CERT_BLOB + ZONE)
    return acme.Certificate.from_json(data) if data else None


@pytest.fixture(scope="module")
def issued(acme_world, gateway_cvm):
    """A gateway state with its wildcard certificate issued once by `dstack-gateway renew-cert`."""
    folder = Path(tempfile.mkdtemp(prefix="gws-", dir="/tmp"))
    # As the role writes it: an Admin listener, its token not in the file (serve gets it in its
    # environment; renew-cert and set-caa need none).
    try:
        config = gateway_config(folder, acme_world, gateway_cvm, admin={"listen": f"127.0.0.1:{free_port()}"})
        started = time.monotonic()
        done = gateway_cli(config, "renew-cert")
        elapsed = time.monotonic() - started
        assert done.returncode == 0, done.stderr
        print(f"\nfirst issuance (account registration, quotes, certbot DNS-01): {elapsed:.1f} s")
        yield config, json.loads(done.stdout)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _verify_quote(cvm, quote_text, report_data, folder):
    """dstack-verify on a quote string of acme-info (a GetQuote answer), report_data required."""
    path = Path(folder) / f"quote-{secrets.token_hex(4)}.json"
    path.write_text(quote_text)
    return subprocess.run([str(BIN / "dstack-verify"), str(path), "--sim-state", str(cvm / "state" / "tdx-sim"),
                           "--report-data", report_data.hex()], capture_output=True, text=True, timeout=60, check=False)


# ---- issuance, acme-info, dstack-verify ---------------------------------------------------------------

def test_renew_cert_issues_the_wildcard_and_acme_info_verifies(issued, acme_world, gateway_cvm, tmp_path):
    config, answer = issued
    assert answer["renewed"] is True and answer["reason"].startswith("no certificate yet")
    certificate = _certificate(config)
    chain = x509.load_pem_x509_certificates(certificate.chain.encode())
    leaf = chain[0]
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert sorted(names) == sorted(WILDCARD)
    # Issued by the ACME server: the chain climbs to the root Pebble issues under.
    root = x509.load_pem_x509_certificates(acme_world.pebble.issuing_roots().encode())[0]
    for child, parent in zip(chain, chain[1:] + [root]):
        child.verify_directly_issued_by(parent)
    # The key is the gateway's (the stored key's public half), made here, never certbot's.
    key = serialization.load_pem_private_key(certificate.key.encode(), None)
    assert spki_der(key.public_key()) == spki_der(leaf.public_key())

    # Not due: nothing ordered.
    again = gateway_cli(config, "renew-cert")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["renewed"] is False and "valid until" in json.loads(again.stdout)["reason"]

    # Gateway.AcmeInfo through the control API's routes: dstack's fields.
    from ansible_collections.dstack.tee.agents.gateway import server  # pylint: disable=import-outside-toplevel
    client = create_app(server.load_config(str(config), {"admin.listen": ""})).test_client()
    info = client.post("/prpc/Gateway.AcmeInfo", json={}).get_json()
    assert sorted(info) == ["account_attestation", "account_quote", "account_uri", "quoted_hist_keys"]
    assert all(sorted(k) == ["attestation", "public_key", "quote"] for k in info["quoted_hist_keys"])
    assert info["account_uri"].startswith(f"https://127.0.0.1:{acme_world.pebble.port}/my-account/")
    assert [k["public_key"] for k in info["quoted_hist_keys"]][-1] == spki_der(leaf.public_key()).hex()

    # Every quote verifies with dstack-verify for its own report_data, and for nothing else.
    expected = [(info["account_quote"], info["account_attestation"], acme.quote_report_data(
        "acme-account", info["account_uri"].encode()))]
    expected += [(k["quote"], k["attestation"], acme.quote_report_data("zt-cert", bytes.fromhex(k["public_key"])))
                 for k in info["quoted_hist_keys"]]
    assert hashlib.sha512(b"zt-cert:" + spki_der(leaf.public_key())).digest() == expected[-1][2]
    for quote, attestation, report_data in expected:
        verified = _verify_quote(gateway_cvm, quote, report_data, tmp_path)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert parse_attestation_document(bytes.fromhex(attestation))["report_data"] == report_data
    wrong = _verify_quote(gateway_cvm, expected[-1][0], acme.quote_report_data("zt-cert", b"another key"), tmp_path)
    assert wrong.returncode == 1, wrong.stdout


# ---- two renewers at once ---------------------------------------------------------------------------------

def race_renew_cert(configs, store):
    """`dstack-gateway renew-cert` against a certificate lock another holder has, then for each
    config all at once: the answers of the race, of which exactly one ordered.

    The held lock makes the refusal certain (renew-cert orders nothing and names the holder); in the
    race the other renewer either finds the lock held or, when it starts after the first is done
    (a loaded machine), the new certificate valid: either way one order."""
    with store.lock(f"acme-cert/{ZONE}", ttl=60, wait=0):
        held = gateway_cli(configs[0], "renew-cert")
    assert held.returncode == 0, held.stderr
    assert json.loads(held.stdout)["renewed"] is False and "held by" in json.loads(held.stdout)["reason"], held.stdout
    procs = [subprocess.Popen(  # pylint: disable=consider-using-with
        [str(BIN / "dstack-gateway"), "renew-cert", "--config", str(config)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for config in configs]
    answers = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        answers.append(json.loads(out))
    assert sorted(a["renewed"] for a in answers) == [False, True], answers
    loser = next(a for a in answers if not a["renewed"])
    assert "held by" in loser["reason"] or loser["reason"].startswith("valid until"), loser
    return answers


def test_two_renewers_racing_order_one_certificate(acme_world, gateway_cvm, tmp_path):
    config = gateway_config(tmp_path / "gw", acme_world, gateway_cvm)
    # Two processes on one state (two nodes on one store): started together, each orders if it can.
    race_renew_cert([config, config], _store(config))
    # One order: one quoted key, one certificate, for that key.
    keys = json.loads(_store(config).get_blob(acme.KEYS_BLOB))
    assert len(keys) == 1
    assert _certificate(config).public_key == keys[0]["public_key"]


@needs_etcd
def test_two_nodes_on_one_etcd_racing_order_one_certificate_sealed_and_shared(acme_world, gateway_cvm, etcd_cluster,
                                                                              tmp_path):
    """Two nodes of a cluster ([core.sync] on a three-member etcd, each its own hub address): the
    etcd lock lets one order; the certificate, its quoted key and the ACME account are then both
    nodes', sealed in etcd (rpc.guest_agent's key), never in clear."""
    prefix = f"/acme-{PID}-{time.time_ns()}/"
    configs = [gateway_config(tmp_path / f"node{n}", acme_world, gateway_cvm, **{
        "core.wg": {"ip": f"10.0.0.{n}/24"},
        "core.sync": {"etcd_endpoints": etcd_cluster.endpoints, "etcd_prefix": prefix}}) for n in (1, 2)]
    from ansible_collections.dstack.tee.agents.gateway import server  # pylint: disable=import-outside-toplevel
    store = open_store(server.load_config(str(configs[1]), {"admin.listen": ""}))
    race_renew_cert(configs, store)
    # Either node now finds the one certificate in etcd: nothing due, nothing ordered.
    for config in configs:
        again = gateway_cli(config, "renew-cert")
        assert again.returncode == 0 and json.loads(again.stdout)["renewed"] is False, again.stdout + again.stderr
        assert "valid until" in json.loads(again.stdout)["reason"]
        assert not (Path(config).parent / "state" / "gateway.sqlite3").exists()   # the cluster's state is etcd's
    keys = json.loads(store.get_blob(acme.KEYS_BLOB))
    certificate = acme.Certificate.from_json(store.get_blob(acme.CERT_BLOB + ZONE))
    assert len(keys) == 1 and certificate.public_key == keys[0]["public_key"]
    assert acme.acme_info(store)["account_uri"].startswith(f"https://127.0.0.1:{acme_world.pebble.port}/my-account/")
    raw = {item["key"].removeprefix(prefix + "blob/"): item["value"]
           for item in EtcdClient(etcd_cluster.endpoints).get(prefix + "blob/", prefix=True)}
    assert {acme.ACCOUNT_BLOB, acme.KEYS_BLOB, acme.CERT_BLOB + ZONE} <= set(raw), sorted(raw)
    for name, value in raw.items():
        assert value.startswith(b"dstack-gateway-sealed-v1:") and b"PRIVATE KEY" not in value, name


# ---- a credentials error ------------------------------------------------------------------------------------

def test_a_wrong_tsig_secret_is_named_without_any_secret(acme_world, gateway_cvm, tmp_path):
    wrong = base64.b64encode(secrets.token_bytes(32)).decode()
    credentials = acme_world.credentials(tmp_path / "wrong.ini", secret=wrong)
    config = gateway_config(tmp_path / "gw", acme_world, gateway_cvm, credentials=credentials)
    for command in ("renew-cert", "set-caa"):
        done = gateway_cli(config, command)
        assert done.returncode == 2, done.stdout + done.stderr
        said = done.stdout + done.stderr
        assert f"refused the TSIG key '{TSIG_NAME}'" in said and "dns_rfc2136_secret" in said, said
        assert credentials in said
        assert wrong not in said and acme_world.dns.secret not in said
    assert _certificate(config) is None
    # Nor in anything the gateway wrote (certbot's kept logs, the store).
    for path in (tmp_path / "gw" / "state").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert wrong.encode() not in data and acme_world.dns.secret.encode() not in data, path
    # A credentials file others may read is refused before anything is asked.
    os.chmod(credentials, 0o644)
    done = gateway_cli(config, "renew-cert")
    assert done.returncode == 2 and "may be read by others (mode 0644): chmod 600 it" in done.stderr


# ---- CAA -------------------------------------------------------------------------------------------------------

def _journal(world):
    """BIND's journal of the zone as its update lines ("add ..."/"del ..."), oldest first."""
    journal = world.dns.folder / f"{ZONE}.zone.jnl"
    out = subprocess.run(["named-journalprint", str(journal)], capture_output=True, text=True, check=True, timeout=30)
    return [line for line in out.stdout.splitlines() if "CAA" in line.split()]


def test_set_caa_pins_issuance_to_the_attested_account_in_dstacks_order(issued, acme_world):
    config, _answer = issued
    dns = acme_world.dns
    dns.update(f'add {ZONE}. 60 CAA 0 issue "other-ca.example"')
    before = len(_journal(acme_world))
    done = gateway_cli(config, "set-caa")
    assert done.returncode == 0, done.stderr
    account_uri = acme.acme_info(_store(config))["account_uri"]
    value = f"{CA_NAME};validationmethods=dns-01;accounturi={account_uri}"
    wanted = [f'0 issue "{value}"', f'0 issuewild "{value}"']
    assert sorted(dns.dig(ZONE, "CAA")) == sorted(wanted)
    assert json.loads(done.stdout) == {"changed": True, "records": {ZONE: sorted(wanted)}}
    # dstack's order: the guards first, then the others out, ours in, the guards out.
    changes = [" ".join(line.split()[i] for i in (0, -2, -1)) for line in _journal(acme_world)[before:]]
    assert changes == ['add issue ";"', 'add issuewild ";"', 'del issue "other-ca.example"',
                       f'add issue "{value}"', f'add issuewild "{value}"', 'del issue ";"', 'del issuewild ";"'], changes
    # Again: nothing to change, nothing sent.
    again = gateway_cli(config, "set-caa")
    assert again.returncode == 0 and json.loads(again.stdout)["changed"] is False
    assert sorted(dns.dig(ZONE, "CAA")) == sorted(wanted) and len(_journal(acme_world)) == before + len(changes)


# ---- the renewal schedule -------------------------------------------------------------------------------

def test_the_schedule_renews_only_within_renew_before_expiration(issued, caplog):
    """acme.RenewalSchedule as serve runs it: a round every renew_interval, which orders a new
    certificate only once the held one expires within renew_before_expiration (both configured)."""
    from ansible_collections.dstack.tee.agents.gateway import server  # pylint: disable=import-outside-toplevel
    config, _answer = issued
    caplog.set_level(logging.DEBUG, logger="dstack.gateway.acme")

    def one_round(before):
        """One round of the schedule (renew_interval 1 s) with this renew_before_expiration; its seconds."""
        settings = {"admin.listen": "", "core.certbot.renew_interval": "1s",
                    "core.certbot.renew_before_expiration": before}
        schedule = acme.RenewalSchedule(create_app(server.load_config(str(config), settings)).extensions[
            "dstack_gateway"].acme)
        schedule.also = (schedule.stop_event.set,)   # after the round's renewal: stop
        started = time.monotonic()
        schedule.start()
        schedule.thread.join(180)
        assert not schedule.thread.is_alive(), "the renewal round did not end"
        return time.monotonic() - started

    held = _certificate(config)
    left = int(held.not_after - time.time())
    # Expiring later than renew_before_expiration: the round orders nothing.
    assert one_round(f"{left - 3600}s") >= 1.0          # the first round waits out renew_interval
    assert _certificate(config) == held
    assert "renewal check: valid until" in caplog.text
    # Within it: the round orders a new certificate for a new key, quoted like the first.
    one_round(f"{left + 3600}s")
    renewed = _certificate(config)
    assert renewed.public_key != held.public_key and renewed.not_after >= held.not_after
    assert "renewal check: it expires in" in caplog.text and ": issued, valid until" in caplog.text
    assert acme.acme_info(_store(config))["quoted_hist_keys"][-1]["public_key"] == renewed.public_key


# ---- serve: the certificate served, renewed with connections open ---------------------------------------

needs_serve = pytest.mark.skipif(shutil.which("wireguard-go") is None or shutil.which("ip") is None,
                                 reason="wireguard-go and iproute2 are installed by scripts/setup.sh")


def _tls(port, root_pem_path, server_name=f"gateway.{ZONE}"):
    """A TLS connection to the data plane (handshake done) and the certificate it was served."""
    context = ssl.create_default_context(cafile=str(root_pem_path))
    conn = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname=server_name)
    return conn, x509.load_der_x509_certificate(conn.getpeercert(binary_form=True))


def _request(conn, path):
    conn.sendall(f"GET {path} HTTP/1.1\r\nHost: gateway.{ZONE}\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    head, _sep, body = data.decode().partition("\r\n\r\n")
    return head.split("\r\n")[0], body


def _admin(port, method):
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # the Admin API's RA-TLS cert: not under test
    request = urllib.request.Request(f"https://127.0.0.1:{port}/prpc/Admin.{method}", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {ADMIN_TOKEN}"})
    with urllib.request.urlopen(request, context=context, timeout=180) as answer:
        return json.loads(answer.read())


@needs_serve
def test_serve_renews_and_serves_the_new_certificate_without_dropping_connections(issued, acme_world, gateway_cvm):
    config, _answer = issued
    folder = Path(config).parent
    proxy_port, rpc_port, admin_port = free_port(), free_port(), free_port()
    netns, interface = f"acme-{PID}", f"wga{PID % 100000}"
    served_config = gateway_config(folder / "serve", acme_world, gateway_cvm, credentials=str(folder / "dns.ini"), **{
        "core": {"state_dir": str(folder / "state")},
        "core.wg": {"netns": netns, "interface": interface, "ip": "10.231.0.1/24", "client_ip_range": "10.231.0.0/25",
                    "reserved_net": ["10.231.0.1/32"], "listen_port": free_tcp_udp_port(),
                    "endpoint": "127.0.0.1:51820"},
        "core.proxy": {"listen_addr": "127.0.0.1", "listen_port": proxy_port},
        # Long enough for a connection that waits through a renewal before it sends its request.
        "core.proxy.timeouts": {"handshake": "60s"},
        "rpc": {"listen": f"127.0.0.1:{rpc_port}", "workers": 1},
        "admin": {"listen": f"127.0.0.1:{admin_port}", "token": ADMIN_TOKEN}})
    roots = folder / "pebble-roots.pem"
    roots.write_text(acme_world.pebble.issuing_roots())
    log_path = folder / "serve.log"
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(lambda: wireguard.netns_exists(netns) and wireguard.netns_remove(netns))
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(  # pylint: disable=consider-using-with
                [str(BIN / "dstack-gateway"), "serve", "--config", str(served_config)], stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        cleanup.callback(stop_process_group, proc)
        deadline = time.monotonic() + 60
        while " ready: " not in log_path.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text(errors="replace")[-5000:]
            time.sleep(0.1)
        first = _certificate(config)
        assert "kept (valid until" in log_path.read_text(errors="replace")   # the stored certificate, not ordered again

        # The data plane serves the stored certificate, and /.dstack/acme-info as the store says.
        conn, served = _tls(proxy_port, roots)
        status, body = _request(conn, "/.dstack/acme-info")
        assert status == "HTTP/1.1 200 OK" and json.loads(body) == acme.acme_info(_store(config))
        assert served.public_bytes(serialization.Encoding.PEM).decode() in first.chain

        # A connection opened before the renewal, its request not sent yet.
        before, served_before = _tls(proxy_port, roots)
        assert served_before == served
        started = time.monotonic()
        assert _admin(admin_port, "RenewCert") == {"renewed": True}
        renewal = time.monotonic() - started
        renewed = _certificate(config)
        assert renewed.public_key != first.public_key
        # New connections get the new certificate within the data plane's poll.
        deadline = time.monotonic() + 10 * acme.CERT_CHECK_INTERVAL
        while True:
            conn, now_served = _tls(proxy_port, roots)
            conn.close()
            if now_served != served:
                break
            assert time.monotonic() < deadline, "the renewed certificate was not served"
            time.sleep(0.2)
        swapped = time.monotonic() - started
        assert spki_der(now_served.public_key()).hex() == renewed.public_key
        assert acme.acme_info(_store(config))["quoted_hist_keys"][-1]["public_key"] == renewed.public_key
        # The connection opened before goes on, on its session with the old certificate.
        assert _request(before, "/health") == ("HTTP/1.1 200 OK", "OK\n")
        print(f"\nforced renewal through Admin.RenewCert: {renewal:.1f} s; served on new connections after {swapped:.1f} s")

        assert _admin(admin_port, "SetCaa") == {}
        assert len(acme_world.dns.dig(ZONE, "CAA")) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log_path.read_text(errors="replace")[-5000:]
    assert not wireguard.netns_exists(netns)


# ---- the credentials files themselves (no server needed) -------------------------------------------------

def _ini(path, text, mode=0o600):
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def test_credentials_files_are_checked_and_their_secrets_never_shown(tmp_path):
    from ansible_collections.dstack.tee.agents.gateway import dns_provider  # pylint: disable=import-outside-toplevel
    from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError  # pylint: disable=import-outside-toplevel
    secret = base64.b64encode(b"s" * 32).decode()
    good = f"dns_rfc2136_server = 127.0.0.1\ndns_rfc2136_name = k\ndns_rfc2136_secret = {secret}\n"
    provider = dns_provider.open_provider("rfc2136", _ini(tmp_path / "good.ini", good))
    assert provider.certbot_args(5)[:2] == ["--dns-rfc2136", "--dns-rfc2136-credentials"]
    assert provider.redact(f"certbot said {secret}!") == "certbot said <hidden>!"
    token = "cf-token-" + secrets.token_hex(8)
    cloudflare = dns_provider.open_provider("cloudflare", _ini(tmp_path / "cf.ini", f"dns_cloudflare_api_token = {token}\n"))
    assert cloudflare.certbot_args(30)[0] == "--dns-cloudflare" and token not in cloudflare.redact(token)
    for name, text, mode, said in (
            ("open.ini", good, 0o644, "may be read by others (mode 0644): chmod 600 it"),
            ("no-name.ini", good.replace("dns_rfc2136_name = k\n", ""), 0o600, "has no dns_rfc2136_name"),
            ("host.ini", good.replace("127.0.0.1", "ns1.example.com"), 0o600, "dns_rfc2136_server must be an IP address"),
            ("b64.ini", good.replace(secret, secret[:-2] + "!!"), 0o600, "dns_rfc2136_secret is not base64"),
            ("alg.ini", good + "dns_rfc2136_algorithm = HMAC-FOO\n", 0o600, "dns_rfc2136_algorithm must be one of"),
            ("junk.ini", good + "this line has no equals sign\n", 0o600, "line 4 is not `key = value`")):
        with pytest.raises(DstackError) as refused:
            dns_provider.open_provider("rfc2136", _ini(tmp_path / name, text, mode))
        assert said in str(refused.value) and name in str(refused.value) and secret[:-2] not in str(refused.value)
    with pytest.raises(DstackError, match="has no dns_cloudflare_api_token"):
        dns_provider.open_provider("cloudflare", _ini(tmp_path / "cf-empty.ini", "dns_cloudflare_email = a@b.c\n"))
    with pytest.raises(DstackError, match="dns_provider: must be one of rfc2136, cloudflare"):
        dns_provider.open_provider("route53", str(tmp_path / "good.ini"))
