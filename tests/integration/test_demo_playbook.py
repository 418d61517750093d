"""The README's main command end to end: site.yml + deploy-app.yml on the simulated default.

Runs `make demo` for real (KMS, gateway and VMM under supervisord, the CVM as a supervised guest
agent with podman in its own network namespace, registered with the gateway over WireGuard), in a
short temporary root (DEMO_ROOT) with its own ports (VMM_PORT, KMS_PORT, APP_PORT, GATEWAY_*PORT:
none of the defaults), interface and namespace names, then: the app answers at its https URL
through the gateway and not on its WireGuard address from outside the gateway's namespace,
verify-app.yml passes on it and fails on a changed compose file, a second run changes nothing,
check mode changes nothing, the quote verifies with dstack-verify and names the local compose_hash,
a compose change deploys as an update of the same instance, bad input is refused before anything
is made, and `make stop` returns with nothing of the demo running. A port another process holds
stops `make demo` before anything is made, naming that process, once a stop under way is done.
The gateway's wildcard certificate comes from the demo's Pebble by DNS-01 on its BIND9 (ACME_PORT,
ACME_MANAGEMENT_PORT, DNS_PORT): the served chain validates under the root Pebble's management API
gives now (and tls/ca.crt is that root), /.dstack/acme-info's account and served key quotes verify
with dstack-verify under report_data computed here, dig shows CAA pinned to that account; a second
`make demo` changes nothing and orders nothing; after `make stop` a new Pebble (a new root, no
accounts) gets the certificate ordered again under a new account, and the CAA records follow.
"""

import hashlib
import json
import os
import fcntl
import re
import shlex
import shutil
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

from conftest import ROOT, free_port, needs_podman, run_playbook, stop_process_group
from dns_fixtures import free_port as free_tcp_udp_port
from ansible_collections.dstack.tee.plugins.module_utils import gateway_http, wireguard
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.host_ports import port_free
from ansible_collections.dstack.tee.plugins.module_utils.ra_tls import peer_chain
from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx
from ansible_collections.dstack.tee.plugins.module_utils.vmm_client import VmmClient

BIN = Path(sys.executable).parent
TOKEN = "demo-vmm-token"
BASE = "dstack.localhost"
HELLO = "Hello from a confidential VM"


def _recap(output):
    match = re.search(r"localhost\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", output)
    assert match, output[-3000:]
    return dict(zip(("ok", "changed", "unreachable", "failed"), map(int, match.groups())))


