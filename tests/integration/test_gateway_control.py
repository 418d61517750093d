"""The gateway's control plane: RegisterCvm trusts only the RA-TLS client certificate.

Real parts: a KMS (its Flask app in process), simulated CVMs booted by the guest agent against it
(measured identity, attested key release), their RA-TLS client certificates from the guest
agent's GetTlsKey signed by the KMS's SignCert, the one verifier, the SQLite store, real HTTP for
the authorization webhook, and a real gunicorn serving the control API over mutual TLS. The
WireGuard hub is a recording stand-in (the real one is plugins/module_utils/wireguard.py's Uapi).
"""

import base64
import datetime
import http.server
import json
import os
import shutil
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent))

# pylint: disable=wrong-import-position
from conftest import free_port, run_module  # noqa: E402
from test_guest_boot import OS_IMAGE, NoContainers, make_share  # noqa: E402
from test_kms import make_kms  # noqa: E402
from ansible_collections.dstack.tee.agents.gateway import config as gateway_config  # noqa: E402
from ansible_collections.dstack.tee.agents.gateway.app import create_admin_app, create_app  # noqa: E402
from ansible_collections.dstack.tee.agents.guest.api import create_app as guest_app  # noqa: E402
from ansible_collections.dstack.tee.agents.guest.boot import Boot  # noqa: E402
from ansible_collections.dstack.tee.agents.guest.context import GuestContext  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils import root_keys  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils import app_certs, wireguard  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.kms_client import KmsCertSigner  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx  # noqa: E402

ADMIN_TOKEN = "admin-token-0123456789abcdef"
GATEWAY_KEY = wireguard.generate_private_key()


# ---- the world: a KMS, CVMs booted against it, their RA-TLS client certificates -------------------

def _der_chain(pems):
    return [x509.load_pem_x509_certificate(p.encode()).public_bytes(serialization.Encoding.DER) for p in pems]


class Cvm:
    """A booted simulated CVM and what it shows the gateway."""

    def __init__(self, ctx, kms, app):
        self.ctx, self.app = ctx, app
        self.ctx.cert_signer = KmsCertSigner(kms, ctx)
        self.instance_id = ctx.instance()["instance_id"]
        self.wg_private = wireguard.generate_private_key()
        self.wg_public = wireguard.public_key(self.wg_private)
        self.cert = self.tls_key()

    def tls_key(self, **options):
        """GetTlsKey through the guest agent's API: {key, certificate_chain} (the KMS signs)."""
        params = {"subject": "dstack-gateway-client", "usage_ra_tls": True, "usage_client_auth": True}
        params.update(options)
        answer = guest_app(self.ctx).test_client().post("/GetTlsKey", json=params)
        assert answer.status_code == 200, answer.json
        return answer.json

    @property
    def chain(self):
        return _der_chain(self.cert["certificate_chain"])


def _boot(base, name, share, sim, kms):
    ctx = GuestContext.open(str(share), str(base / name), tee="sim", sim_state_dir=sim.state_dir)
    Boot(ctx, kms_client=kms, runner=NoContainers()).run()
    return ctx


def _allow(path, *apps):
    path.write_text(json.dumps({"osImages": ["0x" + OS_IMAGE], "apps": {
        "0x" + a["app_id"]: {"composeHashes": ["0x" + a["compose_hash"]], "allowAnyDevice": True} for a in apps}}))


def _no_instance_id(name, args):
    return run_module(name, dict(args, no_instance_id=True) if name == "app_compose" else args)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("gateway-world")
    sim = SimTdx(str(base / "sim"))
    kms_app, kms = make_kms(base, sim)
    (base / "a").mkdir()
    (base / "n").mkdir()
    share_a, app_a = make_share(base / "a", run_module, kms)
    share_n, app_n = make_share(base / "n", _no_instance_id, kms)
    _allow(base / "auth-config.json", app_a, app_n)
    a1 = Cvm(_boot(base, "a1", share_a, sim, kms), kms, app_a)
    a2 = Cvm(_boot(base, "a2", share_a, sim, kms), kms, app_a)  # a second instance of app A
    no_id = Cvm(_boot(base, "n1", share_n, sim, kms), kms, app_n)
    # Another KMS (other root keys) on the same platform, and a CVM of app A that trusts it.
    (base / "other").mkdir()
    other_app, other_kms = make_kms(base / "other", sim)
    _allow(base / "other" / "auth-config.json", app_a)
    (base / "oa").mkdir()
    other_share, same_app = make_share(base / "oa", run_module, other_kms)  # the same compose: app A
    foreign = Cvm(_boot(base, "o1", other_share, sim, other_kms), other_kms, same_app)
    return {"base": base, "sim": sim, "kms_app": kms_app, "kms_dir": base / "kms", "a1": a1, "a2": a2,
            "no_id": no_id, "foreign": foreign, "other_kms_app": other_app}


