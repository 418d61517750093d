"""kms_contract and app_contract against a real JSON-RPC chain (ganache from contracts/node_modules).

The modules run in a subprocess the way Ansible runs them, so the chain must be reachable over
HTTP: the fixture starts ganache on a free port and stops it afterwards.
"""

import pytest

pytest.importorskip("web3", reason="web3 is installed by scripts/setup.sh --test")


from conftest import CHAIN_ID, KEY, OTHER_KEY, free_port, ganache_chain, run_module  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.contract_artifacts import ARTIFACTS  # noqa: E402

OS_IMAGE = "11" * 32
ABI_IMPLEMENTATION = [{"name": "appImplementation", "type": "function", "stateMutability": "view", "inputs": [],
                       "outputs": [{"name": "", "type": "address"}]}]
OS_IMAGE_2 = "12" * 32
COMPOSE = "aa" * 32


@pytest.fixture(scope="module")
def chain():
    yield from ganache_chain()


def _args(url, **extra):
    return dict(rpc_url=url, chain_id=CHAIN_ID, private_key=KEY, **extra)


def _nonce(w3, key=KEY):
    return w3.eth.get_transaction_count(w3.eth.account.from_key(key).address)


@pytest.fixture(scope="module")
def kms(chain):
    url, w3 = chain
    result = run_module("kms_contract", _args(url))
    assert not result.get("failed"), result
    assert result["changed"] and w3.eth.get_code(result["address"])
    assert len(result["tx_hashes"]) == 3  # app implementation, KMS implementation, proxy
    return result["address"]


def test_kms_contract_adds_an_os_image_once(chain, kms):
    url, w3 = chain
    args = _args(url, address=kms, os_images=[OS_IMAGE])

    checked = run_module("kms_contract", args, check=True, diff=True)
    nonce = _nonce(w3)
    assert checked["changed"] and checked["tx_hashes"] == []
    assert checked["diff"]["before"]["os_images"] == [] and checked["diff"]["after"]["os_images"] == [OS_IMAGE]
    assert _nonce(w3) == nonce

    first = run_module("kms_contract", args, diff=True)
    assert first["changed"] and len(first["tx_hashes"]) == 1, first
    assert first["diff"]["after"]["os_images"] == [OS_IMAGE]
    assert _nonce(w3) == nonce + 1

    second = run_module("kms_contract", args)
    assert not second["changed"] and second["tx_hashes"] == []
    assert _nonce(w3) == nonce + 1

    # Without a key nothing can change, but an unchanged contract needs none.
    keyless = dict(args)
    del keyless["private_key"]
    assert not run_module("kms_contract", keyless)["changed"]
    # ... and check mode needs none: it answers "would this change?" read-only (the app role asks it
    # whether the OS image is allowed). Without check mode a keyless change is a clear error.
    preview = run_module("kms_contract", dict(keyless, os_images=[OS_IMAGE_2]), check=True, diff=True)
    assert preview["changed"] and preview["diff"]["after"]["os_images"] == [OS_IMAGE_2]
    assert _nonce(w3) == nonce + 1
    keyless_change = run_module("kms_contract", dict(keyless, os_images=[OS_IMAGE_2]))
    assert keyless_change["failed"] and keyless_change["msg"].startswith("private_key: is required to change")

    absent = run_module("kms_contract", dict(args, os_images=[OS_IMAGE, OS_IMAGE_2], state="absent"))
    assert absent["changed"] and len(absent["tx_hashes"]) == 1


def test_kms_contract_sets_gateway_app_id(chain, kms):
    url, _w3 = chain
    args = _args(url, address=kms, gateway_app_id="ab" * 20, kms_devices=["01" * 32])
    first = run_module("kms_contract", args)
    assert first["changed"] and len(first["tx_hashes"]) == 2, first
    assert not run_module("kms_contract", args)["changed"]


