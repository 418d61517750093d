"""dstack.tee.verify_app (and playbooks/verify-app.yml): an outsider's check of an app, over real HTTPS.

Real parts: a KMS (its Flask app in process) and two simulated CVMs booted against it (app A,
app B with another compose), their guest agents' real Worker apps (agents/guest/worker.py); a
TLS server on 127.0.0.1 with a certificate for *.test.localhost from a test CA; the module run
as Ansible runs it, reaching https://<id>.test.localhost:<port> through the .localhost rule. The
front stands in for the gateway only in routing: `<id>-8090.` to a CVM's Worker, `<id>.` to a
page, `<id>-443s.` with the CVM's own RA-TLS certificate (chosen by SNI, as passthrough would
deliver it). Tests then re-route it: the Worker of another CVM, a replayed answer.
"""

import datetime
import json
import os
import ssl
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from werkzeug.serving import make_server

sys.path.insert(0, str(Path(__file__).resolve().parent))

# pylint: disable=wrong-import-position
from conftest import ROOT, free_port, run_module, run_playbook  # noqa: E402
from test_gateway_client import GATEWAY_COMPOSE, GuestTlsKey, _boot  # noqa: E402
from test_guest_boot import COMPOSE, OS_IMAGE, make_share  # noqa: E402
from test_kms import make_kms  # noqa: E402
from ansible_collections.dstack.tee.agents.guest.worker import create_worker_app  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils import gateway_http  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx  # noqa: E402

BASE = "test.localhost"
APP_YML = "name: boot-test\nallowed_envs: [GREETING, API_TOKEN]\nports:\n  - host_port: 8080\n    vm_port: 80\n"


def _ca(name):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(key, hashes.SHA256()))
    return key, cert


