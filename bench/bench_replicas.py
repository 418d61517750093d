"""Key releases per second with one KMS, and with two replicas behind HAProxy, in one run.

    .venv/bin/python bench/bench_replicas.py [--requests 128] [--clients 16] [--workers 1]

Starts `dstack-kms serve --simulated` (its own temporary state), a second one restored from the
first's state directory (`dstack-kms restore`: the same root keys, a state directory of its own),
both trusting one simulated platform, and HAProxy (`haproxy -f CFG -db`, TCP mode, TLS passed
through, roundrobin per connection) in front of the two. The same client load (N client threads,
each keeping its connection, full attested releases) runs against the first KMS alone and then
against HAProxy (each replica warmed up first, not measured). Prints releases/s, p50/p99, and the
server CPU per release of each setup (KMS processes, and HAProxy for the second).
On one machine the replicas share its cores (and with the clients): the figure says what a second
replica costs and that the load spreads, not what a second machine would add.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_kms import KMS, WARM_UP_CLIENTS, allow, group_cpu, percentile, release_maker, run, serve

from ansible_collections.dstack.tee.plugins.module_utils import app_compose
from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx

HAPROXY = "/usr/sbin/haproxy"


def haproxy(folder, backends):
    """HAProxy in TCP mode on a free port, roundrobin over backends (host:port): (process, url)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    servers = "".join(f"  server kms{i} {backend}\n" for i, backend in enumerate(backends))
    config = Path(folder) / "haproxy.cfg"
    config.write_text("global\n  maxconn 4096\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n"
                      f"  timeout server 60s\nfrontend kms\n  bind 127.0.0.1:{port}\n  default_backend replicas\n"
                      f"backend replicas\n  balance roundrobin\n{servers}")
    proc = subprocess.Popen([HAPROXY, "-f", str(config), "-db"], stdout=subprocess.DEVNULL,  # pylint: disable=consider-using-with
                            stderr=subprocess.DEVNULL, start_new_session=True)
    for _i in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.05)
    return proc, f"https://127.0.0.1:{port}"


def measure(label, url, pgids, make_call, args):
    latencies, errors, wall, spent = run(args.clients, args.requests, make_call,
                                         lambda: group_cpu(*pgids))
    if errors:
        print(f"  {label}: {len(errors)} errors, first: {errors[0]}")
    if latencies:
        print(f"  {label:<32} {len(latencies) / wall:6.1f} releases/s   p50 {percentile(latencies, 50) * 1000:6.1f} ms"
              f"   p99 {percentile(latencies, 99) * 1000:6.1f} ms   server CPU per release "
              f"{spent / len(latencies) * 1000:5.2f} ms   ({url})")
    return len(latencies) / wall if latencies else 0.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--requests", type=int, default=128, help="releases per setup")
    parser.add_argument("--clients", type=int, default=16, help="client threads, each keeping its connection")
    parser.add_argument("--workers", type=int, default=1, help="gunicorn workers per KMS")
    args = parser.parse_args()
    if not os.path.exists(HAPROXY):
        print("haproxy is not installed (scripts/setup.sh installs it)", file=sys.stderr)
        return 2
    app = app_compose.build("services:\n  web:\n    image: nginx\n", "bench")
    chash = app_compose.compose_hash(app)
    app_id = chash[:40]
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            sim_dir = Path(tmp) / "tdx-sim"
            SimTdx(str(sim_dir))
            first, second = Path(tmp) / "kms-a", Path(tmp) / "kms-b"
            server_a, url_a = serve(first, workers=args.workers, sim_state=sim_dir)
            procs.append(server_a)
            subprocess.run([KMS, "restore", "--state-dir", str(second), "--backup", str(first)], check=True,
                           capture_output=True, timeout=60)
            server_b, url_b = serve(second, workers=args.workers, sim_state=sim_dir)
            procs.append(server_b)
            for state in (first, second):
                allow(state, app_id, chash)
            proxy, url_proxy = haproxy(tmp, [url_a.removeprefix("https://"), url_b.removeprefix("https://")])
            procs.append(proxy)
            ca = str(first / "root-ca.crt")
            print(f"KMS replicas: {args.clients} clients, {args.requests} releases per setup, {args.workers} "
                  f"gunicorn worker(s) per KMS, {os.cpu_count()} cores shared by clients, servers and HAProxy")
            for url, label in ((url_a, "warm-a"), (url_b, "warm-b")):  # each replica's threads warmed, not measured
                run(WARM_UP_CLIENTS, 4 * WARM_UP_CLIENTS, release_maker(url, ca, app_id, chash, str(sim_dir), tmp, label))
            one = measure("one KMS", url_a, [server_a.pid],
                          release_maker(url_a, ca, app_id, chash, str(sim_dir), tmp, "one"), args)
            two = measure("two replicas behind HAProxy", url_proxy, [server_a.pid, server_b.pid, proxy.pid],
                          release_maker(url_proxy, ca, app_id, chash, str(sim_dir), tmp, "two"), args)
            if one:
                print(f"  ratio two/one {two / one:4.2f}")
        finally:
            for proc in procs:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
