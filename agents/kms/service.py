# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The KMS's decisions, apart from HTTP: metadata, env keys, nonces, attested key release, SignCert,
and onboarding (GetKmsKey: the root keys, to an attested KMS replica its auth backend allows)."""

import hashlib
import os

from ansible_collections.dstack.tee.agents.kms.audit import AuditLog
from ansible_collections.dstack.tee.agents.kms.auth import decide, make_backend
from ansible_collections.dstack.tee.agents.kms.nonces import NonceStore, mac_key
from ansible_collections.dstack.tee.plugins.module_utils import app_certs, attestation, json_limits, key_release, root_keys
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError, parse_hex

MODES = ("production", "simulation")


class Refused(DstackError):
    """Key release refused: the reason is recorded in the audit log and sent to the requester."""


class KmsService:
    def __init__(self, config):
        self.config = config
        self.mode = config.get("mode", "production")
        if self.mode not in MODES:
            raise DstackError("mode", f"must be production or simulation, not {str(self.mode)[:20]!r}")
        self.state_dir = config["state_dir"]
        self.keys, self.created = root_keys.load_or_create(self.state_dir, also_history=[config.get("audit_log")])
        self.nonces = NonceStore(os.path.join(self.state_dir, "nonces.sqlite3"), mac_key(self.keys.ca_key),
                                 ttl=int(config.get("nonce_ttl", 60)))
        self.audit = AuditLog(config.get("audit_log") or os.path.join(self.state_dir, "audit.log"))
        self.auth = make_backend(config.get("auth") or {})
        self.gateway_app_id = str(config.get("gateway_app_id", ""))
        policy = config.get("policy") or {}
        self.trust = attestation.QuoteTrust(dict(config, mode=self.mode, **{
            k: policy[k] for k in ("allowed_tcb_statuses", "allowed_advisory_ids") if k in policy}), self.state_dir)
        self.root_ca_der = self.trust.root_ca_der
        self.os_image_measurements = os_image_measurements(policy.get("os_image_measurements") or {})
        # Production: an OS image is only as good as the measurements pinned for it (MRTD, RTMR0-2).
        self.require_measurements = bool(policy.get("require_os_image_measurements", self.mode == "production"))
        self._meta = None

    def collateral(self, raw_quote):
        return self.trust.collateral(raw_quote)

    # ---- methods -----------------------------------------------------------------------------

    def get_meta(self):
        if self._meta is None:  # nothing in it changes while the KMS runs, but the chain's answer
            self._meta = {
                "ca_cert": self.keys.ca_cert_pem,
                "k256_pubkey": self.keys.k256_pubkey.hex(),
                "mode": self.mode,
                "attestation_mode": attestation.attestation_mode_for(self.root_ca_der),
                "is_dev": self.mode == "simulation",
                "allow_any_upgrade": False,
                "gateway_app_id": self.gateway_app_id,
                "bootstrap_info": None,
            }
        return {**self._meta, **self._chain_meta()}

    def _chain_meta(self):
        """GetMeta's chain fields: the DstackKms the ethereum backend asks (empty otherwise)."""
        auth = self.config.get("auth") or {}
        if auth.get("type") != "ethereum":
            return {"kms_contract_address": "", "chain_id": None, "app_auth_implementation": ""}
        implementation = ""
        try:
            implementation = self.auth.app_implementation()
        except Exception:  # pylint: disable=broad-exception-caught
            pass  # GetMeta answers even while the chain is unreachable; key release fails closed
        return {"kms_contract_address": str(auth.get("contract_address", "")), "chain_id": int(auth["chain_id"]),
                "app_auth_implementation": implementation}

    def env_pubkey(self, app_id):
        return self.keys.env_pubkey_response(app_id)

    def new_nonce(self):
        nonce, expires = self.nonces.issue()
        return {"nonce": nonce.hex(), "expires_at": int(expires)}

    def _verify(self, quote, event_log, expected_report_data):
        """The quote verified under this KMS's trust root and TCB policy, report_data and event log
        required (attestation.Verification; never raises on a bad quote)."""
        return self.trust.verify(quote, event_log, expected_report_data)

    def _attest(self, request, nonce, expected_report_data, method, remote_addr, kind="app", extra_check=None):
        """Verify the requester's quote and event log, check the measured identity, ask the auth
        backend (about an app, or a KMS replica when kind is "kms"), and only then use the nonce up.
        Returns (boot info, decision, audit fields); Refused (recorded in the audit log) otherwise."""
        audit = {"method": method, "kms_mode": self.mode, "remote_addr": remote_addr}
        try:
            quote = parse_hex(request.get("quote", ""), "quote")
            vm_config = _vm_config(request.get("vm_config"))
            result = self._verify(quote, request.get("event_log"), expected_report_data)
            if result.quote is not None:  # the signed parts: one quote, however its bytes are laid out
                audit["quote_identity"] = result.quote.identity()
            else:  # bytes that are no quote have no identity; their hash still ties the line to them
                audit["quote_sha256"] = hashlib.sha256(quote).hexdigest()
            boot = dict(result.boot_info)
            audit.update({k: boot.get(k) for k in ("app_id", "compose_hash", "instance_id", "device_id",
                                                   "os_image_hash", "mr_aggregated")},
                         tcb_status=result.tcb_status, attestation_mode=result.attestation_mode)
            if not result.ok:
                failed = result.failures[0]
                raise Refused(failed.name, failed.detail)
            if self.mode == "production" and result.attestation_mode != attestation.MODE_TDX:
                raise Refused("attestation_mode", "a production KMS refuses quotes that chain to a simulated root")
            self._check_identity(boot, vm_config, kind)
            if extra_check is not None:
                extra_check(boot)
            decision = decide(self.auth, boot, kind)
            if not decision.allowed:
                raise Refused("auth", decision.reason or "denied")
            self.nonces.consume(nonce)
        except DstackError as exc:
            self.audit.record(decision="refuse", reason=str(exc), **audit)
            raise Refused(exc.field, exc.reason) from None
        return boot, decision, audit

    def _check_identity(self, boot, vm_config, kind):
        """What the measured boot must show beyond a valid quote (identity events before boot-mr-done)."""
        if kind == "app":
            if len(boot["app_id"]) != 40:
                raise Refused("app_id", "the event log has no 20-byte app-id event before boot-mr-done")
            if len(boot["compose_hash"]) != 64:
                raise Refused("compose_hash", "the event log has no 32-byte compose-hash event before boot-mr-done")
            if len(boot["instance_id"]) not in (0, 40):
                raise Refused("instance_id", "the instance-id event before boot-mr-done is neither empty nor 20 bytes")
            if not attestation.measured_kms(boot, self.key_provider_id()):
                raise Refused("key_provider", "the CVM did not measure this KMS as its key provider "
                                              "(key-provider event before boot-mr-done)")
        measured = boot["os_image_hash"]
        claimed = str(vm_config.get("os_image_hash") or "").lower().removeprefix("0x")
        if claimed and claimed != measured:
            raise Refused("vm_config.os_image_hash", "differs from the measured os-image-hash event; the "
                                                     "measured value is the one checked")
        pinned = self.os_image_measurements.get(measured)
        if pinned is None:
            if self.require_measurements:
                raise Refused("os_image_hash", "no MRTD and RTMR0-2 are pinned for this OS image "
                                               "(policy.os_image_measurements)")
            return
        for name, expected in pinned.items():
            if boot.get(name) != expected:
                raise Refused(name, f"differs from the value pinned for OS image {measured[:16]}...")

    def _release_request(self, request, method, remote_addr):
        """(nonce, key_release.Sealer to the requester's ephemeral key) of a key-release request, the
        nonce checked (not yet used up)."""
        try:
            nonce = parse_hex(request.get("nonce", ""), "nonce", length=key_release.NONCE_SIZE)
            sealer = key_release.Sealer(nonce, request.get("ephemeral_public_key", ""))
            self.nonces.check(nonce)
        except DstackError as exc:
            self.audit.record(method=method, decision="refuse", reason=str(exc), kms_mode=self.mode,
                              remote_addr=remote_addr)
            raise Refused(exc.field, exc.reason) from None
        return nonce, sealer

    def get_app_key(self, request, remote_addr=""):
        """Attested key release: nonce, quote bound to the ephemeral key, auth; keys sealed to that key."""
        nonce, sealer = self._release_request(request, "GetAppKey", remote_addr)
        boot, decision, audit = self._attest(
            request, nonce, key_release.key_release_report_data(nonce, sealer.requester_public_key), "GetAppKey",
            remote_addr)
        payload = self.keys.app_key_payload(boot["app_id"], boot["instance_id"], boot["os_image_hash"],
                                            decision.gateway_app_id or self.gateway_app_id)
        sealed = sealer.seal(payload)
        self.audit.record(decision="release", reason="", **audit)
        return sealed

    def get_kms_key(self, request, remote_addr=""):
        """Onboarding: the root keys, sealed to an attested KMS replica the auth backend allows
        (local kms.mrAggregated, webhook /bootAuth/kms, DstackKms.isKmsAllowed)."""
        nonce, sealer = self._release_request(request, "GetKmsKey", remote_addr)
        _boot, _decision, audit = self._attest(
            request, nonce, key_release.key_release_report_data(nonce, sealer.requester_public_key,
                                                                key_release.KMS_KEY_TAG),
            "GetKmsKey", remote_addr, kind="kms")
        ca_key_pem, ca_cert_pem, k256 = root_keys.pem_forms(self.keys)
        payload = {"ca_key": ca_key_pem.decode(), "ca_cert": ca_cert_pem.decode(), "k256_key": k256.hex()}
        sealed = sealer.seal(payload)
        self.audit.record(decision="release", reason="root keys to a KMS replica", **audit)
        return sealed

    def sign_cert(self, request, remote_addr=""):
        """SignCert for GetTlsKey: an attested CVM's CSR, signed by its app's CA; [leaf, app CA, root CA].
        Every field is checked before the quote is (bad input is a 400 and uses no nonce up)."""
        nonce = parse_hex(request.get("nonce", ""), "nonce", length=key_release.NONCE_SIZE)
        csr = app_certs.load_csr(request.get("csr", ""))
        # The app CA is valid as long as the root CA at most (app_certs.app_ca): cap the window by it.
        options = app_certs.leaf_options(request, ca_not_after=self.keys.ca_cert.not_valid_after_utc)
        document = request.get("attestation")
        if document not in (None, "") and not isinstance(document, str):
            raise DstackError("attestation", "must be the attestation document's JSON text")
        try:
            self.nonces.check(nonce)
        except DstackError as exc:
            self.audit.record(method="SignCert", decision="refuse", reason=str(exc), kms_mode=self.mode,
                              remote_addr=remote_addr)
            raise Refused(exc.field, exc.reason) from None
        csr_der = csr.public_bytes(root_keys.serialization.Encoding.DER)
        embedded = []

        def attested_key(boot):  # the RA-TLS attestation is checked before the nonce is used up
            if document not in (None, ""):
                embedded.append(self._ratls_attestation(document, csr, boot))

        boot, _decision, audit = self._attest(request, nonce, key_release.sign_cert_report_data(nonce, csr_der),
                                              "SignCert", remote_addr, extra_check=attested_key)
        ca_key, ca_cert = app_certs.app_ca(self.keys.ca_key, self.keys.ca_cert, boot["app_id"])
        leaf = app_certs.issue_leaf(ca_key, ca_cert, csr, boot["app_id"], attestation=embedded[0] if embedded else None,
                                    **options)
        self.audit.record(decision="release", reason="certificate signed", **audit)
        return {"certificate_chain": [app_certs.pem(leaf), app_certs.pem(ca_cert), app_certs.pem(self.keys.ca_cert)]}

    def _ratls_attestation(self, document, csr, boot):
        """The guest's RA-TLS attestation document, as bytes to embed, once it is shown to be over
        the CSR's key (report_data = SHA-512("ratls-cert:" || SPKI)) and from the same CVM as the
        SignCert quote; a KMS signs no certificate that claims a quote it has not checked."""
        doc = app_certs.parse_attestation_document(document)
        expected = app_certs.ratls_report_data(csr.public_key())
        result = self._verify(doc["quote"], doc["event_log"], expected)
        if not result.ok:
            failed = result.failures[0]
            raise DstackError("attestation", f"{failed.name}: {failed.detail}")
        for name in ("app_id", "instance_id", "compose_hash", "device_id", "mr_system", "os_image_hash"):
            if result.boot_info.get(name) != boot.get(name):
                raise DstackError("attestation", f"is from another CVM than the SignCert quote ({name} differs)")
        if doc["attestation_mode"] != result.attestation_mode:
            raise DstackError("attestation.attestation_mode", f"says {doc['attestation_mode'][:20]!r}; the quote is "
                                                              f"{result.attestation_mode}")
        if doc["report_data"] != expected:
            raise DstackError("attestation.report_data", "is not the quote's (SHA-512 of \"ratls-cert:\" and the key)")
        claimed = str(_vm_config(doc["vm_config"]).get("os_image_hash") or "").lower().removeprefix("0x")
        if claimed and claimed != result.boot_info["os_image_hash"]:
            raise DstackError("attestation.vm_config", "names another OS image than the measured one")
        # What is embedded is rebuilt from the checked fields: no claim goes in that was not checked.
        return app_certs.attestation_document(result.attestation_mode, doc["quote"], doc["event_log"], expected,
                                              doc["vm_config"])

    def key_provider_id(self):
        """The KMS's key-provider id: its root CA public key (SubjectPublicKeyInfo DER), hex."""
        return self.keys.key_provider_id


