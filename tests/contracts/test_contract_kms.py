"""DstackKms on py-evm: every function, every revert path, every event."""

import pytest

pytest.importorskip("eth_tester", reason="web3[tester] is installed by scripts/setup.sh")

from evm_helpers import (ZERO32, ZERO_ADDRESS, boot_info, contract_at, deploy, deploy_app, events, h32,  # noqa: E402
                         not_owner, reverts, send)
# The fixtures chain and setup, by name.
from evm_helpers import chain, setup  # noqa: E402,F401  pylint: disable=unused-import

KMS_ADMIN = [
    ("addKmsAggregatedMr", (h32("mr"),), "KmsAggregatedMrAdded", {"mrAggregated": h32("mr")},
     ("kmsAllowedAggregatedMrs", h32("mr"), True)),
    ("removeKmsAggregatedMr", (h32("mr"),), "KmsAggregatedMrRemoved", {"mrAggregated": h32("mr")},
     ("kmsAllowedAggregatedMrs", h32("mr"), False)),
    ("addKmsDevice", (h32("dev"),), "KmsDeviceAdded", {"deviceId": h32("dev")},
     ("kmsAllowedDeviceIds", h32("dev"), True)),
    ("removeKmsDevice", (h32("dev"),), "KmsDeviceRemoved", {"deviceId": h32("dev")},
     ("kmsAllowedDeviceIds", h32("dev"), False)),
    ("addOsImageHash", (h32("os"),), "OsImageHashAdded", {"osImageHash": h32("os")},
     ("allowedOsImages", h32("os"), True)),
    ("removeOsImageHash", (h32("os"),), "OsImageHashRemoved", {"osImageHash": h32("os")},
     ("allowedOsImages", h32("os"), False)),
    ("setGatewayAppId", ("0xabcdef",), "GatewayAppIdSet", {"gatewayAppId": "0xabcdef"},
     ("gatewayAppId", None, "0xabcdef")),
]
IDS = [a[0] for a in KMS_ADMIN]


def test_initialize(setup):
    kms, owner = setup["kms"], setup["owner"]
    assert kms.functions.owner().call() == owner
    assert kms.functions.appImplementation().call() == setup["app_impl"].address
    receipt = setup["w3"].eth.get_transaction_receipt(
        setup["w3"].eth.get_block("latest")["transactions"][0])
    assert events(kms, "AppImplementationSet", receipt) == [{"implementation": setup["app_impl"].address}]
    reverts(kms.functions.initialize(owner, ZERO_ADDRESS), owner, error="0xf92ee8a9")  # InvalidInitialization
    reverts(setup["kms_impl"].functions.initialize(owner, ZERO_ADDRESS), owner, error="0xf92ee8a9")


def test_initialize_without_implementation(setup):
    w3, owner = setup["w3"], setup["owner"]
    init = setup["kms_impl"].encode_abi("initialize", args=[owner, ZERO_ADDRESS])
    kms = contract_at(w3, "DstackKms", deploy(w3, "ERC1967Proxy", setup["kms_impl"].address, init, sender=owner).address)
    assert kms.functions.appImplementation().call() == ZERO_ADDRESS
    reverts(kms.functions.deployAndRegisterApp(owner, False, False, True, ZERO32, ZERO32), owner,
            reason="DstackApp implementation not set")


@pytest.mark.parametrize("name,args,event,fields,state", KMS_ADMIN, ids=IDS)
def test_owner_admin_functions(setup, name, args, event, fields, state):
    kms, owner = setup["kms"], setup["owner"]
    if name.startswith("remove"):
        send(kms.functions["add" + name[len("remove"):]](*args), owner)
    receipt = send(kms.functions[name](*args), owner)
    assert events(kms, event, receipt) == [fields]
    getter, key, value = state
    assert (kms.functions[getter](key) if key is not None else kms.functions[getter]()).call() == value


@pytest.mark.parametrize("name,args,event,fields,state", KMS_ADMIN, ids=IDS)
def test_admin_functions_refuse_non_owner(setup, name, args, event, fields, state):
    reverts(setup["kms"].functions[name](*args), setup["other"], error=not_owner(setup["other"]))


