"""The gateway's data plane against HAProxy and a direct connection, on one CVM backend reached over
WireGuard, in one run (issue 12, point 5).

    .venv/bin/python bench/bench_gateway.py [--duration 5] [--connections 32] [--workers 1]

Requests/s and p50/p99 latency of 1 KB responses with wrk, keep-alive and a new connection per
request (`Connection: close`), through:
  direct    wrk straight to the CVM's WireGuard address (plain HTTP for termination's row, the app's
            own TLS for passthrough's),
  haproxy   Debian's HAProxy routing the same SNI names to that address (termination: `ssl crt` and
            a map on ssl_fc_sni; passthrough: mode tcp on req.ssl_sni), nbthread = --workers,
  gateway   agents/gateway/proxy.py (uvloop), its router mapping the app id to that address,
            --workers processes sharing the port (SO_REUSEPORT),
and prints the ratios gateway/haproxy and gateway/direct. Both proxies relay TCP after TLS (HAProxy
in mode tcp), so they do the same work.

The backend is a CVM as the gateway sees one: a network namespace `bench-cvm-<pid>` joined to this
one by a veth pair (a free /30 of 10.214.0.0/16), with a wireguard-go interface in it
(10.215.X.2/32) whose one peer is a wireguard-go hub here (10.215.X.1/24, the CVM's key, its /32 and
its veth address as endpoint), as the gateway's hub and a registered CVM are. The app stand-in is a
third HAProxy running inside that namespace, bound to the tunnel address only, answering every
request with the same 1 KB body (plain on one port, TLS with its own certificate on another), so
the app is never the bottleneck. wrk (direct) and both proxies run here and reach the app through
the tunnel: all three rows pay the same WireGuard cost, and the ratios compare the proxies alone.
The bytes the hub's peer carried are read back at the end, as proof the tunnel was the path.

The SNI names resolve to 127.0.0.1 (where the proxies listen) through a hosts file bind-mounted
over /etc/hosts in wrk's own mount namespace (`unshare --mount`), since wrk takes its SNI from the
URL's host. Needs root (namespaces, links, wireguard-go). Every name carries the pid; everything
made (namespace, veth, both wireguard-go processes and their UAPI sockets, HAProxy and gateway
processes) is removed at the end, on failure, ^C or SIGTERM too. wrk, the proxies, wireguard-go and
the app share this machine's cores: compare the ratios, not the absolute figures.
"""

import argparse
import contextlib
import datetime
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ansible_collections.dstack.tee.plugins.module_utils import wireguard

BASE = "gw.test"
APP_ID = "a1b2c3d4"
APP_HTTP_PORT, APP_TLS_PORT = 18080, 18443
CVM_WG_PORT = wireguard.CVM_LISTEN_PORT
BODY = b"x" * 1023 + b"\n"
TERMINATE_NAME = f"{APP_ID}-{APP_HTTP_PORT}.{BASE}"
PASSTHROUGH_NAME = f"{APP_ID}-{APP_TLS_PORT}s.{BASE}"
UNDERLAY_RANGE = "10.214.{x}.0/30"   # the veth pair: the "internet" between hub and CVM
TUNNEL_RANGE = "10.215.{x}.0/24"     # the WireGuard addresses: .1 the hub, .2 the CVM


