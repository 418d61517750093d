"""The KMS with the ethereum auth backend: key release follows the DstackKms / DstackApp contracts.

The chain is py-evm in process (web3's EthereumTesterProvider); the KMS is the real Flask app and
the CVM a simulated TD booting through the real key-release protocol.
"""

import pytest

pytest.importorskip("eth_tester", reason="web3[tester] is installed by scripts/setup.sh --test")

from web3 import Web3  # noqa: E402
from web3.providers.eth_tester import EthereumTesterProvider  # noqa: E402

from ansible_collections.dstack.tee.agents.kms.auth import Ethereum  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils import contracts  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.kms_client import KmsRefused  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx  # noqa: E402
from test_kms import COMPOSE_HASH, OS_IMAGE, VM_CONFIG, boot, make_kms  # noqa: E402

KEY = "0x" + "42" * 32


@pytest.fixture
def chain():
    w3 = Web3(EthereumTesterProvider())
    signer = contracts.Signer(w3, KEY)
    w3.eth.wait_for_transaction_receipt(w3.eth.send_transaction(
        {"from": w3.eth.accounts[0], "to": signer.address, "value": 10 ** 20}))
    kms_contract = contracts.contract(w3, "DstackKms", contracts.deploy_kms(signer)["kms_contract_address"])
    app_address = contracts.deploy_app(signer, kms_contract, allow_any_device=True,
                                       compose_hash=bytes.fromhex(COMPOSE_HASH))
    signer.transact(kms_contract.functions.addOsImageHash(bytes.fromhex(OS_IMAGE)))
    return w3, signer, kms_contract, contracts.contract(w3, "DstackApp", app_address)


def test_release_follows_the_chain(tmp_path, chain):
    w3, signer, kms_contract, app = chain
    sim = SimTdx(str(tmp_path / "sim"))
    kms_app, client = make_kms(tmp_path, sim)
    kms_app.extensions["dstack_kms"].auth = Ethereum(None, kms_contract.address, w3.eth.chain_id, w3=w3)
    app_id = app.address[2:].lower()  # an on-chain app: its id is its contract's address

    assert client.get_app_key(sim, boot(sim, app_id=app_id), VM_CONFIG)["k256_key"]

    signer.transact(app.functions.removeComposeHash(bytes.fromhex(COMPOSE_HASH)))
    with pytest.raises(KmsRefused, match="auth"):
        client.get_app_key(sim, boot(sim, app_id=app_id), VM_CONFIG)

    signer.transact(app.functions.addComposeHash(bytes.fromhex(COMPOSE_HASH)))
    assert client.get_app_key(sim, boot(sim, app_id=app_id), VM_CONFIG)["k256_key"]
    signer.transact(kms_contract.functions.removeOsImageHash(bytes.fromhex(OS_IMAGE)))
    with pytest.raises(KmsRefused, match="auth"):
        client.get_app_key(sim, boot(sim, app_id=app_id), VM_CONFIG)
    audit = kms_app.extensions["dstack_kms"].audit.read()
    assert [a["decision"] for a in audit] == ["release", "refuse", "release", "refuse"]


def test_an_unreachable_chain_or_a_wrong_chain_id_denies(chain):
    w3, _signer, kms_contract, app = chain
    info = {"app_id": app.address[2:].lower(), "compose_hash": COMPOSE_HASH, "os_image_hash": OS_IMAGE,
            "instance_id": "", "device_id": "00" * 32, "mr_aggregated": "00" * 32, "mr_system": "00" * 32,
            "tcb_status": "UpToDate", "advisory_ids": []}
    assert Ethereum(None, kms_contract.address, w3.eth.chain_id, w3=w3).is_app_allowed(info).allowed
    unreachable = Ethereum("http://127.0.0.1:9", kms_contract.address, w3.eth.chain_id).is_app_allowed(info)
    assert not unreachable.allowed and "rpc_url" in unreachable.reason
    wrong = Ethereum(None, kms_contract.address, w3.eth.chain_id + 1, w3=w3).is_app_allowed(info)
    assert not wrong.allowed and "chain" in wrong.reason
