"""The gateway's data plane against HAProxy and a direct connection, in one run (issue 12, point 5).

    .venv/bin/python bench/bench_gateway.py [--duration 5] [--connections 32] [--workers 1]

Requests/s and p50/p99 latency of 1 KB responses with wrk, keep-alive and a new connection per
request (`Connection: close`), through:
  direct    wrk straight to the app (plain HTTP for termination's row, its own TLS for passthrough's),
  haproxy   Debian's HAProxy routing the same SNI names (termination: `ssl crt` and a map on
            ssl_fc_sni; passthrough: mode tcp on req.ssl_sni), nbthread = --workers,
  gateway   agents/gateway/proxy.py (uvloop), --workers processes sharing the port (SO_REUSEPORT),
and prints the ratios gateway/haproxy and gateway/direct. Both proxies relay TCP after TLS (HAProxy
in mode tcp), so they do the same work.

The app stand-in is a third HAProxy answering every request with the same 1 KB body (plain on one
port, TLS with its own certificate on another), so the backend is never the bottleneck. The SNI
names resolve to 127.0.0.1 through a hosts file bind-mounted over /etc/hosts in wrk's own mount
namespace (`unshare --mount`, needs root), since wrk takes its SNI from the URL's host. Everything
listens on loopback, and every process started is stopped at the end. wrk, the proxies and the app
share this machine's cores: compare the ratios, not the absolute figures.
"""

import argparse
import datetime
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

BASE = "gw.test"
APP_ID = "a1b2c3d4"
APP_HOST = "127.77.1.2"
APP_HTTP_PORT, APP_TLS_PORT = 18080, 18443
BODY = b"x" * 1023 + b"\n"
TERMINATE_NAME = f"{APP_ID}-{APP_HTTP_PORT}.{BASE}"
PASSTHROUGH_NAME = f"{APP_ID}-{APP_TLS_PORT}s.{BASE}"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def self_signed(folder, label, names):
    """A key and a self-signed certificate (wrk does not verify), as one PEM (HAProxy) and two files."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
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
    raise SystemExit(f"nothing listens on {host}:{port}")


def check_route(port, name, expect_cert):
    """One request by hand before measuring: the route answers with the 1 KB body, from the right TLS peer."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=name) as conn:
        peer = x509.load_der_x509_certificate(conn.getpeercert(binary_form=True))
        assert peer.subject == expect_cert.subject, (name, peer.subject)
        conn.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(BODY), (name, answer[:200])


