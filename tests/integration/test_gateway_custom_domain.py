"""Custom domains (agents/gateway/custom_domains.py and the data plane): a server name outside the
gateway's base domains goes, by its DNS TXT record `_dstack-app-address.<name>` = "<app_id>:<port>"
(dstack's `_tapp-address.<name>` too, and `_dstack-app-address-wildcard.<parent>`), to that app's
instances on that port, passed through as TLS: the client sees the app's own certificate.

The DNS server is a real BIND9 (dns_fixtures.Bind: `named -g` on a free port, records changed by
TSIG-signed dynamic updates). First on loopback, GatewayProxy against test_gateway_proxy's real
backends and router stub; then end to end: `dstack-gateway serve` in its namespace (its WireGuard
interface in another one, [core.wg] netns, as the demo runs it), BIND9 on the loopback of serve's
namespace, a simulated CVM registered over mutual TLS, its app's TLS server on its tunnel address.
"""

import contextlib
import json
import logging
import shutil
import socket
import ssl
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

sys.path.insert(0, str(Path(__file__).resolve().parent))

# pylint: disable=wrong-import-position
from conftest import eventually  # noqa: E402
from dns_fixtures import Bind, needs_bind  # noqa: E402
from test_gateway_proxy import BASE, HOST_A, HOST_OTHER, Backend, Gateway, Pki, Router, http_get, tls_connect  # noqa: E402
from ansible_collections.dstack.tee.agents.gateway import custom_domains  # noqa: E402
from ansible_collections.dstack.tee.agents.gateway.config import load_config  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError  # noqa: E402

ZONE = "example.test"
APP = "c0ffee00"                 # the app the records name; INST its one instance
INST = "1aaa"
UNREGISTERED = "dead0000beef"    # an app no CVM of which is registered

pytestmark = needs_bind


# ---- loopback: GatewayProxy, real backends, BIND9 -------------------------------------------------------

