# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one verifier for every quote, real or simulated (dstack-reference 7.3 and 7.4).

verify_quote() runs every check and returns a Verification: each check with its result, and the
boot info a KMS or an auth backend decides on. The DCAP part (quote signature, QE report, PCK
chain, CRLs, TCB info and QE identity, dates) is dcap-qvl's; the trust root defaults to Intel's
SGX Root CA and is the simulator's only when a caller passes it explicitly. On top of it: TCB
status and advisory policy, debug TDs refused, optional expected report_data, the event log
replayed against RTMR3 (and RTMR0-2 where the log has their events), identity events unique.
"""

import hashlib
import json
import os
import time
from dataclasses import dataclass, field

from ansible_collections.dstack.tee.plugins.module_utils import eventlog, json_limits, tdx_quote
from ansible_collections.dstack.tee.plugins.module_utils.tdx_quote import pad_report_data
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError, parse_hex
from ansible_collections.dstack.tee.plugins.module_utils.fileio import atomic_write, read_bytes, read_text
from ansible_collections.dstack.tee.plugins.module_utils.intel_root_ca import (
    INTEL_SGX_ROOT_CA_PEM, INTEL_SGX_ROOT_CA_SHA256)

try:
    import dcap_qvl
except ImportError:  # reported by callers through HAS_DCAP_QVL
    HAS_DCAP_QVL = False
else:
    HAS_DCAP_QVL = True

try:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
except ImportError:
    HAS_CRYPTOGRAPHY = False
else:
    HAS_CRYPTOGRAPHY = True

MODE_TDX = "dstack-tdx"
MODE_SIM = "dstack-sim"


@dataclass
class Policy:
    """What a verifier accepts beyond a valid DCAP chain.

    The defaults fail closed: only UpToDate, no advisories, no simulated root. Debug TDs are
    always refused (so is the host's view of their memory).
    """
    allowed_tcb_statuses: tuple = ("UpToDate",)
    allowed_advisory_ids: tuple = ()
    expected_report_data: bytes = None
    require_event_log: bool = False


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""
    skipped: bool = False

    def to_dict(self):
        out = {"name": self.name, "ok": self.ok, "detail": self.detail}
        if self.skipped:
            out["skipped"] = True
        return out


@dataclass
class Verification:
    """The outcome: every check made, and what the quote and event log say (the boot info)."""
    checks: list = field(default_factory=list)
    attestation_mode: str = ""
    tcb_status: str = ""
    advisory_ids: list = field(default_factory=list)
    quote: object = None
    boot_info: dict = field(default_factory=dict)

    @property
    def ok(self):
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def failures(self):
        return [c for c in self.checks if not c.ok]

    def add(self, name, ok, detail="", skipped=False):
        self.checks.append(Check(name, bool(ok), detail, skipped))
        return ok

    def raise_for_failure(self):
        """Raise DstackError naming the first failed check (for callers that only want yes or no)."""
        if not self.ok:
            first = self.failures[0] if self.failures else Check("verification", False, "no check ran")
            raise DstackError(first.name, first.detail or "failed")
        return self

    def to_dict(self):
        report = self.quote.report.to_dict() if self.quote else {}
        return {"ok": self.ok, "attestation_mode": self.attestation_mode, "tcb_status": self.tcb_status,
                "advisory_ids": list(self.advisory_ids), "boot_info": self.boot_info,
                "report": report, "checks": [c.to_dict() for c in self.checks]}


# ---- quotes as given ---------------------------------------------------------------------------

def read_quote_input(data, field):
    """(quote bytes, event_log or None) from raw bytes, hex text, or a guest agent's GetQuote
    response JSON ({"quote": hex, "event_log": ...}); `field` names the input in errors
    (dstack-verify's QUOTE_FILE, an acme-info entry's quote for dstack-ct-monitor)."""
    text = data.strip()
    if text[:1] == b"{":
        doc = json_limits.loads(text, field, hint=" (it looks like a GetQuote response)")
        if not isinstance(doc, dict) or "quote" not in doc:
            raise DstackError(field, "is JSON without a \"quote\" field (expected a GetQuote response)")
        return parse_hex(doc["quote"], f"{field}.quote"), doc.get("event_log") or None
    try:
        decoded = text.decode("ascii")
    except UnicodeDecodeError:
        return data, None
    if decoded and all(c in "0123456789abcdefABCDEFx" for c in decoded):
        return parse_hex(decoded, field), None
    return data, None


# ---- trust roots ------------------------------------------------------------------------------

def intel_root_ca_der():
    return x509.load_pem_x509_certificate(INTEL_SGX_ROOT_CA_PEM).public_bytes(serialization.Encoding.DER)


def load_root_ca(data):
    """DER bytes of a root CA certificate given as PEM or DER bytes."""
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data).public_bytes(serialization.Encoding.DER)
        return x509.load_der_x509_certificate(data).public_bytes(serialization.Encoding.DER)
    except ValueError:
        raise DstackError("root_ca", "is not a PEM or DER certificate") from None


def attestation_mode_for(root_ca_der):
    return MODE_TDX if hashlib.sha256(root_ca_der).hexdigest() == INTEL_SGX_ROOT_CA_SHA256 else MODE_SIM


# ---- collateral -------------------------------------------------------------------------------

def load_collateral(source):
    """A dcap_qvl QuoteCollateralV3 from a dict, a JSON string, or a path to a JSON file."""
    if isinstance(source, dict):
        text = json.dumps(source)
    elif isinstance(source, str) and source.lstrip().startswith("{"):
        text = source
    else:
        text = read_text(source, "collateral")
    try:
        fields = json.loads(text)
        # Collateral may carry a PCK chain, which dcap-qvl would then verify instead of the quote's
        # own: the quote's bytes would no longer be what is verified (tdx_quote.quote_identity).
        if isinstance(fields, dict):
            fields.pop("pck_certificate_chain", None)
        return dcap_qvl.QuoteCollateralV3.from_json(json.dumps(fields))
    except (ValueError, TypeError) as exc:
        raise DstackError("collateral", f"is not DCAP collateral JSON: {exc}") from None


def _next_update(collateral_json):
    """The earliest nextUpdate of the TCB info and QE identity (Unix seconds), or 0 if unknown."""
    import datetime  # pylint: disable=import-outside-toplevel
    times = []
    for key in ("tcb_info", "qe_identity"):
        try:
            doc = json.loads(collateral_json[key])
            stamp = doc["nextUpdate"].replace("Z", "+00:00")
            times.append(datetime.datetime.fromisoformat(stamp).timestamp())
        except (KeyError, ValueError, TypeError):
            return 0
    return min(times)


def _dcap_get_collateral(pccs_url, raw_quote):
    """dcap-qvl's PCCS fetch (async: its future is made on a running loop, so it is called in one).

    The answer comes from one of dcap-qvl's tokio threads: it takes the GIL and calls the loop's
    call_soon_threadsafe, whose self-pipe write lets the GIL go until the write returns. The loop
    may resolve the future in that moment, and a process that then exits finalizes Python while
    the tokio thread waits for the GIL: that thread is ended inside Rust code (a segfault). So the
    fetch returns only once that call has returned into the tokio thread.
    """
    import asyncio  # pylint: disable=import-outside-toplevel
    import threading  # pylint: disable=import-outside-toplevel

    handed_over = threading.Event()
    caller = threading.get_ident()

    class Loop(asyncio.SelectorEventLoop):
        def call_soon_threadsafe(self, *args, **kwargs):
            try:
                return super().call_soon_threadsafe(*args, **kwargs)
            finally:
                if threading.get_ident() != caller:
                    handed_over.set()

    spawned = []

    async def fetch():
        pending = dcap_qvl.get_collateral(pccs_url, raw_quote)
        spawned.append(pending)  # from here on a tokio thread answers
        return await pending

    loop = Loop()
    try:
        return loop.run_until_complete(fetch())
    finally:
        if spawned:
            handed_over.wait(10)
        loop.close()


class CollateralCache:
    """Collateral from a PCCS, cached per FMSPC (and CA) in a folder until its nextUpdate.

    Only collateral that verifies the quote it was fetched for under root_ca_der (the verifier's
    trust root; Intel's when None) is kept: one tampered or broken answer would otherwise be
    served from the cache, failing every quote of that FMSPC, until its nextUpdate.
    """

    def __init__(self, cache_dir, pccs_url, fetch=None, root_ca_der=None):
        self.cache_dir = cache_dir
        self.pccs_url = pccs_url
        self.root_ca_der = root_ca_der
        self._fetch = fetch or self._fetch_pccs

    def _fetch_pccs(self, raw_quote):
        try:
            return json.loads(_dcap_get_collateral(self.pccs_url, bytes(raw_quote)).to_json())
        except (ValueError, RuntimeError, OSError) as exc:
            raise DstackError("pccs_url", f"could not fetch collateral from {self.pccs_url}: {exc}") from None

    def get(self, raw_quote, now=None):
        now = time.time() if now is None else now
        parsed = dcap_qvl.parse_quote(raw_quote)
        path = os.path.join(self.cache_dir, f"{parsed.fmspc().lower()}-{parsed.ca()}.json")
        try:
            with open(path, encoding="utf-8") as handle:
                cached = json.load(handle)
            if now < _next_update(cached):
                return cached
        except (OSError, ValueError):
            pass
        fresh = self._fetch(raw_quote)
        try:
            dcap_claims(raw_quote, fresh, self.root_ca_der, now)
        except (DstackError, ValueError, RuntimeError):
            return fresh  # not kept; the verifier names what is wrong with it
        os.makedirs(self.cache_dir, exist_ok=True)
        atomic_write(path, json.dumps(fresh).encode(), mode=0o644)
        return fresh


class QuoteTrust:
    """What a service that verifies quotes trusts (the KMS, the gateway): its trust root, its
    collateral source and its TCB policy, from one set of settings (the KMS's keys):

        mode                  "production" (Intel's SGX Root CA only) or "simulation"
        sim_state_dir         simulation: the simulator whose root and collateral to use
        root_ca               simulation: a root CA file instead
        collateral            a collateral file (QuoteCollateralV3 JSON)
        pccs_url              or a PCCS, cached per FMSPC in collateral_cache_dir (default
                              state_dir/collateral)
        allowed_tcb_statuses, allowed_advisory_ids
    `field` prefixes the setting names in errors ("attestation." for the gateway's table).
    """

    SIM_COLLATERAL_REFRESH = 3600

    def __init__(self, settings, state_dir, field=""):
        import threading  # pylint: disable=import-outside-toplevel
        self.settings = settings
        self.state_dir = state_dir
        self.field = field
        self.mode = settings.get("mode", "production")
        self.allowed_tcb_statuses = tuple(settings.get("allowed_tcb_statuses") or ("UpToDate",))
        self.allowed_advisory_ids = tuple(settings.get("allowed_advisory_ids") or ())
        self._sim = None
        self._collateral = None
        self._collateral_at = 0
        self._lock = threading.Lock()
        self.root_ca_der = self._trust_root()

    def _trust_root(self):
        settings, field = self.settings, self.field
        if self.mode == "production":
            if settings.get("sim_state_dir") or settings.get("root_ca"):
                raise DstackError(f"{field}mode", "production trusts Intel's SGX Root CA only: remove sim_state_dir "
                                                  "and root_ca")
            return intel_root_ca_der()
        if settings.get("sim_state_dir"):
            from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx  # pylint: disable=import-outside-toplevel
            self._sim = SimTdx(settings["sim_state_dir"])
            return self._sim.root_ca_der
        if settings.get("root_ca"):
            return load_root_ca(read_bytes(settings["root_ca"], f"{field}root_ca"))
        raise DstackError(f"{field}sim_state_dir", "simulation mode needs the simulator's state directory (or root_ca)")

    @property
    def attestation_mode(self):
        return attestation_mode_for(self.root_ca_der)

    def collateral(self, raw_quote):
        """The collateral for this quote: the simulator's (made again hourly), a file's, or a PCCS's."""
        if self._sim is not None:
            with self._lock:
                now = time.time()
                if self._collateral is None or now - self._collateral_at > self.SIM_COLLATERAL_REFRESH:
                    self._collateral = load_collateral(self._sim.collateral_json())
                    self._collateral_at = now
                return self._collateral
        if self.settings.get("collateral"):
            return self.settings["collateral"]
        if self.settings.get("pccs_url"):
            cache = CollateralCache(self.settings.get("collateral_cache_dir")
                                    or os.path.join(self.state_dir, "collateral"), self.settings["pccs_url"],
                                    root_ca_der=self.root_ca_der)
            return cache.get(raw_quote)
        raise DstackError(f"{self.field}collateral", "no collateral source: set collateral (a file) or pccs_url")

    def verify(self, raw_quote, event_log, expected_report_data, collateral=None):
        """verify_quote under this trust, report_data and the event log required."""
        policy = Policy(allowed_tcb_statuses=self.allowed_tcb_statuses, allowed_advisory_ids=self.allowed_advisory_ids,
                        expected_report_data=expected_report_data, require_event_log=True)
        return verify_quote(raw_quote, collateral if collateral is not None else self.collateral(raw_quote),
                            self.root_ca_der, policy, event_log)


def module_trust_argument_spec():
    """The options of the modules that verify quotes (verify_quote, verify_app), documented once in
    the doc fragment dstack.tee.quote_trust."""
    return dict(collateral=dict(type="path"), sim_state_dir=dict(type="path"),
                allowed_tcb_statuses=dict(type="list", elements="str", default=["UpToDate"]))


class ModuleTrust(QuoteTrust):
    """A QuoteTrust from those options: the simulator's root with sim_state_dir (the simulated
    default only), else Intel's SGX Root CA; the collateral file when one is given, else the
    simulator's."""

    def __init__(self, sim_state_dir=None, collateral=None, allowed_tcb_statuses=("UpToDate",)):
        if not sim_state_dir and not collateral:
            raise DstackError("collateral", "is required (a DCAP collateral JSON file) unless sim_state_dir "
                                            "names the simulated TDX to trust")
        if sim_state_dir:
            from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx  # pylint: disable=import-outside-toplevel
            SimTdx.existing(sim_state_dir)  # a verifier trusts an existing simulated TDX, never makes one
        super().__init__({"mode": "simulation" if sim_state_dir else "production", "sim_state_dir": sim_state_dir,
                          "collateral": collateral, "allowed_tcb_statuses": allowed_tcb_statuses}, "")

    def collateral(self, raw_quote):
        return self.settings["collateral"] or super().collateral(raw_quote)


# ---- the verifier -----------------------------------------------------------------------------

def measured_kms(boot_info, key_provider_id):
    """Whether the boot measured, before boot-mr-done, the KMS whose root CA key is key_provider_id
    (hex SPKI, app_certs.key_provider_id) as its key provider: {"name": "kms", "id": that}."""
    try:
        provider = json_limits.loads(bytes.fromhex(boot_info.get("key_provider_info", "")) or b"null", "key_provider")
    except (DstackError, ValueError):  # not hex, or not JSON within the depth limit
        return False
    return isinstance(provider, dict) and provider.get("name") == "kms" \
        and str(provider.get("id", "")).lower() == key_provider_id


def boot_info_from(report, boot_log, ppid, tcb_status, advisory_ids, mode):
    """The boot info of dstack-reference 7.4, from a verified TD report and its RTMR3 events read by
    eventlog.read_boot_log (identity from before boot-mr-done only; None: no event log)."""
    boot_log = boot_log or eventlog.BootLog()
    key_provider = boot_log.identity.get("key-provider")
    mr_key_provider = hashlib.sha256(key_provider).digest() if key_provider is not None else bytes(32)
    aggregated = report.mr_td + report.rtmr0 + report.rtmr1 + report.rtmr2 + report.rtmr3
    extra = report.mr_config_id + report.mr_owner + report.mr_owner_config
    if any(extra):
        aggregated += extra
    mr_kms = next((e.payload for e in boot_log.events if e.name == "mr-kms"), b"")
    return {
        "attestation_mode": mode,
        "app_id": boot_log.get("app-id").hex(),
        "compose_hash": boot_log.get("compose-hash").hex(),
        "instance_id": boot_log.get("instance-id").hex(),
        "device_id": hashlib.sha256(ppid or b"").hexdigest(),
        "mr_aggregated": hashlib.sha256(aggregated).hexdigest(),
        "mr_system": hashlib.sha256(report.mr_td + report.rtmr0 + report.rtmr1 + report.rtmr2
                                    + mr_key_provider).hexdigest(),
        "mrtd": report.mr_td.hex(),
        "rtmr0": report.rtmr0.hex(),
        "rtmr1": report.rtmr1.hex(),
        "rtmr2": report.rtmr2.hex(),
        "os_image_hash": boot_log.get("os-image-hash").hex(),
        "key_provider_info": (key_provider or b"").hex(),
        "key_provider": (key_provider or b"").decode("utf-8", "replace"),
        "mr_kms": mr_kms.hex(),
        "tcb_status": tcb_status,
        "advisory_ids": list(advisory_ids),
    }


def dcap_claims(raw_quote, collateral, root_ca_der, now):
    """dcap-qvl's verification (quote signature, QE report, PCK chain to root_ca_der or Intel's
    root, CRLs, TCB info and QE identity, dates) and its claims; raises ValueError or RuntimeError
    (dcap-qvl's) or DstackError (collateral that is not collateral)."""
    if not isinstance(collateral, dcap_qvl.QuoteCollateralV3):
        collateral = load_collateral(collateral)  # drops a PCK chain: the quote's own is the one verified
    now = int(now)
    root = root_ca_der if root_ca_der is not None else intel_root_ca_der()
    return json.loads(dcap_qvl.QuoteVerifier(root_ca_der=root).verify_with_policy(
        bytes(raw_quote), collateral, now, dcap_qvl.QuotePolicy.claims_only(now)).to_json())


def dcap_verdict(raw_quote, collateral, root_ca_der, now):
    """(TCB status, advisory ids, PPID bytes) of a quote dcap-qvl verifies; raises as dcap_claims.

    A quote the bare verifier (dcap_qvl.verify_with_root_ca, the same checks) accepts needs no
    claims document: building it and its JSON cost a fifth as much again as the verification, on
    every key release. When the bare verifier refuses, dcap_claims decides (its claims-only policy
    accepts what the bare one may refuse, such as a debug TD, which verify_quote refuses by name),
    so a refusal and its message are the claims path's."""
    if not isinstance(collateral, dcap_qvl.QuoteCollateralV3):
        collateral = load_collateral(collateral)
    root = root_ca_der if root_ca_der is not None else intel_root_ca_der()
    try:
        report = dcap_qvl.verify_with_root_ca(bytes(raw_quote), collateral, root, int(now))
    except (ValueError, RuntimeError):
        pass
    else:
        return report.status, list(report.advisory_ids or []), bytes(report.ppid or b"")
    claims = dcap_claims(raw_quote, collateral, root_ca_der, now)
    tcb = claims.get("tcb", {})
    return (tcb.get("status", ""), list(tcb.get("advisory_ids") or []),
            bytes(claims.get("platform", {}).get("pck", {}).get("ppid") or []))


def verify_quote(raw_quote, collateral, root_ca_der=None, policy=None, event_log=None, now=None):
    """Verify a quote and return a Verification with every check. Never raises on a bad quote.

    collateral: a dict, JSON text, file path (read by load_collateral, which drops a PCK chain in
    it: the quote's own chain is the one verified), or a QuoteCollateralV3 made by load_collateral. root_ca_der:
    the trust root (Intel's SGX Root CA when None). event_log: GetQuote's event_log (JSON
    text or list), or None.
    """
    policy = policy or Policy()
    now = int(time.time() if now is None else now)
    result = Verification()
    root = root_ca_der if root_ca_der is not None else intel_root_ca_der()
    result.attestation_mode = attestation_mode_for(root)

    try:
        quote = tdx_quote.parse_quote(raw_quote)
    except DstackError as exc:
        result.add("quote_format", False, exc.reason)
        return result
    result.quote = quote
    result.add("quote_format", True, f"TDX quote v{quote.header.version}, {len(raw_quote)} bytes")
    # Refused before anything else, by name (dcap-qvl refuses debug TDs too, less plainly).
    result.add("debug", not quote.report.debug,
               "debug TD (td_attributes bit 0 set): the host can read its memory" if quote.report.debug
               else "not a debug TD")

    try:
        result.tcb_status, result.advisory_ids, ppid = dcap_verdict(raw_quote, collateral, root, now)
    except DstackError as exc:
        result.add("dcap", False, str(exc))
        return result
    except (ValueError, RuntimeError) as exc:
        result.add("dcap", False, f"{exc} (trust root: {result.attestation_mode} "
                                  f"{hashlib.sha256(root).hexdigest()[:16]}..., time {now})")
        return result
    result.add("dcap", True, "quote signature, QE report, PCK chain to the trust root, CRLs, "
                             "TCB info and QE identity verified by dcap-qvl")

    result.add("tcb_status", result.tcb_status in policy.allowed_tcb_statuses,
               f"{result.tcb_status} (allowed: {', '.join(policy.allowed_tcb_statuses)})")
    refused = [a for a in result.advisory_ids if a not in policy.allowed_advisory_ids]
    result.add("advisory_ids", not refused,
               f"not allowed: {', '.join(refused)}" if refused else
               (f"allowed: {', '.join(result.advisory_ids)}" if result.advisory_ids else "none"))
    if policy.expected_report_data is not None:
        expected = pad_report_data(policy.expected_report_data)
        result.add("report_data", quote.report.report_data == expected,
                   "matches" if quote.report.report_data == expected else "differs from the expected value")

    boot_log = None
    if event_log is None:
        result.add("event_log", not policy.require_event_log,
                   "no event log given: RTMR3 not replayed, no boot info from events", skipped=True)
    else:
        try:
            entries = eventlog.parse_event_log(event_log)
            replayed = eventlog.replay_event_log(entries)
            boot_log = eventlog.read_boot_log(entries)
        except DstackError as exc:
            result.add("event_log", False, str(exc))
        else:
            result.add("event_log", True, f"{len(boot_log.events)} boot events up to "
                                          f"{boot_log.events[-1].name if boot_log.events else '(none)'}, "
                                          f"{len(boot_log.app_events)} app events; identity from before "
                                          f"boot-mr-done" + ("" if boot_log.sealed else " (none: no boot-mr-done)"))
            logged = {e["imr"] for e in entries} | {3}
            replays = True
            for imr, rtmr in enumerate(quote.report.rtmrs):
                if imr not in logged:
                    continue
                ok = replayed[imr] == rtmr
                replays = result.add(f"rtmr{imr}_replay", ok, "the event log replays to the quote's RTMR%d" % imr
                                     if ok else f"the event log replays to {replayed[imr].hex()[:16]}..., "
                                                f"the quote has {rtmr.hex()[:16]}...") and replays
            if not replays:
                boot_log = None  # a log that does not replay says nothing about this boot
    result.boot_info = boot_info_from(quote.report, boot_log, ppid, result.tcb_status, result.advisory_ids,
                                      result.attestation_mode)
    return result


# The Worker's public attestation (Worker.Attest on port 8090): anyone may ask, so the caller's nonce
# is hashed under this label; a caller can never choose the report_data of another use (RA-TLS
# certificates, GetQuote, the KMS's nonces).
WORKER_ATTEST_LABEL = b"dstack.tee-worker-attest:"
WORKER_NONCE_MIN, WORKER_NONCE_MAX = 16, 64


def worker_report_data(nonce):
    """The 64-byte report_data of Worker.Attest for a caller's nonce (bytes, 16 to 64 of them)."""
    if not isinstance(nonce, (bytes, bytearray)) or not WORKER_NONCE_MIN <= len(nonce) <= WORKER_NONCE_MAX:
        raise DstackError("nonce", f"must be {WORKER_NONCE_MIN} to {WORKER_NONCE_MAX} bytes (hex)")
    return hashlib.sha512(WORKER_ATTEST_LABEL + bytes(nonce)).digest()