def haproxy_config(kind, folder, args, ports):
    common = (f"global\n  nbthread {args.workers}\n  maxconn 4000\n"
              f"defaults\n  mode {'http' if kind == 'app' else 'tcp'}\n"
              "  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n")
    if kind == "app":
        return common + (
            f"frontend app_http\n  bind {APP_HOST}:{APP_HTTP_PORT}\n"
            f"  http-request return status 200 content-type text/plain file {folder / 'body.txt'}\n"
            f"frontend app_https\n  bind {APP_HOST}:{APP_TLS_PORT} ssl crt {folder / 'app.pem'}\n"
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
        f"backend app_http\n  server app {APP_HOST}:{APP_HTTP_PORT}\n"
        f"backend app_https\n  server app {APP_HOST}:{APP_TLS_PORT}\n")


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
            return [("instance-1", APP_HOST)] if ident == APP_ID else []

        def port_policy(self, instance_id):  # pylint: disable=unused-argument
            return None

    settings = proxy.ProxySettings(base_domain=BASE, listen_addr="127.0.0.1", listen_port=config["port"],
                                   reuse_port=True)
    proxy.run(settings, StaticRouter(), *proxy.server_contexts(config["cert"], config["key"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (12 runs)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1, help="gateway processes / HAProxy threads")
    parser.add_argument("--serve-gateway", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_gateway:
        serve_gateway(args.serve_gateway)
        return 0
    for tool in ("wrk", "haproxy", "unshare"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed (scripts/setup.sh installs wrk and haproxy)")
    if os.geteuid() != 0:
        raise SystemExit("needs root: wrk's SNI names resolve through a hosts file mounted in its own namespace")

    procs = []
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        folder = Path(tmp)
        try:
            return _bench(args, folder, procs)
        finally:
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


def _bench(args, folder, procs):
    (folder / "body.txt").write_bytes(BODY)
    gateway_cert = self_signed(folder, "gateway", [f"*.{BASE}"])
    app_cert = self_signed(folder, "app", [f"*.{BASE}", APP_HOST])
    ports = {"haproxy_terminate": free_port(), "haproxy_passthrough": free_port(), "gateway": free_port()}
    hosts = folder / "hosts"
    hosts.write_text(f"127.0.0.1 localhost {TERMINATE_NAME} {PASSTHROUGH_NAME}\n")
    log = open(folder / "processes.log", "wb")  # pylint: disable=consider-using-with

    for kind in ("app", "proxy"):
        (folder / f"{kind}.cfg").write_text(haproxy_config(kind, folder, args, ports))
        proc = _start(procs, ["haproxy", "-f", str(folder / f"{kind}.cfg"), "-db"], log)
        wait_for_port(APP_HOST if kind == "app" else "127.0.0.1",
                      APP_HTTP_PORT if kind == "app" else ports["haproxy_terminate"], proc)
    config = json.dumps({"port": ports["gateway"], "cert": str(gateway_cert["crt"]), "key": str(gateway_cert["key"])})
    for _worker in range(args.workers):
        proc = _start(procs, [sys.executable, __file__, "--serve-gateway", config], log)
    wait_for_port("127.0.0.1", ports["gateway"], proc)

    certs = {name: x509.load_pem_x509_certificate(paths["crt"].read_bytes())
             for name, paths in (("gateway", gateway_cert), ("app", app_cert))}
    check_route(ports["haproxy_terminate"], TERMINATE_NAME, certs["gateway"])
    check_route(ports["gateway"], TERMINATE_NAME, certs["gateway"])
    check_route(ports["haproxy_passthrough"], PASSTHROUGH_NAME, certs["app"])
    check_route(ports["gateway"], PASSTHROUGH_NAME, certs["app"])

    urls = {
        ("termination", "direct"): f"http://{APP_HOST}:{APP_HTTP_PORT}/",
        ("termination", "haproxy"): f"https://{TERMINATE_NAME}:{ports['haproxy_terminate']}/",
        ("termination", "gateway"): f"https://{TERMINATE_NAME}:{ports['gateway']}/",
        ("passthrough", "direct"): f"https://{APP_HOST}:{APP_TLS_PORT}/",
        ("passthrough", "haproxy"): f"https://{PASSTHROUGH_NAME}:{ports['haproxy_passthrough']}/",
        ("passthrough", "gateway"): f"https://{PASSTHROUGH_NAME}:{ports['gateway']}/",
    }
    print(f"wrk -t{args.wrk_threads} -c{args.connections} -d{args.duration}s, 1 KB responses, "
          f"{args.workers} gateway process(es) / HAProxy thread(s), {os.cpu_count()} cores shared by all")
    print(f"{'mode':<12} {'connection':<11} {'path':<8} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8}  errors")
    results = {}
    for mode in ("termination", "passthrough"):
        for close in (False, True):
            for path in ("direct", "haproxy", "gateway"):
                result = run_wrk(args, hosts, urls[(mode, path)], close)
                results[(mode, close, path)] = result
                print(f"{mode:<12} {'new' if close else 'keep-alive':<11} {path:<8} {result['rps']:>10.0f} "
                      f"{result['p50_ms']:>8.2f} {result['p99_ms']:>8.2f}  {result['errors']}", flush=True)
    print("\nratios (requests/s)          gateway/haproxy  gateway/direct   target vs haproxy")
    for mode, target in (("termination", 0.6), ("passthrough", 0.8)):
        for close in (False, True):
            gateway, haproxy, direct = (results[(mode, close, path)]["rps"] for path in ("gateway", "haproxy", "direct"))
            print(f"{mode:<12} {'new' if close else 'keep-alive':<11}      {gateway / haproxy:>10.2f}  "
                  f"{gateway / direct:>14.2f}   >= {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
