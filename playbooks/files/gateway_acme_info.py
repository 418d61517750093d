# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The gateway's /.dstack/acme-info as an outsider reads it (demo.yml's last play runs this with the
Python of the venv that holds dstack-verify, then dstack-verify on what it writes).

    gateway_acme_info.py --url https://gateway.<base_domain>:<port>/.dstack/acme-info --ca-cert FILE --out DIR

Fetches acme-info over HTTPS under --ca-cert (SNI the URL's name; *.localhost at 127.0.0.1), and
writes to DIR: acme-info.json as served, account-quote.json (the account URI's quote, a GetQuote
answer) and served-key-quote.json (the quote of the key of the certificate the gateway served
for that request: it must be among quoted_hist_keys). Prints one JSON line: the account URI, the
served certificate's names and issuer, how many keys were quoted, and for each quote file the
report_data it must carry - SHA-512("acme-account:" || URI) and SHA-512("zt-cert:" || the key's
SubjectPublicKeyInfo DER), dstack's rules (from agents/gateway/acme.py) - for
`dstack-verify FILE --report-data HEX`.
Exits 1 naming what is wrong (the URL does not answer, the served key was never quoted).
"""

import argparse
import json
import os
import sys

from cryptography import x509
from cryptography.x509.oid import NameOID

from ansible_collections.dstack.tee.agents.gateway.acme import acme_account_report_data, zt_cert_report_data
from ansible_collections.dstack.tee.plugins.module_utils import gateway_http
from ansible_collections.dstack.tee.plugins.module_utils.app_certs import spki_der
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.fileio import atomic_write


def _write(folder, name, text):
    path = os.path.join(folder, name)
    atomic_write(path, text.encode(), mode=0o644)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--ca-cert", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        answer = gateway_http.fetch(args.url, ca_cert=args.ca_cert, timeout=10, wait_timeout=10, field="url")
        info = answer.json("acme-info")
        leaf = x509.load_der_x509_certificate(answer.peer_chain[0])
        der = spki_der(leaf.public_key())
        keys = info.get("quoted_hist_keys") or []
        served = [k for k in keys if k.get("public_key") == der.hex()]
        if not info.get("account_uri") or not info.get("account_quote"):
            raise DstackError("acme-info", f"{args.url} names no ACME account or no account quote")
        if not served:
            raise DstackError("acme-info", f"the key of the certificate {args.url} served is not among its "
                                           f"{len(keys)} quoted keys (quoted_hist_keys)")
    except DstackError as exc:
        print(f"gateway_acme_info: {exc}", file=sys.stderr)
        return 1
    os.makedirs(args.out, mode=0o755, exist_ok=True)
    uri = info["account_uri"]
    issuer = leaf.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    print(json.dumps({
        "url": args.url, "account_uri": uri, "quoted_keys": len(keys), "info": _write(args.out, "acme-info.json", answer.body.decode()),
        "names": leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName),
        "issuer": issuer[0].value if issuer else leaf.issuer.rfc4514_string(),
        "quotes": [
            {"what": "the ACME account URI", "file": _write(args.out, "account-quote.json", info["account_quote"]),
             "report_data": acme_account_report_data(uri).hex()},
            {"what": "the served certificate's key", "file": _write(args.out, "served-key-quote.json", served[-1]["quote"]),
             "report_data": zt_cert_report_data(der).hex()}]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
