"""Key-release latency of the real KMS over HTTPS, at concurrency 1, 16 and 64, in one run.

    .venv/bin/python bench/bench_kms.py [--requests 192] [--workers 2] [--ethereum]

Starts `dstack-kms serve --simulated` on a loopback port (its own temporary state), allows one
app, and runs full attested key releases (GetNonce, a simulated quote binding the nonce and an
ephemeral key, GetAppKey with the event log) from N client threads. Prints p50 and p99 latency
of a release, and of a GetMeta round trip on the same server and connection settings as the
reference, with the ratio. Client and server share this machine's cores, so the figures at high
concurrency include the clients' own quote signing.

--ethereum also runs a second KMS whose auth backend is the DstackKms / DstackApp contracts on a
local ganache chain (contracts/devchain.py), the app authorized on chain, and prints its release
latency and its ratio to the local-allowlist KMS (the per-block answer cache at work).
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
ROOT = Path(__file__).resolve().parent.parent
OWNER_KEY = "0x" + "42" * 32
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


def serve(state, config=None, workers=2):
    """A `dstack-kms serve --simulated` on a free loopback port: (process, url)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [KMS, "serve", "--simulated", "--state-dir", str(state), "--listen", f"127.0.0.1:{port}",
               "--workers", str(workers)] + (["--config", str(config)] if config else [])
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,  # pylint: disable=consider-using-with
                              start_new_session=True)
    for _i in range(300):  # up to about 30 s for the first answer (listening is not yet serving)
        try:
            KmsClient(f"https://127.0.0.1:{port}", validate_certs=False, timeout=2).get_meta()
            break
        except Exception:  # pylint: disable=broad-exception-caught
            time.sleep(0.1)
    return server, f"https://127.0.0.1:{port}"


def on_chain(chain, chash):
    """DstackKms allowing OS_IMAGE, and a DstackApp allowing chash: (kms address, app_id)."""
    from ansible_collections.dstack.tee.plugins.module_utils import contracts  # pylint: disable=import-outside-toplevel
    signer = contracts.Signer(chain.w3, OWNER_KEY)
    chain.fund(signer.address)
    kms = contracts.contract(chain.w3, "DstackKms", contracts.deploy_kms(signer)["kms_contract_address"])
    signer.transact(kms.functions.addOsImageHash(bytes.fromhex(OS_IMAGE)))
    app = contracts.deploy_app(signer, kms, allow_any_device=True, compose_hash=bytes.fromhex(chash))
    return kms.address, app[2:].lower()


def measure_kms(label, url, ca, app_id, chash, tmp, args, sim_dir):
    """{concurrency: (release latencies, wall, GetMeta latencies)}, printing a line per level."""
    vm_config = json.dumps({"os_image_hash": OS_IMAGE})

    def release_call(index):
        cvm = _Cvm(sim_dir, os.path.join(tmp, f"rtmrs-{label}-{index}.json"))
        measure.measure_identity(cvm, app_id, chash, f"{index:040x}")
        log = json.dumps([e.to_log_entry() for e in cvm.events])
        client = KmsClient(url, ca_cert=ca)
        return lambda: client.get_app_key(cvm.provider, log, vm_config)

    def meta_call(_index):
        client = KmsClient(url, ca_cert=ca)
        return client.get_meta

    results = {}
    print(f"{label}:")
    for concurrency in (1, 16, 64):
        meta, meta_err, _wall = run(concurrency, args.requests, meta_call)
        rel, rel_err, wall = run(concurrency, args.requests, release_call)
        if rel_err or meta_err:
            print(f"  concurrency {concurrency}: {len(rel_err) + len(meta_err)} errors, first: "
                  f"{(rel_err or meta_err)[0]}")
        if not rel or not meta:
            continue
        results[concurrency] = (rel, wall, meta)
        print(f"  concurrency {concurrency:>2}: release p50 {percentile(rel, 50) * 1000:7.1f} ms  "
              f"p99 {percentile(rel, 99) * 1000:7.1f} ms  ({len(rel) / wall:6.1f} releases/s)   "
              f"GetMeta p50 {statistics.median(meta) * 1000:6.1f} ms   "
              f"ratio release/GetMeta p50 {percentile(rel, 50) / statistics.median(meta):5.1f}")
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--requests", type=int, default=192, help="releases per concurrency level")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers")
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
            server, url = serve(state, workers=args.workers)
            servers.append(server)
            app_id = chash[:40]
            (state / "auth-config.json").write_text(json.dumps({"osImages": ["0x" + OS_IMAGE], "apps": {
                "0x" + app_id: {"composeHashes": ["0x" + chash], "allowAnyDevice": True}}}))
            print(f"KMS key release over HTTPS, {args.workers} gunicorn workers, simulated quotes, "
                  f"{os.cpu_count()} cores shared by clients and server")
            local = measure_kms("local allowlist", url, str(state / "root-ca.crt"), app_id, chash, tmp, args,
                                str(state / "tdx-sim"))
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
                server, eth_url = serve(eth_state, config, workers=args.workers)
                servers.append(server)
                eth = measure_kms("ethereum backend (ganache JSON-RPC, answers cached per block)", eth_url,
                                  str(eth_state / "root-ca.crt"), chain_app_id, chash, tmp, args,
                                  str(eth_state / "tdx-sim"))
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
