"""Key release on the real KMS over HTTPS, against the physical floor of the path, in one run.

    .venv/bin/python bench/bench_kms.py [--requests 128] [--workers 2] [--no-access-log] [--ethereum]

Starts `dstack-kms serve --simulated` on a loopback port (its own temporary state), allows one
app, and reports:
- the floor: bare dcap-qvl verifications per CPU second (one core), on a quote of this KMS's
  simulated platform, measured again just before and after each HTTPS run and the per-core
  ratio taken against their mean (this shared machine's speed drifts within minutes);
- the KMS in process (no HTTP, no TLS): CPU per GetAppKey, releases per CPU second;
- over HTTPS at 1, 16 and 64 clients, each client thread keeping its connection (KmsClient, opened
  before the clock starts):
  p50/p99 latency of a whole release (GetNonce, the client's simulated quote, GetAppKey), wall
  releases/s, the server's CPU per release (the CPU time of the KMS's processes: master and
  workers, their threads' run times from /proc, divided by the releases) and so releases/s per
  core, and the same for a kept-alive GetMeta with the ratio release/GetMeta.
Every server is warmed up first (releases from WARM_UP_CLIENTS clients, not measured): the
figures are of a KMS in service, not of its first requests.
Clients and server share this machine's cores: wall figures at high concurrency include the
clients' own quote signing; the per-core figures count the server's CPU only.

--ethereum also runs a second KMS whose auth backend is the DstackKms / DstackApp contracts on a
local ganache chain (contracts/devchain.py), the app authorized on chain, and prints its release
latency and its ratio to the local-allowlist KMS (the per-block answer cache at work).
"""

import argparse
import glob
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

import dcap_qvl

from ansible_collections.dstack.tee.agents.guest import measure
from ansible_collections.dstack.tee.agents.kms.app import create_app
from ansible_collections.dstack.tee.plugins.module_utils import app_certs, app_compose, eventlog, key_release
from ansible_collections.dstack.tee.plugins.module_utils.kms_client import KmsClient
from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx

KMS = str(Path(sys.executable).parent / "dstack-kms")
ROOT = Path(__file__).resolve().parent.parent
OWNER_KEY = "0x" + "42" * 32
OS_IMAGE = "11" * 32
# Releases made before anything is measured, enough to reach every worker thread (2 x 4 by default):
# a thread's first release opens its nonce-store connection and fills the caches it keeps.
WARM_UP_CLIENTS = 8
FLOOR_SECONDS = 0.5  # CPU seconds of bare verification before and after each HTTPS run


class _Cvm:
    """Just enough of a guest for measure.py: a simulated TD with its own RTMRs and event list."""

    def __init__(self, sim_dir, rtmr_file):
        self.provider = SimTdx(sim_dir, rtmr_state=rtmr_file)
        self.provider.reset_rtmrs({"os_image_hash": OS_IMAGE})  # a fresh TD launched with OS_IMAGE
        self.events = []

    def emit_event(self, name, payload=b""):
        event = eventlog.RuntimeEvent(name, bytes(payload))
        self.provider.extend_rtmr(3, event.digest())
        self.events.append(event)


def measured_cvm(sim_dir, rtmr_file, app_id, chash, instance_id, ca_file):
    """A simulated CVM measured up to boot-mr-done, the KMS of ca_file as its key provider: (cvm, event log)."""
    cvm = _Cvm(sim_dir, rtmr_file)
    measure.measure_identity(cvm, app_id, chash, instance_id, OS_IMAGE, "kms",
                             app_certs.key_provider_id(Path(ca_file).read_bytes()))
    return cvm, json.dumps([e.to_log_entry() for e in cvm.events])


def percentile(values, pct):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(pct / 100 * (len(ordered) - 1))))]


