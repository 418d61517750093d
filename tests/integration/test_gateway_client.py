"""The CVM side of gateway registration: gateway_client.GatewayClient against real gateways.

Real parts: a KMS (its Flask app in process) whose allowlist names the gateway app as
gatewayAppId; two simulated CVMs booted against it (app A, and the gateway app with its own
compose), which get their keys, gateway_app_id and KMS root from the KMS; the gateway CVM's
RA-TLS server certificate from its guest agent's GetTlsKey (usage_ra_tls + usage_server_auth,
signed by the KMS's SignCert); `dstack-gateway serve-control` processes (gunicorn, mutual TLS)
serving the control API with it; app A's client certificate the same way; the one verifier on
both sides. The refused gateways are real gateways too, which would register the CVM if it
asked: that they hold no registration shows the CVM sent nothing.
"""

import datetime
import json
import os
import ssl
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509

sys.path.insert(0, str(Path(__file__).resolve().parent))

# pylint: disable=wrong-import-position
from conftest import free_port, run_module  # noqa: E402
from test_gateway_control import ADMIN_TOKEN, GATEWAY_KEY, _server_cert, gateway_toml  # noqa: E402
from test_guest_boot import IMAGE, OS_IMAGE, NoContainers, make_share  # noqa: E402
from test_kms import make_kms  # noqa: E402
from ansible_collections.dstack.tee.agents.guest.api import create_app as guest_app  # noqa: E402
from ansible_collections.dstack.tee.agents.guest.boot import Boot  # noqa: E402
from ansible_collections.dstack.tee.agents.guest.context import GuestContext  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils import attestation, gateway_client, ra_tls, wireguard  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.kms_client import KmsCertSigner  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx  # noqa: E402

GATEWAY_COMPOSE = f"""services:
  gateway:
    image: {IMAGE}
    command: ["/bin/sh", "-c", "exec sleep infinity"]
"""


class GuestTlsKey:
    """A booted CVM's GetTlsKey through its guest agent's API (the KMS signs): what the guest
    boot will hand GatewayClient. `fail` makes it answer as a guest whose KMS is down."""

    def __init__(self, ctx):
        self.client = guest_app(ctx).test_client()
        self.fail = False

    def __call__(self, params):
        if self.fail:
            raise DstackError("kms", "cannot reach the KMS")
        answer = self.client.post("/GetTlsKey", json=params)
        assert answer.status_code == 200, answer.json
        return answer.json


def _boot(base, name, share, sim, kms):
    ctx = GuestContext.open(str(share), str(base / name), tee="sim", sim_state_dir=sim.state_dir)
    ctx.cert_signer = KmsCertSigner(kms, ctx)
    Boot(ctx, kms_client=kms, runner=NoContainers()).run()
    return ctx


def _write_server_cert(folder, answer):
    folder.mkdir()
    (folder / "rpc.crt").write_text("".join(answer["certificate_chain"][:2]))
    (folder / "rpc.key").write_text(answer["key"])
    return folder