@pytest.fixture
def demo_root():
    root = Path(tempfile.mkdtemp(prefix="dd-", dir="/tmp"))
    app = root / "hello"
    shutil.copytree(ROOT / "examples" / "hello", app)
    ports = {"kms": free_port(), "vmm": free_port(), "app": free_port(), "rpc": free_port(), "admin": free_port(),
             "proxy": free_port(), "wg": _free_udp_port(), "acme": free_port(), "acme_management": free_port(),
             "dns": free_tcp_udp_port()}
    # The gateway's interface and namespace, named for this run (a running demo keeps its own).
    gateway_names = {"interface": f"ddg{os.getpid() % 100000}", "netns": f"dstack-test-gw-{os.getpid()}"}
    # The settings make demo's variables do not cover, for make (ARGS) and for ansible-playbook.
    others = ["-e", json.dumps({"dstack_vmm_tokens": [TOKEN]}),
              "-e", json.dumps({"dstack_gateway_proxy_listen_addr": "127.0.0.1",
                                "dstack_gateway_wg_interface": gateway_names["interface"],
                                "dstack_gateway_wg_netns": gateway_names["netns"]})]
    # make demo's variables (Makefile), and the role variables they set, for the later direct runs.
    make_args = [f"DEMO_ROOT={root}", f"KMS_PORT={ports['kms']}", f"VMM_PORT={ports['vmm']}", f"APP_PORT={ports['app']}",
                 f"GATEWAY_PORT={ports['proxy']}", f"GATEWAY_RPC_PORT={ports['rpc']}",
                 f"GATEWAY_ADMIN_PORT={ports['admin']}", f"GATEWAY_WG_PORT={ports['wg']}", f"ACME_PORT={ports['acme']}",
                 f"ACME_MANAGEMENT_PORT={ports['acme_management']}", f"DNS_PORT={ports['dns']}",
                 "ARGS=" + shlex.join(others + ["-e", f"app_dir={app}"])]
    extra = ["-e", f"dstack_root={root}", "-e", f"dstack_kms_listen=127.0.0.1:{ports['kms']}",
             "-e", f"dstack_kms_url=https://127.0.0.1:{ports['kms']}", "-e", f"dstack_vmm_listen=127.0.0.1:{ports['vmm']}",
             "-e", f"dstack_vmm_url=http://127.0.0.1:{ports['vmm']}", "-e", f"dstack_app_host_port={ports['app']}",
             "-e", json.dumps({"dstack_gateway_rpc_listen": f"0.0.0.0:{ports['rpc']}",
                               "dstack_gateway_admin_listen": f"127.0.0.1:{ports['admin']}",
                               "dstack_gateway_proxy_listen_port": ports["proxy"],
                               "dstack_gateway_wg_listen_port": ports["wg"],
                               "dstack_acme_lab_pebble_listen": f"127.0.0.1:{ports['acme']}",
                               "dstack_acme_lab_pebble_management_listen": f"127.0.0.1:{ports['acme_management']}",
                               "dstack_acme_lab_dns_listen": f"127.0.0.1:{ports['dns']}"}), *others]
    yield root, app, ports, extra, make_args
    _teardown(root, ports)
    wireguard.netns_remove(gateway_names["netns"])
    shutil.rmtree(root, ignore_errors=True)


def make(*args, timeout=900):
    """make in the repository (its PATH and ansible.cfg come from the Makefile)."""
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False, env=dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0"))


def _free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("0.0.0.0", 0))
        return sock.getsockname()[1]


def _https_get(port, host, cafile, path="/", chain=None):
    """GET path from the gateway's data plane at 127.0.0.1:port with SNI `host`, checked under
    cafile; `chain` (a list) gets the certificates it served (DER, the leaf first)."""
    context = ssl.create_default_context(cafile=cafile)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=host) as conn:
        if chain is not None:
            chain.extend(peer_chain(conn))  # verified: the leaf, Pebble's intermediate, the root trusted
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return b"".join(iter(lambda: conn.recv(65536), b"")).decode(errors="replace")


GET_FROM = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], 80), timeout=3) as conn:
        conn.settimeout(3)
        conn.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
        print(b"".join(iter(lambda: conn.recv(65536), b"")).decode(errors="replace"))
except OSError as exc:
    print("no answer:", exc)
