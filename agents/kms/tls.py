# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The KMS's HTTPS certificate, issued by its own root CA (clients pin root-ca.crt)."""

import datetime
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ansible_collections.dstack.tee.plugins.module_utils.app_certs import subject_alt_names
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.fileio import atomic_write, read_bytes
from ansible_collections.dstack.tee.plugins.module_utils.root_keys import RPC_CERT, RPC_KEY
VALIDITY_DAYS = 365


def ensure_rpc_cert(state_dir, root, names):
    """(cert path, key path): reuse the RPC certificate when it covers `names`, else issue a new one."""
    cert_path, key_path = os.path.join(state_dir, RPC_CERT), os.path.join(state_dir, RPC_KEY)
    wanted = {str(n) for n in names if n}
    try:
        cert = x509.load_pem_x509_certificate(read_bytes(cert_path, RPC_CERT))
        have = {str(v) for v in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                .get_values_for_type(x509.DNSName)}
        have |= {str(v) for v in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                 .get_values_for_type(x509.IPAddress)}
        fresh = cert.not_valid_after_utc - datetime.timedelta(days=30) > datetime.datetime.now(datetime.timezone.utc)
        if wanted <= have and fresh and os.path.exists(key_path):
            return cert_path, key_path
    except (DstackError, ValueError, x509.ExtensionNotFound):
        pass  # none yet, unreadable or not a certificate: a new one is issued
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dstack-kms rpc")]))
            .issuer_name(root.ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALIDITY_DAYS))
            .add_extension(subject_alt_names(sorted(wanted)), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(root.ca_key, hashes.SHA256()))
    atomic_write(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()), mode=0o600)
    atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return cert_path, key_path