def test_app_contract_deploys_and_manages_compose_hashes(chain, kms):
    url, w3 = chain
    checked = run_module("app_contract", _args(url, kms_address=kms, allow_any_device=True), check=True)
    assert checked["changed"] and checked["address"] is None

    nonce = _nonce(w3)
    deployed = run_module("app_contract", _args(url, kms_address=kms, allow_any_device=True))
    assert deployed["changed"] and len(deployed["tx_hashes"]) == 1, deployed
    assert deployed["app_id"] == deployed["address"][2:].lower() and len(deployed["app_id"]) == 40
    assert _nonce(w3) == nonce + 1
    address = deployed["address"]

    args = _args(url, address=address, compose_hashes=["0x" + COMPOSE], allow_any_device=True)
    checked = run_module("app_contract", args, check=True, diff=True)
    assert checked["changed"] and checked["diff"]["after"]["compose_hashes"] == [COMPOSE]
    assert _nonce(w3) == nonce + 1

    added = run_module("app_contract", args)
    assert added["changed"] and len(added["tx_hashes"]) == 1
    assert not run_module("app_contract", args)["changed"]

    removed = run_module("app_contract", dict(args, state="absent"), diff=True)
    assert removed["changed"] and len(removed["tx_hashes"]) == 1
    assert removed["diff"]["before"]["compose_hashes"] == [COMPOSE]
    assert removed["diff"]["after"]["compose_hashes"] == []
    assert not run_module("app_contract", dict(args, state="absent"))["changed"]

    # A new app with hashes gets the first in the factory call: one transaction, then one per other hash.
    two = ["0x" + COMPOSE, "bb" * 32]
    nonce = _nonce(w3)
    both = run_module("app_contract", _args(url, kms_address=kms, compose_hashes=two, allow_any_device=True), diff=True)
    assert both["changed"] and len(both["tx_hashes"]) == 2 and _nonce(w3) == nonce + 2, both
    assert both["diff"]["after"]["compose_hashes"] == [COMPOSE, "bb" * 32]
    assert not run_module("app_contract", _args(url, address=both["address"], compose_hashes=two))["changed"]


def test_clear_errors(chain, kms):
    url, w3 = chain
    wrong_chain = run_module("kms_contract", dict(_args(url, address=kms), chain_id=CHAIN_ID + 1))
    assert wrong_chain["failed"] and wrong_chain["msg"].startswith("chain_id:")

    unreachable = run_module("kms_contract", _args(f"http://127.0.0.1:{free_port()}", address=kms))
    assert unreachable["failed"] and unreachable["msg"].startswith("rpc_url:")

    nonce = _nonce(w3, OTHER_KEY)
    not_owner = run_module("kms_contract", dict(_args(url, address=kms, os_images=["13" * 32]),
                                                private_key=OTHER_KEY))
    assert not_owner["failed"] and not_owner["msg"].startswith("private_key:"), not_owner
    assert "owner" in not_owner["msg"] and OTHER_KEY[2:] not in not_owner.raw
    assert _nonce(w3, OTHER_KEY) == nonce

    malformed = run_module("app_contract", _args(url, kms_address=kms, compose_hashes=["abc"]))
    assert malformed["failed"] and malformed["msg"].startswith("compose_hashes:")
    bad_length = run_module("kms_contract", _args(url, address=kms, os_images=["ab" * 31]))
    assert bad_length["failed"] and bad_length["msg"].startswith("os_images:")


def test_end_to_end_a_kms_on_the_chain_follows_the_modules(chain, tmp_path):
    """Deploy DstackKms and an app with the modules on ganache; a KMS configured with the ethereum
    backend (JSON-RPC to ganache) releases keys, refuses once the hash is removed, and refuses
    when the OS image is withdrawn."""
    from ansible_collections.dstack.tee.plugins.module_utils.kms_client import KmsRefused
    from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx
    import test_kms

    url, w3 = chain
    kms_result = run_module("kms_contract", _args(url, os_images=[test_kms.OS_IMAGE]))
    assert kms_result["changed"], kms_result
    address = kms_result["address"]
    app = run_module("app_contract", _args(url, kms_address=address, compose_hashes=[test_kms.COMPOSE_HASH],
                                           allow_any_device=True))
    assert app["changed"] and len(app["app_id"]) == 40, app
    app_args = _args(url, address=app["address"], compose_hashes=[test_kms.COMPOSE_HASH])

    sim = SimTdx(str(tmp_path / "sim"))
    auth = {"type": "ethereum", "rpc_url": url, "contract_address": address, "chain_id": CHAIN_ID}
    kms_app, client = test_kms.make_kms(tmp_path, sim, auth=auth)
    meta = client.get_meta()  # dstack's GetMeta names the contract it follows
    assert meta["kms_contract_address"] == address and meta["chain_id"] == CHAIN_ID
    assert meta["app_auth_implementation"] == w3.eth.contract(address, abi=ABI_IMPLEMENTATION).functions.appImplementation().call()
    assert int(meta["app_auth_implementation"], 16) != 0
    assert client.get_app_key(sim, test_kms.boot(sim, app_id=app["app_id"]), test_kms.VM_CONFIG)["k256_key"]

    assert run_module("app_contract", dict(app_args, state="absent"))["changed"]
    with pytest.raises(KmsRefused, match="auth"):
        client.get_app_key(sim, test_kms.boot(sim, app_id=app["app_id"]), test_kms.VM_CONFIG)

    assert run_module("app_contract", app_args)["changed"]
    assert run_module("kms_contract", _args(url, address=address, os_images=[test_kms.OS_IMAGE],
                                            state="absent"))["changed"]
    with pytest.raises(KmsRefused, match="auth"):
        client.get_app_key(sim, test_kms.boot(sim, app_id=app["app_id"]), test_kms.VM_CONFIG)
    decisions = [a["decision"] for a in kms_app.extensions["dstack_kms"].audit.read()]
    assert decisions == ["release", "refuse", "refuse"]


