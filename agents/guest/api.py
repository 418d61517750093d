# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The guest agent's socket API: dstack's DstackGuest service and the legacy Tappd service.

create_app(context) builds the Flask app; agents/guest/server.py serves it on the unix sockets
(/var/run/dstack.sock and /var/run/tappd.sock; both sockets serve both services).

    DstackGuest (dstack-reference 4.2, v0.5.x), at /<Method>:
      GetQuote {report_data}          quote over report_data (<= 64 bytes) right-padded, not hashed:
                                      {quote, event_log (JSON text), report_data (64 bytes), vm_config}
      Attest {report_data}            {attestation}: hex of the JSON document described at ATTESTATION_VERSION
      GetKey {path, purpose, algorithm}   {key, signature_chain: [app-key sig, KMS sig]} (kdf.get_key)
      GetTlsKey {subject, alt_names, usage_ra_tls, usage_server_auth, usage_client_auth,
                 not_before, not_after, with_app_info}
                                      a fresh P-256 key and [leaf, app CA, root CA] from the context's
                                      certificate signer (the KMS's SignCert, or local keys when simulating)
      Info                            what dstack_sdk's InfoResponse / TcbInfoV05x parse
      EmitEvent {event, payload}      extends RTMR3 and appends to the runtime log; {} (the SDK reads JSON)
      Sign {algorithm, data}          ed25519 / secp256k1 (ECDSA over SHA-256) / secp256k1_prehashed
                                      with the GetKey(path "vms", purpose "signing") key
      Verify {algorithm, data, signature, public_key}   {valid}
      Version                         {version, rev}
    Tappd (legacy), at /prpc/Tappd.<Method>:
      TdxQuote {report_data, hash_algorithm, prefix}   report_data = HASH(prefix ":" data), zero-padded;
                                      "raw" takes exactly 64 bytes (TappdClient left-pads shorter input)
      RawQuote {report_data}          TdxQuote with "raw"
      DeriveKey {path, subject, alt_names, usage_*, random_seed}   P-256 key derive_p256(app k256, [path]) + cert
      DeriveK256Key {path, purpose, algorithm}   {k256_key, k256_signature_chain}
      Info, Version                   as above

Requests are JSON POST bodies or GET query parameters (both merged; the body wins); bytes are hex;
missing booleans are false (as in dstack's protobuf messages). GetKey, Sign and DeriveKey need the
app keys the boot wrote; EmitEvent is refused until the boot measured system-ready, so an app event
can never pose as a boot event.
Errors are {"error": "..."}: 400 bad input, 404/405 unknown route or method, 413 too large, 503 not
ready (no app keys yet, no certificate signer, boot not measured), 502 the certificate signer
failed, 501 usage_ra_tls with a signer that cannot embed an attestation, 500 a TEE failure or an
internal error (never a traceback).
"""

import functools
import hashlib
import json
import logging
import secrets
import threading
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ansible_collections.dstack.tee.agents.guest.context import VERSION
from ansible_collections.dstack.tee.agents.wsgi import add_prpc_routes, install_json_errors
from ansible_collections.dstack.tee.plugins.module_utils import app_compose as compose
from ansible_collections.dstack.tee.plugins.module_utils import app_certs, attestation, eventlog, kdf, tdx_quote
from ansible_collections.dstack.tee.plugins.module_utils.app_certs import LocalCertSigner, ratls_report_data
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError, parse_hex
from ansible_collections.dstack.tee.plugins.module_utils.signatures import SIGN_ALGORITHMS, keccak, sign_data, verify_data

MAX_REQUEST_BYTES = 1024 * 1024
REV = "dstack.tee"
# Attest: the attestation is the UTF-8 bytes of a compact JSON object with sorted keys:
#   {"version": ATTESTATION_VERSION, "attestation_mode": "dstack-tdx" | "dstack-sim",
#    "quote": hex, "event_log": "<JSON text>", "report_data": hex (64 bytes), "vm_config": "<JSON text>"}
# Its first byte is "{" (0x7b), so it is never mistaken for dstack's V0 (0x00 + SCALE) or V1
# (msgpack) forms, and it is a GetQuote answer as well: `dstack-verify` reads it as it is.
ATTESTATION_VERSION = app_certs.ATTESTATION_VERSION
APP_CERT_RETRY_SECONDS = 60
APP_CERT_WAIT_SECONDS = 1.0
MAX_NAME_LENGTH = 256
# GetKey / DeriveK256Key algorithms as dstack reads them: "" and the prehashed variant are secp256k1 keys.
KEY_ALGORITHMS = {"": "secp256k1", "secp256k1": "secp256k1", "k256": "secp256k1",
                  "secp256k1_prehashed": "secp256k1", "ed25519": "ed25519"}
DEFAULT_TAPPD_HASH = "sha512"
DEFAULT_TAPPD_PREFIX = "app-data"
log = logging.getLogger("dstack.guest")


TAPPD_HASHES = {
    "sha256": lambda data: hashlib.sha256(data).digest(),
    "sha384": lambda data: hashlib.sha384(data).digest(),
    "sha512": lambda data: hashlib.sha512(data).digest(),
    "sha3-256": lambda data: hashlib.sha3_256(data).digest(),
    "sha3-384": lambda data: hashlib.sha3_384(data).digest(),
    "sha3-512": lambda data: hashlib.sha3_512(data).digest(),
    "keccak256": lambda data: keccak(data, 256),
    "keccak384": lambda data: keccak(data, 384),
    "keccak512": lambda data: keccak(data, 512),
}


class NotReady(Exception):
    """The agent cannot answer yet (503): no app keys, no certificate signer, boot not measured."""


class ServerFailure(Exception):
    """The TEE, a file of the CVM or the certificate signer failed (500, 501 or 502); the message is safe to show."""

    def __init__(self, message, status=500):
        super().__init__(message)
        self.status = status


def _server(call, *args, **kwargs):
    """Run a call whose DstackError is the agent's fault, not the caller's (a 500, not a 400)."""
    try:
        return call(*args, **kwargs)
    except DstackError as exc:
        raise ServerFailure(str(exc)) from None


# ---- request parameters ------------------------------------------------------------------------

# The parameters a GET may repeat (?alt_names=a&alt_names=b), read as lists.
LIST_FIELDS = ("alt_names",)


def _text(params, name, default=""):
    value = params.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise DstackError(name, f"must be a string, not {type(value).__name__}")
    return value


def _hex(params, name, length=None):
    return parse_hex(params.get(name) or "", name, length=length, allow_empty=True)


def _key_algorithm(params):
    algorithm = _text(params, "algorithm")
    if algorithm not in KEY_ALGORITHMS:
        raise DstackError("algorithm", f"unknown value {algorithm[:32]!r} (expected secp256k1 or ed25519)")
    return KEY_ALGORITHMS[algorithm]


def _sign_algorithm(params):
    algorithm = _text(params, "algorithm")
    if algorithm not in SIGN_ALGORITHMS:
        raise DstackError("algorithm", f"unknown value {algorithm[:32]!r} (expected one of {', '.join(SIGN_ALGORITHMS)})")
    return algorithm


def tappd_report_data(data, hash_algorithm="", prefix=""):
    """Tappd TdxQuote report_data: HASH(prefix ":" data) zero-padded to 64 bytes, or raw 64 bytes."""
    algorithm = hash_algorithm or DEFAULT_TAPPD_HASH
    if algorithm == "raw":
        if len(data) != tdx_quote.REPORT_DATA_SIZE:
            raise DstackError("report_data", f"must be exactly 64 bytes with hash_algorithm raw, got {len(data)}")
        return bytes(data)
    if algorithm not in TAPPD_HASHES:
        raise DstackError("hash_algorithm", f"unknown value {algorithm[:32]!r} (expected raw or one of {', '.join(TAPPD_HASHES)})")
    digest = TAPPD_HASHES[algorithm]((prefix or DEFAULT_TAPPD_PREFIX).encode("utf-8") + b":" + bytes(data))
    return digest.ljust(tdx_quote.REPORT_DATA_SIZE, b"\x00")


# ---- certificates -------------------------------------------------------------------------------

def _csr_pem(key, subject, alt_names=()):
    if len(subject) > 64:
        raise DstackError("subject", f"is {len(subject)} characters; a certificate common name holds at most 64")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)] if subject else [])
    builder = x509.CertificateSigningRequestBuilder().subject_name(name)
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in alt_names]), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def _key_pem(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


# ---- the service --------------------------------------------------------------------------------

class GuestApi:
    """The methods of both services over one GuestContext; each takes the request parameters."""

    def __init__(self, context):
        self.ctx = context
        self._app_cert = ""
        self._app_cert_lock = threading.Lock()
        self._app_cert_thread = None
        self._app_cert_next_try = 0.0

    # -- what the boot left in the work folder --

    def _k256(self):
        """(app k256 key, KMS k256_signature over it), or NotReady before the boot fetched the keys."""
        try:
            keys = self.ctx.app_keys()
        except DstackError as exc:
            raise NotReady(str(exc)) from None
        try:
            return (parse_hex(keys.get("k256_key", ""), "k256_key", length=32),
                    # empty for the local and none key providers, as in dstack
                    parse_hex(keys.get("k256_signature") or "", "k256_signature", length=(65, 0), allow_empty=True))
        except DstackError as exc:
            raise ServerFailure(f".appkeys.json is damaged: {exc}") from None

    def _measured(self):
        events = _server(self.ctx.runtime_events)
        return any(e.name == "system-ready" for e in events)

    def _derive(self, path, purpose, algorithm):
        app_k256, k256_signature = self._k256()
        key, chain0 = kdf.get_key(app_k256, path, purpose, algorithm)
        return key, [chain0, k256_signature]

    def _quote(self, report_data):
        """(quote, event log JSON text, padded report_data) from the TEE."""
        padded = tdx_quote.pad_report_data(report_data)
        quote, event_log = _server(self.ctx.quote, padded)
        return quote, event_log, padded

    def _attestation(self, report_data):
        quote, event_log, padded = self._quote(report_data)
        return app_certs.attestation_document(self.ctx.attestation_mode, quote, event_log, padded,
                                              _server(self.ctx.vm_config))

    def _issue(self, key, params, subject):
        """[leaf, app CA, root CA] for `key`, from the context's certificate signer."""
        signer = self.ctx.cert_signer
        if signer is None:
            raise NotReady("no certificate signer: this agent has no KMS (or local CA) to sign certificates")
        options = app_certs.leaf_options(params, server_auth_default=False)
        alt_names = options["alt_names"]
        app_certs.param_flag(params, "with_app_info")  # accepted (dstack OS >= 0.5.7); the leaf always carries the app id
        csr = _csr_pem(key, subject, alt_names)
        if app_certs.param_flag(params, "usage_ra_tls"):
            if not _embeds_attestation(signer):
                raise ServerFailure("usage_ra_tls: this agent's certificate signer cannot embed an attestation yet", status=501)
            options["attestation"] = self._attestation(ratls_report_data(key.public_key()))
        try:
            return list(signer.sign(csr, **options))
        except DstackError as exc:
            raise ServerFailure(f"the certificate signer failed: {exc}", status=502) from None

    def _app_cert_now(self):
        """Info's app_cert: a client certificate from the signer, made once in the background (as
        dstack's demo cert), so a slow KMS never makes Info slow; "" until it is there."""
        if self.ctx.cert_signer is None:
            return ""
        with self._app_cert_lock:
            if not self._app_cert and self._app_cert_thread is None and time.monotonic() >= self._app_cert_next_try:
                self._app_cert_thread = threading.Thread(target=self._make_app_cert, name="app-cert", daemon=True)
                self._app_cert_thread.start()
            thread = self._app_cert_thread
        if thread is not None:
            thread.join(APP_CERT_WAIT_SECONDS)
        return self._app_cert

    def _make_app_cert(self):
        try:
            key = ec.generate_private_key(ec.SECP256R1())
            chain = self.ctx.cert_signer.sign(_csr_pem(key, "demo-cert"), usage_server_auth=False, usage_client_auth=True)
            cert = "\n".join(chain)
        except (DstackError, OSError, ValueError) as exc:
            log.warning("could not get the app certificate (retrying in %d s): %s", APP_CERT_RETRY_SECONDS, exc)
            cert = ""
        with self._app_cert_lock:
            self._app_cert = cert
            self._app_cert_thread = None
            self._app_cert_next_try = time.monotonic() + APP_CERT_RETRY_SECONDS

    # -- DstackGuest --

    def get_quote(self, params):
        quote, event_log, padded = self._quote(_hex(params, "report_data"))
        return {"quote": quote.hex(), "event_log": event_log, "report_data": padded.hex(),
                "vm_config": _server(self.ctx.vm_config)}

    def attest(self, params):
        return {"attestation": self._attestation(_hex(params, "report_data")).hex()}

    def get_key(self, params):
        path, purpose = _text(params, "path"), _text(params, "purpose")
        key, chain = self._derive(path, purpose, _key_algorithm(params))
        return {"key": key.hex(), "signature_chain": [s.hex() for s in chain]}

    def get_tls_key(self, params):
        key = ec.generate_private_key(ec.SECP256R1())
        chain = self._issue(key, params, _text(params, "subject"))
        return {"key": _key_pem(key), "certificate_chain": chain}

    def info(self, params):  # pylint: disable=unused-argument
        quote, event_log = self._quote(b"")[:2]
        report = _server(tdx_quote.parse_quote, quote).report
        try:
            boot_log = eventlog.read_boot_log(event_log)
        except DstackError as exc:
            log.warning("Info: the event log has no usable boot events: %s", exc)
            boot_log = None
        ppid = getattr(self.ctx.provider, "ppid", None)  # the simulator knows its PPID; real TDX needs the PCK cert
        boot = attestation.boot_info_from(report, boot_log, ppid, "", [], self.ctx.attestation_mode)
        compose_bytes = _server(self.ctx.app_compose_bytes)
        app = _server(compose.parse, compose_bytes)
        vm_config = _server(self.ctx.vm_config)
        instance = _server(self.ctx.instance)
        compose_hash = boot["compose_hash"] or hashlib.sha256(compose_bytes).hexdigest()
        app_id = boot["app_id"] or instance.get("app_id") or compose.app_id_for(compose_hash)
        os_image_hash = boot["os_image_hash"] or _json_field(vm_config, "os_image_hash")
        tcb_info = {"mrtd": report.mr_td.hex(), **{f"rtmr{i}": report.rtmrs[i].hex() for i in range(4)},
                    "mr_aggregated": boot["mr_aggregated"], "os_image_hash": os_image_hash,
                    "compose_hash": compose_hash, "device_id": boot["device_id"],
                    "event_log": json.loads(event_log), "app_compose": compose_bytes.decode("utf-8", "replace")}
        return {"app_id": app_id, "instance_id": boot["instance_id"] or instance.get("instance_id", ""),
                "app_cert": self._app_cert_now(), "tcb_info": json.dumps(tcb_info, indent=2),
                "app_name": str(app.get("name", "")), "device_id": boot["device_id"],
                "mr_aggregated": boot["mr_aggregated"], "os_image_hash": os_image_hash,
                "key_provider_info": boot["key_provider"], "compose_hash": compose_hash, "vm_config": vm_config,
                "cloud_vendor": "", "cloud_product": ""}

    def emit_event(self, params):
        event, payload = _text(params, "event"), _hex(params, "payload")
        if not event:
            raise DstackError("event", "must be a non-empty name")
        if len(event) > MAX_NAME_LENGTH:
            raise DstackError("event", f"is {len(event)} characters; at most {MAX_NAME_LENGTH} are allowed")
        if event in eventlog.RESERVED_EVENTS:
            # The boot's names state the CVM's identity: an app must not be able to measure them.
            raise DstackError("event", f"{event!r} is a name the boot measures; an app event needs another name")
        if not self._measured():
            # Before system-ready an app event could pose as a boot event (app-id, compose-hash, ...).
            raise NotReady("EmitEvent: the boot has not finished measuring (no system-ready event yet)")
        _server(self.ctx.emit_event, event, payload)
        return {}

    def sign(self, params):
        algorithm, data = _sign_algorithm(params), _hex(params, "data")
        key, chain = self._derive("vms", "signing", KEY_ALGORITHMS[algorithm])
        signature, public_key = sign_data(algorithm, key, data)
        return {"signature": signature.hex(), "signature_chain": [signature.hex()] + [s.hex() for s in chain],
                "public_key": public_key.hex()}

    def verify(self, params):
        algorithm = _sign_algorithm(params)
        valid = verify_data(algorithm, _hex(params, "data"), _hex(params, "signature"), _hex(params, "public_key"))
        return {"valid": valid}

    def version(self, params):  # pylint: disable=unused-argument
        return {"version": VERSION, "rev": REV}

    # -- Tappd (legacy) --

    def tdx_quote(self, params, raw=False):
        algorithm = "raw" if raw else (_text(params, "hash_algorithm") or DEFAULT_TAPPD_HASH)
        prefix = "" if algorithm == "raw" else (_text(params, "prefix") or DEFAULT_TAPPD_PREFIX)
        quote, event_log, padded = self._quote(tappd_report_data(_hex(params, "report_data"), algorithm, prefix))
        return {"quote": quote.hex(), "event_log": event_log, "hash_algorithm": algorithm, "prefix": prefix,
                "report_data": padded.hex()}

    def raw_quote(self, params):
        return self.tdx_quote(params, raw=True)

    def derive_key(self, params):
        path = _text(params, "path")
        seed = secrets.token_bytes(32) if app_certs.param_flag(params, "random_seed") else self._k256()[0]
        key = kdf.derive_p256(seed, [path.encode("utf-8")])
        chain = self._issue(key, params, _text(params, "subject"))
        return {"key": _key_pem(key), "certificate_chain": chain}

    def derive_k256_key(self, params):
        key, chain = self._derive(_text(params, "path"), _text(params, "purpose"), _key_algorithm(params))
        return {"k256_key": key.hex(), "k256_signature_chain": [s.hex() for s in chain]}


def _embeds_attestation(signer):
    """Whether signer.sign() takes attestation=bytes for the RA-TLS extension (LocalCertSigner and
    KmsCertSigner do; another signer says so with an `embeds_attestation` attribute)."""
    return bool(getattr(signer, "embeds_attestation", isinstance(signer, LocalCertSigner)))


def _json_field(text, name):
    try:
        value = json.loads(text).get(name, "") if text else ""
    except (ValueError, AttributeError):
        return ""
    return value if isinstance(value, str) else ""


DSTACK_GUEST_METHODS = {
    "GetQuote": GuestApi.get_quote, "Attest": GuestApi.attest, "GetKey": GuestApi.get_key,
    "GetTlsKey": GuestApi.get_tls_key, "Info": GuestApi.info, "EmitEvent": GuestApi.emit_event,
    "Sign": GuestApi.sign, "Verify": GuestApi.verify, "Version": GuestApi.version,
}
TAPPD_METHODS = {
    "TdxQuote": GuestApi.tdx_quote, "RawQuote": GuestApi.raw_quote, "DeriveKey": GuestApi.derive_key,
    "DeriveK256Key": GuestApi.derive_k256_key, "Info": GuestApi.info, "Version": GuestApi.version,
}


def install_errors(app):
    """The guest agent's JSON errors (wsgi.install_json_errors, plus 503 not ready and the TEE's or the
    signer's failures); the socket API and the public Worker (agents/guest/worker.py) share them."""
    install_json_errors(app, log, {NotReady: 503, ServerFailure: lambda exc: exc.status})


def create_app(context, config=None):
    """The guest agent's Flask app over a GuestContext. config: {"max_request_bytes": int} (optional)."""
    # Flask only where an app is made: the boot imports this module for GuestApi, and Flask's
    # imports (0.1-0.2 s of CPU) would come before the boot's first step.
    from flask import Flask  # pylint: disable=import-outside-toplevel
    config = config or {}
    app = Flask("dstack-guest-agent")
    app.config["MAX_CONTENT_LENGTH"] = int(config.get("max_request_bytes") or MAX_REQUEST_BYTES)
    api = GuestApi(context)
    app.extensions["dstack_guest"] = api

    def bound(methods):
        return {name: functools.partial(method, api) for name, method in methods.items()}

    add_prpc_routes(app, "/", bound(DSTACK_GUEST_METHODS), list_fields=LIST_FIELDS)
    add_prpc_routes(app, "/prpc/Tappd.", bound(TAPPD_METHODS), endpoint_prefix="Tappd.", list_fields=LIST_FIELDS)
    install_errors(app)
    return app