class RecordingHub:
    """Stands in for wireguard.Uapi: records the peer changes; handshakes given by the test."""

    def __init__(self):
        self.calls, self.peers, self.handshakes, self.fail = [], {}, {}, False

    def _maybe_fail(self):
        if self.fail:
            raise DstackError("wireguard", "the UAPI socket is gone")

    def set_peer(self, public_key, allowed_ips, endpoint=None, persistent_keepalive=None):
        self._maybe_fail()
        self.calls.append(("set_peer", public_key, list(allowed_ips)))
        self.peers[public_key] = list(allowed_ips)
        del endpoint, persistent_keepalive

    def remove_peer(self, public_key):
        self._maybe_fail()
        self.calls.append(("remove_peer", public_key))
        self.peers.pop(public_key, None)

    def sync_peers(self, peers):
        self._maybe_fail()
        assert all(isinstance(p, wireguard.Peer) for p in peers)
        self.calls.append(("sync_peers", sorted(p.public_key for p in peers)))
        self.peers = {p.public_key: list(p.allowed_ips) for p in peers}

    def get(self):
        return {"peers": [wireguard.Peer(k, v, last_handshake=self.handshakes.get(k, 0)) for k, v in self.peers.items()]}


def gateway_toml(world, state_dir, **sections):
    """A gateway.toml for this world; sections: {"core.wg": {...}} merged over the defaults."""
    values = {
        "core": {"state_dir": str(state_dir), "kms_url": "https://kms.test"},
        "core.wg": {"private_key": GATEWAY_KEY, "endpoint": "gateway.test:51820"},
        "core.proxy": {"base_domain": "dstack.localhost"},
        "rpc": {"kms_root_ca": str(world["kms_dir"] / root_keys.ROOT_CA_CERT)},
        "attestation": {"mode": "simulation", "sim_state_dir": world["sim"].state_dir},
        "admin": {"listen": "127.0.0.1:8011", "token": ADMIN_TOKEN},
    }
    for name, extra in sections.items():
        values.setdefault(name, {}).update(extra)
    text = ""
    for name, table in values.items():
        text += f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items()) + "\n"
    path = Path(state_dir).parent / f"{Path(state_dir).name}.toml"
    path.write_text(text)
    return path


class Gateway:
    """A gateway's apps over one state directory (a new one is a restart)."""

    def __init__(self, world, state_dir, hub=None, **sections):
        self.config = gateway_config.load_config(gateway_toml(world, state_dir, **sections), environ={})
        self.hub = RecordingHub() if hub is None else hub
        self.app = create_app(self.config, hub=self.hub)
        self.service = self.app.extensions["dstack_gateway"]
        self.client = self.app.test_client()
        self.admin = create_admin_app(self.config, self.service).test_client()

    def register(self, cvm=None, chain=None, **body):
        if cvm is not None:
            body.setdefault("client_public_key", cvm.wg_public)
            chain = cvm.chain if chain is None else chain
        environ = {"dstack.peer_cert_chain": chain} if chain is not None else {}
        return self.client.post("/prpc/Gateway.RegisterCvm", json=body, environ_base=environ)

    def call_admin(self, method, token=ADMIN_TOKEN, **params):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.admin.post(f"/prpc/Admin.{method}", json=params, headers=headers)


@pytest.fixture
def gateway(world, tmp_path):
    return Gateway(world, tmp_path / "gw")


# ---- RegisterCvm --------------------------------------------------------------------------------