"""


def _teardown(root, ports):
    """The CVMs removed through the VMM when it answers (that removes their namespaces too), the
    demo stopped (scripts/stop-demo.sh waits until it is down), and the namespaces of CVMs that
    make stop left (as make clean removes them)."""
    try:
        status = _vmm(ports, "Status")
        for vm in status.get("vms", []):
            _vmm(ports, "RemoveVm", {"id": vm["id"]})
    except DstackError:
        pass
    subprocess.run([str(ROOT / "scripts" / "stop-demo.sh"), str(root)], capture_output=True, check=False, timeout=300)
    for vm_dir in (root / "run").glob("*-*-*-*-*"):
        wireguard.netns_remove(f"dstack-{vm_dir.name}")


def _vmm(ports, method, body=None):
    return VmmClient(f"http://127.0.0.1:{ports['vmm']}", token=TOKEN).call(method, body)


def _deploy(app, extra, *flags):
    return run_playbook(ROOT / "playbooks" / "deploy-app.yml", "-e", f"app_dir={app}", *extra, *flags)


@needs_podman
def test_demo_deploys_verifies_and_updates(demo_root):
    root, app, ports, extra, make_args = demo_root
    first = make("demo", *make_args)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
    built = (root / "build" / "hello" / "app-compose.json").read_bytes()
    compose_hash = hashlib.sha256(built).hexdigest()
    assert f"compose_hash:   {compose_hash}" in first.stdout
    assert "verified, dstack-sim, TCB UpToDate" in first.stdout and "compose_hash matches" in first.stdout
    with urllib.request.urlopen(f"http://127.0.0.1:{ports['app']}/", timeout=10) as response:
        page = response.read().decode()
    assert HELLO in page and "App key fingerprint" in page and "(no key" not in page
    for secret in ("demo-token-0123456789", "dropped-by-the-guest"):
        assert secret not in first.stdout + first.stderr
    # A clean run: no warning, no template error, no task named with an empty value.
    for marker in ("[WARNING]", "<< error", "[DEPRECATION"):
        assert marker not in first.stdout + first.stderr, (marker, (first.stdout + first.stderr)[-3000:])
    for name in re.findall(r"^TASK \[(.*)\] \**$", first.stdout, re.M):
        assert not re.search(r"(\s$|\s{2}|\(\s*\)|''|:$|\bfor\s*$|\bat\s*$)", name), name

    # Through the gateway: the URL it printed, verified from outside by the deploy itself.
    app_id = compose_hash[:40]
    url = f"https://{app_id}.{BASE}:{ports['proxy']}/"
    assert f"url:            {url}" in first.stdout, first.stdout[-3000:]
    assert re.search(r"via the gateway: .*all \d+ checks passed", first.stdout, re.S), first.stdout[-3000:]
    gateway_ca = str(root / "gateway" / "tls" / "ca.crt")
    answer = _https_get(ports["proxy"], f"{app_id}.{BASE}", gateway_ca)
    assert answer.startswith("HTTP/1.1 200") and HELLO in answer, answer[:500]
    # Its certificate: from the demo's Pebble, every key and the account attested, CAA pinned; make
    # demo printed the checks it ran, as commands to run again.
    acme = _acme_state(root, ports, f"{app_id}.{BASE}")
    assert Path(gateway_ca).read_text() == acme["root"]
    assert re.search(r"verified: +the ACME account URI: \S*dstack-verify \S*account-quote.json --sim-state \S+ "
                     r"--report-data [0-9a-f]{128}", first.stdout), first.stdout[-3000:]
    assert f"dig @127.0.0.1 -p {ports['dns']} CAA {BASE}" in first.stdout
    assert f'0 issuewild "pebble;validationmethods=dns-01;accounturi={acme["account_uri"]}"' in first.stdout
    # make demo again: nothing changes, nothing is ordered (the same certificate, no key quoted).
    second = make("demo", *make_args)
    assert second.returncode == 0 and _recap(second.stdout)["changed"] == 0, second.stdout[-4000:]
    assert _acme_state(root, ports, f"{app_id}.{BASE}") == acme
    # The CVM's WireGuard address answers inside the gateway's namespace, and not from the host's.
    vm = _vmm(ports, "Status")["vms"][0]
    wg_ip = _gateway_hosts(root, ports)[vm["instance_id"]]
    inside = subprocess.run(wireguard.netns_exec_argv(_gateway_netns(extra), [sys.executable, "-c", GET_FROM, wg_ip]),
                            capture_output=True, text=True, timeout=30, check=True).stdout
    assert HELLO in inside, inside[:500]
    outside = subprocess.run([sys.executable, "-c", GET_FROM, wg_ip], capture_output=True, text=True, timeout=30,
                             check=True).stdout
    assert HELLO not in outside, outside[:500]

    # verify-app.yml, as an outsider runs it: passes on the app, fails naming compose_hash on a changed compose.
    verify = ["-e", f"app_url={url}", "-e", f"ca_cert={gateway_ca}", "-e", f"sim_state_dir={root / 'kms' / 'tdx-sim'}"]
    passed = run_playbook(ROOT / "playbooks" / "verify-app.yml", *verify, "-e", f"app_dir={app}")
    assert passed.returncode == 0 and "checks passed" in passed.stdout, passed.stdout[-3000:]
    changed = root / "changed"
    shutil.copytree(app, changed)
    (changed / "docker-compose.yaml").write_text((app / "docker-compose.yaml").read_text() + "# changed\n")
    failed = run_playbook(ROOT / "playbooks" / "verify-app.yml", *verify, "-e", f"app_dir={changed}")
    assert failed.returncode != 0 and "compose_hash" in failed.stdout, failed.stdout[-3000:]
    shutil.rmtree(changed)

    # The quote from the CVM's socket verifies with dstack-verify, and names the local compose_hash.
    sock = root / "run" / vm["id"] / "dstack.sock"
    quote = subprocess.run(["curl", "-s", "--unix-socket", str(sock), "-X", "POST", "http://cvm/GetQuote", "-d",
                            '{"report_data": "abcd"}'], capture_output=True, text=True, check=True).stdout
    (root / "quote.json").write_text(quote)
    (root / "collateral.json").write_text(SimTdx(str(root / "kms" / "tdx-sim")).collateral_json())
    verify = subprocess.run([str(BIN / "dstack-verify"), str(root / "quote.json"), "--collateral",
                             str(root / "collateral.json"), "--sim-state", str(root / "kms" / "tdx-sim")],
                            capture_output=True, text=True, check=False)
    assert verify.returncode == 0, verify.stderr
    assert json.loads(verify.stdout)["boot_info"]["compose_hash"] == compose_hash

    # Again: nothing changes; check mode changes nothing either.
    again = _deploy(app, extra)
    assert again.returncode == 0 and _recap(again.stdout)["changed"] == 0, again.stdout[-3000:]
    check = _deploy(app, extra, "--check", "--diff")
    assert check.returncode == 0 and _recap(check.stdout)["changed"] == 0, check.stdout[-3000:]

    # A compose change: check mode names the new compose_hash and changes nothing...
    (app / "docker-compose.yaml").write_text((app / "docker-compose.yaml").read_text() + "# v2\n")
    preview = _deploy(app, extra, "--check", "--diff")
    assert preview.returncode == 0 and _recap(preview.stdout)["changed"] > 0, preview.stdout[-3000:]
    assert (root / "build" / "hello" / "app-compose.json").read_bytes() == built
    new_hash = re.search(r"Authorize compose_hash ([0-9a-f]{64})", preview.stdout).group(1)
    assert new_hash != compose_hash
    # ... then the update: same app, same instance, new compose_hash allowed beside the old one.
    update = _deploy(app, extra)
    assert update.returncode == 0, update.stdout[-4000:]
    info = _vmm(ports, "GetInfo", {"id": vm["id"]})["info"]
    assert info["compose_hash"] == new_hash and info["instance_id"] == vm["instance_id"]
    allow = json.loads((root / "kms" / "auth-config.json").read_text())
    assert {"0x" + compose_hash, "0x" + new_hash} <= set(allow["apps"]["0x" + vm["app_id"]]["composeHashes"])

    # Bad input is refused, named, before anything changes (the allowlist, the build, the VMs).
    before = _state(root, ports)
    other = root / "other"
    shutil.copytree(app, other)
    (other / "app.yml").write_text((app / "app.yml").read_text().replace("name: hello", "name: other"))
    # (Each reason as the role's uri tasks gave it, or as dstack.tee.app_check, which replaces them, gives it.)
    for flags, reasons in (
            (["-e", f"app_dir={other}", "-e", "dstack_app_kms_url=https://127.0.0.1:9"],
             ("Status code was -1", "is the KMS running?")),
            (["-e", f"app_dir={other}", "-e", "dstack_app_vmm_token=wrong"], ("Status code was 401", "(HTTP 401)")),
            (["-e", f"app_dir={other}"], (f"ports: host port {ports['app']} is already in use",
                                          f"ports: host port {ports['app']}/tcp is held by the CVM 'hello'")),
            # A guest image whose hash the VMM does not serve under that name: refused by the first
            # check, so not even the pinned hash reaches the allowlist.
            (["-e", f"app_dir={app}", "-e", "dstack_app_image=guest", "-e", "dstack_app_os_image_hash=" + "ab" * 32],
             ("os_image_hash: is " + "ab" * 32 + ", but the VMM on localhost names no image guest (Vmm.ListImages); "
              "give the os_image_hash of the image you built",)),
            # A pin that is no hash at all is named as such, before any VMM is asked.
            (["-e", f"app_dir={app}", "-e", "dstack_app_image=guest", "-e", "dstack_app_os_image_hash=ab12"],
             ("os_image_hash: must be 32 bytes",))):
        refused = run_playbook(ROOT / "playbooks" / "deploy-app.yml", *extra, *flags)
        assert refused.returncode != 0 and any(r in " ".join(refused.stdout.split()) for r in reasons), \
            (reasons, refused.stdout[-2500:])
        assert _state(root, ports) == before
    (other / "app.yml").write_text((app / "app.yml").read_text().replace("name: hello", "name: bad/name"))
    refused = run_playbook(ROOT / "playbooks" / "deploy-app.yml", *extra, "-e", f"app_dir={other}")
    assert refused.returncode != 0 and "name: may hold only" in refused.stdout
    assert _state(root, ports) == before

    # make stop returns once all of it is down: the supervisords and every process under them (the
    # KMS, the gateway and its WireGuard hub, the VMM, the CVM's guest agent), and the containers.
    supervisords = [int((root / folder / "supervisord.pid").read_text()) for folder in ("services", "run/supervisor")]
    assert _demo_processes(root, extra) and _demo_containers(root)
    stopped = make("stop", f"DEMO_ROOT={root}", timeout=300)
    assert stopped.returncode == 0 and f"everything under {root} is down" in stopped.stdout, stopped.stdout + stopped.stderr
    assert not _demo_processes(root, extra) and not any(Path(f"/proc/{pid}").exists() for pid in supervisords)
    assert not _demo_containers(root)
    for name in ("kms", "vmm", "proxy", "app", "acme", "acme_management", "dns"):
        assert port_free("tcp", "127.0.0.1", ports[name]), name
    assert port_free("udp", "127.0.0.1", ports["dns"])

    # Started again, Pebble has a new root and no accounts: the gateway orders its certificate again
    # from an account registered there (quoted), its clients trust the new root, CAA names the new account.
    again = make("demo", *make_args)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-2000:]
    renewed = _acme_state(root, ports, f"{app_id}.{BASE}")
    assert renewed["root"] != acme["root"] and (root / "gateway" / "tls" / "ca.crt").read_text() == renewed["root"]
    assert renewed["account_uri"] != acme["account_uri"] and renewed["fingerprint"] != acme["fingerprint"]
    assert renewed["quoted_keys"] == acme["quoted_keys"] + 1


def _pebble_root(root, ports):
    """The root the demo's Pebble issues under now, from its management API."""
    context = ssl.create_default_context(cafile=str(root / "acme-lab" / "pebble" / "listener-ca.pem"))
    with urllib.request.urlopen(f"https://127.0.0.1:{ports['acme_management']}/roots/0", context=context,
                                timeout=10) as answer:
        return answer.read().decode()


