# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The governance contracts from Python (dstack-reference 9): connect, deploy, call, send, plan.

One home for the KMS's ethereum auth backend (`ask`: isAppAllowed / isKmsAllowed) and the chain
side of kms_contract / app_contract (their Ansible side is contract_module.py). Needs web3
(`HAS_WEB3`); errors are DstackError naming the field, never a private key.
"""

import contextlib
import traceback

from ansible_collections.dstack.tee.plugins.module_utils.contract_artifacts import ARTIFACTS
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError, parse_hex

try:
    from eth_account import Account
    from web3 import Web3
    from web3.exceptions import ContractCustomError, ContractLogicError, Web3RPCError
except ImportError:
    HAS_WEB3 = False
    WEB3_IMPORT_ERROR = traceback.format_exc()
    Account = Web3 = None
    ContractCustomError = ContractLogicError = Exception

    class Web3RPCError(Exception):
        """Stands in for web3's error type when web3 is missing (nothing raises it then)."""
else:
    HAS_WEB3 = True
    WEB3_IMPORT_ERROR = None

ZERO_ADDRESS = "0x" + "00" * 20
# Custom errors a revert may carry (selector -> name), decoded for the messages.
_ERRORS = {
    "118cdaa7": "the key is not the contract owner (OwnableUnauthorizedAccount)",
    "f92ee8a9": "the contract is already initialized (InvalidInitialization)",
}


def require_web3():
    if not HAS_WEB3:
        raise DstackError("web3", "the Python package web3 is required (pip install web3)")


def bytes32(value, field):
    """32 bytes from hex (0x optional); the error names the field."""
    return parse_hex(value, field, length=32)


def address(value, field):
    """A checksummed address from 20 bytes of hex (0x optional)."""
    require_web3()
    return Web3.to_checksum_address(parse_hex(value, field, length=20))


def connect(rpc_url, chain_id=None, timeout=10, w3=None):
    """A Web3 connected to rpc_url whose chain id is chain_id (when given)."""
    require_web3()
    if w3 is None:
        if not rpc_url or not str(rpc_url).startswith(("http://", "https://")):
            raise DstackError("rpc_url", "must be an http:// or https:// URL")
        w3 = Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": timeout}))
    try:
        actual = w3.eth.chain_id
    except Exception as exc:  # pylint: disable=broad-except
        raise DstackError("rpc_url", f"cannot reach the chain's JSON-RPC at {rpc_url}: {type(exc).__name__}") from None
    if chain_id is not None and int(chain_id) != actual:
        raise DstackError("chain_id", f"the RPC serves chain id {actual}, not {chain_id}")
    return w3


def contract(w3, name, at):
    """The contract `name` (DstackKms, DstackApp, ...) at address `at`; it must have code."""
    checksummed = address(at, "address")
    if not w3.eth.get_code(checksummed):
        raise DstackError("address", f"no contract at {checksummed}")
    return w3.eth.contract(address=checksummed, abi=ARTIFACTS[name]["abi"])


def revert_reason(exc):
    """A readable reason from a web3 / eth-tester revert."""
    data = getattr(exc, "data", None)
    text = str(exc)
    for selector, meaning in _ERRORS.items():
        raw = bytes.fromhex(selector)
        if (isinstance(data, str) and data[2:10] == selector) or selector in text or \
                raw.decode("latin-1") in text or repr(raw)[2:-1] in text:
            return meaning
    if isinstance(exc, ContractLogicError) and getattr(exc, "message", None):
        return exc.message
    return text


def rpc_refusal(exc):
    """The node's own words for a transaction it refused (insufficient funds, nonce too low, ...)."""
    error = (getattr(exc, "rpc_response", None) or {}).get("error") or {}
    message = error.get("message") if isinstance(error, dict) else None
    return str(message or getattr(exc, "message", "") or exc)[:300]