def test_register_takes_the_identity_from_the_certificate_only(gateway, world):
    a1 = world["a1"]
    # The body's claims of another identity are not read.
    answer = gateway.register(a1, app_id="ee" * 20, instance_id="ff" * 20, compose_hash="dd" * 32)
    assert answer.status_code == 200, answer.json
    gw_public = wireguard.public_key(GATEWAY_KEY)
    assert answer.json == {
        "wg": {"client_ip": "10.0.0.2", "servers": [{"pk": gw_public, "ip": "10.0.0.1/24", "endpoint": "gateway.test:51820"}]},
        "agent": {"external_port": 443, "internal_port": 8090, "domain": "dstack.localhost",
                  "app_address_ns_prefix": "_dstack-app-address"},
        "gateways": [dict(answer.json["gateways"][0], wg_public_key=gw_public, wg_ip="10.0.0.1/24",
                          wg_endpoint="gateway.test:51820")]}
    stored = gateway.service.store.instance(a1.instance_id)
    assert (stored.app_id, stored.compose_hash, stored.client_ip, stored.public_key) == \
        (a1.app["app_id"], a1.app["compose_hash"], "10.0.0.2", a1.wg_public)
    assert gateway.service.store.instance("ff" * 20) is None and gateway.service.store.count() == 1
    assert gateway.hub.calls == [("set_peer", a1.wg_public, ["10.0.0.2/32"])]


def test_instances_get_the_next_address_and_keep_theirs_with_a_new_key(gateway, world):
    a1, a2 = world["a1"], world["a2"]
    assert a1.instance_id != a2.instance_id
    assert gateway.register(a1).json["wg"]["client_ip"] == "10.0.0.2"
    assert gateway.register(a2).json["wg"]["client_ip"] == "10.0.0.3"
    new_key = wireguard.public_key(wireguard.generate_private_key())
    again = gateway.register(a1, client_public_key=new_key,
                             port_policy={"ports": [{"port": 80, "pp": True}], "restrict_mode": True})
    assert again.status_code == 200 and again.json["wg"]["client_ip"] == "10.0.0.2"
    assert gateway.hub.calls[-2:] == [("remove_peer", a1.wg_public), ("set_peer", new_key, ["10.0.0.2/32"])]
    assert gateway.service.store.port_policy(a1.instance_id) == {"ports": [{"port": 80, "pp": True}],
                                                                 "restrict_mode": True}
    assert sorted(i.instance_id for i in gateway.service.store.instances_of(a1.app["app_id"])) == \
        sorted([a1.instance_id, a2.instance_id])
    assert gateway.call_admin("GetMeta").json == {"registered": 2, "online": 0}


def _refused(answer, field):
    assert answer.status_code == 403, (answer.status_code, answer.json)
    assert answer.json["error"].startswith(field), answer.json
    return answer.json["error"]


def test_refused_without_a_certificate(gateway, world):
    _refused(gateway.register(chain=[], client_public_key=world["a1"].wg_public), "client_certificate")
    _refused(gateway.register(client_public_key=world["a1"].wg_public), "client_certificate")
    assert gateway.service.store.count() == 0 and gateway.hub.calls == []


def test_refused_a_certificate_of_another_kms(gateway, world):
    foreign = world["foreign"]
    # A genuine CVM of the same app, but its certificate chains to another KMS's root.
    assert "does not chain" in _refused(gateway.register(foreign), "client_certificate")
    # Even when it presents our KMS's root as its top certificate.
    ours = (world["kms_dir"] / root_keys.ROOT_CA_CERT).read_text()
    chain = foreign.chain[:2] + _der_chain([ours])
    _refused(gateway.register(foreign, chain=chain), "client_certificate")
    # A leaf alone (no app CA) cannot be checked, so it is refused.
    _refused(gateway.register(world["a1"], chain=world["a1"].chain[:1]), "client_certificate")
    assert gateway.service.store.count() == 0 and gateway.hub.calls == []


def test_refused_a_kms_certificate_without_attestation_or_not_for_clients(gateway, world):
    a1 = world["a1"]
    plain = a1.tls_key(usage_ra_tls=False)  # KMS-issued, chains fine, carries no quote
    assert "no attestation extension" in _refused(gateway.register(a1, chain=_der_chain(plain["certificate_chain"])),
                                                  "attestation")
    server_only = a1.tls_key(usage_client_auth=False)
    assert "client authentication" in _refused(
        gateway.register(a1, chain=_der_chain(server_only["certificate_chain"])), "client_certificate")


def _reissued(world, cvm, attestation, key=None, app_id=None):
    """A leaf signed by the real app CA (from the KMS's root keys: what a KMS that embedded an
    unchecked attestation would issue), for `key` (a fresh one by default)."""
    keys = root_keys.load(str(world["kms_dir"]))
    app_id = app_id or cvm.app["app_id"]
    ca_key, ca_cert = app_certs.app_ca(keys.ca_key, keys.ca_cert, app_id)
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
           .sign(key, hashes.SHA256()))
    leaf = app_certs.issue_leaf(ca_key, ca_cert, csr, app_id, usage_server_auth=False, usage_client_auth=True,
                                attestation=attestation)
    return [c.public_bytes(serialization.Encoding.DER) for c in (leaf, ca_cert, keys.ca_cert)]


