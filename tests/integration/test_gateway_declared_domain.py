"""Custom domains an app declares (app-compose custom_domains), terminated by the gateway with their
own ACME certificates (agents/gateway/custom_certs.py), with real parts only: Pebble validating
DNS-01 on BIND9 (acme_fixtures), `dstack-gateway serve` with its WireGuard interface in its own
namespace, a simulated CVM (its KMS, its boot, its RA-TLS certificate) registered over mutual TLS
from its own namespace, its tunnel, its app and its public Worker API (`dstack-guest-agent
serve-worker`: the gateway reads the declaration from Worker.Info's app-compose, checked against the
attested compose_hash), and the app role's task file run by ansible-playbook for the TXT records.

    root namespace: serve (data plane 127.0.0.1, control API on the veth), Pebble, BIND9
      ddr<pid> 10.98.X.1/30 ---veth--- ddc<pid> 10.98.X.2/30   dcv-<pid> (the CVM)
    dwg-<pid>: the gateway's WireGuard 10.78.0.1 ==tunnel== 10.78.0.2 (the app :80, the Worker :8090)
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509

sys.path.insert(0, str(Path(__file__).resolve().parent))

# pylint: disable=wrong-import-position,redefined-outer-name,unused-import
from acme_fixtures import ZONE, acme_world, needs_acme_world  # noqa: E402,F401
from conftest import free_port, run_module, run_playbook, stop_process_group  # noqa: E402
from dns_fixtures import free_port as free_tcp_udp_port  # noqa: E402
from test_gateway_acme import ADMIN_TOKEN, _verify_quote, gateway_config, gateway_cvm  # noqa: E402,F401
from test_gateway_control import Cvm, _allow, _boot  # noqa: E402
from test_gateway_serve import APP_SERVERS, _cvm_tunnel, _ip, _kill_everything_in, _start_in  # noqa: E402
from test_guest_boot import make_share  # noqa: E402
from test_kms import make_kms  # noqa: E402
from ansible_collections.dstack.tee.agents.gateway import acme, custom_certs  # noqa: E402
from ansible_collections.dstack.tee.agents.gateway.store import Store  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils import root_keys, wireguard  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.app_certs import spki_der  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx  # noqa: E402

pytestmark = [needs_acme_world, pytest.mark.skipif(
    not (shutil.which("wireguard-go") and shutil.which("ip")), reason="wireguard-go and iproute2 (scripts/setup.sh)")]

BIN = Path(sys.executable).parent
PID = os.getpid()
BASE = f"gw.{ZONE}"                      # the gateway's base domain: the wildcard *.gw.dstack.test
SHOP, TAKEN = f"shop.{ZONE}", f"taken.{ZONE}"   # both declared by the app; TAKEN's record names another app
OTHER_APP = "be" * 20
CVM_NS, WG_NS = f"dcv-{PID}", f"dwg-{PID}"
VETH_ROOT, VETH_CVM = f"ddr{PID}", f"ddc{PID}"
GW_WG, CVM_WG = f"wgd{PID}", f"wgk{PID}"
AGENT_PORT = 8090

# RegisterCvm as the CVM sends it (mutual TLS with its RA-TLS certificate). The gateway's own
# certificate is its RA-TLS one from its CVM's guest agent, checked by other tests: not here.
REGISTER = r"""
import json, ssl, sys, urllib.request
url, cert, key, body = sys.argv[1:5]
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
context.load_cert_chain(cert, key)
request = urllib.request.Request(url, data=body.encode(), headers={"Content-Type": "application/json"}, method="POST")
with urllib.request.urlopen(request, context=context, timeout=10) as response:
    print(json.dumps(json.loads(response.read())))
"""

# The CVM's public Worker API on its agent port, in its namespace, as `dstack-guest-agent run --netns` starts it.
WORKER = r"""
import os, socket, sys
sock = socket.create_server(("0.0.0.0", int(sys.argv[1])))
sock.set_inheritable(True)
os.execv(sys.argv[2], [sys.argv[2], "serve-worker", "--fd", str(sock.fileno()), *sys.argv[3:]])
"""


def _free_third_octet():
    used = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    for offset in range(250):
        third = (PID + offset) % 250 + 1
        if f" 10.98.{third}." not in used:
            return third
    pytest.skip("no free 10.98.X.0/24 in the root namespace")
    return None


def _declaring(name, args):
    """make_share's module runner: app_compose with an app.yml declaring the custom domains."""
    if name == "app_compose":
        yml = Path(args["dest"]).parent.parent / "app.yml"
        yml.write_text(f"custom_domains:\n  - {SHOP}\n  - domain: {TAKEN}\n    port: 80\n")
        args = dict(args, app_yml=str(yml))
    return run_module(name, args)