def _vm_config(value):
    if value in (None, ""):
        return {}
    if isinstance(value, dict):
        return value
    parsed = json_limits.loads(value, "vm_config")
    if not isinstance(parsed, dict):
        raise DstackError("vm_config", "is not a JSON object")
    return parsed


MEASUREMENT_NAMES = ("mrtd", "rtmr0", "rtmr1", "rtmr2")


def os_image_measurements(value):
    """policy.os_image_measurements: {os_image_hash: {mrtd, rtmr1, rtmr2[, rtmr0]}} (hex, 48 bytes each),
    checked once at start; keys lowercased without 0x."""
    if not isinstance(value, dict):
        raise DstackError("policy.os_image_measurements", "must be a table {os_image_hash = {mrtd, rtmr1, rtmr2}}")
    pins = {}
    for image, measurements in value.items():
        where = f"policy.os_image_measurements.{str(image)[:20]}"
        image_hex = parse_hex(image, where, length=32).hex()
        if not isinstance(measurements, dict) or not measurements:
            raise DstackError(where, "must be a table of mrtd, rtmr0, rtmr1, rtmr2 (hex)")
        unknown = sorted(set(measurements) - set(MEASUREMENT_NAMES))
        if unknown:
            raise DstackError(f"{where}.{unknown[0]}", f"is not one of {', '.join(MEASUREMENT_NAMES)}")
        pins[image_hex] = {name: parse_hex(measurements[name], f"{where}.{name}", length=48).hex()
                           for name in MEASUREMENT_NAMES if name in measurements}
    return pins