def _dstack_verify(root, quote, report_data):
    (root / "acme-quote.json").write_text(quote)
    return subprocess.run([str(BIN / "dstack-verify"), str(root / "acme-quote.json"), "--sim-state",
                           str(root / "kms" / "tdx-sim"), "--report-data", report_data.hex()],
                          capture_output=True, text=True, timeout=120, check=False)


def _acme_state(root, ports, app_host):
    """The gateway's certificate as an outsider checks it, each claim asserted: the chain served for
    the app validates under the root Pebble's management API gives now, its leaf is for *.BASE and
    BASE from Pebble's intermediate; acme-info (https://gateway.BASE) quotes the account URI and the
    served key with dstack's report_data (SHA-512 of "acme-account:" || URI, of "zt-cert:" || the
    SubjectPublicKeyInfo DER: computed here), both verified by dstack-verify, and a quote is refused
    for the other's report_data; dig shows CAA issue and issuewild pinned to that account, and no
    other. Returns what a later run is compared with."""
    root_pem = _pebble_root(root, ports)
    (root / "pebble-root-now.pem").write_text(root_pem)
    trusted = str(root / "pebble-root-now.pem")
    chain = []
    answer = _https_get(ports["proxy"], app_host, trusted, chain=chain)
    assert answer.startswith("HTTP/1.1 200") and HELLO in answer, answer[:500]
    leaf, intermediate, last = (x509.load_der_x509_certificate(der) for der in chain)
    assert last.public_bytes(serialization.Encoding.PEM).decode() == root_pem
    assert intermediate.subject == leaf.issuer
    assert intermediate.subject.rfc4514_string().startswith("CN=Pebble Intermediate CA")
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(names.get_values_for_type(x509.DNSName)) == sorted([f"*.{BASE}", BASE])

    info = gateway_http.fetch(f"https://gateway.{BASE}:{ports['proxy']}/.dstack/acme-info", ca_cert=trusted,
                              timeout=10).json("acme-info")
    account_uri = info["account_uri"]
    assert account_uri.startswith(f"https://127.0.0.1:{ports['acme']}/")
    der = leaf.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    served = [key for key in info["quoted_hist_keys"] if key["public_key"] == der.hex()]
    assert len(served) == 1, info["quoted_hist_keys"]
    account_data = hashlib.sha512(b"acme-account:" + account_uri.encode()).digest()
    key_data = hashlib.sha512(b"zt-cert:" + der).digest()
    for quote, report_data in ((info["account_quote"], account_data), (served[0]["quote"], key_data)):
        done = _dstack_verify(root, quote, report_data)
        assert done.returncode == 0, done.stdout[-1500:] + done.stderr[-1500:]
    assert _dstack_verify(root, info["account_quote"], key_data).returncode != 0

    caa = subprocess.run(["dig", "+short", "@127.0.0.1", "-p", str(ports["dns"]), "CAA", BASE], capture_output=True,
                         text=True, timeout=30, check=True).stdout.splitlines()
    value = f"pebble;validationmethods=dns-01;accounturi={account_uri}"
    assert sorted(caa) == sorted([f'0 issue "{value}"', f'0 issuewild "{value}"']), caa
    return {"root": root_pem, "account_uri": account_uri, "quoted_keys": len(info["quoted_hist_keys"]),
            "fingerprint": hashlib.sha256(chain[0]).hexdigest()}