def progress(message):
    print(f"-- {message}", flush=True)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def self_signed(folder, label, names, ips=()):
    """A key and a self-signed certificate (wrk does not verify), as one PEM (HAProxy) and two files."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    alt_names = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    paths = {kind: folder / f"{label}.{kind}" for kind in ("crt", "key", "pem")}
    paths["crt"].write_bytes(cert_pem)
    paths["key"].write_bytes(key_pem)
    paths["pem"].write_bytes(cert_pem + key_pem)
    return paths


def wait_for_port(host, port, proc, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            proc.log.flush()
            raise SystemExit(f"a process exited early ({' '.join(proc.args)}, status {proc.returncode}):\n"
                             + Path(proc.log.name).read_text(errors="replace")[-3000:])
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing answers on {host}:{port}")


def check_route(host, port, name, expect_cert):
    """One request by hand before measuring: the route answers with the 1 KB body, from the right
    TLS peer (expect_cert None: plain HTTP)."""
    with contextlib.ExitStack() as stack:
        conn = stack.enter_context(socket.create_connection((host, port), timeout=5))
        if expect_cert is not None:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            conn = stack.enter_context(context.wrap_socket(conn, server_hostname=name))
            peer = x509.load_der_x509_certificate(conn.getpeercert(binary_form=True))
            assert peer.subject == expect_cert.subject, (name, peer.subject)
        conn.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(BODY), (name, answer[:200])


def haproxy_config(kind, folder, args, ports, app_host):
    common = (f"global\n  nbthread {args.workers}\n  maxconn 4000\n"
              f"defaults\n  mode {'http' if kind == 'app' else 'tcp'}\n"
              "  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n")
    if kind == "app":
        return common + (
            f"frontend app_http\n  bind {app_host}:{APP_HTTP_PORT}\n"
            f"  http-request return status 200 content-type text/plain file {folder / 'body.txt'}\n"
            f"frontend app_https\n  bind {app_host}:{APP_TLS_PORT} ssl crt {folder / 'app.pem'}\n"
            f"  http-request return status 200 content-type text/plain file {folder / 'body.txt'}\n")
    (folder / "terminate.map").write_text(f"{TERMINATE_NAME} app_http\n")
    (folder / "passthrough.map").write_text(f"{PASSTHROUGH_NAME} app_https\n")
    return common + (
        f"frontend terminate\n  bind 127.0.0.1:{ports['haproxy_terminate']} ssl crt {folder / 'gateway.pem'}"
        " alpn http/1.1\n"
        f"  use_backend %[ssl_fc_sni,lower,map({folder / 'terminate.map'})]\n"
        f"frontend passthrough\n  bind 127.0.0.1:{ports['haproxy_passthrough']}\n"
        "  tcp-request inspect-delay 5s\n  tcp-request content accept if { req_ssl_hello_type 1 }\n"
        f"  use_backend %[req.ssl_sni,lower,map({folder / 'passthrough.map'})]\n"
        f"backend app_http\n  server app {app_host}:{APP_HTTP_PORT}\n"
        f"backend app_https\n  server app {app_host}:{APP_TLS_PORT}\n")


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def run_wrk(args, hosts_file, url, close):
    command = ["wrk", "-t", str(args.wrk_threads), "-c", str(args.connections), "-d", f"{args.duration}s",
               "--latency", "--timeout", "5s"]
    if close:
        command += ["-H", "Connection: close"]
    command.append(url)
    inner = f"mount --bind {hosts_file} /etc/hosts && exec " + " ".join(f"'{part}'" for part in command)
    out = subprocess.run(["unshare", "--mount", "sh", "-c", inner], capture_output=True, text=True,
                         timeout=args.duration + 60, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    latency = {}
    for pct in ("50", "99"):
        value, unit = re.search(rf"^\s+{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        latency[pct] = float(value) * _UNITS[unit]
    errors = re.search(r"Socket errors:.*", out)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50_ms": latency["50"], "p99_ms": latency["99"],
            "errors": (errors.group(0) if errors else "") + (f" non-2xx {non_2xx.group(1)}" if non_2xx else "")}


def serve_gateway(config_json):
    """The gateway process (one of --workers): a static router for the benchmark's one app."""
    from ansible_collections.dstack.tee.agents.gateway import proxy  # pylint: disable=import-outside-toplevel
    config = json.loads(config_json)

    class StaticRouter:
        def resolve(self, ident):
            return [("instance-1", config["app_host"])] if ident == APP_ID else []

        def port_policy(self, instance_id):  # pylint: disable=unused-argument
            return None

    settings = proxy.ProxySettings(base_domain=BASE, listen_addr="127.0.0.1", listen_port=config["port"],
                                   reuse_port=True)
    proxy.run(settings, StaticRouter(), *proxy.server_contexts(config["cert"], config["key"]))


# --- the CVM: a namespace reached over wireguard-go ---------------------------------------------

def _routes_here():
    """The IPv4 prefixes routed in this namespace (every table), to pick ranges nobody uses."""
    out = subprocess.run(["ip", "-j", "-4", "route", "show", "table", "all"], capture_output=True, text=True,
                         check=True).stdout
    prefixes = []
    for route in json.loads(out or "[]"):
        with contextlib.suppress(ValueError):
            prefixes.append(ipaddress.ip_network(route.get("dst", ""), strict=False))
    return prefixes


