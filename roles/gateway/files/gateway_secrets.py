# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The gateway's own keys and certificates, made once in its state directory (run by the
dstack.tee.gateway role with the Python of the venv that holds dstack-gateway).

    STATE/tls/ca.key, ca.crt              a local CA (P-256, 10 years), made once
    STATE/tls/wildcard.key, wildcard.crt  *.<base domain>, what the data plane terminates TLS with
    STATE/wireguard.key                   the hub's WireGuard private key (the file `serve` reads)
    STATE/admin-token                     the Admin API token (only with --admin-token-file)

A certificate is issued again only when it is missing, not from this CA, does not cover its
names, or expires within 30 days; the CA, the WireGuard key and the token are never replaced.
--no-local-ca (the data plane's certificate comes from an ACME CA): no CA and no wildcard
certificate are made; the tls folder is, for the ACME CA's roots the role installs as its ca.crt.
Keys are written 0600 and atomically. Prints one JSON line: {"changed", "made": [files],
"wg_public_key"}; never a key or the token. --check reports what would be made and writes nothing.
"""

import argparse
import datetime
import json
import os
import secrets
import sys

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ansible_collections.dstack.tee.plugins.module_utils import wireguard
from ansible_collections.dstack.tee.plugins.module_utils.app_certs import subject_alt_names
from ansible_collections.dstack.tee.plugins.module_utils.fileio import atomic_write

CA_DAYS = 3650
LEAF_DAYS = 365
RENEW_BEFORE = datetime.timedelta(days=30)
KEY_FILE = "wireguard.key"   # agents/gateway/server.py KEY_FILE: serve reads the key from there


def _now():
    return datetime.datetime.now(datetime.timezone.utc)


def _name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


def _load(path, loader):
    try:
        with open(path, "rb") as handle:
            return loader(handle.read())
    except (OSError, ValueError, TypeError):
        return None


def _ensure_ca(folder, check, made):
    key_path, cert_path = os.path.join(folder, "ca.key"), os.path.join(folder, "ca.crt")
    key = _load(key_path, lambda data: serialization.load_pem_private_key(data, None))
    cert = _load(cert_path, x509.load_pem_x509_certificate)
    if key is not None and cert is not None and cert.public_key().public_numbers() == key.public_key().public_numbers():
        return key, cert
    if os.path.exists(key_path) or os.path.exists(cert_path):
        # Replacing a CA would silently un-trust every client that pinned it: refuse, naming the file.
        # (ca.crt may be an ACME CA's roots, installed while the certificate came from there.)
        raise SystemExit(f"gateway_secrets: {folder}: ca.key or ca.crt is missing, damaged or not the other's pair; "
                         "restore it or remove both to make a new CA")
    made.append(cert_path)
    if check:
        return None, None
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(_name("dstack-gateway local CA")).issuer_name(_name("dstack-gateway local CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    atomic_write(key_path, _key_pem(key), mode=0o600)
    atomic_write(cert_path, _cert_pem(cert), mode=0o644)
    return key, cert


def _leaf_current(cert_path, key_path, ca_cert, names):
    cert = _load(cert_path, x509.load_pem_x509_certificate)
    key = _load(key_path, lambda data: serialization.load_pem_private_key(data, None))
    if cert is None or key is None or ca_cert is None:
        return False
    try:
        cert.verify_directly_issued_by(ca_cert)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    have = {str(v) for v in san.get_values_for_type(x509.DNSName)} | \
           {str(v) for v in san.get_values_for_type(x509.IPAddress)}
    same_key = cert.public_key().public_numbers() == key.public_key().public_numbers()
    return have == set(names) and same_key and cert.not_valid_after_utc - RENEW_BEFORE > _now()


def _ensure_leaf(folder, stem, names, ca, check, made):
    ca_key, ca_cert = ca
    cert_path, key_path = os.path.join(folder, f"{stem}.crt"), os.path.join(folder, f"{stem}.key")
    if _leaf_current(cert_path, key_path, ca_cert, names):
        return
    made.append(cert_path)
    if check:
        return
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(_name(f"dstack-gateway {stem}")).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
            .add_extension(subject_alt_names(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    # The key first: a certificate is never left next to a key that is not its own.
    atomic_write(key_path, _key_pem(key), mode=0o600)
    atomic_write(cert_path, _cert_pem(cert), mode=0o644)


def _ensure_wireguard_key(state_dir, check, made):
    path = os.path.join(state_dir, KEY_FILE)
    if os.path.exists(path):
        with open(path, encoding="ascii") as handle:
            return wireguard.public_key(handle.read().strip(), path)
    made.append(path)
    if check:
        return ""
    private = wireguard.generate_private_key()
    atomic_write(path, (private + "\n").encode(), mode=0o600)
    return wireguard.public_key(private)


def _ensure_token(path, check, made):
    if os.path.exists(path):
        return
    made.append(path)
    if not check:
        atomic_write(path, (secrets.token_urlsafe(32) + "\n").encode(), mode=0o600)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--base-domain", required=True)
    parser.add_argument("--admin-token-file", help="make this token file (0600) when it does not exist")
    parser.add_argument("--no-local-ca", action="store_true",
                        help="make no CA and no wildcard certificate (they come from an ACME CA)")
    parser.add_argument("--check", action="store_true", help="report what would be made, write nothing")
    args = parser.parse_args(argv)
    folder = os.path.join(args.state_dir, "tls")
    made = []
    if not args.check:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    if not args.no_local_ca:
        ca = _ensure_ca(folder, args.check, made)
        _ensure_leaf(folder, "wildcard", [f"*.{args.base_domain}"], ca, args.check, made)
    wg_public = _ensure_wireguard_key(args.state_dir, args.check, made)
    if args.admin_token_file:
        _ensure_token(args.admin_token_file, args.check, made)
    print(json.dumps({"changed": bool(made), "made": made, "wg_public_key": wg_public}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
