"""Key-release latency of the real KMS over HTTPS, at concurrency 1, 16 and 64, in one run.

    .venv/bin/python bench/bench_kms.py [--requests 200] [--workers 2]

Starts `dstack-kms serve --simulated` on a loopback port (its own temporary state), allows one
app, and runs full attested key releases (GetNonce, a simulated quote binding the nonce and an
ephemeral key, GetAppKey with the event log) from N client threads. Prints p50 and p99 latency
of a release, and of a GetMeta round trip on the same server and connection settings as the
reference, with the ratio. Client and server share this machine's cores, so the figures at high
concurrency include the clients' own quote signing.
"""

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ansible_collections.dstack.tee.agents.guest import measure
from ansible_collections.dstack.tee.plugins.module_utils import app_compose, eventlog
from ansible_collections.dstack.tee.plugins.module_utils.kms_client import KmsClient
from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx

KMS = str(Path(sys.executable).parent / "dstack-kms")
OS_IMAGE = "11" * 32


class _Cvm:
    """Just enough of a guest for measure.py: a simulated TD with its own RTMRs and event list."""

    def __init__(self, sim_dir, rtmr_file):
        self.provider = SimTdx(sim_dir, rtmr_state=rtmr_file)
        self.provider.reset_rtmrs()  # a fresh TD
        self.events = []

    def emit_event(self, name, payload=b""):
        event = eventlog.RuntimeEvent(name, bytes(payload))
        self.provider.extend_rtmr(3, event.digest())
        self.events.append(event)


def percentile(values, pct):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(pct / 100 * (len(ordered) - 1))))]


def run(concurrency, total, make_call):
    latencies, errors, lock = [], [], threading.Lock()
    per_thread = max(1, total // concurrency)

    def worker(index):
        call = make_call(index)
        for _i in range(per_thread):
            start = time.perf_counter()
            try:
                call()
            except Exception as exc:  # pylint: disable=broad-exception-caught
                with lock:
                    errors.append(str(exc))
                continue
            with lock:
                latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    wall = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors, time.perf_counter() - wall


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--requests", type=int, default=192, help="releases per concurrency level")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "kms"
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = subprocess.Popen([KMS, "serve", "--simulated", "--state-dir", str(state), "--listen",  # pylint: disable=consider-using-with
                                   f"127.0.0.1:{port}", "--workers", str(args.workers)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            for _i in range(300):
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                        break
                except OSError:
                    time.sleep(0.1)
            app = app_compose.build("services:\n  web:\n    image: nginx\n", "bench")
            chash = app_compose.compose_hash(app)
            app_id = chash[:40]
            (state / "auth-config.json").write_text(json.dumps({"osImages": ["0x" + OS_IMAGE], "apps": {
                "0x" + app_id: {"composeHashes": ["0x" + chash], "allowAnyDevice": True}}}))
            url, ca = f"https://127.0.0.1:{port}", str(state / "root-ca.crt")
            vm_config = json.dumps({"os_image_hash": OS_IMAGE})

            def release_call(index):
                cvm = _Cvm(str(state / "tdx-sim"), os.path.join(tmp, f"rtmrs-{index}.json"))
                measure.measure_identity(cvm, app_id, chash, f"{index:040x}")
                log = json.dumps([e.to_log_entry() for e in cvm.events])
                client = KmsClient(url, ca_cert=ca)
                return lambda: client.get_app_key(cvm.provider, log, vm_config)

            def meta_call(_index):
                client = KmsClient(url, ca_cert=ca)
                return client.get_meta

            print(f"KMS key release over HTTPS, {args.workers} gunicorn workers, simulated quotes, "
                  f"{os.cpu_count()} cores shared by clients and server")
            for concurrency in (1, 16, 64):
                meta, meta_err, _wall = run(concurrency, args.requests, meta_call)
                rel, rel_err, wall = run(concurrency, args.requests, release_call)
                if rel_err or meta_err:
                    print(f"  concurrency {concurrency}: {len(rel_err) + len(meta_err)} errors, first: "
                          f"{(rel_err or meta_err)[0]}")
                if not rel or not meta:
                    continue
                print(f"  concurrency {concurrency:>2}: release p50 {percentile(rel, 50) * 1000:7.1f} ms  "
                      f"p99 {percentile(rel, 99) * 1000:7.1f} ms  ({len(rel) / wall:6.1f} releases/s)   "
                      f"GetMeta p50 {statistics.median(meta) * 1000:6.1f} ms   "
                      f"ratio release/GetMeta p50 {percentile(rel, 50) / statistics.median(meta):5.1f}")
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