def pick_ranges(pid):
    """X for 10.214.X.0/30 and 10.215.X.0/24, starting from the pid, neither overlapping a route here."""
    used = _routes_here()
    for step in range(256):
        x = (pid + step) % 256
        nets = [ipaddress.ip_network(template.format(x=x)) for template in (UNDERLAY_RANGE, TUNNEL_RANGE)]
        if not any(net.overlaps(route) for net in nets for route in used if route.prefixlen > 0):
            return x
    raise SystemExit("no free 10.214.X.0/30 with a free 10.215.X.0/24: every X is routed here already")


class Cvm:
    """The benchmark's CVM: namespace, veth, its wireguard-go and the hub's. Each piece made is
    registered on `stack` for removal before the next is made, so a failure half-way leaves nothing."""

    def __init__(self, pid):
        self.netns = f"bench-cvm-{pid}"
        self.veth_here, self.veth_there = f"bvh{pid}", f"bvc{pid}"
        x = pick_ranges(pid)
        underlay = ipaddress.ip_network(UNDERLAY_RANGE.format(x=x))
        tunnel = ipaddress.ip_network(TUNNEL_RANGE.format(x=x))
        self.underlay_here, self.underlay_there = (str(underlay[1]), str(underlay[2]))
        self.hub_ip, self.app_ip = str(tunnel[1]), str(tunnel[2])
        self.tunnel_prefixlen = tunnel.prefixlen
        self.hub = wireguard.WgInterface(f"bwh{pid}")
        self.wg = wireguard.WgInterface(f"bwc{pid}", netns=self.netns)
        self.hub_pub = None
        self.cvm_pub = None

    def make(self, stack):
        if wireguard.netns_exists(self.netns):
            raise SystemExit(f"network namespace {self.netns} exists already (a run of this pid left it?)")
        progress(f"network namespace {self.netns}, veth {self.veth_here} {self.underlay_here}/30 <-> "
                 f"{self.veth_there} {self.underlay_there}/30")
        stack.callback(wireguard.netns_remove, self.netns)
        wireguard.netns_add(self.netns)
        stack.callback(wireguard.delete_link, self.veth_here)
        wireguard.veth_pair(self.veth_here, None, self.veth_there, self.netns)
        wireguard.configure_link(self.veth_here, None, address=f"{self.underlay_here}/30")
        wireguard.configure_link(self.veth_there, self.netns, address=f"{self.underlay_there}/30")
        wireguard.configure_link("lo", self.netns)

        hub_key, cvm_key = wireguard.generate_private_key(), wireguard.generate_private_key()
        self.hub_pub, self.cvm_pub = wireguard.public_key(hub_key), wireguard.public_key(cvm_key)
        progress(f"wireguard-go {self.wg.name} in {self.netns}: {self.app_ip}/32, UDP {CVM_WG_PORT}, "
                 f"route to the hub's {self.hub_ip}")
        stack.callback(self.wg.down)
        self.wg.up(f"{self.app_ip}/32", private_key=cvm_key, listen_port=CVM_WG_PORT)
        subprocess.run(wireguard.netns_exec_argv(self.netns, ["ip", "route", "add", f"{self.hub_ip}/32",
                                                              "dev", self.wg.name]), check=True)
        # The CVM learns the hub's endpoint from its first packet, as a CVM behind the gateway does.
        self.wg.uapi.set_peer(self.hub_pub, [f"{self.hub_ip}/32"])
        progress(f"wireguard-go hub {self.hub.name} here: {self.hub_ip}/{self.tunnel_prefixlen}, "
                 f"peer {self.app_ip}/32 at {self.underlay_there}:{CVM_WG_PORT}")
        stack.callback(self.hub.down)
        self.hub.up(f"{self.hub_ip}/{self.tunnel_prefixlen}", private_key=hub_key)
        self.hub.uapi.set_peer(self.cvm_pub, [f"{self.app_ip}/32"], endpoint=f"{self.underlay_there}:{CVM_WG_PORT}")

    def hub_peer(self):
        return next(peer for peer in self.hub.uapi.get()["peers"] if peer.public_key == self.cvm_pub)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (12 runs)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1, help="gateway processes / HAProxy threads")
    parser.add_argument("--serve-gateway", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_gateway:
        with contextlib.suppress(KeyboardInterrupt):  # ^C reaches the workers too: the parent reports it
            serve_gateway(args.serve_gateway)
        return 0
    for tool in ("wrk", "haproxy", "unshare", "wireguard-go", "ip"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed (scripts/setup.sh installs wrk, haproxy and wireguard-go)")
    if not wireguard.HAS_PYROUTE2:
        raise SystemExit("pyroute2 is not installed (run with the project's .venv/bin/python)")
    if os.geteuid() != 0:
        raise SystemExit("needs root: a network namespace, a veth pair and wireguard-go for the CVM, and "
                         "wrk's SNI names in a hosts file mounted in its own namespace")

    main_pid = os.getpid()

    def stop(signum, _frame):
        if os.getpid() != main_pid:  # a fork of pyroute2's (its netns helpers), stopped by TERM
            os._exit(128 + signum)
        raise SystemExit(128 + signum)

    # SIGTERM and SIGHUP unwind as ^C does, so the clean-up below runs.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        stack = contextlib.ExitStack()
        try:
            return _bench(args, Path(tmp), stack)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            if os.getpid() != main_pid:  # a pyroute2 fork interrupted by ^C: the clean-up is not its to do
                os._exit(1)
            # A second ^C must not cut the clean-up short and leave a namespace or wireguard-go behind.
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(signum, signal.SIG_IGN)
            progress("cleaning up: processes, wireguard-go, veth, namespace")
            stack.close()


def _stop_all(procs):
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _start(procs, command, log):
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)  # pylint: disable=consider-using-with
    proc.log = log
    procs.append(proc)
    return proc


def _row(mode, close, path):
    return f"{mode:<12} {'new' if close else 'keep-alive':<11} {path:<8}"


def _bench(args, folder, stack):
    cvm = Cvm(os.getpid())
    cvm.make(stack)

    (folder / "body.txt").write_bytes(BODY)
    gateway_cert = self_signed(folder, "gateway", [f"*.{BASE}"])
    app_cert = self_signed(folder, "app", [f"*.{BASE}"], ips=[cvm.app_ip])
    ports = {"haproxy_terminate": free_port(), "haproxy_passthrough": free_port(), "gateway": free_port()}
    hosts = folder / "hosts"
    hosts.write_text(f"127.0.0.1 localhost {TERMINATE_NAME} {PASSTHROUGH_NAME}\n")
    log = stack.enter_context(open(folder / "processes.log", "wb"))  # pylint: disable=consider-using-with
    procs = []
    stack.callback(_stop_all, procs)  # before the tunnel and the namespace go (LIFO)

    progress(f"app HAProxy in {cvm.netns} on {cvm.app_ip}:{APP_HTTP_PORT} (HTTP) and :{APP_TLS_PORT} (TLS)")
    (folder / "app.cfg").write_text(haproxy_config("app", folder, args, ports, cvm.app_ip))
    proc = _start(procs, wireguard.netns_exec_argv(cvm.netns, ["haproxy", "-f", str(folder / "app.cfg"), "-db"]),
                  log)
    wait_for_port(cvm.app_ip, APP_HTTP_PORT, proc, timeout=15)  # the first packet makes the handshake
    if not cvm.hub_peer().last_handshake:
        raise SystemExit(f"the app answers on {cvm.app_ip} without a WireGuard handshake: not the tunnel")

    progress(f"HAProxy here on 127.0.0.1:{ports['haproxy_terminate']} (termination) and "
             f":{ports['haproxy_passthrough']} (passthrough), nbthread {args.workers}")
    (folder / "proxy.cfg").write_text(haproxy_config("proxy", folder, args, ports, cvm.app_ip))
    proc = _start(procs, ["haproxy", "-f", str(folder / "proxy.cfg"), "-db"], log)
    wait_for_port("127.0.0.1", ports["haproxy_terminate"], proc)

    progress(f"gateway here on 127.0.0.1:{ports['gateway']}, {args.workers} process(es), {APP_ID} -> {cvm.app_ip}")
    config = json.dumps({"port": ports["gateway"], "cert": str(gateway_cert["crt"]), "key": str(gateway_cert["key"]),
                         "app_host": cvm.app_ip})
    for _worker in range(args.workers):
        proc = _start(procs, [sys.executable, __file__, "--serve-gateway", config], log)
    wait_for_port("127.0.0.1", ports["gateway"], proc)

    progress("one request by hand on each of the six routes")
    certs = {name: x509.load_pem_x509_certificate(paths["crt"].read_bytes())
             for name, paths in (("gateway", gateway_cert), ("app", app_cert))}
    check_route(cvm.app_ip, APP_HTTP_PORT, TERMINATE_NAME, None)
    check_route("127.0.0.1", ports["haproxy_terminate"], TERMINATE_NAME, certs["gateway"])
    check_route("127.0.0.1", ports["gateway"], TERMINATE_NAME, certs["gateway"])
    check_route(cvm.app_ip, APP_TLS_PORT, PASSTHROUGH_NAME, certs["app"])
    check_route("127.0.0.1", ports["haproxy_passthrough"], PASSTHROUGH_NAME, certs["app"])
    check_route("127.0.0.1", ports["gateway"], PASSTHROUGH_NAME, certs["app"])

    urls = {
        ("termination", "direct"): f"http://{cvm.app_ip}:{APP_HTTP_PORT}/",
        ("termination", "haproxy"): f"https://{TERMINATE_NAME}:{ports['haproxy_terminate']}/",
        ("termination", "gateway"): f"https://{TERMINATE_NAME}:{ports['gateway']}/",
        ("passthrough", "direct"): f"https://{cvm.app_ip}:{APP_TLS_PORT}/",
        ("passthrough", "haproxy"): f"https://{PASSTHROUGH_NAME}:{ports['haproxy_passthrough']}/",
        ("passthrough", "gateway"): f"https://{PASSTHROUGH_NAME}:{ports['gateway']}/",
    }
    runs = [(mode, close, path) for mode in ("termination", "passthrough") for close in (False, True)
            for path in ("direct", "haproxy", "gateway")]
    before = cvm.hub_peer()
    results = {}
    for number, key in enumerate(runs, 1):
        result = run_wrk(args, hosts, urls[(key[0], key[2])], key[1])
        results[key] = result
        progress(f"[{number:>2}/{len(runs)}] {_row(*key)} {result['rps']:>9.0f} req/s  p50 {result['p50_ms']:.2f} ms  "
                 f"p99 {result['p99_ms']:.2f} ms  {result['errors']}")
    after = cvm.hub_peer()

    print(f"\nwrk -t{args.wrk_threads} -c{args.connections} -d{args.duration}s, 1 KB responses, "
          f"{args.workers} gateway process(es) / HAProxy thread(s), {os.cpu_count()} cores shared by all")
    print(f"backend: app in netns {cvm.netns}, reached over wireguard-go at {cvm.app_ip} (hub {cvm.hub.name} "
          f"{cvm.hub_ip} -> {cvm.underlay_there}:{CVM_WG_PORT}); the tunnel carried "
          f"{(after.tx_bytes - before.tx_bytes) / 1e6:.0f} MB to the app and "
          f"{(after.rx_bytes - before.rx_bytes) / 1e6:.0f} MB back during the runs")
    print(f"{'mode':<12} {'connection':<11} {'path':<8} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8}  errors")
    for key in runs:
        result = results[key]
        print(f"{_row(*key)} {result['rps']:>10.0f} {result['p50_ms']:>8.2f} {result['p99_ms']:>8.2f}  "
              f"{result['errors']}")
    print("\nratios (requests/s)          gateway/haproxy  gateway/direct   target vs haproxy")
    for mode, target in (("termination", 0.6), ("passthrough", 0.8)):
        for close in (False, True):
            gateway, haproxy, direct = (results[(mode, close, path)]["rps"] for path in ("gateway", "haproxy", "direct"))
            print(f"{mode:<12} {'new' if close else 'keep-alive':<11}      {gateway / haproxy:>10.2f}  "
                  f"{gateway / direct:>14.2f}   >= {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