class GatewayProcess:
    """`dstack-gateway serve-control` with the given server certificate (rpc.crt, rpc.key in `folder`)."""

    def __init__(self, world, folder):
        self.port, self.admin_port = free_port(), free_port()
        rpc = {"listen": f"127.0.0.1:{self.port}", "cert": str(folder / "rpc.crt"), "key": str(folder / "rpc.key"),
               "workers": 1}
        path = gateway_toml(world, folder / "state", rpc=rpc, admin={"listen": f"127.0.0.1:{self.admin_port}"})
        self.url = f"https://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "ansible_collections.dstack.tee.agents.gateway.cli",
                                      "serve-control", "--config", str(path)], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def _call(self, url, token=None):
        """Our own look at the gateway (not the CVM's check): TLS unverified, JSON back."""
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
        request = urllib.request.Request(url, data=b"{}", headers=headers, method="POST")
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return json.loads(response.read())

    def wait_ready(self, deadline):
        while True:
            try:
                return self._call(f"{self.url}/prpc/Gateway.Info")
            except (urllib.error.URLError, ConnectionError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(self.proc.stdout.read().decode(errors="replace")[-4000:]) from None
                time.sleep(0.1)

    def registered(self):
        """Admin.Status's instances: {instance_id: (ip, app_id)}."""
        hosts = self._call(f"https://127.0.0.1:{self.admin_port}/prpc/Admin.Status", token=ADMIN_TOKEN)["hosts"]
        return {h["instance_id"]: (h["ip"], h["app_id"]) for h in hosts}

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
        if self.proc.returncode is None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("gateway-client")
    sim = SimTdx(str(base / "sim"))
    kms_app, kms = make_kms(base, sim)
    (base / "a").mkdir()
    (base / "g").mkdir()
    share_a, app_a = make_share(base / "a", run_module, kms)
    share_g, app_g = make_share(base / "g", run_module, kms, compose=GATEWAY_COMPOSE)
    assert app_g["app_id"] != app_a["app_id"]
    # The KMS names the gateway app (the local allowlist's gatewayAppId): the CVMs get it with their keys.
    (base / "auth-config.json").write_text(json.dumps({
        "gatewayAppId": app_g["app_id"], "osImages": ["0x" + OS_IMAGE],
        "apps": {"0x" + a["app_id"]: {"composeHashes": ["0x" + a["compose_hash"]], "allowAnyDevice": True}
                 for a in (app_a, app_g)}}))
    cvm, gateway_cvm = _boot(base, "a1", share_a, sim, kms), _boot(base, "g1", share_g, sim, kms)
    keys = cvm.app_keys()
    assert keys["gateway_app_id"] == app_g["app_id"]
    server = {"subject": "gateway.test", "usage_ra_tls": True, "usage_server_auth": True}
    as_gateway, as_app_a = GuestTlsKey(gateway_cvm), GuestTlsKey(cvm)
    folders = {"gateway": _write_server_cert(base / "gateway", as_gateway(server)),
               # app A's own RA-TLS server certificate: genuine, attested, but not the gateway app's
               "other_app": _write_server_cert(base / "other-app", as_app_a(server)),
               # the gateway app's certificate, issued by the KMS, with no attestation in it
               "no_attestation": _write_server_cert(base / "no-attestation", as_gateway(dict(server, usage_ra_tls=False))),
               "plain_tls": base / "plain-tls"}
    folders["plain_tls"].mkdir()
    _server_cert(folders["plain_tls"])  # a CA of its own and a certificate for 127.0.0.1
    settings = {"kms_dir": base / "kms", "sim": sim}
    gateways = {name: GatewayProcess(settings, folder) for name, folder in folders.items()}
    try:
        deadline = time.monotonic() + 30
        for gateway in gateways.values():
            gateway.wait_ready(deadline)
        yield {"base": base, "sim": sim, "kms_app": kms_app, "cvm": cvm, "keys": keys, "app_a": app_a, "app_g": app_g,
               "get_tls_key": as_app_a, "gateways": gateways}
    finally:
        for gateway in gateways.values():  # all told to stop first: they exit in parallel
            if gateway.proc.poll() is None:
                gateway.proc.terminate()
        for gateway in gateways.values():
            gateway.stop()


def new_client(world, cache_path, get_tls_key=None):
    """The CVM's GatewayClient as the guest boot makes it: its KMS root, gateway_app_id from the KMS."""
    trust = attestation.QuoteTrust({"mode": "simulation", "sim_state_dir": world["sim"].state_dir}, str(world["base"]))
    return gateway_client.GatewayClient(str(cache_path), get_tls_key or world["get_tls_key"], world["keys"]["ca_cert"],
                                        trust, world["keys"]["gateway_app_id"])


def sign_certs(world):
    """How many certificates the KMS signed (SignCert releases in its audit log)."""
    return sum(1 for e in world["kms_app"].extensions["dstack_kms"].audit.read()
               if e.get("method") == "SignCert" and e.get("decision") == "release")


def test_a_cvm_registers_and_gets_an_address(world, tmp_path):
    cache = tmp_path / "run" / "gateway-cache.json"
    gateway = world["gateways"]["gateway"]
    registration = new_client(world, cache).register(gateway.url)
    instance_id = world["cvm"].instance()["instance_id"]
    assert registration.client_ip == "10.0.0.2"
    assert registration.gateway["app_id"] == world["app_g"]["app_id"]  # the attested gateway app
    assert gateway.registered()[instance_id] == ("10.0.0.2", world["app_a"]["app_id"])
    # The wg-quick file: this CVM's key and address, the gateway as its one peer.
    cached = json.loads(cache.read_text())
    gw_public = wireguard.public_key(GATEWAY_KEY)
    assert f"PrivateKey = {cached['wg_private_key']}\n" in registration.wg_quick
    assert "Address = 10.0.0.2/32\n" in registration.wg_quick
    assert f"PublicKey = {gw_public}\nAllowedIPs = 10.0.0.1/32\nEndpoint = gateway.test:51820\n" in registration.wg_quick
    assert registration.answer["wg"]["servers"][0]["pk"] == gw_public
    # The cache: 0600, in a folder made 0700, and no key in what a log would show.
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600 and stat.S_IMODE(cache.parent.stat().st_mode) == 0o700
    assert cached["wg_private_key"] not in repr(registration) and "PRIVATE KEY" not in repr(registration)
    assert [p.name for p in cache.parent.iterdir()] == ["gateway-cache.json"]  # the temporary key file is gone


def test_the_cache_is_reused_then_renewed_near_expiry(world, tmp_path):
    cache = tmp_path / "gateway-cache.json"
    gateway = world["gateways"]["gateway"]
    before = sign_certs(world)
    first = new_client(world, cache).register(gateway.url)
    assert sign_certs(world) == before + 1
    cached = json.loads(cache.read_text())
    leaf = x509.load_pem_x509_certificate(cached["certificate_chain"][0].encode())
    # A restarted checker (a new client on the same cache) registers with what is cached: no SignCert.
    again = new_client(world, cache).register(gateway.url)
    assert sign_certs(world) == before + 1 and json.loads(cache.read_text()) == cached
    assert again.client_ip == first.client_ip and again.wg_quick == first.wg_quick
    # Still more than 10 days left: reused.
    renew_at = leaf.not_valid_after_utc - datetime.timedelta(seconds=gateway_client.RENEW_BEFORE_SECONDS)
    new_client(world, cache).register(gateway.url, now=renew_at - datetime.timedelta(minutes=1))
    assert sign_certs(world) == before + 1
    # Within 10 days of expiry: a new certificate (the WireGuard key kept), and the gateway takes it.
    renewed = new_client(world, cache).register(gateway.url, now=renew_at + datetime.timedelta(minutes=1))
    assert sign_certs(world) == before + 2
    fresh = json.loads(cache.read_text())
    assert fresh["wg_private_key"] == cached["wg_private_key"] and fresh["certificate_chain"] != cached["certificate_chain"]
    assert renewed.client_ip == first.client_ip


def test_a_kms_outage_uses_the_still_valid_cached_certificate(world, tmp_path):
    cache = tmp_path / "gateway-cache.json"
    gateway = world["gateways"]["gateway"]
    down = GuestTlsKey(world["cvm"])
    down.fail = True
    with pytest.raises(DstackError) as err:  # nothing cached: the KMS's failure is the answer
        new_client(world, cache, down).register(gateway.url)
    assert err.value.field == "kms" and not cache.exists()
    new_client(world, cache).register(gateway.url)
    leaf = x509.load_pem_x509_certificate(json.loads(cache.read_text())["certificate_chain"][0].encode())
    near_expiry = leaf.not_valid_after_utc - datetime.timedelta(days=1)
    before = cache.read_bytes()
    assert new_client(world, cache, down).register(gateway.url, now=near_expiry).client_ip == "10.0.0.2"
    assert cache.read_bytes() == before


def test_a_damaged_cache_is_replaced(world, tmp_path):
    cache = tmp_path / "gateway-cache.json"
    cache.write_text('{"version": 1, "wg_private_key": "x"')
    gateway = world["gateways"]["gateway"]
    before = sign_certs(world)
    assert new_client(world, cache).register(gateway.url).client_ip == "10.0.0.2"
    assert sign_certs(world) == before + 1 and json.loads(cache.read_text())["version"] == 1


@pytest.mark.parametrize("name, field, words", [
    ("other_app", "app_id", "not the expected app"),
    ("no_attestation", "attestation", "no attestation extension"),
    ("plain_tls", "server_certificate", "does not chain to the KMS root"),
])
def test_the_cvm_refuses_a_gateway_that_is_not_the_gateway_app(world, tmp_path, name, field, words):
    gateway = world["gateways"][name]
    with pytest.raises(ra_tls.Refused) as err:
        new_client(world, tmp_path / "gateway-cache.json").register(gateway.url)
    assert err.value.field == field and words in err.value.reason, str(err.value)
    # A real gateway, which would have registered the CVM: it saw no RegisterCvm.
    assert gateway.registered() == {}


def test_gateway_errors_and_bad_settings_name_the_field(world, tmp_path):
    gateway = world["gateways"]["gateway"]
    client = new_client(world, tmp_path / "gateway-cache.json")
    with pytest.raises(DstackError) as err:  # the gateway's 400 comes back with its reason
        client.register(gateway.url, port_policy={"ports": [{"port": 0}]})
    assert err.value.field == "gateway" and "HTTP 400" in err.value.reason and "port_policy.ports[0].port" in err.value.reason
    for url in ("http://127.0.0.1:1", "https://127.0.0.1:99999", "https://user@127.0.0.1/", 7):
        with pytest.raises(DstackError) as err:
            client.register(url)
        assert err.value.field == "gateway_url", url
    with pytest.raises(DstackError) as err:
        client.register(f"https://127.0.0.1:{free_port()}")  # nothing listens there
    assert err.value.field == "gateway_url" and "cannot reach" in err.value.reason
    for app_id in ("any", "", "xyz"):  # dstack's "any" skips the check; here there is always one
        with pytest.raises(DstackError) as err:
            gateway_client.GatewayClient(str(tmp_path / "c.json"), world["get_tls_key"], world["keys"]["ca_cert"],
                                         None, app_id)
        assert err.value.field == "gateway_app_id"