def test_end_to_end_kms_onboarding_follows_is_kms_allowed(chain, tmp_path):
    """A KMS on the ethereum backend gives its root keys to a replica only while kms_contract lists
    the replica's aggregated MR and device (DstackKms.isKmsAllowed), and stops once the MR is removed."""
    from ansible_collections.dstack.tee.plugins.module_utils.kms_client import KmsRefused
    from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx
    import test_kms
    from test_kms_onboard import replica

    url, _w3 = chain
    sim = SimTdx(str(tmp_path / "sim"))
    attest, info = replica(sim)
    kms_args = _args(url, os_images=[test_kms.OS_IMAGE], kms_devices=[info["device_id"]])
    address = run_module("kms_contract", kms_args)["address"]
    kms_args["address"] = address
    auth = {"type": "ethereum", "rpc_url": url, "contract_address": address, "chain_id": CHAIN_ID}
    kms_app, client = test_kms.make_kms(tmp_path, sim, auth=auth)
    with pytest.raises(KmsRefused, match="auth"):
        client.get_kms_key(attest)  # no aggregated MR listed yet

    mr = dict(kms_args, kms_aggregated_mrs=[info["mr_aggregated"]])
    checked = run_module("kms_contract", mr, check=True, diff=True)
    assert checked["changed"] and checked["diff"]["after"]["kms_aggregated_mrs"] == [info["mr_aggregated"]]
    assert run_module("kms_contract", mr)["changed"]
    received = client.get_kms_key(attest)
    assert received["k256_key"] == kms_app.extensions["dstack_kms"].keys.k256_key.hex()

    assert run_module("kms_contract", dict(mr, state="absent"))["changed"]
    with pytest.raises(KmsRefused, match="auth"):
        client.get_kms_key(attest)
    assert [a["decision"] for a in kms_app.extensions["dstack_kms"].audit.read()] == ["refuse", "release", "refuse"]


def test_a_failure_after_the_deployment_still_names_the_new_app(chain, kms):
    """The factory call deploys the app with its first hash; if a later transaction fails (here the
    key, funded for little more than the deployment, runs out of funds among the next hashes), the
    failure returns the new address so the next run attaches to it instead of deploying another."""
    url, w3 = chain
    poor = w3.eth.account.create()
    factory = w3.eth.contract(kms, abi=ARTIFACTS["DstackKms"]["abi"])
    deploy_gas = factory.get_function_by_signature("deployAndRegisterApp(address,bool,bool,bool,bytes32,bytes32)")(
        poor.address, False, False, True, b"\0" * 32, bytes.fromhex(COMPOSE)).estimate_gas({"from": w3.eth.accounts[0]})
    w3.eth.wait_for_transaction_receipt(w3.eth.send_transaction(
        {"from": w3.eth.accounts[0], "to": poor.address, "value": (deploy_gas + 1000) * w3.eth.gas_price}))
    hashes = [COMPOSE] + [f"{n:02x}" * 32 for n in range(0xc0, 0xc6)]
    result = run_module("app_contract", dict(rpc_url=url, chain_id=CHAIN_ID, private_key=poor.key.hex(),
                                             kms_address=kms, compose_hashes=hashes, allow_any_device=True))
    assert result.get("failed") and "address" in result, dict(result)
    assert "the DstackApp was deployed at " + result["address"] in result["msg"], result["msg"]
    assert "the node refused the transaction: insufficient funds" in result["msg"] and "'stack'" not in result["msg"]
    app = w3.eth.contract(result["address"], abi=ARTIFACTS["DstackApp"]["abi"])
    assert app.functions.allowedComposeHashes(bytes.fromhex(COMPOSE)).call()
    assert not app.functions.allowedComposeHashes(bytes.fromhex(hashes[-1])).call()
    assert result["app_id"] == result["address"][2:].lower() and poor.key.hex()[2:] not in result.raw
