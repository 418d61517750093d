"""Quote verification throughput: our verifier against a bare dcap_qvl.verify, in one run.

    .venv/bin/python bench/bench_verify.py [--seconds 3] [--sim-state DIR]

Prints quotes/second for each and the ratio (ours / bare). Ours does everything a KMS needs:
parse, dcap-qvl verification under the configured root, the policy checks, the RTMR3 replay of
an event log and the boot info. The reference is dcap-qvl alone on the same quote and collateral.
With --sim-state (or by default, in a temporary directory) it also measures a simulated quote.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import dcap_qvl

from ansible_collections.dstack.tee.plugins.module_utils import attestation, eventlog

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "tdx"
PINNED = 1750331763


def rate(func, seconds):
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        func()
        count += 1
    return count / (time.perf_counter() - start)


def compare(label, quote, collateral_json, root_der, now, event_log, seconds, rounds=10):
    """Bare and ours alternated in `rounds` short runs, each figure the median of its runs: this
    shared machine's speed drifts within seconds, and a drift would otherwise fall on one side."""
    collateral = dcap_qvl.QuoteCollateralV3.from_json(collateral_json)
    policy = attestation.Policy(require_event_log=event_log is not None)

    def bare():
        dcap_qvl.verify_with_root_ca(quote, collateral, root_der, now)

    def ours():
        attestation.verify_quote(quote, collateral, root_der, policy, event_log, now).raise_for_failure()

    bare(), ours()  # warm up
    bare_rates, our_rates = [], []
    for _round in range(rounds):
        bare_rates.append(rate(bare, seconds / rounds))
        our_rates.append(rate(ours, seconds / rounds))
    bare_rate, our_rate = statistics.median(bare_rates), statistics.median(our_rates)
    print(f"{label:<28} bare dcap-qvl {bare_rate:8.0f}/s   ours {our_rate:8.0f}/s   "
          f"ratio ours/bare {our_rate / bare_rate:5.2f}   ours costs {1e6 / our_rate - 1e6 / bare_rate:5.0f} us more")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument("--sim-state", help="simulator state directory (default: a temporary one)")
    args = parser.parse_args()
    print(f"quote verification throughput, {args.seconds:.0f} s per figure, one core")
    if (SAMPLE / "tdx_quote").exists():
        compare("real Intel quote (no log)", (SAMPLE / "tdx_quote").read_bytes(),
                (SAMPLE / "tdx_quote_collateral.json").read_text(), attestation.intel_root_ca_der(), PINNED,
                None, args.seconds)
    try:
        from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx
    except ImportError:
        print("simulated quote: skipped (no simulator)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        sim = SimTdx(args.sim_state or tmp)
        events = [eventlog.RuntimeEvent(n, p) for n, p in
                  [("system-preparing", b""), ("app-id", b"\x01" * 20), ("compose-hash", b"\x02" * 32),
                   ("instance-id", b"\x03" * 20), ("boot-mr-done", b""), ("system-ready", b"")]]
        rtmr3 = eventlog.replay(e.digest() for e in events)
        quote = sim.get_quote(b"bench", rtmr3=rtmr3)
        log = json.dumps([e.to_log_entry() for e in events])
        compare("simulated quote + event log", quote, sim.collateral_json(), sim.root_ca_der, int(time.time()),
                log, args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
