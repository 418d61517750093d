"""module_utils/contracts.py on py-evm: deploy, signed transactions, clear errors; the KMS's ethereum
backend (agents/kms/auth.py Ethereum, the caller of contracts.ask) asking the deployed contracts."""

import pytest

pytest.importorskip("eth_tester", reason="web3[tester] is installed by scripts/setup.sh")

from evm_helpers import h32  # noqa: E402
# The fixtures chain and setup, by name.
from evm_helpers import chain, setup  # noqa: E402,F401  pylint: disable=unused-import

from ansible_collections.dstack.tee.agents.kms.auth import Ethereum  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils import contracts  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError  # noqa: E402

KEY = "0x" + "11" * 32
OTHER_KEY = "22" * 32


@pytest.fixture
def deployed(chain):
    w3, funder = chain[0], chain[1]
    signer = contracts.Signer(w3, KEY)
    other = contracts.Signer(w3, OTHER_KEY)
    for account in (signer.address, other.address):
        w3.eth.wait_for_transaction_receipt(w3.eth.send_transaction(
            {"from": funder, "to": account, "value": 10 ** 20}))
    out = contracts.deploy_kms(signer)
    kms = contracts.contract(w3, "DstackKms", out["kms_contract_address"])
    app_id = contracts.deploy_app(signer, kms, allow_any_device=True, compose_hash=h32("c1"))
    signer.transact(kms.functions.addOsImageHash(h32("os")))
    return w3, signer, other, kms, app_id


def boot(app_id, compose=h32("c1"), os_image=h32("os")):
    return {"app_id": app_id[2:].lower(), "compose_hash": compose.hex(), "instance_id": "", "device_id": "ab" * 32,
            "mr_aggregated": "00" * 32, "mr_system": "00" * 32, "os_image_hash": os_image.hex(),
            "tcb_status": "UpToDate", "advisory_ids": []}


def answer(rpc_url, kms_address, chain_id, boot_info, w3=None, method="is_app_allowed"):
    """(allowed, reason) as the KMS's ethereum backend decides it, asked afresh (no cached connection)."""
    decision = getattr(Ethereum(rpc_url, kms_address, chain_id, w3=w3), method)(boot_info)
    return decision.allowed, decision.reason


def test_is_app_allowed_follows_the_contracts(deployed):
    w3, signer, kms, app_id = deployed[0], deployed[1], deployed[3], deployed[4]
    chain_id = w3.eth.chain_id
    assert answer(None, kms.address, chain_id, boot(app_id), w3=w3) == (True, "")
    assert answer(None, kms.address, chain_id, boot(app_id, os_image=h32("x")), w3=w3) == (
        False, "OS image is not allowed")
    app = contracts.contract(w3, "DstackApp", app_id)
    signer.transact(app.functions.removeComposeHash(h32("c1")))
    assert answer(None, kms.address, chain_id, boot(app_id), w3=w3) == (False, "Compose hash not allowed")
    assert answer(None, kms.address, chain_id, boot(app_id), w3=w3, method="is_kms_allowed") == (
        False, "Aggregated MR not allowed")


def test_clear_errors(deployed):
    w3, signer, other, kms, app_id = deployed
    chain_id = w3.eth.chain_id
    allowed, reason = answer(None, kms.address, 999, boot(app_id), w3=w3)
    assert not allowed and reason == f"chain_id: the RPC serves chain id {chain_id}, not 999"
    allowed, reason = answer("http://127.0.0.1:9", kms.address, chain_id, boot(app_id))
    assert not allowed and reason.startswith("rpc_url: cannot reach the chain's JSON-RPC at http://127.0.0.1:9")
    allowed, reason = answer(None, kms.address, chain_id, dict(boot(app_id), compose_hash="zz"), w3=w3)
    assert not allowed and reason.startswith("compose_hash: is not hex")
    allowed, reason = answer(None, "0x" + "12" * 20, chain_id, boot(app_id), w3=w3)
    assert not allowed and reason.startswith("address: no contract at")
    with pytest.raises(DstackError, match="is not the owner"):
        contracts.require_owner(kms, other)
    with pytest.raises(DstackError, match="not the contract owner"):
        other.transact(kms.functions.addOsImageHash(h32("x")))
    with pytest.raises(DstackError, match=r"compose_hash: must be 32 bytes"):
        contracts.bytes32("ab" * 31, "compose_hash")
    with pytest.raises(DstackError) as info:
        contracts.Signer(w3, "0x" + "00" * 32)
    assert "00" * 32 not in str(info.value)
    contracts.require_owner(kms, signer)
