# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""`dstack-ct-monitor`: is every certificate logged for the gateway's domain for a key the
gateway attested? (dstack's ct_monitor, with every quote verified.)

    dstack-ct-monitor --gateway https://gateway.example.com --domain example.com
                      [--ca-cert FILE] [--certs PATH | --crtsh-url URL [--crtsh-ca-cert FILE]]
                      [--sim-state DIR | --root-ca FILE] [--collateral FILE | --pccs-url URL [--cache-dir DIR]]
                      [--allow-status S] [--allow-advisory ID] [--app-id ID] [--json] [--interval N]

One round:
1. GET the gateway's /.dstack/acme-info (https only; --ca-cert for a private CA): the ACME
   account URI and every certificate key the gateway ever used (quoted_hist_keys), each with a
   quote (the guest agent's GetQuote answer as JSON, as acme.py stores it, or a bare quote in hex).
2. Verify every quote with the project's one verifier (attestation.verify_quote: what
   `dstack-verify` runs, with its trust options: --sim-state or --root-ca for a simulated TDX,
   --collateral or --pccs-url): the DCAP chain, the TCB policy, and report_data =
   SHA-512("zt-cert:" || the key's SubjectPublicKeyInfo DER), the account's SHA-512("acme-account:"
   || URI). With --app-id, the event log must replay and name that app (the gateway's own): a quote
   from any other TD, whatever its report_data, attests nothing. Keys whose quote fails are not
   attested.
3. The certificates logged for the domain (and every name under it): from crt.sh's JSON API
   (`?q=<domain>&output=json` and `?q=%.<domain>`, then each certificate by id, `?d=<id>`), or from
   --certs, a PEM file or a folder of them (certificates not for the domain skipped when --domain is
   given). Each certificate's public key is compared with the attested set.

Every certificate for a key not attested is an error line in the log (naming its source, names,
serial and issuer), as is every quote that fails; --json prints the report (one JSON document; one
line per round with --interval). Exit status: 0 when every certificate is for an attested key and
every quote verified, 1 when not, 2 when the monitor could not check (bad option, gateway or crt.sh
unreachable). --interval N repeats every N seconds (dstack checks every 60) until interrupted,
fetching from crt.sh only the certificates it has not read yet.
"""

import argparse
import datetime
import hashlib
import json
import logging
import os
import sys
import time
from urllib.parse import quote as url_quote, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ansible_collections.dstack.tee.agents.gateway.acme import acme_account_report_data, zt_cert_report_data
from ansible_collections.dstack.tee.plugins.module_utils import attestation, gateway_http
from ansible_collections.dstack.tee.plugins.module_utils.app_certs import spki_der
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError, parse_hex
from ansible_collections.dstack.tee.plugins.module_utils.fileio import read_bytes

log = logging.getLogger("dstack.ct_monitor")

PROG = "dstack-ct-monitor"
ACME_INFO_PATH = "/.dstack/acme-info"
CRTSH_URL = "https://crt.sh"
MAX_ACME_INFO = 16 * 1024 * 1024       # every key's quote and event log, tens of KiB each
MAX_CRTSH_LIST = 64 * 1024 * 1024      # a busy domain has tens of thousands of entries
MAX_CERT = 256 * 1024


# ---- what the gateway attested ------------------------------------------------------------------

class Trust:
    """The verifier's options, as dstack-verify takes them, over attestation.QuoteTrust (the trust
    root and collateral source every service uses)."""

    def __init__(self, args):
        if args.sim_state:
            # Imported only here: trusting a simulator is an explicit choice.
            from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx  # pylint: disable=import-outside-toplevel
            SimTdx.existing(args.sim_state, "--sim-state")    # trust an existing simulator, never make one
        elif not args.root_ca and not args.collateral and not args.pccs_url:
            raise DstackError("--collateral", "is required (or --pccs-url to fetch it; --sim-state for a simulated "
                                              "gateway)")
        if args.root_ca and not args.collateral and not args.pccs_url:
            raise DstackError("--collateral", "is required with --root-ca (or --pccs-url)")
        simulated = bool(args.sim_state or args.root_ca)
        root_ca, sim_state = args.root_ca or "", args.sim_state or ""
        if sim_state and (args.collateral or args.pccs_url):
            # As dstack-verify: the simulator's root, the collateral from where it was asked for.
            root_ca, sim_state = os.path.join(sim_state, "root-ca.crt"), ""
        self.quote_trust = attestation.QuoteTrust(
            {"mode": "simulation" if simulated else "production", "sim_state_dir": sim_state,
             "root_ca": root_ca, "collateral": args.collateral or "", "pccs_url": args.pccs_url or "",
             "collateral_cache_dir": args.cache_dir,
             "allowed_tcb_statuses": list(dict.fromkeys(["UpToDate", *args.allow_status])),
             "allowed_advisory_ids": list(args.allow_advisory)}, args.cache_dir, field="--")
        self.app_id = args.app_id.lower() if args.app_id else None

    def verify(self, quote_field, expected_report_data, what):
        """(failures as text, [] when the quote verifies for this report_data (and --app-id); the
        app_id its event log names, "" without one)."""
        try:
            if isinstance(quote_field, dict):
                quote_field = json.dumps(quote_field)
            if not isinstance(quote_field, str) or not quote_field:
                raise DstackError(what, "has no quote")
            quote, event_log = attestation.read_quote_input(quote_field.encode(), what)
        except DstackError as exc:
            return [f"{exc.field}: {exc.reason}"], ""
        trust = self.quote_trust
        policy = attestation.Policy(allowed_tcb_statuses=trust.allowed_tcb_statuses,
                                    allowed_advisory_ids=trust.allowed_advisory_ids,
                                    expected_report_data=expected_report_data, require_event_log=bool(self.app_id))
        result = attestation.verify_quote(quote, trust.collateral(quote), trust.root_ca_der, policy, event_log)
        failures = [f"{check.name}: {check.detail}" for check in result.failures]
        app_id = (result.boot_info or {}).get("app_id", "")
        if self.app_id and result.ok and app_id != self.app_id:
            failures.append(f"app_id: the quote's event log names app {app_id or '(none)'}, not {self.app_id}")
        return failures, app_id


def _public_key_der(text, field):
    """A key of acme-info (SPKI DER in hex, as dstack's JSON gives bytes; or PEM), as SPKI DER."""
    if not isinstance(text, str) or not text:
        raise DstackError(field, "is missing")
    try:
        if "BEGIN PUBLIC KEY" in text:
            key = serialization.load_pem_public_key(text.encode())
        else:
            key = serialization.load_der_public_key(parse_hex(text, field))
    except ValueError:
        raise DstackError(field, "is not a public key (SubjectPublicKeyInfo DER in hex, or PEM)") from None
    return spki_der(key)


def key_id(der):
    return hashlib.sha256(der).hexdigest()


def acme_info_url(gateway):
    """The acme-info URL of a gateway URL: https://gateway.<base>[:port] gets /.dstack/acme-info."""
    parts = urlsplit(gateway.strip())
    if parts.scheme != "https" or not parts.hostname:
        raise DstackError("--gateway", "must be an https:// URL (https://gateway.<base_domain>[:port])")
    return gateway.strip().rstrip("/") + ACME_INFO_PATH if parts.path in ("", "/") else gateway.strip()


def fetch_acme_info(url, ca_cert=None):
    answer = gateway_http.fetch(url, ca_cert=ca_cert, max_bytes=MAX_ACME_INFO, field="--gateway", ca_field="--ca-cert")
    info = answer.json("--gateway")
    if not isinstance(info, dict) or not isinstance(info.get("quoted_hist_keys", []), list):
        raise DstackError("--gateway", f"{url} did not answer an acme-info document (quoted_hist_keys)")
    return info


def attested_keys(info, trust):
    """({SPKI DER: key report} of the keys whose quote verified, the report of every key, the account's)."""
    keys, attested = [], {}
    for index, entry in enumerate(info.get("quoted_hist_keys") or []):
        field = f"quoted_hist_keys[{index}]"
        report = {"index": index}
        try:
            if not isinstance(entry, dict):
                raise DstackError(field, "is not an object")
            der = _public_key_der(entry.get("public_key"), f"{field}.public_key")
        except DstackError as exc:
            report.update(ok=False, failures=[f"{exc.field}: {exc.reason}"])
            keys.append(report)
            log.error("attested key #%d: %s", index, exc)
            continue
        failures, app_id = trust.verify(entry.get("quote"), zt_cert_report_data(der), f"{field}.quote")
        report.update(public_key_sha256=key_id(der), app_id=app_id, ok=not failures, failures=failures)
        keys.append(report)
        if failures:
            log.error("attested key #%d (SPKI SHA-256 %s): its quote does not attest it: %s", index, key_id(der)[:16],
                      "; ".join(failures))
        else:
            attested[der] = report
    uri = info.get("account_uri") or ""
    account = {"uri": uri}
    if not isinstance(uri, str) or not uri:
        account.update(ok=False, failures=["account_uri: is missing"])
    else:
        failures, app_id = trust.verify(info.get("account_quote"), acme_account_report_data(uri), "account_quote")
        account.update(app_id=app_id, ok=not failures, failures=failures)
    if not account["ok"]:
        log.error("ACME account %s: its quote does not attest it: %s", uri or "(none)", "; ".join(account["failures"]))
    return attested, keys, account


# ---- what was logged ------------------------------------------------------------------------------

def _names(cert):
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    common = [a.value for a in cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)]
    return list(dict.fromkeys(n.lower() for n in [*names, *common] if isinstance(n, str)))


def for_domain(names, domain):
    """A certificate names the domain, a name under it, or its wildcard."""
    return any(n == domain or n.endswith("." + domain) for n in names)


def describe(cert, source):
    """What the report and the log say of one certificate."""
    issuer = ", ".join(a.value for a in cert.issuer.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)) \
        or cert.issuer.rfc4514_string()
    der = spki_der(cert.public_key())
    return {"source": source, "names": _names(cert), "serial": format(cert.serial_number, "x"), "issuer": issuer,
            "not_before": cert.not_valid_before_utc.isoformat(), "not_after": cert.not_valid_after_utc.isoformat(),
            "public_key_sha256": key_id(der), "_spki": der}


def _pem_certificates(data, source):
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        pass
    try:
        return [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise DstackError("--certs", f"{source} holds no PEM or DER certificate") from None


def certificates_from_path(path):
    """Every certificate of a PEM (or DER) file, or of the files of a folder (not recursing)."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, name) for name in os.listdir(path)
                       if os.path.isfile(os.path.join(path, name)) and not name.startswith("."))
    elif os.path.exists(path):
        files = [path]
    else:
        raise DstackError("--certs", f"{path} is neither a file nor a folder")
    found = []
    for name in files:
        certs = _pem_certificates(read_bytes(name, "--certs"), name)
        found.extend(describe(cert, name if len(certs) == 1 else f"{name}#{i}") for i, cert in enumerate(certs))
    return found


class CrtSh:
    """crt.sh's JSON API: the entries for a domain and its subdomains, each certificate fetched
    once by its id (kept across rounds: a logged certificate never changes)."""

    def __init__(self, base_url=CRTSH_URL, ca_cert=None, timeout=60.0):
        parts = urlsplit(base_url)
        if parts.scheme != "https" or not parts.hostname:
            raise DstackError("--crtsh-url", "must be an https:// URL")
        self.base_url, self.ca_cert, self.timeout = base_url.rstrip("/"), ca_cert, timeout
        self.seen = {}    # crt.sh id -> describe()

    def _get(self, query, max_bytes):
        return gateway_http.fetch(f"{self.base_url}/?{query}", ca_cert=self.ca_cert, timeout=self.timeout,
                                  max_bytes=max_bytes, field="--crtsh-url", ca_field="--crtsh-ca-cert")

    def entries(self, domain):
        ids = {}
        for pattern in (domain, f"%.{domain}"):
            listing = self._get(f"q={url_quote(pattern, safe='')}&output=json", MAX_CRTSH_LIST).json("--crtsh-url")
            if not isinstance(listing, list):
                raise DstackError("--crtsh-url", f"{self.base_url} answered {type(listing).__name__}, not a list "
                                                 "of entries")
            for entry in listing:
                if isinstance(entry, dict) and isinstance(entry.get("id"), int) and not isinstance(entry["id"], bool):
                    ids[entry["id"]] = entry
        return ids

    def certificates(self, domain):
        for cert_id in sorted(self.entries(domain)):
            if cert_id not in self.seen:
                answer = self._get(f"d={cert_id}", MAX_CERT)
                if answer.status != 200:
                    raise DstackError("--crtsh-url", f"{answer.url} answered HTTP {answer.status} {answer.reason}")
                certs = _pem_certificates(answer.body, f"crt.sh id {cert_id}")
                self.seen[cert_id] = describe(certs[0], f"crt.sh id {cert_id}")
        return [self.seen[cert_id] for cert_id in sorted(self.seen)]


# ---- one round ------------------------------------------------------------------------------------

def check(args, trust, crtsh):
    """One round: the report (see the module's documentation)."""
    url = acme_info_url(args.gateway)
    info = fetch_acme_info(url, args.ca_cert)
    attested, keys, account = attested_keys(info, trust)
    if args.certs:
        certificates = [c for c in certificates_from_path(args.certs)
                        if not args.domain or for_domain(c["names"], args.domain)]
    else:
        certificates = crtsh.certificates(args.domain)
    unknown = 0
    for cert in certificates:
        cert["attested"] = cert["_spki"] in attested
        if not cert["attested"]:
            unknown += 1
            log.error("unknown certificate: %s for %s, serial %s, issued by %s: its public key (SPKI SHA-256 %s) is "
                      "not one the gateway attested", cert["source"], ", ".join(cert["names"]) or "(no name)",
                      cert["serial"], cert["issuer"], cert["public_key_sha256"][:16])
    failed_keys = sum(1 for k in keys if not k["ok"])
    ok = not unknown and not failed_keys and account["ok"]
    if ok:
        log.info("OK: %d certificate(s)%s, all for the %d key(s) the gateway attested (ACME account %s attested)",
                 len(certificates), f" for {args.domain}" if args.domain else "", len(attested), account["uri"])
    else:
        log.error("%d unknown certificate(s) of %d, %d of %d attested key(s) not verified%s", unknown,
                  len(certificates), failed_keys, len(keys), "" if account["ok"] else ", the ACME account not verified")
    return {"ok": ok, "checked_at": datetime.datetime.now(datetime.timezone.utc).isoformat(), "acme_info": url,
            "domain": args.domain or None, "source": args.certs or crtsh.base_url, "account": account,
            "attested_keys": keys, "unknown": unknown,
            "certificates": [{k: v for k, v in c.items() if not k.startswith("_")} for c in certificates]}


def build_parser():
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n", maxsplit=1)[0].split("`: ", 1)[-1])
    parser.add_argument("--gateway", required=True,
                        help="the gateway's URL, https://gateway.<base_domain>[:port] (or its acme-info URL)")
    parser.add_argument("--ca-cert", help="the CA the gateway's certificate is checked under (default: the system's)")
    parser.add_argument("--domain", help="the domain watched: its certificates and every name under it (required "
                                         "with crt.sh; with --certs, others are skipped)")
    parser.add_argument("--certs", help="a PEM file or a folder of certificates, instead of crt.sh")
    parser.add_argument("--crtsh-url", default=CRTSH_URL, help=f"crt.sh's URL (default {CRTSH_URL})")
    parser.add_argument("--crtsh-ca-cert", help="the CA crt.sh's certificate is checked under (default: the system's)")
    roots = parser.add_mutually_exclusive_group()
    roots.add_argument("--root-ca", help="trust root certificate (PEM or DER) of a simulated TDX; default: Intel's "
                                         "SGX Root CA")
    roots.add_argument("--sim-state", help="trust the simulated TDX of this simulator state directory (its root and "
                                           "collateral)")
    parser.add_argument("--collateral", help="DCAP collateral JSON (QuoteCollateralV3 fields)")
    parser.add_argument("--pccs-url", help="fetch collateral from this PCCS (cached per FMSPC in --cache-dir)")
    parser.add_argument("--cache-dir", default=".dstack-collateral", help="collateral cache for --pccs-url")
    parser.add_argument("--allow-status", action="append", default=[],
                        help="also accept this TCB status (UpToDate is always accepted); repeatable")
    parser.add_argument("--allow-advisory", action="append", default=[], help="accept this advisory ID; repeatable")
    parser.add_argument("--app-id", help="the gateway's app_id: every quote's event log must name it")
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    parser.add_argument("--interval", type=float, default=0,
                        help="check again every N seconds until interrupted (dstack: 60); default: once")
    return parser


def _check_args(args):
    if not args.certs and not args.domain:
        raise DstackError("--domain", "is required with crt.sh (or --certs PATH)")
    if args.domain:
        args.domain = args.domain.strip().lower().rstrip(".").removeprefix("*.")
    if args.certs and not os.path.exists(args.certs):
        raise DstackError("--certs", f"{args.certs} is neither a file nor a folder")
    if args.interval < 0:
        raise DstackError("--interval", "must be 0 (once) or a number of seconds")
    acme_info_url(args.gateway)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=f"%(asctime)s {PROG} %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        _check_args(args)
        trust = Trust(args)
        crtsh = None if args.certs else CrtSh(args.crtsh_url, args.crtsh_ca_cert)
    except DstackError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    status = 0
    try:
        while True:
            try:
                report = check(args, trust, crtsh)
                status = 0 if report["ok"] else 1
                if args.json:
                    json.dump(report, sys.stdout, indent=None if args.interval else 2)
                    sys.stdout.write("\n")
                    sys.stdout.flush()
            except DstackError as exc:
                if not args.interval:
                    print(f"{PROG}: error: {exc}", file=sys.stderr)
                    return 2
                log.error("this round could not check: %s", exc)
            if not args.interval:
                return status
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