@pytest.fixture(scope="module")
def dns(tmp_path_factory):
    with Bind(tmp_path_factory.mktemp("dns"), {ZONE: []}) as server:
        yield server


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The gateway's certificate, the app's (for names of the custom zone), and the app's TLS
    server on HOST_A; a sentinel TLS server on HOST_OTHER no record names."""
    folder = tmp_path_factory.mktemp("custom-domain-pki")
    pki = {"gateway": Pki(folder, "gateway", [f"*.{BASE}"]), "app": Pki(folder, "app", [f"*.{ZONE}", f"*.sub.{ZONE}"])}
    app = Backend("app-tls", HOST_A, tls=pki["app"].server_context())
    sentinel = Backend("sentinel", HOST_OTHER, app.port, tls=pki["app"].server_context())
    yield {"pki": pki, "app": app, "sentinel": sentinel}
    app.close()
    sentinel.close()


@pytest.fixture
def router():
    return Router({APP: [(INST, HOST_A)], INST: [(INST, HOST_A)]})


@pytest.fixture
def gateway(world, dns, router):
    made = []

    def start(routes=None, **settings):
        settings.setdefault("dns_resolver", (dns.address,))
        settings.setdefault("timeouts", {"dns_resolve": 3.0})
        gw = Gateway(routes or router, world["pki"], **settings)
        made.append(gw)
        return gw
    yield start
    for gw in made:
        gw.stop()
    assert world["sentinel"].accepted == [], "a connection went where no record led"


@pytest.fixture
def proxy_log(caplog):
    caplog.set_level(logging.INFO, logger="dstack.gateway")
    return caplog


def _txt(dns, name, value, ttl=60):
    dns.update(f'add {name}.{ZONE} {ttl} TXT "{value}"')


def _get(gw, name, cafile):
    with tls_connect(gw, name, cafile) as conn:
        served = conn.getpeercert(binary_form=True)
        status, body = http_get(conn, name)
    return status, json.loads(body), served


def test_a_txt_record_passes_the_custom_domain_through_to_the_app(gateway, world, dns, router):
    app = world["app"]
    _txt(dns, "_dstack-app-address.shop", f"{APP}:{app.port}")
    gw = gateway()
    app_der = world["pki"]["app"].cert.public_bytes(serialization.Encoding.DER)
    for _round in range(3):
        # The client trusts only the app's CA: the handshake is the app's own, end to end.
        status, body, served = _get(gw, f"shop.{ZONE}", world["pki"]["app"].ca_file)
        assert status == 200 and body["backend"] == "app-tls" and body["port"] == app.port
        assert served == app_der
    assert router.asked[0] == APP
    # The answer was cached (its TTL is 60 s): BIND9 was asked once for three connections.
    assert dns.queries(f"_dstack-app-address.shop.{ZONE}") == 1
    # Not terminated: the gateway's own certificate is never what the client gets.
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_connect(gw, f"shop.{ZONE}", world["pki"]["gateway"].ca_file)
    assert gw.state()[2] == 0   # the failed verification was the client's; the gateway refused nothing


def test_the_compat_name_the_wildcard_and_their_order(gateway, world, dns):
    app = world["app"]
    _txt(dns, "_tapp-address.old", f"{APP}:{app.port}")                 # dstack's older name
    _txt(dns, "_dstack-app-address-wildcard", f"{APP}:{app.port}")       # every name under the zone
    _txt(dns, "_dstack-app-address.both", f"{APP}:{app.port}")
    _txt(dns, "_tapp-address.both", f"{APP}:{world['sentinel'].port + 1}")  # loses to the prefix's
    gw = gateway()
    cafile = world["pki"]["app"].ca_file
    for name in (f"old.{ZONE}", f"anything.{ZONE}", f"both.{ZONE}"):
        status, body, _served = _get(gw, name, cafile)
        assert status == 200 and body["backend"] == "app-tls", name
    # Both names of one server name were asked at once, as dstack does.
    assert dns.queries(f"_dstack-app-address.old.{ZONE}") == dns.queries(f"_tapp-address.old.{ZONE}") == 1
    # With app_address_ns_compat off, _tapp-address is not asked (the wildcard answers instead).
    gw = gateway(app_address_ns_compat=False)
    _get(gw, f"compat-off.{ZONE}", cafile)
    assert dns.queries(f"_tapp-address.compat-off.{ZONE}") == 0
    assert dns.queries(f"_dstack-app-address.compat-off.{ZONE}") == 1


@pytest.mark.parametrize("record, value, alert, logged", [
    ("unregistered", f"{UNREGISTERED}:443", "UNRECOGNIZED_NAME",
     f"unknown id {UNREGISTERED} (custom domain unregistered.{ZONE}, TXT _dstack-app-address.unregistered.{ZONE}): "
     "no such app or instance registered here"),
    ("malformed", "nonsense", "UNRECOGNIZED_NAME", "is 'nonsense', not <app_id>:<port>"),
    ("badport", f"{APP}:70000", "UNRECOGNIZED_NAME", f"is '{APP}:70000', not <app_id>:<port>"),
    ("restricted", f"{APP}:PORT", "ACCESS_DENIED", f"port PORT not allowed for {APP} (custom domain restricted."),
    ("none.sub", None, "UNRECOGNIZED_NAME", f"has no TXT record _dstack-app-address.none.sub.{ZONE} or "
                                            f"_tapp-address.none.sub.{ZONE} or _dstack-app-address-wildcard.sub.{ZONE}"),
])
def test_refused_with_the_reason_in_the_log(gateway, world, dns, router, proxy_log, record, value, alert, logged):
    port = str(world["app"].port)
    if value:
        _txt(dns, f"_dstack-app-address.{record}", value.replace("PORT", port))
    # The app allows only port 80 (restrict_mode): a record naming its TLS port is refused.
    router.policies[INST] = {"ports": [{"port": 80, "pp": False}], "restrict_mode": True}
    gw = gateway()
    name = f"{record}.{ZONE}"
    with pytest.raises(ssl.SSLError, match=alert):
        tls_connect(gw, name, world["pki"]["app"].ca_file)
    assert gw.state() == ({}, 0, 1)
    assert logged.replace("PORT", port) in proxy_log.text
    if record == "unregistered":
        assert router.asked == [UNREGISTERED]
    if value is None:
        assert router.asked == []


def test_no_record_is_cached_at_most_10_seconds(gateway, world, dns):
    """The zone's negative TTL is an hour (dns_fixtures); the gateway keeps "no record" 10 s at most."""
    gw = gateway()
    name, cafile = f"late.sub.{ZONE}", world["pki"]["app"].ca_file     # no wildcard under sub.
    first = time.monotonic()
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        tls_connect(gw, name, cafile)
    assert dns.queries(f"_dstack-app-address.{name}") == 1
    _txt(dns, "_dstack-app-address.late.sub", f"{APP}:{world['app'].port}")
    assert dns.dig(f"_dstack-app-address.{name}") == [f'"{APP}:{world["app"].port}"']   # (a query too)
    # Still the cached "no record": the gateway did not ask again.
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        tls_connect(gw, name, cafile)
    assert dns.queries(f"_dstack-app-address.{name}") == 2
    while True:
        try:
            status, body, _served = _get(gw, name, cafile)
            break
        except ssl.SSLError:
            assert time.monotonic() - first < custom_domains.NEGATIVE_TTL + 2, "the record was not seen within 10 s"
            time.sleep(0.5)
    assert status == 200 and body["backend"] == "app-tls"
    assert time.monotonic() - first > custom_domains.NEGATIVE_TTL - 1   # the cache held, and no longer than 10 s
    assert dns.queries(f"_dstack-app-address.{name}") == 3


