"""Helpers for the governance contracts on an in-process chain (py-evm, web3's EthereumTesterProvider).

Test files start with `pytest.importorskip("eth_tester")`, so they skip where web3[tester] is missing.
"""

import ast

import pytest

try:
    from eth_tester.exceptions import TransactionFailed
    from web3 import Web3
    from web3.exceptions import ContractCustomError, ContractLogicError
except ImportError:  # the test files skip
    Web3 = None
    ContractCustomError = ContractLogicError = TransactionFailed = Exception

from ansible_collections.dstack.tee.plugins.module_utils.contract_artifacts import ARTIFACTS

ZERO32 = b"\0" * 32
ZERO_ADDRESS = "0x" + "00" * 20


def h32(label):
    """A distinct bytes32 value per label."""
    return Web3.keccak(text=label)


def contract_at(w3, name, address):
    return w3.eth.contract(address=address, abi=ARTIFACTS[name]["abi"])


def deploy(w3, name, *args, sender):
    factory = w3.eth.contract(abi=ARTIFACTS[name]["abi"], bytecode=ARTIFACTS[name]["bytecode"])
    receipt = w3.eth.wait_for_transaction_receipt(factory.constructor(*args).transact({"from": sender}))
    assert receipt.status == 1
    return contract_at(w3, name, receipt.contractAddress)


def send(fn, sender):
    """Send a transaction; return its receipt (status 1)."""
    receipt = fn.w3.eth.wait_for_transaction_receipt(fn.transact({"from": sender}))
    assert receipt.status == 1
    return receipt


def custom_error(name, *types_and_values):
    """The revert data of a custom error, for comparing with ContractCustomError.data."""
    from eth_abi import encode
    types = [pair[0] for pair in types_and_values]
    selector = Web3.keccak(text=f"{name}({','.join(types)})")[:4]
    return "0x" + (selector + encode(types, [pair[1] for pair in types_and_values])).hex()


def _revert_data(exc):
    """The revert bytes of an eth-tester TransactionFailed or a web3 contract error."""
    data = getattr(exc, "data", None)
    if isinstance(data, str) and data.startswith("0x"):
        return bytes.fromhex(data[2:])
    text = str(exc.args[0]) if exc.args else str(exc)
    prefix = "execution reverted: "
    if text.startswith(prefix + "b'") or text.startswith(prefix + 'b"'):
        return ast.literal_eval(text[len(prefix):])
    return text.encode()


def reverts(fn, sender, *, reason=None, error=None):
    """Assert that fn reverts (simulated, and mined with status 0) with a reason or a custom error."""
    with pytest.raises((ContractLogicError, ContractCustomError, TransactionFailed)) as info:
        fn.call({"from": sender})
    exc = info.value
    if reason is not None:
        assert reason in str(exc), str(exc)
    if error is not None:
        assert _revert_data(exc) == bytes.fromhex(error[2:]), (exc, error)
    receipt = fn.w3.eth.wait_for_transaction_receipt(fn.transact({"from": sender, "gas": 1_000_000}))
    assert receipt.status == 0
    return exc


def not_owner(account):
    return custom_error("OwnableUnauthorizedAccount", ("address", account))


def boot_info(app_id, compose_hash=None, device_id=None, os_image=None, tcb_status="UpToDate",
              mr_aggregated=None, advisory_ids=()):
    """An AppBootInfo tuple in ABI order."""
    return (app_id, compose_hash or h32("compose"), ZERO_ADDRESS, device_id or h32("device"),
            mr_aggregated or h32("mr-aggregated"), h32("mr-system"), os_image or h32("os-image"),
            tcb_status, list(advisory_ids))


def events(contract, name, receipt):
    from web3.logs import DISCARD
    return [dict(e.args) for e in contract.events[name]().process_receipt(receipt, errors=DISCARD)]


@pytest.fixture(scope="module")
def chain():
    from web3 import EthereumTesterProvider
    w3 = Web3(EthereumTesterProvider())
    owner, other, third = w3.eth.accounts[:3]
    return w3, owner, other, third


@pytest.fixture
def setup(chain):
    """A fresh DstackKms (behind its ERC-1967 proxy) with the DstackApp implementation set."""
    w3, owner, other, third = chain
    app_impl = deploy(w3, "DstackApp", sender=owner)
    kms_impl = deploy(w3, "DstackKms", sender=owner)
    init = kms_impl.encode_abi("initialize", args=[owner, app_impl.address])
    proxy = deploy(w3, "ERC1967Proxy", kms_impl.address, init, sender=owner)
    kms = contract_at(w3, "DstackKms", proxy.address)
    return {"w3": w3, "owner": owner, "other": other, "third": third, "kms": kms,
            "kms_impl": kms_impl, "app_impl": app_impl, "init_receipt": proxy}


def deploy_app(s, *, owner=None, disable_upgrades=False, require_tcb=False, allow_any=False,
               device=ZERO32, compose=ZERO32, sender=None):
    """Deploy an app through the 6-argument factory; return (app contract, receipt)."""
    kms = s["kms"]
    fn = kms.get_function_by_signature("deployAndRegisterApp(address,bool,bool,bool,bytes32,bytes32)")(
        owner or s["owner"], disable_upgrades, require_tcb, allow_any, device, compose)
    app_id = fn.call({"from": sender or s["owner"]})
    receipt = send(fn, sender or s["owner"])
    return contract_at(s["w3"], "DstackApp", app_id), receipt