def _attestation_of(cvm):
    leaf = x509.load_pem_x509_certificate(cvm.cert["certificate_chain"][0].encode())
    return leaf.extensions.get_extension_for_oid(x509.ObjectIdentifier(app_certs.OID_ATTESTATION)).value.value


def test_refused_tampered_attestations(gateway, world):
    a1 = world["a1"]
    genuine = json.loads(_attestation_of(a1))
    leaf_key = serialization.load_pem_private_key(a1.cert["key"].encode(), None)
    # The control: the same document re-issued for its own key passes (so each refusal below is the tamper's).
    assert gateway.register(a1, chain=_reissued(world, a1, _attestation_of(a1), key=leaf_key)).status_code == 200
    # 1. One byte of the quote changed.
    quote = bytearray.fromhex(genuine["quote"])
    quote[200] ^= 1
    flipped = json.dumps(dict(genuine, quote=quote.hex())).encode()
    assert "dcap" in _refused(gateway.register(a1, chain=_reissued(world, a1, flipped, key=leaf_key)), "attestation")
    # 2. The genuine attestation, of another key (the one in a1's certificate), on a new key's leaf.
    assert "report_data" in _refused(gateway.register(a1, chain=_reissued(world, a1, _attestation_of(a1))),
                                     "attestation")
    # 3. The event log changed (an identity event's payload): it no longer replays to RTMR3.
    log = json.loads(genuine["event_log"]) if isinstance(genuine["event_log"], str) else genuine["event_log"]
    entry = next(e for e in log if e.get("event") == "instance-id")
    entry["event_payload"] = "ab" * 20
    relogged = json.dumps(dict(genuine, event_log=json.dumps(log))).encode()
    _refused(gateway.register(a1, chain=_reissued(world, a1, relogged, key=leaf_key)), "attestation")
    # 4. App A's genuine attestation under another app's CA: the attested app is not the certificate's.
    other = _reissued(world, a1, _attestation_of(a1), key=leaf_key, app_id="ee" * 20)
    assert "app_id" in _refused(gateway.register(a1, chain=other), "attestation")
    # 5. Not an attestation document at all.
    _refused(gateway.register(a1, chain=_reissued(world, a1, b"[1, 2]", key=leaf_key)), "attestation")
    assert gateway.service.store.count() == 1  # the control only


def test_refused_an_app_with_no_instance_id(gateway, world):
    no_id = world["no_id"]
    assert no_id.instance_id == ""
    assert "no_instance_id" in _refused(gateway.register(no_id), "instance_id")
    assert gateway.service.store.count() == 0


def test_refused_a_wireguard_key_of_another_instance(gateway, world):
    a1, a2 = world["a1"], world["a2"]
    assert gateway.register(a1).status_code == 200
    assert "another instance" in _refused(gateway.register(a2, client_public_key=a1.wg_public), "client_public_key")
    assert gateway.service.store.instance(a2.instance_id) is None
    assert gateway.hub.calls == [("set_peer", a1.wg_public, ["10.0.0.2/32"])]


def test_refused_an_instance_id_registered_to_another_app(gateway, world):
    a1 = world["a1"]
    gateway.service.store.register(a1.instance_id, "ee" * 20, "dd" * 32, wireguard.public_key(wireguard.generate_private_key()))
    assert "another app" in _refused(gateway.register(a1), "instance_id")
    assert gateway.service.store.instance(a1.instance_id).app_id == "ee" * 20
    assert gateway.hub.calls == []