def run(concurrency, total, make_call, cpu=None):
    """(latencies, errors, wall seconds, CPU seconds between two cpu() snapshots) of `total` calls from
    `concurrency` threads.

    Each thread first makes its call (make_call(index): its client, its connection opened); the
    clock and cpu() start once every thread is ready, so that the figures are those of clients that
    keep their connections, not of their TLS handshakes. cpu()'s first snapshot is taken before any
    client starts (a snapshot taken meanwhile missed the first calls of a short run)."""
    latencies, errors, lock = [], [], threading.Lock()
    per_thread = max(1, total // concurrency)
    ready, go = threading.Barrier(concurrency + 1), threading.Barrier(concurrency + 1)

    def worker(index):
        try:
            call = make_call(index)
        except Exception as exc:  # pylint: disable=broad-exception-caught
            with lock:
                errors.append(str(exc))
            call = None
        ready.wait()
        go.wait()
        for _i in range(per_thread if call else 0):
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
    for thread in threads:
        thread.start()
    ready.wait()
    cpu_start = cpu() if cpu else None  # taken while every client waits: reading /proc takes a while
    go.wait()
    wall = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - wall
    return latencies, errors, wall, (cpu() - cpu_start) if cpu else None


class CpuSnapshot(dict):
    """{(pid, thread id): CPU seconds} of the threads of some process groups. later - earlier is the
    CPU time spent between two snapshots by the threads alive at the later one: a thread that ended
    in between takes its share along (gunicorn's threads live as long as their worker)."""

    def __sub__(self, earlier):
        return sum(max(0.0, seconds - earlier.get(key, 0.0)) for key, seconds in self.items())


def group_cpu(*pgids):
    """A CpuSnapshot of the processes of these process groups (a server, its workers): each thread's
    run time from /proc/PID/task/TID/schedstat (nanoseconds; the 10 ms clock ticks of
    /proc/PID/stat, its fallback, blur a figure of a few milliseconds per release)."""
    snapshot, tick = CpuSnapshot(), os.sysconf("SC_CLK_TCK")
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat, encoding="ascii") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) not in pgids:  # fields after the name: state, ppid, pgrp, ..., utime (11), stime (12)
            continue
        pid = os.path.basename(os.path.dirname(stat))
        threads = glob.glob(f"/proc/{pid}/task/*/schedstat")
        for schedstat in threads:
            try:
                with open(schedstat, encoding="ascii") as handle:
                    snapshot[(pid, schedstat.split("/")[4])] = int(handle.read().split()[0]) / 1e9
            except (OSError, ValueError, IndexError):
                continue  # a thread that just ended
        if not threads:
            snapshot[(pid, "stat")] = (int(fields[11]) + int(fields[12])) / tick
    return snapshot


def serve(state, config=None, workers=2, sim_state=None, access_log=True):
    """A `dstack-kms serve --simulated` on a free loopback port: (process, url)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [KMS, "serve", "--simulated", "--state-dir", str(state), "--listen", f"127.0.0.1:{port}",
               "--workers", str(workers)] + (["--config", str(config)] if config else []) \
        + ([] if access_log else ["--no-access-log"]) \
        + (["--sim-state", str(sim_state)] if sim_state else [])
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,  # pylint: disable=consider-using-with
                              start_new_session=True)
    for _i in range(300):  # up to about 30 s for the first answer (listening is not yet serving)
        try:
            KmsClient(f"https://127.0.0.1:{port}", validate_certs=False, timeout=2).get_meta()
            break
        except Exception:  # pylint: disable=broad-exception-caught
            time.sleep(0.1)
    return server, f"https://127.0.0.1:{port}"


def allow(state, app_id, chash):
    (Path(state) / "auth-config.json").write_text(json.dumps({"osImages": ["0x" + OS_IMAGE], "apps": {
        "0x" + app_id: {"composeHashes": ["0x" + chash], "allowAnyDevice": True}}}))


def release_maker(url, ca, app_id, chash, sim_dir, tmp, label):
    """make_call(index) for run(): a CVM per client thread, measured once, and its kept-alive client."""
    vm_config = json.dumps({"os_image_hash": OS_IMAGE})

    def release_call(index):
        cvm, log = measured_cvm(sim_dir, os.path.join(tmp, f"rtmrs-{label}-{index}.json"), app_id, chash,
                                f"{index:040x}", ca)
        client = KmsClient(url, ca_cert=ca)
        client.get_meta()  # the connection this client keeps
        return lambda: client.get_app_key(cvm.provider, log, vm_config)
    return release_call


def floor_and_in_process(state, app_id, chash, tmp, seconds=2.0):
    """(floor, in-process releases per CPU second): `floor(seconds)` measures bare dcap-qvl
    verifications per CPU second (one core) on a quote of this KMS's platform, each time it is
    called (the HTTPS figures are set against floors measured just before and after them: this
    machine's speed drifts by a third within minutes as its neighbours come and go).

    The in-process KMS is create_app on the served KMS's state directory (same keys, allowlist and
    simulated platform); requests are made beforehand so that only the KMS's work is timed."""
    app = create_app({"state_dir": str(state), "mode": "simulation", "sim_state_dir": str(Path(state) / "tdx-sim"),
                      "auth": {"type": "local", "path": str(Path(state) / "auth-config.json")},
                      "audit_log": os.path.join(tmp, "in-process-audit.log")})
    service = app.extensions["dstack_kms"]
    cvm, log = measured_cvm(str(Path(state) / "tdx-sim"), os.path.join(tmp, "rtmrs-in-process.json"), app_id, chash,
                            "ab" * 20, Path(state) / "root-ca.crt")
    requests = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(requests) < 20:
        nonce = bytes.fromhex(service.new_nonce()["nonce"])
        _private, public = key_release.new_ephemeral_key()
        quote = cvm.provider.get_quote(key_release.key_release_report_data(nonce, public))
        requests.append({"nonce": nonce.hex(), "ephemeral_public_key": public.hex(), "quote": quote.hex(),
                         "event_log": log, "vm_config": json.dumps({"os_image_hash": OS_IMAGE})})
    service.get_app_key(requests.pop())  # warm: collateral, app cache
    raw = bytes.fromhex(requests[0]["quote"])
    collateral = service.collateral(raw)

    def floor(duration=seconds / 2):
        now, count = int(time.time()), 0
        cpu = time.process_time()
        while time.process_time() - cpu < duration or count < 20:
            dcap_qvl.verify_with_root_ca(raw, collateral, service.root_ca_der, now)
            count += 1
        return count / (time.process_time() - cpu)

    before = floor()
    cpu = time.process_time()
    for request in requests:
        service.get_app_key(request)
    in_process = len(requests) / (time.process_time() - cpu)
    return floor, in_process, (before + floor()) / 2