def test_kms_info(setup):
    kms, owner, other = setup["kms"], setup["owner"], setup["other"]
    info = (b"\x02" * 33, b"ca", b"quote", b"log")
    receipt = send(kms.functions.setKmsInfo(info), owner)
    assert events(kms, "KmsInfoSet", receipt) == [{"k256Pubkey": b"\x02" * 33}]
    assert kms.functions.kmsInfo().call() == list(info)
    send(kms.functions.setKmsQuote(b"quote2"), owner)
    send(kms.functions.setKmsEventlog(b"log2"), owner)
    assert kms.functions.kmsInfo().call() == [b"\x02" * 33, b"ca", b"quote2", b"log2"]
    for fn in (kms.functions.setKmsInfo(info), kms.functions.setKmsQuote(b"q"), kms.functions.setKmsEventlog(b"l")):
        reverts(fn, other, error=not_owner(other))


def test_register_app_is_public(setup):
    kms, other = setup["kms"], setup["other"]
    app = h32("some app")[:20]
    address = setup["w3"].to_checksum_address(app)
    receipt = send(kms.functions.registerApp(address), other)
    assert events(kms, "AppRegistered", receipt) == [{"appId": address}]
    assert kms.functions.registeredApps(address).call() is True
    reverts(kms.functions.registerApp(ZERO_ADDRESS), other, reason="Invalid app ID")


def test_set_app_implementation(setup):
    kms, owner, other = setup["kms"], setup["owner"], setup["other"]
    new_impl = deploy(setup["w3"], "DstackApp", sender=owner)
    receipt = send(kms.functions.setAppImplementation(new_impl.address), owner)
    assert events(kms, "AppImplementationSet", receipt) == [{"implementation": new_impl.address}]
    assert kms.functions.appImplementation().call() == new_impl.address
    reverts(kms.functions.setAppImplementation(ZERO_ADDRESS), owner, reason="Invalid implementation address")
    reverts(kms.functions.setAppImplementation(new_impl.address), other, error=not_owner(other))


def test_deploy_and_register_app_six_arguments(setup):
    kms = setup["kms"]
    app, receipt = deploy_app(setup, compose=h32("c1"), require_tcb=True, sender=setup["other"])
    assert kms.functions.registeredApps(app.address).call() is True
    assert events(kms, "AppRegistered", receipt) == [{"appId": app.address}]
    assert events(kms, "AppDeployedViaFactory", receipt) == [{"appId": app.address, "deployer": setup["other"]}]
    assert app.functions.requireTcbUpToDate().call() is True
    assert app.functions.allowedComposeHashes(h32("c1")).call() is True
    # An ERC-1967 proxy of the implementation.
    slot = int("360894a13ba1a3210667c828492db98dca3e2076cc3735a920a3ca505d382bbc", 16)
    stored = setup["w3"].eth.get_storage_at(app.address, slot)
    assert stored[-20:] == bytes.fromhex(setup["app_impl"].address[2:])
    reverts(kms.get_function_by_signature("deployAndRegisterApp(address,bool,bool,bool,bytes32,bytes32)")(
        ZERO_ADDRESS, False, False, True, ZERO32, ZERO32), setup["owner"], reason="Invalid owner address")


def test_deploy_and_register_app_five_arguments(setup):
    kms, owner = setup["kms"], setup["owner"]
    fn = kms.get_function_by_signature("deployAndRegisterApp(address,bool,bool,bytes32,bytes32)")(
        owner, True, False, h32("d1"), h32("c1"))
    app_id = fn.call({"from": owner})
    receipt = send(fn, owner)
    app = contract_at(setup["w3"], "DstackApp", app_id)
    assert events(kms, "AppDeployedViaFactory", receipt) == [{"appId": app_id, "deployer": owner}]
    assert app.functions.requireTcbUpToDate().call() is False
    assert app.functions.upgradesDisabled().call() is True
    assert app.functions.allowedDeviceIds(h32("d1")).call() is True
    reverts(kms.get_function_by_signature("deployAndRegisterApp(address,bool,bool,bytes32,bytes32)")(
        ZERO_ADDRESS, False, True, ZERO32, ZERO32), owner, reason="Invalid owner address")