@pytest.mark.parametrize("body, field", [
    ({}, "client_public_key"),
    ({"client_public_key": 7}, "client_public_key"),
    ({"client_public_key": "not base64!"}, "client_public_key"),
    ({"client_public_key": base64.b64encode(b"k" * 31).decode()}, "client_public_key"),
    ({"port_policy": "all"}, "port_policy"),
    ({"port_policy": {"ports": [{"port": 0}]}}, "port_policy.ports[0].port"),
    ({"port_policy": {"ports": [{"port": 80, "pp": "yes"}]}}, "port_policy.ports[0].pp"),
    ({"port_policy": {"ports": [{"port": 80}, {"port": 80}]}}, "port_policy.ports[1].port"),
    ({"port_policy": {"restrict_mode": 1}}, "port_policy.restrict_mode"),
    ({"port_policy": {"allow": []}}, "port_policy.allow"),
])
def test_malformed_bodies_are_400_naming_the_field(gateway, world, body, field):
    a1 = world["a1"]
    if "client_public_key" not in body and field != "client_public_key":
        body = dict(body, client_public_key=a1.wg_public)
    answer = gateway.client.post("/prpc/Gateway.RegisterCvm", json=body, environ_base={"dstack.peer_cert_chain": a1.chain})
    assert answer.status_code == 400, answer.json
    assert answer.json["error"].startswith(field), answer.json
    assert gateway.service.store.count() == 0


def test_malformed_requests_are_4xx_never_500(gateway, world):
    environ = {"dstack.peer_cert_chain": world["a1"].chain}
    post = gateway.client.post
    assert post("/prpc/Gateway.RegisterCvm", data=b"{not json", environ_base=environ).status_code == 400
    assert post("/prpc/Gateway.RegisterCvm", data=b"[1]", environ_base=environ).status_code == 400
    deep = b"[" * 5000 + b"]" * 5000
    assert post("/prpc/Gateway.RegisterCvm", data=deep, environ_base=environ).status_code == 400
    assert post("/prpc/Gateway.RegisterCvm", data=b" " * (70 * 1024), environ_base=environ).status_code == 413
    assert gateway.client.get("/prpc/Gateway.RegisterCvm").status_code == 405
    garbage = gateway.client.post("/prpc/Gateway.RegisterCvm", json={"client_public_key": world["a1"].wg_public},
                                  environ_base={"dstack.peer_cert_chain": [b"\x30\x03\x02\x01\x01"]})
    assert garbage.status_code == 403 and garbage.json["error"].startswith("client_certificate")