def on_chain(chain, chash):
    """DstackKms allowing OS_IMAGE, and a DstackApp allowing chash: (kms address, app_id)."""
    from ansible_collections.dstack.tee.plugins.module_utils import contracts  # pylint: disable=import-outside-toplevel
    signer = contracts.Signer(chain.w3, OWNER_KEY)
    chain.fund(signer.address)
    kms = contracts.contract(chain.w3, "DstackKms", contracts.deploy_kms(signer)["kms_contract_address"])
    signer.transact(kms.functions.addOsImageHash(bytes.fromhex(OS_IMAGE)))
    app = contracts.deploy_app(signer, kms, allow_any_device=True, compose_hash=bytes.fromhex(chash))
    return kms.address, app[2:].lower()


def measure_kms(label, url, ca, app_id, chash, tmp, args, sim_dir, pgid=None, floor=None):
    """{concurrency: (release latencies, wall, GetMeta latencies)}, printing a line per level.
    pgid: the server's process group, whose CPU time is read around each run."""
    release_call = release_maker(url, ca, app_id, chash, sim_dir, tmp, label)

    def meta_call(_index):
        client = KmsClient(url, ca_cert=ca)
        client.get_meta()  # the connection this client keeps
        return client.get_meta

    def measured(concurrency, make_call):
        latencies, errors, wall, cpu = run(concurrency, args.requests, make_call,
                                           (lambda: group_cpu(pgid)) if pgid else None)
        return latencies, errors, wall, (cpu / max(1, len(latencies))) if pgid else None

    def floor_around(work):
        """work()'s result and the bare dcap-qvl floor measured just before and just after it."""
        if floor is None:
            return work(), None
        before = floor(FLOOR_SECONDS)
        result = work()
        return result, (before + floor(FLOOR_SECONDS)) / 2

    results = {}
    print(f"{label}:")
    run(WARM_UP_CLIENTS, 4 * WARM_UP_CLIENTS, release_call)  # every worker thread's first release: not measured
    for concurrency in (1, 16, 64):
        meta, meta_err, _wall, meta_cpu = measured(concurrency, meta_call)
        (rel, rel_err, wall, rel_cpu), floor_now = floor_around(lambda: measured(concurrency, release_call))
        if rel_err or meta_err:
            print(f"  concurrency {concurrency}: {len(rel_err) + len(meta_err)} errors, first: "
                  f"{(rel_err or meta_err)[0]}")
        if not rel or not meta:
            continue
        results[concurrency] = (rel, wall, meta)
        print(f"  {concurrency:>2} clients: release p50 {percentile(rel, 50) * 1000:6.1f} ms  p99 "
              f"{percentile(rel, 99) * 1000:7.1f} ms  {len(rel) / wall:6.1f} releases/s   GetMeta p50 "
              f"{statistics.median(meta) * 1000:5.2f} ms   ratio release/GetMeta p50 "
              f"{percentile(rel, 50) / statistics.median(meta):5.1f}")
        if rel_cpu:
            per_core = 1 / rel_cpu
            versus = (f" = {per_core / floor_now:4.2f}x bare dcap-qvl, {floor_now:5.0f}/s per core measured "
                      "around it") if floor_now else ""
            print(f"      server CPU per release {rel_cpu * 1000:5.2f} ms ({per_core:5.0f} releases/s per core"
                  f"{versus}); per GetMeta {meta_cpu * 1000:5.2f} ms; ratio "
                  f"{rel_cpu / meta_cpu if meta_cpu else float('nan'):5.1f}")
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--requests", type=int, default=128, help="releases per concurrency level")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers")
    parser.add_argument("--no-access-log", action="store_true", help="serve with dstack-kms serve --no-access-log")
    parser.add_argument("--ethereum", action="store_true",
                        help="also a KMS on the ethereum backend (ganache), and its ratio to the local one")
    args = parser.parse_args()
    app = app_compose.build("services:\n  web:\n    image: nginx\n", "bench")
    chash = app_compose.compose_hash(app)
    servers = []
    with tempfile.TemporaryDirectory() as tmp:
        chain = None
        try:
            state = Path(tmp) / "kms"
            server, url = serve(state, workers=args.workers, access_log=not args.no_access_log)
            servers.append(server)
            app_id = chash[:40]
            allow(state, app_id, chash)
            print(f"KMS key release, simulated quotes, {os.cpu_count()} cores shared by clients and server")
            floor, in_process, floor_then = floor_and_in_process(state, app_id, chash, tmp)
            print(f"floor: bare dcap-qvl {floor_then:6.0f} verifications/s per core ({1000 / floor_then:5.2f} ms), "
                  "measured again around each HTTPS run")
            print(f"KMS in process (no HTTP, no TLS): {in_process:6.0f} releases/s per core ({1000 / in_process:5.2f} "
                  f"ms CPU per GetAppKey) = {in_process / floor_then:4.2f}x bare dcap-qvl")
            print(f"over HTTPS, {args.workers} gunicorn asyncio workers, clients keep their connections"
                  f"{', no access log' if args.no_access_log else ''}")
            local = measure_kms("local allowlist", url, str(state / "root-ca.crt"), app_id, chash, tmp, args,
                                str(state / "tdx-sim"), pgid=server.pid, floor=floor)
            if args.ethereum:
                sys.path.insert(0, str(ROOT / "contracts"))
                from devchain import DevChain  # pylint: disable=import-outside-toplevel
                chain = DevChain().start()
                kms_address, chain_app_id = on_chain(chain, chash)
                eth_state = Path(tmp) / "kms-eth"
                eth_state.mkdir(mode=0o700)
                config = eth_state / "kms.toml"
                config.write_text(f'[auth]\ntype = "ethereum"\nrpc_url = "{chain.url}"\n'
                                  f'contract_address = "{kms_address}"\nchain_id = {chain.chain_id}\n')
                server, eth_url = serve(eth_state, config, workers=args.workers, access_log=not args.no_access_log)
                servers.append(server)
                eth = measure_kms("ethereum backend (ganache JSON-RPC, answers cached per block)", eth_url,
                                  str(eth_state / "root-ca.crt"), chain_app_id, chash, tmp, args,
                                  str(eth_state / "tdx-sim"), pgid=server.pid, floor=floor)
                for concurrency in sorted(set(local) & set(eth)):
                    print(f"  concurrency {concurrency:>2}: ratio ethereum/local release p50 "
                          f"{percentile(eth[concurrency][0], 50) / percentile(local[concurrency][0], 50):5.2f}")
        finally:
            for server in servers:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(timeout=30)
            if chain is not None:
                chain.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