def _tls(port, server_name, cafile, timeout=10):
    context = ssl.create_default_context(cafile=str(cafile))
    conn = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=timeout),
                               server_hostname=server_name)
    return conn, x509.load_der_x509_certificate(conn.getpeercert(binary_form=True))


def _get(conn, server_name, path="/"):
    conn.sendall(f"GET {path} HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    head, _sep, body = data.decode(errors="replace").partition("\r\n\r\n")
    return head.split("\r\n")[0], body


def _admin(port, method, **params):
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # its RA-TLS certificate: not under test here
    request = urllib.request.Request(f"https://127.0.0.1:{port}/prpc/Admin.{method}", data=json.dumps(params).encode(),
                                     method="POST", headers={"Content-Type": "application/json",
                                                             "Authorization": f"Bearer {ADMIN_TOKEN}"})
    try:
        with urllib.request.urlopen(request, context=context, timeout=180) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _until(what, check, timeout, log=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        try:
            done = check()
            if done:
                return done
        except (OSError, ssl.SSLError):
            pass
        assert time.monotonic() < deadline, f"{what}:\n{log()[-5000:]}"
        time.sleep(0.3)


def _names(cert):
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)


def test_a_declared_domain_is_served_with_its_own_certificate_and_a_foreign_record_gets_none(
        acme_world, gateway_cvm, tmp_path):
    dns = acme_world.dns
    roots = tmp_path / "pebble-roots.pem"
    roots.write_text(acme_world.pebble.issuing_roots())
    with contextlib.ExitStack() as cleanup:
        # The app's CVM: its KMS, its app-compose declaring SHOP and TAKEN, its boot.
        sim = SimTdx(str(tmp_path / "sim"))
        _kms_app, kms = make_kms(tmp_path, sim)
        (tmp_path / "app").mkdir()
        share, app = make_share(tmp_path / "app", _declaring, kms)
        _allow(tmp_path / "auth-config.json", app)
        cvm = Cvm(_boot(tmp_path, "cvm", share, sim, kms), kms, app)
        app_id = app["app_id"]
        assert json.loads((share / "app-compose.json").read_text())["custom_domains"] == [
            {"domain": SHOP, "port": 80}, {"domain": TAKEN, "port": 80}]
        # The owners' records: SHOP names this app's port 80 (a short TTL: a change is seen within
        # seconds), TAKEN names another app.
        dns.update(f'add _dstack-app-address.{SHOP} 1 TXT "{app_id}:80"')
        dns.update(f'add _dstack-app-address.{TAKEN} 60 TXT "{OTHER_APP}:80"')

        # The CVM's namespace, on a veth to this one.
        third = _free_third_octet()
        root_ip, cvm_ip = f"10.98.{third}.1", f"10.98.{third}.2"
        cleanup.callback(wireguard.netns_remove, CVM_NS)
        wireguard.netns_add(CVM_NS)
        wireguard.configure_link("lo", CVM_NS)
        cleanup.callback(wireguard.delete_link, VETH_ROOT)
        wireguard.veth_pair(VETH_ROOT, None, VETH_CVM, CVM_NS)
        wireguard.configure_link(VETH_ROOT, None, address=f"{root_ip}/30")
        wireguard.configure_link(VETH_CVM, CVM_NS, address=f"{cvm_ip}/30")
        _ip("-n", CVM_NS, "route", "add", "default", "via", root_ip)
        cleanup.callback(_kill_everything_in, CVM_NS)

        # The gateway: serve in this namespace, its interface in WG_NS, ACME through Pebble and BIND9.
        proxy_port, rpc_port, admin_port, wg_port = free_port(), free_port(), free_port(), free_tcp_udp_port()
        config = gateway_config(tmp_path / "gw", acme_world, gateway_cvm, **{
            "core.wg": {"netns": WG_NS, "interface": GW_WG, "ip": "10.78.0.1/24", "client_ip_range": "10.78.0.0/25",
                        "reserved_net": ["10.78.0.1/32"], "listen_port": wg_port, "endpoint": f"{root_ip}:{wg_port}"},
            "core.proxy": {"base_domain": BASE, "listen_addr": "127.0.0.1", "listen_port": proxy_port,
                           "dns_resolver": [dns.address], "agent_port": AGENT_PORT},
            # The CVMs' certificates chain to the app's KMS, their quotes to its simulated platform;
            # the gateway's own keys are still quoted by its own CVM (rpc.guest_agent).
            "rpc": {"listen": f"{root_ip}:{rpc_port}", "workers": 1,
                    "kms_root_ca": str(tmp_path / "kms" / root_keys.ROOT_CA_CERT)},
            "attestation": {"sim_state_dir": sim.state_dir},
            "admin": {"listen": f"127.0.0.1:{admin_port}", "token": ADMIN_TOKEN}})
        log_path = tmp_path / "serve.log"

        def log():
            return log_path.read_text(errors="replace")
        cleanup.callback(wireguard.netns_remove, WG_NS)
        cleanup.callback(_kill_everything_in, WG_NS)
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(  # pylint: disable=consider-using-with
                [str(BIN / "dstack-gateway"), "serve", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        cleanup.callback(stop_process_group, proc)

        def ready():
            assert proc.poll() is None, f"serve exited with {proc.returncode}:\n{log()[-5000:]}"
            return " ready: " in log()
        _until("serve did not get ready", ready, 120, log)
        store = Store(str(tmp_path / "gw" / "state"), "10.78.0.0/25", "10.78.0.1/24")
        wildcard = acme.Certificate.from_json(store.get_blob(acme.CERT_BLOB + BASE))

        # The CVM registers, brings its tunnel up, serves its app and its Worker API.
        cert, key = tmp_path / "client.pem", tmp_path / "client.key"
        cert.write_text("".join(cvm.cert["certificate_chain"][:2]))
        key.write_text(cvm.cert["key"])
        done = subprocess.run(wireguard.netns_exec_argv(CVM_NS, [
            sys.executable, "-c", REGISTER, f"https://{root_ip}:{rpc_port}/prpc/Gateway.RegisterCvm", str(cert), str(key),
            json.dumps({"client_public_key": cvm.wg_public})]), capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, done.stderr + log()[-3000:]
        answer = json.loads(done.stdout)
        client_ip = answer["wg"]["client_ip"]
        _cvm_tunnel(cleanup, cvm, answer, netns=CVM_NS, interface=CVM_WG)
        own = cvm.tls_key(usage_server_auth=True, usage_client_auth=False, alt_names=[SHOP])
        (tmp_path / "app.crt").write_text("".join(own["certificate_chain"][:2]))
        (tmp_path / "app.key").write_text(own["key"])
        _start_in(cleanup, CVM_NS, APP_SERVERS, client_ip, app_id, 8443, tmp_path / "app.crt", tmp_path / "app.key")
        worker = subprocess.Popen(  # pylint: disable=consider-using-with
            wireguard.netns_exec_argv(CVM_NS, [
                sys.executable, "-c", WORKER, str(AGENT_PORT), str(BIN / "dstack-guest-agent"), "--config-dir", str(share),
                "--work-dir", str(tmp_path / "cvm"), "--tee", "sim", "--sim-state", sim.state_dir, "--engine", "none"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cleanup.callback(worker.wait)
        cleanup.callback(worker.kill)

        # The gateway reads the declaration from the CVM's Worker.Info, checks each record, orders
        # SHOP's certificate and serves it: SHOP's own name, issued by Pebble, a key of its own.
        began = time.monotonic()

        def shop_served():
            conn, served = _tls(proxy_port, SHOP, roots)
            with conn:
                return served, _get(conn, SHOP)
        served, (status, body) = _until("SHOP was not served with its own certificate", shop_served, 120, log)
        print(f"\ndeclared domain served with its own certificate {time.monotonic() - began:.1f} s after the registration")
        assert status == "HTTP/1.1 200 OK" and body == f"http app {app_id} answers 10.78.0.1"   # terminated, to port 80
        assert _names(served) == [SHOP]
        shop = acme.Certificate.from_json(store.get_blob(acme.CERT_BLOB + SHOP))
        assert spki_der(served.public_key()).hex() == shop.public_key != wildcard.public_key
        root = x509.load_pem_x509_certificates(roots.read_text().encode())[0]
        chain = x509.load_pem_x509_certificates(shop.chain.encode())
        for child, parent in zip(chain, chain[1:] + [root]):
            child.verify_directly_issued_by(parent)
        assert custom_certs.served_names(store) == {SHOP: {"app_id": app_id, "port": 80}}
        assert f"app {app_id} (compose_hash {app['compose_hash']}) declares {SHOP} (port 80), {TAKEN} (port 80)" in log()

        # Quoted like the wildcard: its key in acme-info (the data plane's /.dstack/acme-info), and
        # the quote verifies with dstack-verify for report_data SHA-512("zt-cert:" || its key).
        conn, _wild = _tls(proxy_port, f"gateway.{BASE}", roots)
        with conn:
            status, body = _get(conn, f"gateway.{BASE}", "/.dstack/acme-info")
        keys = {k["public_key"]: k for k in json.loads(body)["quoted_hist_keys"]}
        assert status == "HTTP/1.1 200 OK" and shop.public_key in keys and wildcard.public_key in keys
        verified = _verify_quote(gateway_cvm, keys[shop.public_key]["quote"],
                                 acme.zt_cert_report_data(bytes.fromhex(shop.public_key)), tmp_path)
        assert verified.returncode == 0, verified.stdout + verified.stderr

        # TAKEN's record names another app: no certificate is ordered for this app, the refusal is
        # logged, and a connection goes where the record says (an app not registered: refused).
        assert store.get_blob(acme.CERT_BLOB + TAKEN) is None
        assert (f"custom domain {TAKEN}: no certificate, not terminated: declared by app {app_id}, but TXT "
                f"_dstack-app-address.{TAKEN} names {OTHER_APP}:80, another app") in log()
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
            _tls(proxy_port, TAKEN, roots)
        assert f"unknown id {OTHER_APP} (custom domain {TAKEN}, TXT _dstack-app-address.{TAKEN})" in log()
        assert _admin(admin_port, "RenewCert", name=TAKEN) == (
            400, {"error": f"name: {TAKEN}: declared by app {app_id}, but TXT _dstack-app-address.{TAKEN} names "
                           f"{OTHER_APP}:80, another app"})
        assert _admin(admin_port, "RenewCert", name=f"nobody.{ZONE}")[0] == 400
        assert store.get_blob(acme.CERT_BLOB + TAKEN) is None

        # Admin.RenewCert {name}: a new key for SHOP, quoted, served on new connections.
        assert _admin(admin_port, "RenewCert", name=SHOP) == (200, {"renewed": True})
        renewed = acme.Certificate.from_json(store.get_blob(acme.CERT_BLOB + SHOP))
        assert renewed.public_key != shop.public_key
        assert renewed.public_key in {k["public_key"] for k in acme.acme_info(store)["quoted_hist_keys"]}
        _until("the renewed certificate was not served",
               lambda: spki_der(shop_served()[0].public_key()).hex() == renewed.public_key, 10 * acme.CERT_CHECK_INTERVAL,
               log)

        # The record moves to the app's TLS port: the declaration ({SHOP, 80}) no longer matches, so
        # the gateway stops terminating and passes the name through (the app's own certificate).
        dns.update(f"del _dstack-app-address.{SHOP} TXT")
        dns.update(f'add _dstack-app-address.{SHOP} 1 TXT "{app_id}:8443"')

        def passed_through():
            with socket.create_connection(("127.0.0.1", proxy_port), timeout=5) as raw:
                context = ssl.create_default_context(cafile=str(tmp_path / "kms" / root_keys.ROOT_CA_CERT))
                with context.wrap_socket(raw, server_hostname=SHOP) as conn:
                    return _get(conn, SHOP)[1] == f"tls app {app_id} answers 10.78.0.1"
        _until("SHOP was still terminated after its record moved", passed_through, 15, log)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log()[-5000:]


def test_the_app_role_writes_the_txt_records_or_prints_them(acme_world, gateway_cvm, tmp_path):
    """roles/app/tasks/custom_domains.yml through ansible-playbook: check mode, idempotence, print-only."""
    dns = acme_world.dns
    config = gateway_config(tmp_path / "gw", acme_world, gateway_cvm, **{"core.proxy": {"base_domain": BASE}})
    app_id = "0123456789abcdef0123456789abcdef01234567"
    playbook = tmp_path / "play.yml"
    playbook.write_text(f"""
- hosts: localhost
  gather_facts: false
  tasks:
    - ansible.builtin.include_role:
        name: dstack.tee.app
        tasks_from: custom_domains
      vars:
        dstack_app_gateway_config: {config}
        dstack_app_gateway_base_domain: {BASE}
        dstack_app_compose:
          app_id: {app_id}
          app_compose:
            custom_domains: [{{domain: role.{ZONE}, port: 80}}, {{domain: api.role.{ZONE}, port: 8080}}]
""")
    inventory = Path(__file__).resolve().parents[2] / "playbooks" / "localhost.yml"

    def play(*extra):
        done = run_playbook(playbook, "-i", str(inventory), *extra)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def records():
        return [dns.dig(f"_dstack-app-address.role.{ZONE}", "TXT"), dns.dig(f"_dstack-app-address.api.role.{ZONE}", "TXT")]

    # Not allowed to write: the records to add by hand, nothing changed.
    out = play()
    assert f'_dstack-app-address.role.{ZONE}. TXT "{app_id}:80"' in out
    assert f'_dstack-app-address.api.role.{ZONE}. TXT "{app_id}:8080"' in out
    assert f"role.{ZONE}. CNAME gateway.{BASE}." in out and "changed=0" in out
    assert records() == [[], []]
    # Allowed: check mode says it would write, and writes nothing; then written; then left alone.
    write = ("-e", "dstack_app_custom_domains_write_dns=true")
    out = play(*write, "--check")
    assert "changed=1" in out and "would be set (check mode), was none" in out and records() == [[], []]
    out = play(*write)
    assert "changed=1" in out and records() == [[f'"{app_id}:80"'], [f'"{app_id}:8080"']]
    for extra in ((), ("--check",)):
        out = play(*write, *extra)
        assert "changed=0" in out and out.count("already set") == 2, out
    # A record that names another app is replaced (and the run says what it was).
    dns.update(f"del _dstack-app-address.role.{ZONE} TXT")
    dns.update(f'add _dstack-app-address.role.{ZONE} 60 TXT "{OTHER_APP}:80"')
    out = play(*write)
    assert f"set, was {OTHER_APP}:80" in out and records()[0] == [f'"{app_id}:80"']
    # A bad request names its field (no DNS change is tried).
    done = subprocess.run([str(BIN / "dstack-gateway"), "set-txt", "--config", str(config), "--domain", f"role.{ZONE}",
                           "--app-id", "not-hex"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "app_id:" in done.stderr and dns.secret not in done.stdout + done.stderr


def test_a_declaration_counts_only_from_the_attested_app_compose():
    """custom_certs.declared_in: Worker.Info's app-compose must hash to the compose_hash the CVM's
    certificate attested; one that does not is refused (and not kept), an app-compose that is not
    public or declares badly is refused for good."""
    from ansible_collections.dstack.tee.plugins.module_utils import app_compose  # pylint: disable=import-outside-toplevel
    from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError  # pylint: disable=import-outside-toplevel
    app = app_compose.build("services:\n  web:\n    image: x\n", "shop", custom_domains=[SHOP])
    data = app_compose.render(app)
    attested = app_compose.compose_hash(data)

    def info(text):
        return {"tcb_info": json.dumps({"app_compose": text, "compose_hash": attested})}
    assert custom_certs.declared_in(info(data.decode()), attested) == [{"domain": SHOP, "port": 80}]
    # Another app's bytes, here claiming a name this app never declared: not this app's declaration.
    forged = app_compose.render(dict(app, custom_domains=[{"domain": f"bank.{ZONE}", "port": 80}]))
    with pytest.raises(DstackError) as err:
        custom_certs.declared_in(info(forged.decode()), attested)
    assert not isinstance(err.value, custom_certs.Refused) and "does not hash to the attested compose_hash" in str(err.value)
    with pytest.raises(custom_certs.Refused, match="public_tcbinfo is false"):
        custom_certs.declared_in({"tcb_info": ""}, attested)
    bad = app_compose.render(dict(app, custom_domains=["*.example.com"]))
    with pytest.raises(custom_certs.Refused, match=r"custom_domains\[0\].domain"):
        custom_certs.declared_in(info(bad.decode()), app_compose.compose_hash(bad))
