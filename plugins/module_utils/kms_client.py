# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A client of the KMS API (/prpc/KMS.*): used by the env_encrypt module, the guest agent and tests.

HTTPS is checked against the KMS root CA certificate when one is given (the KMS issues its own
server certificate from it); otherwise against the system's trust store.
"""

import json

from ansible_collections.dstack.tee.plugins.module_utils import key_release
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError, parse_hex
from ansible_collections.dstack.tee.plugins.module_utils.prpc import PrpcClient, Refused

KmsRefused = Refused  # the KMS answered, and said no (HTTP 403): the reason is the KMS's


class KmsClient(PrpcClient):
    def __init__(self, url, ca_cert=None, timeout=30.0, validate_certs=True, field="kms_url"):
        """ca_cert: path of the KMS root CA certificate to check HTTPS against.

        validate_certs=False is for a CVM that does not know its KMS's CA yet: it then relies on
        the sealed answer (only its ephemeral key opens it) and on checking the KMS's root
        against the key_provider_id the app pinned, which the key-provider event measures.
        """
        super().__init__(url, "KMS", field=field, ca_cert=ca_cert, timeout=timeout, validate_certs=validate_certs)

    def get_meta(self):
        return self.call("GetMeta")

    def get_app_env_encrypt_pubkey(self, app_id):
        return self.call("GetAppEnvEncryptPubKey", {"app_id": parse_hex(app_id, "app_id", length=20).hex()})

    def get_app_key(self, provider, event_log, vm_config=""):
        """Attested key release: nonce, quote binding it and an ephemeral key, then open the sealed keys.

        `provider` is a TEE provider (tdx.open_provider); `event_log` the JSON event log whose
        RTMR3 the quote will show.
        """
        return self._sealed_release("GetAppKey", key_release.KEY_RELEASE_TAG, lambda report_data: {
            "quote": provider.get_quote(report_data).hex(), "event_log": event_log, "vm_config": vm_config})

    def get_kms_key(self, attest):
        """Onboarding (KMS.GetKmsKey): the source KMS's root keys {ca_key, ca_cert, k256_key}.

        attest(report_data) must give this replica's {quote (hex), event_log, vm_config} over the
        64-byte report_data, as the guest agent's GetQuote does (guest_client.get_quote).
        """
        return self._sealed_release("GetKmsKey", key_release.KMS_KEY_TAG, attest)

    def _sealed_release(self, method, tag, attest):
        """GetNonce, an ephemeral key, evidence over report_data(tag, nonce, key), then the sealed answer opened."""
        nonce = parse_hex(self.call("GetNonce")["nonce"], "nonce", length=key_release.NONCE_SIZE)
        private_key, public_key = key_release.new_ephemeral_key()
        evidence = attest(key_release.key_release_report_data(nonce, public_key, tag))
        answer = self.call(method, {"nonce": nonce.hex(), "ephemeral_public_key": public_key.hex(),
                                    "quote": evidence["quote"], "event_log": evidence.get("event_log", ""),
                                    "vm_config": evidence.get("vm_config", "")})
        return key_release.open_sealed(answer, nonce, private_key)

    def sign_cert(self, provider, event_log_fn, csr_pem, vm_config="", **options):
        """SignCert: a quote binding the nonce and the CSR, then [leaf, app CA, root CA] PEMs.

        event_log_fn() gives the event log after the quote is taken (the two must agree).
        """
        nonce = parse_hex(self.call("GetNonce")["nonce"], "nonce", length=key_release.NONCE_SIZE)
        csr_der = _csr_der(csr_pem)
        quote = provider.get_quote(key_release.sign_cert_report_data(nonce, csr_der))
        request = {"nonce": nonce.hex(), "csr": csr_pem if isinstance(csr_pem, str) else csr_pem.decode(),
                   "quote": quote.hex(), "event_log": event_log_fn(), "vm_config": vm_config}
        request.update({k: v.decode() if isinstance(v, bytes) else v for k, v in options.items() if v is not None})
        return self.call("SignCert", request)["certificate_chain"]


def _csr_der(csr_pem):
    from cryptography import x509  # pylint: disable=import-outside-toplevel
    from cryptography.hazmat.primitives import serialization  # pylint: disable=import-outside-toplevel
    data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    try:
        return x509.load_pem_x509_csr(data).public_bytes(serialization.Encoding.DER)
    except ValueError:
        raise DstackError("csr", "is not a PEM certificate signing request") from None


class KmsCertSigner:
    """The guest agent's GetTlsKey signer: the KMS's SignCert, attested with this CVM's quote.

    For RA-TLS the guest passes attestation= (its attestation document over the leaf key); the
    KMS verifies it is this CVM's and bound to the CSR's key before embedding it.
    """

    embeds_attestation = True

    def __init__(self, client, context):
        self.client = client
        self.context = context

    def sign(self, csr_pem, **options):
        return self.client.sign_cert(self.context.provider, lambda: json.dumps(self.context.event_log()),
                                     csr_pem, self.context.vm_config(), **options)