def _leaf(ca_key, ca_cert, dns_name):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def _pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _key_pem(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _context(folder, chain_pem, key_pem):
    (folder / "chain.pem").write_text(chain_pem)
    (folder / "key.pem").write_text(key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(folder / "chain.pem"), str(folder / "key.pem"))
    return context


def page(text):
    def app(_environ, start_response):
        body = text.encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
    return app


def canned(answer):
    """A Worker stand-in that answers the same recorded Worker.Attest answer whatever the nonce."""
    def app(_environ, start_response):
        body = json.dumps(answer).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
    return app


class Front:
    """The gateway's routing, nothing else: Host's first label -> a WSGI app; 502 for no route."""

    def __init__(self):
        self.routes = {}

    def __call__(self, environ, start_response):
        label = environ.get("HTTP_HOST", "").split(":")[0].split(".")[0]
        app = self.routes.get(label)
        if app is None:
            start_response("502 Bad Gateway", [("Content-Type", "text/plain"), ("Content-Length", "8")])
            return [b"no route"]
        return app(environ, start_response)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("verify-app")
    sim = SimTdx(str(base / "sim"))
    _kms_app, kms = make_kms(base, sim)
    (base / "a").mkdir()
    (base / "b").mkdir()
    share_a, app_a = make_share(base / "a", run_module, kms)
    share_b, app_b = make_share(base / "b", run_module, kms, compose=GATEWAY_COMPOSE)
    (base / "auth-config.json").write_text(json.dumps({
        "osImages": ["0x" + OS_IMAGE],
        "apps": {"0x" + a["app_id"]: {"composeHashes": ["0x" + a["compose_hash"]], "allowAnyDevice": True}
                 for a in (app_a, app_b)}}))
    cvm_a, cvm_b = _boot(base, "a1", share_a, sim, kms), _boot(base, "b1", share_b, sim, kms)
    # The app folder an outsider has: the compose file and app.yml the deploy was made from.
    app_dir = base / "hello"
    app_dir.mkdir()
    (app_dir / "docker-compose.yaml").write_text(COMPOSE)
    (app_dir / "app.yml").write_text(APP_YML)

    ca_key, ca = _ca("verify-app test gateway CA")
    other_key, other_ca = _ca("another CA")
    wildcard_key, wildcard = _leaf(ca_key, ca, f"*.{BASE}")
    (base / "ca.crt").write_text(_pem(ca))
    (base / "other-ca.crt").write_text(_pem(other_ca))
    (base / "other-ca.key").write_text(_key_pem(other_key))
    kms_root = cvm_a.app_keys()["ca_cert"]
    (base / "ca-and-kms.crt").write_text(_pem(ca) + kms_root)
    (base / "tls").mkdir()
    gateway_tls = _context(base / "tls", _pem(wildcard), _key_pem(wildcard_key))

    # Each CVM's own RA-TLS server certificate (GetTlsKey through its guest agent, the KMS signs),
    # for A's passthrough name: what a `-443s` app serves itself.
    passthrough = f"{app_a['app_id']}-443s"
    ra_tls = {}
    for name, ctx in (("a", cvm_a), ("b", cvm_b)):
        answer = GuestTlsKey(ctx)({"subject": "app", "alt_names": [f"{passthrough}.{BASE}"],
                                   "usage_ra_tls": True, "usage_server_auth": True})
        (base / f"ra-{name}").mkdir()
        ra_tls[name] = _context(base / f"ra-{name}", "".join(answer["certificate_chain"][:2]), answer["key"])
    served = {"passthrough": ra_tls["a"]}

    def by_sni(sock, server_name, _context_now):
        if server_name and server_name.startswith(passthrough + "."):
            sock.context = served["passthrough"]
    gateway_tls.sni_callback = by_sni

    front = Front()
    port = free_port()
    server = make_server("127.0.0.1", port, front, threaded=True, ssl_context=gateway_tls)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    workers = {"a": create_worker_app(cvm_a), "b": create_worker_app(cvm_b)}
    ids = {"a": app_a["app_id"], "instance_a": cvm_a.instance()["instance_id"], "b": app_b["app_id"]}
    default_routes = {f"{ids['a']}-8090": workers["a"], ids["a"]: page("hello from app A"),
                      f"{ids['instance_a']}-8090": workers["a"], ids["instance_a"]: page("hello from app A"),
                      passthrough: page("hello from app A, its own TLS"),
                      f"{ids['b']}-8090": workers["b"], ids["b"]: page("hello from app B")}
    front.routes.update(default_routes)
    try:
        yield {"base": base, "sim": sim, "app_a": app_a, "app_b": app_b, "ids": ids, "port": port, "front": front,
               "routes": default_routes, "workers": workers, "app_dir": app_dir, "ra_tls": ra_tls, "served": served,
               "cvm_a": cvm_a}
    finally:
        server.shutdown()
        thread.join(10)


@pytest.fixture
def w(world):
    """The world with its routes as made, whatever a test changed."""
    world["front"].routes.clear()
    world["front"].routes.update(world["routes"])
    world["served"]["passthrough"] = world["ra_tls"]["a"]
    return world


def url(world, label):
    return f"https://{label}.{BASE}:{world['port']}"


def args(world, **extra):
    out = {"app_url": url(world, world["ids"]["a"]), "app_dir": str(world["app_dir"]),
           "ca_cert": str(world["base"] / "ca.crt"), "sim_state_dir": world["sim"].state_dir, "timeout": 20}
    out.update(extra)
    return {k: v for k, v in out.items() if v is not None}


def names(result):
    return [c["name"] for c in result["checks"]]


def test_the_right_compose_passes_and_check_mode_checks_the_same(w):
    result = run_module("verify_app", args(w))
    assert not result.get("failed"), result.get("msg")
    assert result["ok"] and not result["changed"]
    assert result["app_id"] == w["app_a"]["app_id"] and result["compose_hash"] == w["app_a"]["compose_hash"]
    assert result["local_compose_hash"] == w["app_a"]["compose_hash"]  # app.yml read as the deploy read it
    assert result["instance_id"] == w["ids"]["instance_a"]
    assert result["attestation_mode"] == "dstack-sim" and result["tcb_status"] == "UpToDate"
    assert result["boot_info"]["os_image_hash"] == OS_IMAGE  # for comparisons the module does not make
    checks = {c["name"]: c for c in result["checks"]}
    for name in ("worker", "dcap", "tcb_status", "report_data", "event_log", "rtmr3_replay", "compose_hash",
                 "app_id", "tls", "app"):
        assert checks[name]["ok"], checks.get(name)
    assert "terminated by the gateway (certificate for *.test.localhost, issuer verify-app test gateway CA)" \
        in checks["tls"]["detail"]
    assert checks["app"]["detail"].endswith("answered HTTP 200 OK")
    report = "\n".join(result["report"])
    assert f"app {w['app_a']['app_id']}, instance {w['ids']['instance_a']}" in report
    assert "verified (dstack-sim, TCB UpToDate)" in report and "checks passed" in report
    # Check mode only reads: the same checks, the same answers.
    checked = run_module("verify_app", args(w), check=True)
    assert not checked.get("failed"), checked.get("msg")
    assert [(c["name"], c["ok"]) for c in checked["checks"]] == [(c["name"], c["ok"]) for c in result["checks"]]


def test_a_compose_file_with_the_deploys_options_and_an_instance_url_pass(w):
    compose = str(w["app_dir"] / "docker-compose.yaml")
    result = run_module("verify_app", args(w, app_dir=None, compose=compose, name="boot-test",
                                           allowed_envs=["GREETING", "API_TOKEN"],
                                           app_url=url(w, w["ids"]["instance_a"])))
    assert not result.get("failed"), result.get("msg")
    checks = {c["name"]: c for c in result["checks"]}
    assert checks["instance_id"]["ok"] and "app_id" not in checks  # the URL names the instance
    # The folder's name is not the deploy's app name: another app-compose.json, another hash.
    other = run_module("verify_app", args(w, app_dir=None, compose=compose, allowed_envs=["GREETING", "API_TOKEN"]))
    assert other["failed"] and other["msg"].startswith("compose_hash: ")


def test_a_changed_compose_file_fails_naming_compose_hash(w, tmp_path):
    changed = tmp_path / "changed"
    changed.mkdir()
    (changed / "docker-compose.yaml").write_text(COMPOSE.replace("8080:80", "8081:80"))
    (changed / "app.yml").write_text(APP_YML)
    result = run_module("verify_app", args(w, app_dir=str(changed)))
    assert result["failed"] and not result["ok"]
    assert result["msg"] == (f"compose_hash: the CVM runs {w['app_a']['compose_hash']}, the local compose file is "
                             f"{result['local_compose_hash']} ({changed / 'docker-compose.yaml'})")
    assert result["local_compose_hash"] != w["app_a"]["compose_hash"]
    # Everything else still checked, and passing: the report says what is wrong, and only that.
    assert [c["name"] for c in result["checks"] if not c["ok"]] == ["compose_hash"]
    assert any(line.startswith("FAILED compose_hash: ") for line in result["report"])


def test_a_quote_from_another_cvm_fails(w):
    # The front sends A's Worker name to B's Worker: a fresh, valid quote over this nonce, of app B.
    w["front"].routes[f"{w['ids']['a']}-8090"] = w["workers"]["b"]
    result = run_module("verify_app", args(w))
    assert result["failed"] and result["app_id"] == w["app_b"]["app_id"]
    failed = {c["name"]: c["detail"] for c in result["checks"] if not c["ok"]}
    assert set(failed) == {"compose_hash", "app_id"}
    assert failed["app_id"] == (f"the CVM that answered is app {w['app_b']['app_id']} (instance "
                                f"{result['instance_id']}), not the URL's {w['ids']['a']}")
    assert result["msg"].startswith("compose_hash: the CVM runs " + w["app_b"]["compose_hash"])
    # B's own compose file does not help: the URL names app A.
    b_dir = w["base"] / "b-app"
    b_dir.mkdir(exist_ok=True)
    (b_dir / "docker-compose.yaml").write_text(GATEWAY_COMPOSE)
    (b_dir / "app.yml").write_text(APP_YML)
    as_b = run_module("verify_app", args(w, app_dir=str(b_dir)))
    assert as_b["msg"].startswith("app_id: the CVM that answered is app " + w["app_b"]["app_id"])


def test_a_replayed_answer_fails_naming_report_data(w):
    # A genuine answer of A's Worker, recorded earlier (over another caller's nonce), replayed.
    recorded = w["workers"]["a"].test_client().post("/prpc/Worker.Attest", json={"nonce": "11" * 32}).json
    w["front"].routes[f"{w['ids']['a']}-8090"] = canned(recorded)
    result = run_module("verify_app", args(w))
    assert result["failed"]
    assert result["msg"] == "report_data: the quote is not over this check's nonce (a replayed or another CVM's quote)"
    # The quote itself is genuine: the DCAP chain and the event log verify; only the nonce is wrong.
    checks = {c["name"]: c["ok"] for c in result["checks"]}
    assert checks["dcap"] and checks["rtmr3_replay"] and not checks["report_data"]
    assert "compose_hash" not in checks and "app" not in checks  # nothing compared with an unverified quote


@pytest.mark.parametrize("route, words", [
    (page("<html>an app, not the Worker</html>"), "did not answer JSON"),
    (canned({"quote": "not hex", "event_log": "[]"}), "answered: quote: is not hex"),
    (canned({"quote": "00" * 64}), "answered: event_log: is missing"),
])
def test_a_worker_that_answers_no_quote_fails_naming_worker(w, route, words):
    w["front"].routes[f"{w['ids']['a']}-8090"] = route
    result = run_module("verify_app", args(w))
    assert result["failed"] and result["msg"].startswith("worker: ") and words in result["msg"], result["msg"]
    assert names(result) == ["worker"]


def test_another_ca_fails_naming_tls(w):
    result = run_module("verify_app", args(w, ca_cert=str(w["base"] / "other-ca.crt")))
    assert result["failed"] and result["msg"].startswith(f"tls: the certificate {w['ids']['a']}-8090.{BASE} served "
                                                         f"does not validate under {w['base'] / 'other-ca.crt'}")
    assert names(result) == ["tls"]


def test_a_passthrough_app_with_its_own_ra_tls_certificate(w):
    passthrough = url(w, f"{w['ids']['a']}-443s")
    result = run_module("verify_app", args(w, app_url=passthrough, ca_cert=str(w["base"] / "ca-and-kms.crt")))
    assert not result.get("failed"), result.get("msg")
    tls = next(c for c in result["checks"] if c["name"] == "tls")
    assert "served by the attested CVM itself (RA-TLS certificate for " in tls["detail"]
    assert f"app {w['app_a']['app_id']}, instance {w['ids']['instance_a']})" in tls["detail"]
    # Under the gateway's CA alone, the app's own certificate (KMS-issued) does not validate.
    alone = run_module("verify_app", args(w, app_url=passthrough))
    assert alone["failed"] and alone["msg"].startswith(f"tls: the certificate {w['ids']['a']}-443s.{BASE} served")
    # B's genuine RA-TLS certificate (its names made for A's URL) served at A's URL: another app.
    w["served"]["passthrough"] = w["ra_tls"]["b"]
    other = run_module("verify_app", args(w, app_url=passthrough, ca_cert=str(w["base"] / "ca-and-kms.crt")))
    assert other["failed"] and other["msg"].startswith(f"tls: it is app {w['app_b']['app_id']}'s")


def test_wait_timeout_retries_until_the_route_exists(w):
    for label in (w["ids"]["a"], f"{w['ids']['a']}-8090"):
        del w["front"].routes[label]
    at_once = run_module("verify_app", args(w))
    assert at_once["failed"] and at_once["msg"].startswith("worker: ") and "HTTP 502" in at_once["msg"]
    timer = threading.Timer(2.0, lambda: w["front"].routes.update(w["routes"]))
    timer.start()
    started = time.monotonic()
    try:
        waited = run_module("verify_app", args(w, wait_timeout=30))
    finally:
        timer.cancel()
    assert not waited.get("failed"), waited.get("msg")
    assert 2.0 <= time.monotonic() - started < 30


def test_an_answer_larger_than_the_limit_is_refused(w):
    """gateway_http.fetch bounds what it reads (here in this process, through the .localhost rule)."""
    big = "x" * 5000
    w["front"].routes["big"] = page(big)
    context = gateway_http.ssl_context(str(w["base"] / "ca.crt"))
    answer = gateway_http.fetch(url(w, "big"), context=context, max_bytes=5000)
    assert answer.status == 200 and answer.body == big.encode() and answer.peer_chain
    with pytest.raises(DstackError) as err:
        gateway_http.fetch(url(w, "big"), context=context, max_bytes=4999)
    assert err.value.field == "response" and "answered 5000 bytes, more than the 4999 allowed" in err.value.reason

    def no_length(_environ, start_response):  # the size known only by reading
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [big.encode()]
    w["front"].routes["big"] = no_length
    with pytest.raises(DstackError) as err:
        gateway_http.fetch(url(w, "big"), context=context, max_bytes=4999)
    assert err.value.field == "response" and "answered more than the 4999 bytes allowed" in err.value.reason


def test_bad_input_names_the_option(w, tmp_path):
    bad_url = run_module("verify_app", args(w, app_url="https://not-an-id.test.localhost"))
    assert bad_url["failed"] and bad_url["field"] == "app_url" and "40 hex digits" in bad_url["msg"]
    http = run_module("verify_app", args(w, app_url=f"http://{w['ids']['a']}.{BASE}"))
    assert http["failed"] and http["msg"].startswith("app_url: must be an https:// URL")
    empty = tmp_path / "empty"
    empty.mkdir()
    no_compose = run_module("verify_app", args(w, app_dir=str(empty)))
    assert no_compose["failed"] and no_compose["msg"] == f"app_dir: {empty} has no docker-compose.yaml"
    # A verifier never makes a simulated TDX where it was told one is.
    missing = tmp_path / "no-sim"
    no_sim = run_module("verify_app", args(w, sim_state_dir=str(missing)))
    assert no_sim["failed"] and no_sim["field"] == "sim_state_dir" and not missing.exists()


def test_the_playbook(w):
    # A relative app_dir is the shell's (ansible-playbook runs in ROOT), not the module's folder's.
    proc = run_playbook(ROOT / "playbooks" / "verify-app.yml", "-e", f"app_url={url(w, w['ids']['a'])}",
                        "-e", f"app_dir={os.path.relpath(w['app_dir'], ROOT)}", "-e", f"ca_cert={w['base'] / 'ca.crt'}",
                        "-e", f"sim_state_dir={w['sim'].state_dir}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert f"CVM:           app {w['app_a']['app_id']}" in proc.stdout
    assert "terminated by the gateway (certificate for *.test.localhost" in proc.stdout
    assert "checks passed" in proc.stdout
    # A changed compose file: the report is shown, then the play fails naming the check.
    changed = w["base"] / "changed-for-playbook"
    changed.mkdir(exist_ok=True)
    (changed / "docker-compose.yaml").write_text(COMPOSE.replace("8080:80", "8082:80"))
    (changed / "app.yml").write_text(APP_YML)
    failed = run_playbook(ROOT / "playbooks" / "verify-app.yml", "-e", f"app_url={url(w, w['ids']['a'])}",
                          "-e", f"app_dir={changed}", "-e", f"ca_cert={w['base'] / 'ca.crt'}",
                          "-e", f"sim_state_dir={w['sim'].state_dir}")
    assert failed.returncode != 0
    assert "FAILED compose_hash: the CVM runs " + w["app_a"]["compose_hash"] in failed.stdout
    assert "TASK [Stop naming the check that failed]" in failed.stdout
    assert "compose_hash: the CVM runs" in failed.stdout.split("TASK [Stop naming the check that failed]")[1]


def test_verify_quote_shares_the_trust_options(w, tmp_path):
    """verify_quote takes its trust root through the same options (attestation.ModuleTrust)."""
    quote, event_log = w["cvm_a"].quote(b"a GetQuote answer")
    answer = tmp_path / "quote.json"
    answer.write_text(json.dumps({"quote": quote.hex(), "event_log": event_log}))
    ok = run_module("verify_quote", {"quote_file": str(answer), "sim_state_dir": w["sim"].state_dir,
                                     "expected_compose_hash": w["app_a"]["compose_hash"]})
    assert not ok.get("failed"), ok.get("msg")
    other_sim = SimTdx(str(tmp_path / "other-sim"))  # another simulated installation: another root
    refused = run_module("verify_quote", {"quote_file": str(answer), "sim_state_dir": other_sim.state_dir})
    assert refused["failed"] and refused["msg"].startswith("dcap: ")