def test_a_silent_resolver_refuses_after_the_timeout_and_never_blocks_the_loop(gateway, world, router, proxy_log):
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)   # takes queries, never answers
    silent.bind(("127.0.0.1", 0))
    with silent:
        gw = gateway(dns_resolver=(f"127.0.0.1:{silent.getsockname()[1]}",), timeouts={"dns_resolve": 4.0})
        outcome = {}

        def custom():
            began = time.monotonic()
            try:
                tls_connect(gw, f"slow.{ZONE}", world["pki"]["app"].ca_file).close()
                outcome["custom"] = "connected"
            except ssl.SSLError as exc:
                outcome["custom"] = str(exc)
            outcome["custom_took"] = time.monotonic() - began
        thread = threading.Thread(target=custom)
        thread.start()
        time.sleep(0.3)
        # While that lookup waits, the loop serves another route at once (the app's TLS port by
        # its instance id, passed through; the app's certificate is for the custom zone's names).
        began = time.monotonic()
        context = ssl.create_default_context(cafile=str(world["pki"]["app"].ca_file))
        context.check_hostname = False
        name = f"{INST}-{world['app'].port}s.{BASE}"
        with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname=name) as conn:
                assert http_get(conn, name)[0] == 200
        assert time.monotonic() - began < 2.5 and thread.is_alive()
        thread.join(10)
    assert "UNRECOGNIZED_NAME" in outcome["custom"] and 3.9 < outcome["custom_took"] < 6.5, outcome
    assert f"custom domain slow.{ZONE}: " in proxy_log.text and "within 4 s" in proxy_log.text, proxy_log.text


def test_custom_domains_off(gateway, world, dns):
    _txt(dns, "_dstack-app-address.off", f"{APP}:{world['app'].port}")
    gw = gateway(app_address_ns_prefix="")
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        tls_connect(gw, f"off.{ZONE}", world["pki"]["app"].ca_file)
    assert dns.queries(f"_dstack-app-address.off.{ZONE}") == 0


@pytest.mark.parametrize("key, value, reason", [
    ("dns_resolver", ["dns.example.test:53"], "an address, not a name"),
    ("dns_resolver", ["127.0.0.1:0"], "port outside"),
    ("dns_resolver", ["[::1"], "is not IP"),
    ("app_address_ns_prefix", "two.labels", "one DNS label"),
])
def test_bad_settings_are_named(tmp_path, key, value, reason):
    (tmp_path / "root-ca.crt").write_text("x")
    raw = {"core.state_dir": str(tmp_path), "core.wg.public_key": "A" * 43 + "=", "core.wg.endpoint": "10.0.0.1:51820",
           "rpc.kms_root_ca": str(tmp_path / "root-ca.crt"), "attestation.mode": "simulation",
           "attestation.sim_state_dir": str(tmp_path), f"core.proxy.{key}": value}
    with pytest.raises(DstackError) as err:
        load_config(overrides=raw, environ={})
    assert err.value.field.startswith(f"core.proxy.{key}") and reason in err.value.reason
    overrides = dict(raw, **{"core.proxy.dns_resolver": ["127.0.0.1", "[::1]:5353"],
                             "core.proxy.app_address_ns_prefix": "_dstack-app-address"})
    good = load_config(overrides=overrides, environ={})["core"]["proxy"]
    assert good["dns_resolver"] == ["127.0.0.1:53", "[::1]:5353"] and good["app_address_ns_compat"] is True
    assert good["timeouts"]["dns_resolve"] == 5.0


def test_names_of_the_base_domain_are_never_looked_up(gateway, world, dns):
    gw = gateway()
    for name in (BASE, f"{INST}.x.{BASE}", f"unknown.{BASE}"):
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
            tls_connect(gw, name, world["pki"]["app"].ca_file)
    assert BASE not in dns.log


# ---- end to end: dstack-gateway serve, its WireGuard in [core.wg] netns, a registered CVM ---------------

