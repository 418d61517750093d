# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""`dstack-verify`: verify a TDX quote (real or simulated) and print the boot info and every check.

    dstack-verify QUOTE_FILE --collateral FILE [--event-log FILE] [--root-ca FILE | --sim-state DIR]
                  [--at UNIX_SECONDS] [--pccs-url URL --cache-dir DIR] [--report-data HEX]
                  [--allow-status S ...] [--allow-advisory ID ...]
    dstack-verify QUOTE_FILE --sim-state DIR      a simulated quote: root and collateral from DIR
    dstack-verify serve-pccs --sim-state DIR [--listen HOST:PORT]
                  the simulated platform's collateral over Intel's PCCS API, for --pccs-url (pccs.py)

QUOTE_FILE holds the raw quote, its hex, or a guest agent's GetQuote response JSON
({"quote": hex, "event_log": "...", ...}; its event log is then used unless --event-log is given).
Prints JSON; exits 0 when every check passes, 1 when one fails (named on stderr), 2 on bad input.
At most MAX_INPUT_BYTES are read from QUOTE_FILE (a quote is a few KB; a GetQuote answer adds its
event log).
"""

import argparse
import json
import sys

from ansible_collections.dstack.tee.plugins.module_utils import attestation
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError, parse_hex


MAX_INPUT_BYTES = 4 * 1024 * 1024


def _read(path, field, limit=MAX_INPUT_BYTES):
    try:
        if path == "-":
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with open(path, "rb") as handle:
                data = handle.read(limit + 1)
    except OSError as exc:
        raise DstackError(field, f"cannot read {path}: {exc.strerror}") from None
    if len(data) > limit:
        raise DstackError(field, f"{path} holds more than {limit} bytes: not a quote or a GetQuote answer")
    return data


def build_parser():
    parser = argparse.ArgumentParser(prog="dstack-verify", description=__doc__.split("\n\n", maxsplit=1)[0],
                                     epilog="dstack-verify serve-pccs --help: serve a simulated platform's "
                                            "collateral over Intel's PCCS API (for --pccs-url)")
    parser.add_argument("quote_file", metavar="QUOTE_FILE", help="raw quote, hex, or GetQuote JSON ('-' for stdin)")
    parser.add_argument("--collateral", help="DCAP collateral JSON (QuoteCollateralV3 fields)")
    parser.add_argument("--pccs-url", help="fetch collateral from this PCCS instead (cached per FMSPC)")
    parser.add_argument("--cache-dir", default=".dstack-collateral", help="collateral cache for --pccs-url")
    parser.add_argument("--event-log", help="the event log JSON (GetQuote's event_log)")
    roots = parser.add_mutually_exclusive_group()
    roots.add_argument("--root-ca", help="trust root certificate (PEM or DER); default: Intel SGX Root CA")
    roots.add_argument("--sim-state", help="trust the simulated root CA of this simulator state directory (and use its "
                                           "collateral unless --collateral or --pccs-url is given)")
    parser.add_argument("--at", type=int, help="verify as at this Unix time (default: now)")
    parser.add_argument("--report-data", help="require this report_data (hex, at most 64 bytes)")
    parser.add_argument("--allow-status", action="append", default=[],
                        help="also accept this TCB status (UpToDate is always accepted); repeatable")
    parser.add_argument("--allow-advisory", action="append", default=[], help="accept this advisory ID; repeatable")
    parser.add_argument("--require-event-log", action="store_true", help="fail when no event log is given")
    return parser


def run(args):
    quote, event_log = attestation.read_quote_input(_read(args.quote_file, "QUOTE_FILE"), "QUOTE_FILE")
    if args.event_log:
        event_log = _read(args.event_log, "--event-log").decode("utf-8", "replace")
    sim = None
    if args.sim_state:
        # Imported only here: trusting a simulator is an explicit choice.
        from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx  # pylint: disable=import-outside-toplevel
        sim = SimTdx.existing(args.sim_state, "--sim-state")
        root = sim.root_ca_der
    elif args.root_ca:
        root = attestation.load_root_ca(_read(args.root_ca, "--root-ca"))
    else:
        root = None
    if args.collateral:
        collateral = attestation.load_collateral(args.collateral)
    elif args.pccs_url:
        collateral = attestation.CollateralCache(args.cache_dir, args.pccs_url, root_ca_der=root).get(quote, args.at)
    elif sim is not None:
        # The simulated platform's own collateral, issued around the verification time.
        collateral = attestation.load_collateral(sim.collateral(now=args.at) if args.at else sim.collateral())
    else:
        raise DstackError("--collateral", "is required (or --pccs-url to fetch it; --sim-state for a simulated quote)")
    policy = attestation.Policy(
        allowed_tcb_statuses=tuple(dict.fromkeys(["UpToDate", *args.allow_status])),
        allowed_advisory_ids=tuple(args.allow_advisory),
        expected_report_data=parse_hex(args.report_data, "--report-data") if args.report_data else None,
        require_event_log=args.require_event_log)
    return attestation.verify_quote(quote, collateral, root, policy, event_log, args.at), quote


def _simulated_hint(args, quote):
    """A line for a simulated quote checked against Intel's root (or another), which fails its chain."""
    from ansible_collections.dstack.tee.plugins.module_utils import tdx_sim  # pylint: disable=import-outside-toplevel
    if args.sim_state or not tdx_sim.issued_by_simulator(quote):
        return ""
    return ("dstack-verify: this quote is from the dstack.tee simulator, not from Intel TDX hardware: "
            "pass --sim-state DIR (the simulator's state, e.g. .demo/kms/tdx-sim) to trust that simulator")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve-pccs"]:  # a quote file of that name is ./serve-pccs
        from ansible_collections.dstack.tee.agents.verifier import pccs  # pylint: disable=import-outside-toplevel
        return pccs.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        result, quote = run(args)
    except DstackError as exc:
        print(f"dstack-verify: error: {exc}", file=sys.stderr)
        return 2
    json.dump(result.to_dict(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    for check in result.failures:
        print(f"dstack-verify: FAILED {check.name}: {check.detail}", file=sys.stderr)
    if result.ok:
        print(f"dstack-verify: OK ({result.attestation_mode}, TCB {result.tcb_status})", file=sys.stderr)
    elif _simulated_hint(args, quote):
        print(_simulated_hint(args, quote), file=sys.stderr)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