def test_is_app_allowed_checks_in_order(setup):
    kms, owner = setup["kms"], setup["owner"]
    app = deploy_app(setup, compose=h32("c1"), allow_any=True)[0]
    check = kms.functions.isAppAllowed
    info = boot_info(app.address, compose_hash=h32("c1"), os_image=h32("os"))
    unknown = boot_info(setup["w3"].to_checksum_address(h32("unknown")[:20]), os_image=h32("os"))
    assert check(unknown).call() == [False, "App not registered"]
    assert check(info).call() == [False, "OS image is not allowed"]
    send(kms.functions.addOsImageHash(h32("os")), owner)
    assert check(info).call() == [True, ""]
    # A registered address without code.
    send(kms.functions.registerApp(unknown[0]), owner)
    assert check(unknown).call() == [False, "App not deployed or invalid address"]
    # Delegation: the app's answer comes through.
    bad = boot_info(app.address, compose_hash=h32("c2"), os_image=h32("os"))
    assert check(bad).call() == [False, "Compose hash not allowed"]
    send(app.functions.removeComposeHash(h32("c1")), owner)
    assert check(info).call() == [False, "Compose hash not allowed"]
    send(kms.functions.removeOsImageHash(h32("os")), owner)
    assert check(info).call() == [False, "OS image is not allowed"]


def test_is_app_allowed_app_contract_that_fails(setup):
    w3, kms, owner = setup["w3"], setup["kms"], setup["owner"]
    send(kms.functions.addOsImageHash(h32("os")), owner)
    # A contract whose code is the INVALID opcode: the KMS answers a refusal instead of reverting.
    receipt = w3.eth.wait_for_transaction_receipt(
        w3.eth.send_transaction({"from": owner, "data": "0x60fe60005360016000f3"}))
    send(kms.functions.registerApp(receipt.contractAddress), owner)
    assert kms.functions.isAppAllowed(boot_info(receipt.contractAddress, os_image=h32("os"))).call() == [
        False, "App contract check failed"]


def test_is_kms_allowed(setup):
    kms, owner = setup["kms"], setup["owner"]
    check = kms.functions.isKmsAllowed
    info = boot_info(ZERO_ADDRESS, os_image=h32("os"), mr_aggregated=h32("mr"), device_id=h32("dev"))
    assert check(boot_info(ZERO_ADDRESS, tcb_status="OutOfDate")).call() == [False, "TCB status is not up to date"]
    assert check(info).call() == [False, "OS image is not allowed"]
    send(kms.functions.addOsImageHash(h32("os")), owner)
    assert check(info).call() == [False, "Aggregated MR not allowed"]
    send(kms.functions.addKmsAggregatedMr(h32("mr")), owner)
    assert check(info).call() == [False, "KMS is not allowed to boot on this device"]
    send(kms.functions.addKmsDevice(h32("dev")), owner)
    assert check(info).call() == [True, ""]
    send(kms.functions.removeKmsDevice(h32("dev")), owner)
    assert check(info).call() == [False, "KMS is not allowed to boot on this device"]


def test_interfaces(setup):
    supports = setup["kms"].functions.supportsInterface
    assert supports(bytes.fromhex("1e079198")).call() is True
    assert supports(bytes.fromhex("01ffc9a7")).call() is True
    assert supports(bytes.fromhex("8fd37527")).call() is False


def test_upgrade_is_owner_only_and_keeps_state(setup):
    w3, kms, owner, other = setup["w3"], setup["kms"], setup["owner"], setup["other"]
    send(kms.functions.addOsImageHash(h32("os")), owner)
    new_impl = deploy(w3, "DstackKms", sender=owner)
    reverts(kms.functions.upgradeToAndCall(new_impl.address, b""), other, error=not_owner(other))
    receipt = send(kms.functions.upgradeToAndCall(new_impl.address, b""), owner)
    assert events(kms, "Upgraded", receipt) == [{"implementation": new_impl.address}]
    assert kms.functions.allowedOsImages(h32("os")).call() is True


def test_transfer_ownership(setup):
    kms, owner, other = setup["kms"], setup["owner"], setup["other"]
    receipt = send(kms.functions.transferOwnership(other), owner)
    assert events(kms, "OwnershipTransferred", receipt) == [{"previousOwner": owner, "newOwner": other}]
    reverts(kms.functions.addOsImageHash(h32("x")), owner, error=not_owner(owner))
    reverts(kms.functions.transferOwnership(owner), owner, error=not_owner(owner))
