# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The simulated default's ACME CA and DNS server (machine-recipes.md): BIND9 (`named -g`)
authoritative for zones that take RFC 2136 updates signed with a TSIG key, and Pebble (the Let's
Encrypt test server) validating DNS-01 against it. The one home of their configuration, for the
dstack.tee.acme_lab role (through dstack.tee.acme_lab_config) and the tests' fixtures
(tests/integration/dns_fixtures.py, acme_fixtures.py).

    new_tsig_secret()                          a TSIG secret (base64 of 32 random bytes)
    tsig_key(name, secret), tsig_secret(text)  named's key clause, and the secret read back from it
    zone_file(zone, records, negative_ttl)     a zone's master file: SOA, NS, then the records
    named_conf(folder, key_file, key_name, zones, address, port, query_log)
    pebble_config(listen, management_listen, cert, key, http_port, tls_port)   pebble.json
    PEBBLE_ENV                                 Pebble's environment (no random waits, no nonce
                                               rejections, every order validated)
    listener_tls(names, days)                  (CA, certificate, key) PEM of Pebble's HTTPS listener
    rfc2136_credentials(server, port, key_name, secret)   certbot-dns-rfc2136's credentials INI

Texts only: writing them (atomically, 0600 for the key, the listener's key and the credentials)
is the caller's.
"""

import base64
import datetime
import ipaddress
import json
import re
import secrets

try:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
except ImportError:  # reported by callers through HAS_CRYPTOGRAPHY
    HAS_CRYPTOGRAPHY = False
else:
    HAS_CRYPTOGRAPHY = True

from ansible_collections.dstack.tee.plugins.module_utils.app_certs import subject_alt_names
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError

TSIG_ALGORITHM = "hmac-sha256"
# Pebble without its random validation sleeps and nonce rejections (real clients retry them; a
# demo or a test would only wait), and without reusing authorizations: every order is validated
# by DNS-01 for real.
PEBBLE_ENV = {"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"}
# The ports Pebble's VA would connect to for HTTP-01 and TLS-ALPN-01 (it listens on neither;
# DNS-01 is the only challenge used here).
PEBBLE_HTTP_PORT = 5002
PEBBLE_TLS_PORT = 5001
_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?$")
_KEY_SECRET = re.compile(r'secret\s+"([A-Za-z0-9+/=]+)"')


def check_name(value, field):
    """A DNS name (a zone, a TSIG key name) safe to place in named.conf; DstackError otherwise."""
    if not isinstance(value, str) or len(value) > 253 or not _NAME.match(value):
        raise DstackError(field, f"must be a DNS name (letters, digits, '-' and '_' in dot-separated labels), "
                                 f"got {value!r}")
    return value.rstrip(".")


def new_tsig_secret():
    return base64.b64encode(secrets.token_bytes(32)).decode()


def tsig_key(name, secret):
    """named's key clause for the TSIG key `name` (the file named.conf includes)."""
    return f'key "{check_name(name, "tsig_name")}" {{ algorithm {TSIG_ALGORITHM}; secret "{secret}"; }};\n'


def tsig_secret(text):
    """The secret of a key clause tsig_key (or tsig-keygen) wrote; None when there is none."""
    found = _KEY_SECRET.search(text or "")
    return found.group(1) if found else None


def zone_file(zone, records, negative_ttl=3600):
    """A zone's master file: its SOA (negative answers kept `negative_ttl` s), NS ns.<zone> at
    127.0.0.1, then `records` (lines of the master file format, e.g. "* IN A 127.0.0.1")."""
    zone = check_name(zone, "zone")
    return (f"$TTL 60\n@ {negative_ttl} IN SOA ns.{zone}. hostmaster.{zone}. ( 1 3600 600 86400 {negative_ttl} )\n"
            f"@ IN NS ns.{zone}.\nns IN A 127.0.0.1\n" + "".join(f"{record}\n" for record in records))


def named_conf(folder, key_file, key_name, zones, address="127.0.0.1", port=53, query_log=False):
    """named.conf for `named -g -c` in `folder` (its working folder: pid, session key, journals):
    listening on address:port (UDP and TCP) only, no recursion; `zones` maps each zone to its
    master file, every name in it open to updates signed with the TSIG key `key_name`."""
    key_name = check_name(key_name, "tsig_name")
    ipaddress.ip_address(address)
    blocks = "".join(f'zone "{check_name(zone, "zone")}" {{ type primary; file "{path}"; '
                     f'update-policy {{ grant {key_name} zonesub ANY; }}; }};\n' for zone, path in zones.items())
    return (f'include "{key_file}";\n'
            f'options {{ directory "{folder}"; pid-file "{folder}/named.pid"; '
            f'session-keyfile "{folder}/session.key"; listen-on port {int(port)} {{ {address}; }}; '
            f'listen-on-v6 {{ none; }}; recursion no; dnssec-validation no; '
            f'querylog {"yes" if query_log else "no"}; }};\n'
            'controls { };\n' + blocks)


def pebble_config(listen, management_listen, cert, key, http_port=PEBBLE_HTTP_PORT, tls_port=PEBBLE_TLS_PORT):
    """pebble.json's text: the ACME directory at https://<listen>/dir, the management API
    (/roots/0, /intermediates/0) at https://<management_listen>, both with the listener's
    certificate."""
    return json.dumps({"pebble": {
        "listenAddress": listen, "managementListenAddress": management_listen,
        "certificate": cert, "privateKey": key, "httpPort": int(http_port), "tlsPort": int(tls_port),
        "ocspResponderURL": "", "externalAccountBindingRequired": False}}, indent=2, sort_keys=True) + "\n"


def _pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def listener_tls(names=("localhost", "127.0.0.1"), days=3650, ca_name="dstack.tee Pebble listener CA"):
    """(CA PEM, certificate PEM, key PEM) for Pebble's HTTPS listener (the ACME API, not the CA it
    issues under): a P-256 CA and a certificate for `names` (DNS names or IP addresses)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca = (x509.CertificateBuilder().subject_name(issuer).issuer_name(issuer).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(subject_alt_names(names), critical=False)
            .sign(ca_key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return _pem(ca), _pem(cert), key_pem


def listener_tls_current(ca_pem, cert_pem, key_pem, names, min_days=30):
    """Whether a listener's files still serve: the certificate is the CA's, for the key, covers
    `names` and is valid for `min_days` more days."""
    try:
        ca = x509.load_pem_x509_certificate(ca_pem.encode())
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        key = serialization.load_pem_private_key(key_pem.encode(), None)
        cert.verify_directly_issued_by(ca)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False  # unreadable, or not issued by the CA
    have = {str(v) for v in san.get_values_for_type(x509.DNSName)} | \
           {str(v) for v in san.get_values_for_type(x509.IPAddress)}
    left = cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    return (have == set(names) and left > datetime.timedelta(days=min_days)
            and key.public_key().public_numbers() == cert.public_key().public_numbers())


def rfc2136_credentials(server, port, key_name, secret):
    """certbot-dns-rfc2136's credentials INI (the gateway's [core.certbot] credentials, 0600)."""
    return (f"dns_rfc2136_server = {server}\ndns_rfc2136_port = {int(port)}\ndns_rfc2136_name = {key_name}\n"
            f"dns_rfc2136_secret = {secret}\ndns_rfc2136_algorithm = {TSIG_ALGORITHM.upper()}\n")