class _Webhook(http.server.BaseHTTPRequestHandler):
    status = 200
    seen = []

    def do_POST(self):  # pylint: disable=invalid-name
        self.seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_the_authorization_webhook_is_asked_and_fails_closed(world, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Webhook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/app-auth"
        gateway = Gateway(world, tmp_path / "gw", **{"core.auth": {"enabled": True, "url": url, "timeout": "2s"}})
        a1 = world["a1"]
        _Webhook.status = 403
        assert "denied" in _refused(gateway.register(a1), "auth")
        assert _Webhook.seen[-1]["app_id"] == a1.app["app_id"] and _Webhook.seen[-1]["instance_id"] == a1.instance_id
        _Webhook.status = 200
        assert gateway.register(a1).status_code == 200
    finally:
        server.shutdown()
        server.server_close()
    assert "failed" in _refused(gateway.register(a1), "auth")  # the webhook is gone: refused, not allowed


def test_a_hub_failure_keeps_the_registration_and_a_retry_applies_it(gateway, world):
    a1 = world["a1"]
    gateway.hub.fail = True
    failed = gateway.register(a1)
    assert failed.status_code == 503 and failed.json["error"].startswith("wireguard"), failed.json
    assert gateway.service.store.instance(a1.instance_id).client_ip == "10.0.0.2"
    gateway.hub.fail = False
    assert gateway.register(a1).json["wg"]["client_ip"] == "10.0.0.2"
    assert gateway.hub.peers == {a1.wg_public: ["10.0.0.2/32"]}


def test_no_free_address_is_503_naming_the_range(world, tmp_path):
    gateway = Gateway(world, tmp_path / "gw", **{"core.wg": {"client_ip_range": "10.0.0.0/30"}})  # .1 is the gateway
    assert gateway.register(world["a1"]).json["wg"]["client_ip"] == "10.0.0.2"
    full = gateway.register(world["a2"])
    assert full.status_code == 503 and full.json["error"].startswith("core.wg.client_ip_range"), full.json


def test_a_restart_keeps_registrations_and_brings_the_peers_back(world, tmp_path):
    first = Gateway(world, tmp_path / "gw")
    for cvm in (world["a1"], world["a2"]):
        assert first.register(cvm).status_code == 200
    before = {i.instance_id: i.client_ip for i in first.service.store.instances()}
    again = Gateway(world, tmp_path / "gw")  # a new process on the same state directory
    assert again.service.sync_peers() == 2
    assert again.hub.calls == [("sync_peers", sorted([world["a1"].wg_public, world["a2"].wg_public]))]
    assert again.hub.peers == first.hub.peers
    assert {i.instance_id: i.client_ip for i in again.service.store.instances()} == before
    assert again.register(world["a2"]).json["wg"]["client_ip"] == before[world["a2"].instance_id]


def test_stale_instances_are_recycled(gateway, world):
    a1, a2 = world["a1"], world["a2"]
    gateway.register(a1)
    gateway.register(a2)
    now = time.time()
    gateway.hub.handshakes = {a1.wg_public: now}
    assert gateway.service.refresh_handshakes() == 2
    assert gateway.call_admin("GetMeta").json == {"registered": 2, "online": 1}
    later = now + 10 * 3600 + 60  # past core.recycle.timeout (10 h); a1 keeps shaking hands, a2 went silent
    gateway.hub.handshakes = {a1.wg_public: later - 5}
    gateway.service.refresh_handshakes()
    assert gateway.service.recycle(now=later) == [a2.instance_id]
    assert gateway.hub.calls[-1] == ("remove_peer", a2.wg_public)
    assert [i.instance_id for i in gateway.service.store.instances()] == [a1.instance_id]


def test_a_real_wireguard_go_interface_as_the_hub(world, tmp_path):
    """The peers land on a real interface (wireguard-go in its own namespace, through the UAPI
    socket): registration, a new key, a restart's sync (a lost peer back, a stray one gone), removal."""
    if shutil.which("wireguard-go") is None or os.geteuid() != 0:
        pytest.skip("wireguard-go and root (network namespaces) are set up by scripts/setup.sh")
    name = f"dgc{os.getpid() % 100000}"
    wireguard.netns_add(f"dstack-gwc-{os.getpid()}")
    interface = wireguard.WgInterface(name, netns=f"dstack-gwc-{os.getpid()}")
    try:
        uapi = interface.up(private_key=GATEWAY_KEY, listen_port=0)

        def peers():
            return {p.public_key: p.allowed_ips for p in uapi.get()["peers"]}

        gateway = Gateway(world, tmp_path / "gw", hub=uapi)
        a1, a2 = world["a1"], world["a2"]
        assert gateway.register(a1).status_code == 200 and gateway.register(a2).status_code == 200
        assert peers() == {a1.wg_public: ["10.0.0.2/32"], a2.wg_public: ["10.0.0.3/32"]}
        new_key = wireguard.public_key(wireguard.generate_private_key())
        assert gateway.register(a1, client_public_key=new_key).status_code == 200
        assert peers() == {new_key: ["10.0.0.2/32"], a2.wg_public: ["10.0.0.3/32"]}
        stray = wireguard.public_key(wireguard.generate_private_key())
        uapi.remove_peer(a2.wg_public)
        uapi.set_peer(stray, ["10.0.0.99/32"])
        restarted = Gateway(world, tmp_path / "gw", hub=uapi)
        assert restarted.service.sync_peers() == 2
        assert peers() == {new_key: ["10.0.0.2/32"], a2.wg_public: ["10.0.0.3/32"]}
        assert restarted.call_admin("RemoveInstance", id=a2.instance_id).json == {"removed": True}
        assert peers() == {new_key: ["10.0.0.2/32"]}
    finally:
        interface.down()
        wireguard.netns_remove(f"dstack-gwc-{os.getpid()}")


# ---- Info, GetPeers, Admin -------------------------------------------------------------------------

def test_info_and_get_peers(gateway, world):
    info = gateway.client.get("/prpc/Gateway.Info").json
    assert info["base_domain"] == "dstack.localhost" and info["external_port"] == 443
    assert info["app_address_ns_prefix"] == "_dstack-app-address" and info["version"]
    assert gateway.client.post("/prpc/Gateway.GetPeers").status_code == 403
    peers = gateway.client.post("/prpc/Gateway.GetPeers", environ_base={"dstack.peer_cert_chain": world["a1"].chain})
    assert peers.status_code == 200 and peers.json["peers"] == [{"id": 0, "url": peers.json["my_url"]}]


def test_admin_needs_its_token(gateway):
    assert gateway.call_admin("Status", token=None).status_code == 401
    assert gateway.call_admin("Status", token="wrong-token-0123456789").status_code == 401
    wrong_scheme = gateway.admin.post("/prpc/Admin.Status", headers={"Authorization": f"Basic {ADMIN_TOKEN}"})
    assert wrong_scheme.status_code == 401
    assert gateway.call_admin("Status").status_code == 200


def test_admin_methods(gateway, world):
    a1, a2 = world["a1"], world["a2"]
    gateway.register(a1)
    gateway.register(a2)
    status = gateway.call_admin("Status").json
    assert sorted((h["instance_id"], h["ip"], h["app_id"]) for h in status["hosts"]) == sorted(
        [(a1.instance_id, "10.0.0.2", a1.app["app_id"]), (a2.instance_id, "10.0.0.3", a2.app["app_id"])])
    assert status["nodes"][0]["wg_public_key"] == wireguard.public_key(GATEWAY_KEY)
    assert gateway.call_admin("GetInfo", id=a2.instance_id).json["info"]["ip"] == "10.0.0.3"
    assert gateway.call_admin("GetInfo", id="00" * 20).json == {"found": False}
    assert gateway.call_admin("GetInfo").status_code == 400
    policy = {"ports": [{"port": 8080, "pp": True}], "restrict_mode": True}
    assert gateway.call_admin("SetPortPolicy", app_id=a1.app["app_id"], policy=policy).status_code == 200
    assert gateway.service.store.port_policy(a2.instance_id) == policy
    bad = gateway.call_admin("SetPortPolicy", app_id=a1.app["app_id"], policy={"ports": [{"port": 70000}]})
    assert bad.status_code == 400 and bad.json["error"].startswith("policy.ports[0].port")
    assert gateway.call_admin("SetPortPolicy", app_id="xyz", policy=None).status_code == 400
    assert gateway.call_admin("SetPortPolicy", app_id=a1.app["app_id"], policy=None).json["policy"] is None
    assert gateway.service.store.port_policy(a2.instance_id) is None
    assert gateway.call_admin("RemoveInstance", id=a1.instance_id).json == {"removed": True}
    assert gateway.hub.calls[-1] == ("remove_peer", a1.wg_public)
    assert gateway.call_admin("RemoveInstance", id=a1.instance_id).json == {"removed": False}
    assert gateway.call_admin("GetMeta").json["registered"] == 1


# ---- configuration ------------------------------------------------------------------------------

def test_configuration_defaults_durations_and_environment(world, tmp_path):
    path = gateway_toml(world, tmp_path / "gw", **{"core.proxy.timeouts": {"connect": "2s", "idle": "10m"}})
    config = gateway_config.load_config(path, environ={"DSTACK_GATEWAY_CORE_PROXY_BASE_DOMAIN": "apps.example",
                                                       "DSTACK_GATEWAY_CORE_WG_RESERVED_NET": "10.0.0.1/32,10.0.0.8/29"})
    assert config["core"]["proxy"]["timeouts"]["connect"] == 2 and config["core"]["proxy"]["timeouts"]["idle"] == 600
    assert config["core"]["proxy"]["timeouts"]["total"] == 5 * 3600
    assert config["core"]["proxy"]["base_domain"] == "apps.example"
    assert config["core"]["wg"]["reserved_net"] == ["10.0.0.1/32", "10.0.0.8/29"]
    assert config["core"]["wg"]["public_key"] == wireguard.public_key(GATEWAY_KEY)
    shown = json.dumps(gateway_config.redacted(config))
    assert GATEWAY_KEY not in shown and ADMIN_TOKEN not in shown


@pytest.mark.parametrize("sections, environ, field", [
    ({"core.wg": {"endpoint": ""}}, {}, "core.wg.endpoint"),
    ({"core.wg": {"client_ip_range": "10.0.0.1/25"}}, {}, "core.wg.client_ip_range"),
    ({"core.wg": {"ip": "10.0.0.1"}}, {}, "core.wg.ip"),
    ({"core.wg": {"private_key": "c2VjcmV0LWJ1dC10b28tc2hvcnQ="}}, {}, "core.wg.private_key"),
    ({"core.wg": {"public_key": wireguard.public_key(wireguard.generate_private_key())}}, {}, "core.wg.public_key"),
    ({"core.proxy": {"listen_port": 0}}, {}, "core.proxy.listen_port"),
    ({"core.proxy.timeouts": {"idle": "ten minutes"}}, {}, "core.proxy.timeouts.idle"),
    ({"core.proxy": {"base_domain": "bad domain"}}, {}, "core.proxy.base_domain"),
    ({"core.auth": {"enabled": True}}, {}, "core.auth.url"),
    ({"core": {"listen": "x"}}, {}, "core.listen"),
    ({"admin": {"token": "short"}}, {}, "admin.token"),
    ({"admin": {"listen": "127.0.0.1:8010"}}, {}, "admin.listen"),
    ({"attestation": {"mode": "production"}}, {}, "attestation.mode"),
    ({}, {"DSTACK_GATEWAY_CORE_RECYCLE_ENABLED": "maybe"}, "core.recycle.enabled"),
    ({}, {"DSTACK_GATEWAY_RPC_KMS_ROOT_CA": "/nonexistent/root-ca.crt"}, "rpc.kms_root_ca"),
])
def test_configuration_errors_name_the_key(world, tmp_path, sections, environ, field):
    path = gateway_toml(world, tmp_path / "gw", **sections)
    with pytest.raises(DstackError) as err:
        gateway_config.load_config(path, environ=environ)
    assert err.value.field == field, str(err.value)
    assert GATEWAY_KEY not in str(err.value) and ADMIN_TOKEN not in str(err.value)


# ---- a real gunicorn, mutual TLS: the certificate reaches the view -----------------------------------

def _server_cert(tmp_path):
    """A CA and a certificate for 127.0.0.1 (the gateway's own TLS; its RA-TLS identity comes later)."""
    import ipaddress  # pylint: disable=import-outside-toplevel
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test gateway CA")])
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway")]))
            .issuer_name(name).public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False).sign(ca_key, hashes.SHA256()))
    (tmp_path / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "rpc.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "rpc.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    return str(tmp_path / "ca.crt")


def _client_context(server_ca, cvm=None, directory=None):
    context = ssl.create_default_context(cafile=server_ca)
    if cvm is not None:
        (directory / "client.pem").write_text("".join(cvm.cert["certificate_chain"][:2]))
        (directory / "client.key").write_text(cvm.cert["key"])
        context.load_cert_chain(str(directory / "client.pem"), str(directory / "client.key"))
    return context


def _post(url, context, body=None, token=None):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=json.dumps(body or {}).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_gunicorn_over_mutual_tls_hands_the_client_certificate_to_register_cvm(world, tmp_path):
    server_ca = _server_cert(tmp_path)
    port, admin_port = free_port(), free_port()
    rpc = {"listen": f"127.0.0.1:{port}", "cert": str(tmp_path / "rpc.crt"), "key": str(tmp_path / "rpc.key"),
           "workers": 1}
    path = gateway_toml(world, tmp_path / "gw", rpc=rpc, admin={"listen": f"127.0.0.1:{admin_port}"})
    proc = subprocess.Popen([sys.executable, "-m", "ansible_collections.dstack.tee.agents.gateway.cli", "serve-control",
                             "--config", str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        base, admin = f"https://127.0.0.1:{port}", f"https://127.0.0.1:{admin_port}"
        anonymous = _client_context(server_ca)
        deadline = time.monotonic() + 30
        while True:
            try:
                assert _post(f"{base}/prpc/Gateway.Info", anonymous)[0] == 200
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
                time.sleep(0.2)
        a1 = world["a1"]
        status, body = _post(f"{base}/prpc/Gateway.RegisterCvm", anonymous, {"client_public_key": a1.wg_public})
        assert status == 403 and body["error"].startswith("client_certificate"), body
        status, body = _post(f"{base}/prpc/Gateway.RegisterCvm", _client_context(server_ca, a1, tmp_path),
                             {"client_public_key": a1.wg_public})
        assert status == 200 and body["wg"]["client_ip"] == "10.0.0.2", body
        # Another KMS's certificate does not even get through the TLS handshake (ca_certs is our KMS root).
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            _post(f"{base}/prpc/Gateway.RegisterCvm", _client_context(server_ca, world["foreign"], tmp_path),
                  {"client_public_key": world["foreign"].wg_public})
        # The Admin API answers on its own listener only, and with the token only.
        assert _post(f"{admin}/prpc/Admin.GetMeta", anonymous, token=ADMIN_TOKEN) == (200, {"registered": 1, "online": 0})
        assert _post(f"{admin}/prpc/Admin.GetMeta", anonymous)[0] == 401
        assert _post(f"{base}/prpc/Admin.GetMeta", anonymous, token=ADMIN_TOKEN)[0] == 404
    except AssertionError:
        proc.terminate()
        print(proc.communicate(timeout=10)[0].decode(errors="replace")[-6000:])  # the server's log, for the failure
        raise
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
