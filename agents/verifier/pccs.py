# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""`dstack-verify serve-pccs`: the simulated TDX platform's collateral over Intel's PCCS API.

    dstack-verify serve-pccs --sim-state DIR [--listen 127.0.0.1:8081] [--tls-cert FILE --tls-key FILE]

The routes and answers are those of Intel's PCS/PCCS v4 for TDX, as dcap-qvl's collateral fetch
(and so attestation.CollateralCache, `dstack-verify --pccs-url`, the KMS's pccs_url) reads them:

    GET /tdx/certification/v4/tcb?fmspc=HEX        {"tcbInfo": ..., "signature": hex}
                                                   + TCB-Info-Issuer-Chain
    GET /tdx/certification/v4/qe/identity          {"enclaveIdentity": ..., "signature": hex}
                                                   + SGX-Enclave-Identity-Issuer-Chain
    GET /sgx/certification/v4/pckcrl?ca=platform   the PCK CRL, DER with encoding=der (else PEM)
                                                   + SGX-PCK-CRL-Issuer-Chain
    GET /sgx/certification/v4/rootcacrl            the root CA CRL, hex of its DER (as PCCS serves it)

Issuer chains are PEM, URL-encoded, as Intel sends them. Every answer is made and signed by the
simulator (SimTdx.collateral) when it is asked, issued an hour before and valid 30 days after. An
FMSPC or CA this platform does not have is a 404; a malformed one a 400; errors are JSON.
Plain HTTP is served on loopback only; elsewhere --tls-cert and --tls-key are required.
"""

import argparse
import ipaddress
import logging
import os
import re
import sys
from urllib.parse import quote

from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError

log = logging.getLogger("dstack.sim_pccs")

DEFAULT_LISTEN = "127.0.0.1:8081"
PCK_CA = "platform"  # the simulated PCK CA is a platform CA (tdx_sim.PCK_CA_CN), as dcap-qvl reads its name
_FMSPC_RE = re.compile(r"\A[0-9a-fA-F]{12}\Z")


class NotServed(DstackError):
    """Something this simulated platform does not have (an FMSPC, a CA): 404."""


def _chain_header(pem):
    # Intel URL-encodes the PEM chains (headers cannot carry line breaks); dcap-qvl decodes them.
    return quote(pem, safe="")


def create_app(sim_state_dir):
    """The PCCS Flask app for the simulated TDX in sim_state_dir (an existing one: never made here)."""
    from flask import Flask, Response, request  # pylint: disable=import-outside-toplevel
    from ansible_collections.dstack.tee.agents.wsgi import install_json_errors  # pylint: disable=import-outside-toplevel
    from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx  # pylint: disable=import-outside-toplevel

    sim = SimTdx.existing(sim_state_dir, "--sim-state")
    fmspc = sim.fmspc.hex().upper()
    app = Flask("dstack-sim-pccs")
    app.extensions["dstack_sim_pccs"] = sim

    def check_update():
        # PCCS's TCB recovery choice (dcap-qvl asks for "standard"): one platform TCB here, either way.
        if request.args.get("update", "standard") not in ("standard", "early"):
            raise DstackError("update", "must be standard or early")

    def signed(name, body_key, chain_key, header):
        collateral = sim.collateral()
        # The signed text goes out byte for byte: the signature is over exactly these bytes.
        body = '{"%s":%s,"signature":"%s"}' % (body_key, collateral[name], collateral[name + "_signature"])
        return Response(body, mimetype="application/json", headers={header: _chain_header(collateral[chain_key])})

    @app.get("/tdx/certification/v4/tcb")
    def tcb_info():
        check_update()
        asked = request.args.get("fmspc", "")
        if not _FMSPC_RE.match(asked):
            raise DstackError("fmspc", "must be 12 hex digits (6 bytes)")
        if asked.upper() != fmspc:
            raise NotServed("fmspc", f"no TCB info for {asked.upper()}: this simulated platform's FMSPC is {fmspc}")
        return signed("tcb_info", "tcbInfo", "tcb_info_issuer_chain", "TCB-Info-Issuer-Chain")

    @app.get("/tdx/certification/v4/qe/identity")
    def qe_identity():
        check_update()
        return signed("qe_identity", "enclaveIdentity", "qe_identity_issuer_chain",
                      "SGX-Enclave-Identity-Issuer-Chain")

    @app.get("/sgx/certification/v4/pckcrl")
    def pck_crl():
        ca, encoding = request.args.get("ca", ""), request.args.get("encoding", "pem")
        if ca not in ("processor", "platform"):
            raise DstackError("ca", "must be processor or platform")
        if ca != PCK_CA:
            raise NotServed("ca", f"this simulated platform has no {ca} CA (its PCK CA is a {PCK_CA} CA)")
        if encoding not in ("pem", "der"):
            raise DstackError("encoding", "must be pem or der")
        collateral = sim.collateral()
        der = bytes.fromhex(collateral["pck_crl"])
        if encoding == "der":
            body, mimetype = der, "application/pkix-crl"
        else:
            body, mimetype = _crl_pem(der), "application/x-pem-file"
        return Response(body, mimetype=mimetype,
                        headers={"SGX-PCK-CRL-Issuer-Chain": _chain_header(collateral["pck_crl_issuer_chain"])})

    @app.get("/sgx/certification/v4/rootcacrl")
    def root_ca_crl():
        return Response(sim.collateral()["root_ca_crl"], mimetype="text/plain")

    install_json_errors(app, log, {NotServed: 404})
    return app


def _crl_pem(der):
    from cryptography import x509  # pylint: disable=import-outside-toplevel
    from cryptography.hazmat.primitives import serialization  # pylint: disable=import-outside-toplevel
    return x509.load_der_x509_crl(der).public_bytes(serialization.Encoding.PEM)


def _is_loopback(host):
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def build_parser():
    parser = argparse.ArgumentParser(prog="dstack-verify serve-pccs",
                                     description="Serve a simulated TDX platform's collateral over Intel's PCCS API.")
    parser.add_argument("--sim-state", required=True, help="the simulator's state directory (e.g. .demo/kms/tdx-sim)")
    parser.add_argument("--listen", default=DEFAULT_LISTEN, help=f"HOST:PORT (default {DEFAULT_LISTEN})")
    parser.add_argument("--tls-cert", help="serve https with this certificate (PEM); required beyond loopback")
    parser.add_argument("--tls-key", help="the certificate's private key (PEM)")
    return parser


def serve(args):
    from ansible_collections.dstack.tee.agents.wsgi import run_gunicorn  # pylint: disable=import-outside-toplevel
    host, _sep, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        raise DstackError("--listen", "must be HOST:PORT")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise DstackError("--tls-key" if args.tls_cert else "--tls-cert", "--tls-cert and --tls-key go together")
    if not args.tls_cert and not _is_loopback(host):
        raise DstackError("--tls-cert", f"is required when listening on {host} (plain HTTP is for loopback only)")
    for option, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if path and not os.path.isfile(path):
            raise DstackError(option, f"{path} is not a file")
    app = create_app(args.sim_state)  # fails here, before listening, on a bad state directory
    scheme = "https" if args.tls_cert else "http"
    print(f"dstack-verify serve-pccs: the simulated TDX of {os.path.abspath(args.sim_state)} "
          f"(FMSPC {app.extensions['dstack_sim_pccs'].fmspc.hex().upper()}) at {scheme}://{host}:{port} "
          f"(dstack-verify --pccs-url {scheme}://{host}:{port})", file=sys.stderr)
    tls = {"certfile": args.tls_cert, "keyfile": args.tls_key} if args.tls_cert else {}
    run_gunicorn(app, bind=f"{host}:{port}", workers=1, threads=4, timeout=30, accesslog="-", errorlog="-",
                 loglevel="info", **tls)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        serve(args)
    except DstackError as exc:
        print(f"dstack-verify serve-pccs: error: {exc}", file=sys.stderr)
        return 2
    return 0