def boot_info_tuple(boot_info):
    """AppBootInfo in ABI order from the KMS's boot info (hex without 0x, as 5.3's webhook)."""
    def b32(key):
        value = boot_info.get(key) or ""
        return parse_hex(value, key, length=32) if value else b"\0" * 32

    def addr(key):
        value = boot_info.get(key) or ""
        if not value:
            return ZERO_ADDRESS
        raw = parse_hex(value, key)
        if len(raw) > 20:
            raise DstackError(key, f"must be at most 20 bytes, got {len(raw)}")
        return Web3.to_checksum_address(raw.rjust(20, b"\0"))

    return (addr("app_id"), b32("compose_hash"), addr("instance_id"), b32("device_id"), b32("mr_aggregated"),
            b32("mr_system"), b32("os_image_hash"), str(boot_info.get("tcb_status") or ""),
            [str(a) for a in boot_info.get("advisory_ids") or []])


def ask(kms, method, boot_info):
    """(allowed, reason) from a DstackKms view, isAppAllowed or isKmsAllowed, on a connected contract."""
    info = boot_info_tuple(boot_info)
    try:
        allowed, reason = kms.functions[method](info).call()
    except (ContractLogicError, ContractCustomError, ValueError) as exc:
        raise DstackError("kms_contract_address", f"{method} failed: {revert_reason(exc)}") from None
    return bool(allowed), str(reason)


@contextlib.contextmanager
def _refusals(what):
    """A revert or the node's refusal of a transaction as a DstackError naming `what` (never the key)."""
    try:
        yield
    except (ContractLogicError, ContractCustomError, ValueError) as exc:
        raise DstackError(what, f"the transaction would revert: {revert_reason(exc)}") from None
    except Web3RPCError as exc:
        raise DstackError(what, f"the node refused the transaction: {rpc_refusal(exc)}") from None
    except Exception as exc:  # pylint: disable=broad-except
        # eth-tester raises its own TransactionFailed; keep the reason, never the key.
        if type(exc).__name__ == "TransactionFailed":
            raise DstackError(what, f"the transaction would revert: {revert_reason(exc)}") from None
        raise


class Signer:
    """Sends transactions signed with one private key (never shown in errors)."""

    def __init__(self, w3, private_key, field="private_key"):
        require_web3()
        try:
            self.account = Account.from_key(parse_hex(private_key, field, length=32))
        except DstackError:
            raise
        except Exception:  # pylint: disable=broad-except
            raise DstackError(field, "is not a valid secp256k1 private key") from None
        self.w3 = w3
        self.address = self.account.address
        self.tx_hashes = []  # every transaction sent, in order (the modules return them)

    def _send(self, tx, what):
        tx.setdefault("from", self.address)
        tx["nonce"] = self.w3.eth.get_transaction_count(self.address, "pending")
        tx["chainId"] = self.w3.eth.chain_id
        with _refusals(what):
            if "gas" not in tx:
                tx["gas"] = int(self.w3.eth.estimate_gas(tx) * 1.2) + 10000
            if "gasPrice" not in tx and "maxFeePerGas" not in tx:
                tx["gasPrice"] = self.w3.eth.gas_price
            signed = self.account.sign_transaction(tx)
            tx_hash = self.w3.eth.send_raw_transaction(signed.raw_transaction)
            receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=120)
        self.tx_hashes.append("0x" + bytes(receipt.transactionHash).hex())
        if receipt.status != 1:
            raise DstackError(what, f"the transaction {tx_hash.hex()} reverted")
        return receipt

    def transact(self, fn, what=None):
        """Send a contract function call; returns the receipt."""
        with _refusals(what or fn.fn_name):
            tx = fn.build_transaction({"from": self.address})
        return self._send(tx, what or fn.fn_name)

    def deploy(self, name, *args):
        """Deploy contract `name` with constructor args; returns its address."""
        factory = self.w3.eth.contract(abi=ARTIFACTS[name]["abi"], bytecode=ARTIFACTS[name]["bytecode"])
        tx = factory.constructor(*args).build_transaction({"from": self.address})
        return self._send(tx, f"deploy {name}").contractAddress