@pytest.mark.skipif(not (shutil.which("wireguard-go") and shutil.which("ip")), reason="needs wireguard-go and iproute2")
def test_serve_routes_a_custom_domain_to_a_registered_cvm_and_refuses_an_unregistered_app(tmp_path):
    from test_gateway_serve import (  # pylint: disable=import-outside-toplevel
        APP_SERVERS, APP_TLS_PORT, CVM_NS, GW_NS, PID, GatewayProcess, _boot_cvm, _build_network, _body,
        _cvm_tunnel, _gateway_toml, _https_get, _kill_everything_in, _register, _start_in, _write_certs)
    from ansible_collections.dstack.tee.plugins.module_utils import root_keys, wireguard  # pylint: disable=import-outside-toplevel

    wg_netns = f"gwt-{PID}"
    with contextlib.ExitStack() as cleanup:
        net = _build_network(cleanup)
        cleanup.callback(wireguard.netns_remove, wg_netns)   # serve makes it; runs after what is killed in it
        cleanup.callback(_kill_everything_in, wg_netns)
        sim, cvm = _boot_cvm(tmp_path)
        app_id = cvm.app["app_id"]
        # BIND9 on the loopback of serve's namespace: reachable from serve's network only, not from
        # the WireGuard namespace the data plane connects from.
        dns = Bind(tmp_path, {ZONE: [f'_dstack-app-address.shop 60 TXT "{app_id}:{APP_TLS_PORT}"',
                                     f'_dstack-app-address.ghost 60 TXT "{UNREGISTERED}:{APP_TLS_PORT}"']},
                   netns=GW_NS)
        dns.start()
        cleanup.callback(dns.stop)
        server_ca = _write_certs(tmp_path, [net.gw_ip, net.gw_cvm_ip])
        kms_root = tmp_path / "kms" / root_keys.ROOT_CA_CERT
        gateway = GatewayProcess(_gateway_toml(tmp_path, sim, tmp_path / "kms", net,
                                               **{"core.wg": {"netns": wg_netns},
                                                  "core.proxy": {"dns_resolver": [dns.address]}}),
                                 tmp_path / "serve.log")
        cleanup.callback(gateway.kill)
        gateway.start()
        assert f"custom domains: TXT _dstack-app-address.<name> and _tapp-address.<name> asked of {dns.address}" \
            in gateway.log

        status, answer = _register(net, cvm, server_ca, tmp_path)
        assert status == 200, answer
        _cvm_tunnel(cleanup, cvm, answer)
        own = cvm.tls_key(usage_server_auth=True, usage_client_auth=False,
                          alt_names=[f"shop.{ZONE}", f"late.{ZONE}"])
        (tmp_path / "app.crt").write_text("".join(own["certificate_chain"][:2]))
        (tmp_path / "app.key").write_text(own["key"])
        _start_in(cleanup, CVM_NS, APP_SERVERS, answer["wg"]["client_ip"], app_id, APP_TLS_PORT,
                  tmp_path / "app.crt", tmp_path / "app.key")

        # The custom domain, passed through: the CVM's own certificate, checked up to the KMS root
        # for the custom name by the client; the app saw the gateway's tunnel address.
        answer_text, served = eventually(lambda: _https_get(net.gw_ip, f"shop.{ZONE}", kms_root))
        assert _body(answer_text) == f"tls app {app_id} answers 10.77.0.1"
        assert served == x509.load_pem_x509_certificate(own["certificate_chain"][0].encode()).public_bytes(
            serialization.Encoding.DER)

        # A record naming an app with no registered CVM: refused at the handshake, the reason logged.
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
            _https_get(net.gw_ip, f"ghost.{ZONE}", kms_root)
        assert (f"unknown id {UNREGISTERED} (custom domain ghost.{ZONE}, TXT _dstack-app-address.ghost.{ZONE}): "
                "no such app or instance registered here") in gateway.log

        # No record yet: refused, and that answer kept at most 10 s (the zone says an hour).
        first = time.monotonic()
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
            _https_get(net.gw_ip, f"late.{ZONE}", kms_root)
        assert f"custom domain late.{ZONE}: is not under a base domain of this gateway and has no TXT record" \
            in gateway.log
        dns.update(f'add _dstack-app-address.late.{ZONE} 60 TXT "{app_id}:{APP_TLS_PORT}"')
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
            _https_get(net.gw_ip, f"late.{ZONE}", kms_root)
        while True:
            try:
                answer_text, _served = _https_get(net.gw_ip, f"late.{ZONE}", kms_root)
                break
            except ssl.SSLError:
                assert time.monotonic() - first < custom_domains.NEGATIVE_TTL + 3, gateway.log[-3000:]
                time.sleep(0.5)
        assert _body(answer_text) == f"tls app {app_id} answers 10.77.0.1"
        assert gateway.stop() == 0, gateway.log[-6000:]
