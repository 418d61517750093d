# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Auth backends: who may get keys. Every backend fails closed: any error is a refusal.

local     an auth-simple-compatible JSON allowlist (dstack-reference 5.3), re-read when it changes
webhook   dstack's bootAuth protocol: POST <url>/bootAuth/app (or /bootAuth/kms) with the boot info
ethereum  DstackKms.isAppAllowed (or isKmsAllowed) through web3, cached per block

Each backend answers two questions: is_app_allowed (an app's CVM asks for its keys) and
is_kms_allowed (a KMS replica asks for the root keys to onboard, KMS.GetKmsKey).
"""

import json
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from ansible_collections.dstack.tee.plugins.module_utils import json_limits
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.fileio import read_bytes

BACKENDS = ("local", "webhook", "ethereum")


@dataclass
class Decision:
    allowed: bool
    reason: str = ""
    gateway_app_id: str = ""


def webhook_body(boot_info):
    """The bootAuth request body: exactly the reference's camelCase fields, hex without 0x."""
    return {
        "attestationMode": boot_info.get("attestation_mode", ""),
        "mrAggregated": boot_info.get("mr_aggregated", ""),
        "osImageHash": boot_info.get("os_image_hash", ""),
        "mrSystem": boot_info.get("mr_system", ""),
        "appId": boot_info.get("app_id", ""),
        "composeHash": boot_info.get("compose_hash", ""),
        "instanceId": boot_info.get("instance_id", ""),
        "deviceId": boot_info.get("device_id", ""),
        "keyProviderInfo": boot_info.get("key_provider_info", ""),
        "tcbStatus": boot_info.get("tcb_status", ""),
        "advisoryIds": list(boot_info.get("advisory_ids", [])),
    }


def _hex0x(value):
    text = str(value or "").lower()
    return text if text.startswith("0x") else "0x" + text


class LocalAllowlist:
    """auth-simple's rules over its auth-config.json, re-read whenever the file changes."""
    asks_the_network = False  # the KMS answers on its event loop only when no backend call waits on the network

    def __init__(self, path):
        self.path = path
        self._lock = threading.Lock()
        self._stamp = None
        self._config = None

    def _load(self):
        try:
            stat = os.stat(self.path)
        except OSError as exc:
            raise DstackError("auth.local", f"cannot read the allowlist {self.path}: {exc.strerror}") from None
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        with self._lock:
            if stamp != self._stamp:
                data = read_bytes(self.path, "auth.local")
                try:
                    config = json.loads(data)
                except ValueError as exc:
                    raise DstackError("auth.local", f"the allowlist {self.path} is not valid JSON: {exc}") from None
                if not isinstance(config, dict):
                    raise DstackError("auth.local", "the allowlist must be a JSON object")
                self._config, self._stamp = config, stamp
            return self._config

    def _platform(self, config, boot_info):
        """auth-simple's checks common to apps and KMSs: the reason to refuse, or None."""
        if boot_info.get("tcb_status") != "UpToDate":
            return f"TCB status {boot_info.get('tcb_status')!r} is not UpToDate"
        os_images = {_hex0x(h) for h in config.get("osImages", [])}
        if _hex0x(boot_info.get("os_image_hash")) not in os_images:
            return "OS image is not allowed"
        return None

    def is_kms_allowed(self, boot_info):
        config = self._load()
        refused = self._platform(config, boot_info)
        if refused:
            return Decision(False, refused)
        kms = config.get("kms") or {}
        # An empty mrAggregated list allows no KMS at all (auth-simple's rule): onboarding is opt-in.
        if _hex0x(boot_info.get("mr_aggregated")) not in {_hex0x(m) for m in kms.get("mrAggregated", [])}:
            return Decision(False, "KMS aggregated MR is not allowed")
        devices = {_hex0x(d) for d in kms.get("devices", [])}
        if not kms.get("allowAnyDevice") and devices and _hex0x(boot_info.get("device_id")) not in devices:
            return Decision(False, "KMS device is not allowed")
        return Decision(True, "")

    def is_app_allowed(self, boot_info):
        config = self._load()
        gateway = str(config.get("gatewayAppId", ""))
        refused = self._platform(config, boot_info)
        if refused:
            return Decision(False, refused, gateway)
        apps = {_hex0x(k): v for k, v in (config.get("apps") or {}).items()}
        app = apps.get(_hex0x(boot_info.get("app_id")))
        if not isinstance(app, dict):
            return Decision(False, "app not registered", gateway)
        if _hex0x(boot_info.get("compose_hash")) not in {_hex0x(h) for h in app.get("composeHashes", [])}:
            return Decision(False, "compose hash not allowed", gateway)
        devices = {_hex0x(d) for d in app.get("devices", [])}
        if not app.get("allowAnyDevice") and devices and _hex0x(boot_info.get("device_id")) not in devices:
            return Decision(False, "device not allowed", gateway)
        return Decision(True, "", gateway)


class Webhook:
    """dstack's bootAuth webhook; timeouts, errors and anything but {"isAllowed": true} deny."""
    asks_the_network = True

    def __init__(self, url, timeout=5.0):
        self.url = url.rstrip("/")
        self.timeout = timeout

    def is_app_allowed(self, boot_info):
        return self._ask("app", boot_info)

    def is_kms_allowed(self, boot_info):
        return self._ask("kms", boot_info)

    def _ask(self, kind, boot_info):
        body = json.dumps(webhook_body(boot_info)).encode("utf-8")
        request = urllib.request.Request(f"{self.url}/bootAuth/{kind}", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # nosec: configured URL
                answer = json_limits.loads(response.read(64 * 1024), "answer")
        except (urllib.error.URLError, OSError, ValueError, DstackError) as exc:
            return Decision(False, f"auth webhook failed, so denied: {getattr(exc, 'reason', exc)}")
        if not isinstance(answer, dict) or answer.get("isAllowed") is not True:
            reason = answer.get("reason") if isinstance(answer, dict) else None
            return Decision(False, f"auth webhook denied: {reason or 'no isAllowed=true in its answer'}")
        return Decision(True, str(answer.get("reason") or ""), str(answer.get("gatewayAppId") or ""))


class Ethereum:
    """DstackKms.isAppAllowed / isKmsAllowed through web3 (plugins/module_utils/contracts.py); errors deny.

    The contract is connected once (the chain id checked) and kept; the chain id is checked again
    at every new block, and any chain error drops the connection, so the next question reconnects.
    Answers are cached per block: the same boot info asked again in the same block is answered
    from the cache, so a flood of boots costs one chain call per block, and any change on the
    chain (a new block) is seen at once. A release thus costs two RPCs: the block number and the
    question.
    """
    asks_the_network = True

    def __init__(self, rpc_url, contract_address, chain_id, w3=None):
        from ansible_collections.dstack.tee.plugins.module_utils import contracts  # pylint: disable=import-outside-toplevel
        self.contracts = contracts
        self.rpc_url, self.contract_address, self.chain_id, self.w3 = rpc_url, contract_address, int(chain_id), w3
        self._kms = None            # the connected DstackKms
        self._checked_block = None  # the block at which the chain id was last checked
        self._cache = {}
        self._implementation = None
        self._lock = threading.Lock()

    def _contract(self):
        """(DstackKms, current block); the chain id is checked on connecting and at each new block."""
        with self._lock:
            if self._kms is None:
                w3 = self.contracts.connect(self.rpc_url, self.chain_id, w3=self.w3)
                self._kms = self.contracts.contract(w3, "DstackKms", self.contract_address)
                self._checked_block = None
            kms = self._kms
        block = kms.w3.eth.block_number
        if block != self._checked_block:
            actual = kms.w3.eth.chain_id
            if actual != self.chain_id:
                raise DstackError("chain_id", f"the RPC serves chain id {actual}, not {self.chain_id}")
            self._checked_block = block
        return kms, block

    def _drop(self):
        with self._lock:
            self._kms = None

    def app_implementation(self, max_age=60.0):
        """The DstackApp implementation the contract's factory deploys (GetMeta's app_auth_implementation),
        read at most once a minute: GetMeta is asked often and decides nothing."""
        now = time.monotonic()
        if self._implementation is None or now - self._implementation[0] > max_age:
            kms, _block = self._contract()
            self._implementation = (now, str(kms.functions.appImplementation().call()))
        return self._implementation[1]

    def is_app_allowed(self, boot_info):
        return self._ask("isAppAllowed", boot_info)

    def is_kms_allowed(self, boot_info):
        return self._ask("isKmsAllowed", boot_info)

    def _ask(self, method, boot_info):
        try:
            kms, block = self._contract()
            key = (block, method, json.dumps(boot_info, sort_keys=True))
            with self._lock:
                if key in self._cache:
                    return self._cache[key]
            allowed, reason = self.contracts.ask(kms, method, boot_info)
        except DstackError as exc:
            self._drop()
            return Decision(False, str(exc))
        except Exception as exc:  # pylint: disable=broad-exception-caught
            self._drop()
            return Decision(False, f"rpc_url: the chain's JSON-RPC at {self.rpc_url} failed: {type(exc).__name__}")
        decision = Decision(bool(allowed), reason or ("" if allowed else "denied by DstackKms"))
        with self._lock:
            self._cache = {k: v for k, v in self._cache.items() if k[0] == block}
            self._cache[key] = decision
        return decision


def make_backend(config):
    """The backend named by config["type"]; errors name the setting."""
    kind = config.get("type", "local")
    if kind == "local":
        if not config.get("path"):
            raise DstackError("auth.path", "is required for the local allowlist")
        return LocalAllowlist(config["path"])
    if kind == "webhook":
        if not config.get("url"):
            raise DstackError("auth.url", "is required for the webhook backend")
        return Webhook(config["url"], float(config.get("timeout", 5.0)))
    if kind == "ethereum":
        for name in ("rpc_url", "contract_address", "chain_id"):
            if not config.get(name):
                raise DstackError(f"auth.{name}", "is required for the ethereum backend")
        return Ethereum(config["rpc_url"], config["contract_address"], config["chain_id"])
    raise DstackError("auth.type", f"unknown backend {str(kind)[:20]!r} (expected one of {', '.join(BACKENDS)})")


def decide(backend, boot_info, kind="app"):
    """Ask a backend whether an app ("app") or a KMS replica ("kms") may have keys.

    Any exception is a refusal: the KMS fails closed.
    """
    try:
        decision = backend.is_kms_allowed(boot_info) if kind == "kms" else backend.is_app_allowed(boot_info)
    except DstackError as exc:
        return Decision(False, f"auth backend error, so denied: {exc}")
    except Exception as exc:  # pylint: disable=broad-exception-caught
        return Decision(False, f"auth backend error, so denied: {type(exc).__name__}")
    return decision if isinstance(decision, Decision) else Decision(False, "auth backend gave no decision")