def deploy_kms(signer, owner=None):
    """Deploy DstackApp (implementation), DstackKms (implementation) and the KMS proxy.

    Returns {"kms_contract_address", "kms_implementation", "app_implementation"}.
    """
    owner = owner or signer.address
    app_impl = signer.deploy("DstackApp")
    kms_impl = signer.deploy("DstackKms")
    impl = signer.w3.eth.contract(address=kms_impl, abi=ARTIFACTS["DstackKms"]["abi"])
    init = impl.encode_abi("initialize", args=[owner, app_impl])
    proxy = signer.deploy("ERC1967Proxy", kms_impl, init)
    return {"kms_contract_address": proxy, "kms_implementation": kms_impl, "app_implementation": app_impl}


def deploy_app(signer, kms, owner=None, disable_upgrades=False, require_tcb_up_to_date=False,
               allow_any_device=False, device_id=b"\0" * 32, compose_hash=b"\0" * 32):
    """Deploy and register an app through DstackKms.deployAndRegisterApp; returns the app address."""
    fn = kms.get_function_by_signature("deployAndRegisterApp(address,bool,bool,bool,bytes32,bytes32)")(
        owner or signer.address, disable_upgrades, require_tcb_up_to_date, allow_any_device, device_id,
        compose_hash)
    receipt = signer.transact(fn, "deployAndRegisterApp")
    logs = kms.events.AppDeployedViaFactory().process_receipt(receipt, errors=_discard())
    if not logs:
        raise DstackError("kms_contract_address", "deployAndRegisterApp emitted no AppDeployedViaFactory")
    return logs[0].args.appId


def _discard():
    from web3.logs import DISCARD  # pylint: disable=import-outside-toplevel
    return DISCARD


def require_owner(target, signer, field="private_key"):
    """Raise unless the signer owns the contract (checked before any transaction)."""
    current = target.functions.owner().call()
    if current != signer.address:
        raise DstackError(field, f"the key's address {signer.address} is not the owner ({current}) of {target.address}")


def plan_sets(contract, params, sets, state):
    """The membership changes a module needs: (changes, before, after).

    sets maps an option to (view function, add function, remove function); params[option] lists
    32-byte hex values that should be present (state "present") or absent. changes are
    (function name, argument, option) in a stable order; before/after show only listed values.
    """
    want = state == "present"
    changes, before, after = [], {}, {}
    for field, (view, add, remove) in sets.items():
        values = []
        for value in params.get(field) or []:
            raw = bytes32(value, field)
            if raw not in values:
                values.append(raw)
        current = [raw for raw in values if contract.functions[view](raw).call()]
        before[field] = sorted(raw.hex() for raw in current)
        after[field] = sorted(raw.hex() for raw in values) if want else []
        for raw in values:
            if (raw in current) != want:
                changes.append((add if want else remove, raw, field))
    return changes, before, after


def plan_value(contract, getter, setter, field, wanted, changes, before, after):
    """Add a setter call to `changes` when a scalar on chain differs from `wanted` (None: leave it)."""
    if wanted is None:
        return
    current = contract.functions[getter]().call()
    before[field], after[field] = current, wanted
    if current != wanted:
        changes.append((setter, wanted, field))


def plan(contract, params, sets, scalars):
    """(changes, before, after) for a contract module: the sets' membership (plan_sets) and the
    scalars, each (getter, setter, field, wanted value or None to leave it) (plan_value)."""
    changes, before, after = plan_sets(contract, params, sets, params["state"])
    for getter, setter, field, wanted in scalars:
        plan_value(contract, getter, setter, field, wanted, changes, before, after)
    return changes, before, after


def check_values(params, sets):
    """Refuse a malformed 32-byte value of any listed option before anything is sent."""
    for field in sets:
        for value in params.get(field) or []:
            bytes32(value, field)