def _demo_processes(root, extra):
    """The processes whose command line names the demo's root or its gateway's WireGuard interface."""
    interface = next(json.loads(e)["dstack_gateway_wg_interface"] for e in extra if "dstack_gateway_wg_interface" in e)
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if proc.name.isdigit() and any(str(root).encode() in arg or arg == interface.encode() for arg in argv):
            found.append(int(proc.name))
    return found


def _demo_containers(root):
    """The podman containers of the demo's CVMs (their compose project's folder is under the root)."""
    listed = subprocess.run(["podman", "ps", "-a", "--format",
                             '{{.Names}} {{index .Labels "com.docker.compose.project.working_dir"}}'],
                            capture_output=True, text=True, check=True, timeout=120).stdout
    return [line.split()[0] for line in listed.splitlines() if f" {root}/" in line]


def _gateway_netns(extra):
    return next(json.loads(e)["dstack_gateway_wg_netns"] for e in extra if "dstack_gateway_wg_netns" in e)


def _gateway_hosts(root, ports):
    """Admin.Status's instance_id -> WireGuard address, over the gateway's RA-TLS (under the KMS root)."""
    context = ssl.create_default_context(cafile=str(root / "gateway" / "kms-root-ca.crt"))
    context.check_hostname = False
    token = (root / "gateway" / "admin-token").read_text().strip()
    request = urllib.request.Request(f"https://127.0.0.1:{ports['admin']}/prpc/Admin.Status", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, context=context, timeout=10) as response:
        return {h["instance_id"]: h["ip"] for h in json.loads(response.read())["hosts"]}


