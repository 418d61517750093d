# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The gateway's certificate checked as an outsider checks it (demo.yml's last play runs this with
the Python of the venv that holds dstack-verify).

    gateway_acme_info.py --url https://gateway.<base_domain>:<port>/.dstack/acme-info --ca-cert FILE
                         --out DIR --sim-state DIR --dns-server IP:PORT

1. Fetches acme-info over HTTPS under --ca-cert (SNI the URL's name; *.localhost at 127.0.0.1) and
   writes to --out: acme-info.json as served, account-quote.json (the account URI's quote, a
   GetQuote answer) and served-key-quote.json (the quote of the key of the certificate the gateway
   served for that request: it must be among quoted_hist_keys).
2. Runs `dstack-verify FILE --sim-state DIR --report-data HEX` on both, report_data by dstack's
   rules (agents/gateway/acme.py): SHA-512("acme-account:" || URI), SHA-512("zt-cert:" || the key's
   SubjectPublicKeyInfo DER); and `dig @IP -p PORT CAA <domain> +short`, whose answer must be
   exactly `0 issue` and `0 issuewild` naming that account (accounturi=URI). The three run at once.
Prints one JSON line (the certificate's names and issuer, the account, how many keys were quoted,
each command run and the CAA records); exits 1 naming the check that failed.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.x509.oid import NameOID

from ansible_collections.dstack.tee.agents.gateway.acme import acme_account_report_data, zt_cert_report_data
from ansible_collections.dstack.tee.plugins.module_utils import gateway_http
from ansible_collections.dstack.tee.plugins.module_utils.app_certs import spki_der
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.fileio import atomic_write

TIMEOUT = 120


def _write(folder, name, text):
    path = os.path.join(folder, name)
    atomic_write(path, text.encode(), mode=0o644)
    return path


def _fetch(url, ca_cert):
    """(acme-info, the served leaf certificate, its SubjectPublicKeyInfo DER)."""
    answer = gateway_http.fetch(url, ca_cert=ca_cert, timeout=10, wait_timeout=10, field="url")
    info = answer.json("acme-info")
    leaf = x509.load_der_x509_certificate(answer.peer_chain[0])
    if not info.get("account_uri") or not info.get("account_quote"):
        raise DstackError("acme-info", f"{url} names no ACME account or no account quote")
    return info, answer.body, leaf, spki_der(leaf.public_key())


def _caa_failure(lines, domain, account_uri):
    value = f"validationmethods=dns-01;accounturi={account_uri}\""
    tags = sorted(line.split()[1] for line in lines if len(line.split()) > 2)
    if tags != ["issue", "issuewild"] or not all(line.startswith("0 ") and line.endswith(value) for line in lines):
        return (f"the CAA records of {domain} are not issue and issuewild pinned to the account {account_uri}: "
                f"{lines or 'none'}")
    return ""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--ca-cert", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--sim-state", required=True)
    parser.add_argument("--dns-server", required=True, help="IP:PORT")
    args = parser.parse_args(argv)
    try:
        info, body, leaf, der = _fetch(args.url, args.ca_cert)
    except DstackError as exc:
        print(f"gateway_acme_info: {exc}", file=sys.stderr)
        return 1
    keys = info.get("quoted_hist_keys") or []
    served = [k for k in keys if k.get("public_key") == der.hex()]
    if not served:
        print(f"gateway_acme_info: the key of the certificate {args.url} served is not among its {len(keys)} quoted "
              "keys (quoted_hist_keys)", file=sys.stderr)
        return 1
    os.makedirs(args.out, mode=0o755, exist_ok=True)
    uri, domain = info["account_uri"], urlsplit(args.url).hostname.partition(".")[2]
    verify = os.path.join(os.path.dirname(sys.executable), "dstack-verify")
    checks = [(what, [verify, _write(args.out, name, quote), "--sim-state", args.sim_state, "--report-data", data.hex()])
              for what, name, quote, data in (
                  ("the ACME account URI", "account-quote.json", info["account_quote"], acme_account_report_data(uri)),
                  ("the served certificate's key", "served-key-quote.json", served[-1]["quote"],
                   zt_cert_report_data(der)))]
    ip, _sep, port = args.dns_server.rpartition(":")
    dig = ["dig", f"@{ip}", "-p", port, "CAA", domain, "+short"]
    _write(args.out, "acme-info.json", body.decode())
    running = [(what, argv_, subprocess.Popen(argv_, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # pylint: disable=consider-using-with
               for what, argv_ in checks + [("CAA", dig)]]
    failures, caa = [], []
    for what, argv_, proc in running:
        try:
            out, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        if proc.returncode != 0:
            failures.append(f"{what}: `{shlex.join(argv_)}` failed ({proc.returncode}): {(err or out).strip()[-500:]}")
        elif what == "CAA":
            caa = out.splitlines()
    failures += [reason for reason in [_caa_failure(caa, domain, uri)] if reason and not any("CAA" in f for f in failures)]
    if failures:
        print("gateway_acme_info: " + "; ".join(failures), file=sys.stderr)
        return 1
    issuer = leaf.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    print(json.dumps({
        "url": args.url, "account_uri": uri, "quoted_keys": len(keys),
        "names": leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName),
        "issuer": issuer[0].value if issuer else leaf.issuer.rfc4514_string(),
        "verified": [{"what": what, "command": shlex.join(argv_)} for what, argv_ in checks],
        "caa_command": shlex.join(dig), "caa": caa}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