def _state(root, ports):
    """What a deployment changes: the allowlist, the build folder, the VMs."""
    return ((root / "kms" / "auth-config.json").read_text(), sorted(p.name for p in (root / "build").iterdir()),
            [vm["id"] for vm in _vmm(ports, "Status")["vms"]])


def test_a_compose_file_that_does_not_parse_is_refused_before_anything_is_made(demo_root):
    root, app, _ports, extra, _make_args = demo_root
    (app / "docker-compose.yaml").write_text("services: [broken\n")
    result = run_playbook(ROOT / "playbooks" / "deploy-app.yml", "-e", f"app_dir={app}", *extra,
                          "-e", "dstack_app_vmm_url=http://127.0.0.1:9")
    assert result.returncode != 0
    # Named as dstack.tee.app_compose named it, or as dstack.tee.app_check (which replaces it in the role) names it.
    assert any(f"{where}: is not valid YAML at line 2" in result.stdout
               for where in ("compose_file", f"{app}/docker-compose.yaml")), result.stdout[-2000:]
    assert not (root / "run").exists() and not (root / "kms").exists() and not (root / "build").exists()


def test_make_demo_waits_for_a_stop_then_a_port_another_process_holds_stops_it_naming_that_process(demo_root):
    root, _app, ports, _extra, make_args = demo_root
    before = sorted(p.name for p in root.iterdir())
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(ports["vmm"]), "--bind", "127.0.0.1"],  # pylint: disable=consider-using-with
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=root, start_new_session=True)
    try:
        for _attempt in range(100):
            if not port_free("tcp", "127.0.0.1", ports["vmm"]):
                break
            time.sleep(0.1)
        # A make stop under way holds the root's stop.lock (scripts/stop-demo.sh): make demo waits.
        with open(root / "stop.lock", "w", encoding="ascii") as lock, open(root / "make.out", "w+", encoding="utf-8") as out:
            fcntl.flock(lock, fcntl.LOCK_EX)
            demo = subprocess.Popen(["make", "--no-print-directory", "demo", *make_args], cwd=ROOT, stdout=out,  # pylint: disable=consider-using-with
                                    stderr=subprocess.STDOUT, text=True, env=dict(os.environ, ANSIBLE_NOCOLOR="1"))
            deadline = time.monotonic() + 120
            while "waiting for the previous make stop" not in (root / "make.out").read_text() and time.monotonic() < deadline:
                assert demo.poll() is None, (root / "make.out").read_text()
                time.sleep(0.2)
            time.sleep(1)
            assert demo.poll() is None and "PLAY" not in (root / "make.out").read_text()
            fcntl.flock(lock, fcntl.LOCK_UN)
            demo.wait(timeout=300)
            output = (root / "make.out").read_text()
        assert demo.returncode != 0, output[-3000:]
        # Named: the variable, the port, the process (pid and command line); nothing was made.
        held = f"VMM_PORT (dstack_vmm_listen): port {ports['vmm']}/tcp on 127.0.0.1 is held by pid {server.pid} " \
               f"({sys.executable} -m http.server {ports['vmm']} --bind 127.0.0.1)"
        assert held in " ".join(output.split()), output[-3000:]
        assert sorted(p.name for p in root.iterdir()) == sorted(before + ["stop.lock", "make.out"])
        assert "dstack.tee.kms" not in output
    finally:
        stop_process_group(server)
