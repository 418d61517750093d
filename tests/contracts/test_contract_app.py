"""DstackApp on py-evm: every function, every revert path, every event."""

import pytest

pytest.importorskip("eth_tester", reason="web3[tester] is installed by scripts/setup.sh")

from evm_helpers import (ZERO32, boot_info, contract_at, deploy, deploy_app, events, h32, not_owner,  # noqa: E402
                         reverts, send)
# The fixtures chain and setup, by name.
from evm_helpers import chain, setup  # noqa: E402,F401  pylint: disable=unused-import

APP_ADMIN = [
    ("addComposeHash", (h32("c2"),), "ComposeHashAdded", {"composeHash": h32("c2")}),
    ("removeComposeHash", (h32("c1"),), "ComposeHashRemoved", {"composeHash": h32("c1")}),
    ("addDevice", (h32("d2"),), "DeviceAdded", {"deviceId": h32("d2")}),
    ("removeDevice", (h32("d1"),), "DeviceRemoved", {"deviceId": h32("d1")}),
    ("setAllowAnyDevice", (True,), "AllowAnyDeviceSet", {"allowAny": True}),
    ("setRequireTcbUpToDate", (True,), "RequireTcbUpToDateSet", {"requireUpToDate": True}),
    ("disableUpgrades", (), "UpgradesDisabled", {}),
]


def test_initial_state_and_init_events(setup):
    app, receipt = deploy_app(setup, device=h32("d1"), compose=h32("c1"), require_tcb=True)
    assert app.functions.owner().call() == setup["owner"]
    assert app.functions.version().call() == 2
    assert app.functions.allowedComposeHashes(h32("c1")).call() is True
    assert app.functions.allowedDeviceIds(h32("d1")).call() is True
    assert app.functions.allowAnyDevice().call() is False
    assert app.functions.requireTcbUpToDate().call() is True
    assert app.functions.upgradesDisabled().call() is False
    assert events(app, "DeviceAdded", receipt) == [{"deviceId": h32("d1")}]
    assert events(app, "ComposeHashAdded", receipt) == [{"composeHash": h32("c1")}]


def test_zero_initial_values_add_nothing(setup):
    app, receipt = deploy_app(setup, allow_any=True)
    assert app.functions.allowedComposeHashes(ZERO32).call() is False
    assert app.functions.allowedDeviceIds(ZERO32).call() is False
    assert app.functions.allowAnyDevice().call() is True
    assert events(app, "DeviceAdded", receipt) == [] and events(app, "ComposeHashAdded", receipt) == []


@pytest.mark.parametrize("name,args,event,fields", APP_ADMIN, ids=[a[0] for a in APP_ADMIN])
def test_owner_admin_functions_change_state_and_emit(setup, name, args, event, fields):
    app = deploy_app(setup, device=h32("d1"), compose=h32("c1"))[0]
    receipt = send(app.functions[name](*args), setup["owner"])
    assert events(app, event, receipt) == [fields]
    state = {
        "addComposeHash": lambda: app.functions.allowedComposeHashes(h32("c2")).call() is True,
        "removeComposeHash": lambda: app.functions.allowedComposeHashes(h32("c1")).call() is False,
        "addDevice": lambda: app.functions.allowedDeviceIds(h32("d2")).call() is True,
        "removeDevice": lambda: app.functions.allowedDeviceIds(h32("d1")).call() is False,
        "setAllowAnyDevice": lambda: app.functions.allowAnyDevice().call() is True,
        "setRequireTcbUpToDate": lambda: app.functions.requireTcbUpToDate().call() is True,
        "disableUpgrades": lambda: app.functions.upgradesDisabled().call() is True,
    }
    assert state[name]()


@pytest.mark.parametrize("name,args,event,fields", APP_ADMIN, ids=[a[0] for a in APP_ADMIN])
def test_admin_functions_refuse_non_owner(setup, name, args, event, fields):
    app = deploy_app(setup, device=h32("d1"), compose=h32("c1"))[0]
    reverts(app.functions[name](*args), setup["other"], error=not_owner(setup["other"]))


def test_set_flags_back_to_false(setup):
    app = deploy_app(setup, allow_any=True, require_tcb=True)[0]
    r1 = send(app.functions.setAllowAnyDevice(False), setup["owner"])
    r2 = send(app.functions.setRequireTcbUpToDate(False), setup["owner"])
    assert events(app, "AllowAnyDeviceSet", r1) == [{"allowAny": False}]
    assert events(app, "RequireTcbUpToDateSet", r2) == [{"requireUpToDate": False}]
    assert app.functions.allowAnyDevice().call() is False
    assert app.functions.requireTcbUpToDate().call() is False


def test_is_app_allowed_order_tcb_then_compose_then_device(setup):
    app = deploy_app(setup, device=h32("d1"), compose=h32("c1"), require_tcb=True)[0]
    check = app.functions.isAppAllowed
    ok = boot_info(app.address, compose_hash=h32("c1"), device_id=h32("d1"))
    assert check(ok).call() == [True, ""]
    # Everything wrong: the TCB is reported first, then the compose hash, then the device.
    bad = boot_info(app.address, compose_hash=h32("x"), device_id=h32("y"), tcb_status="OutOfDate")
    assert check(bad).call() == [False, "TCB status is not up to date"]
    bad = boot_info(app.address, compose_hash=h32("x"), device_id=h32("y"))
    assert check(bad).call() == [False, "Compose hash not allowed"]
    bad = boot_info(app.address, compose_hash=h32("c1"), device_id=h32("y"))
    assert check(bad).call() == [False, "Device not allowed"]


def test_tcb_only_checked_when_required(setup):
    app = deploy_app(setup, compose=h32("c1"), allow_any=True)[0]
    info = boot_info(app.address, compose_hash=h32("c1"), tcb_status="OutOfDate", advisory_ids=["INTEL-SA-00837"])
    assert app.functions.isAppAllowed(info).call() == [True, ""]
    send(app.functions.setRequireTcbUpToDate(True), setup["owner"])
    assert app.functions.isAppAllowed(info).call() == [False, "TCB status is not up to date"]


def test_removed_hash_and_device_refused(setup):
    app = deploy_app(setup, device=h32("d1"), compose=h32("c1"))[0]
    info = boot_info(app.address, compose_hash=h32("c1"), device_id=h32("d1"))
    assert app.functions.isAppAllowed(info).call()[0] is True
    send(app.functions.removeDevice(h32("d1")), setup["owner"])
    assert app.functions.isAppAllowed(info).call() == [False, "Device not allowed"]
    send(app.functions.setAllowAnyDevice(True), setup["owner"])
    assert app.functions.isAppAllowed(info).call() == [True, ""]
    send(app.functions.removeComposeHash(h32("c1")), setup["owner"])
    assert app.functions.isAppAllowed(info).call() == [False, "Compose hash not allowed"]


def test_interfaces(setup):
    app = deploy_app(setup)[0]
    supports = app.functions.supportsInterface
    assert supports(bytes.fromhex("1e079198")).call() is True  # IAppAuth
    assert supports(bytes.fromhex("8fd37527")).call() is True  # IAppAuthBasicManagement
    assert supports(bytes.fromhex("01ffc9a7")).call() is True  # ERC-165
    assert supports(bytes.fromhex("ffffffff")).call() is False


def test_transfer_ownership(setup):
    app = deploy_app(setup)[0]
    send(app.functions.transferOwnership(setup["other"]), setup["owner"])
    assert app.functions.owner().call() == setup["other"]
    reverts(app.functions.addComposeHash(h32("c")), setup["owner"], error=not_owner(setup["owner"]))
    send(app.functions.addComposeHash(h32("c")), setup["other"])


def test_initialize_cannot_run_twice_nor_on_the_implementation(setup):
    app = deploy_app(setup)[0]
    again = app.functions.initialize(setup["other"], False, False, True, ZERO32, ZERO32)
    reverts(again, setup["other"], error="0xf92ee8a9")  # InvalidInitialization()
    impl = setup["app_impl"].functions.initialize(setup["other"], False, False, True, ZERO32, ZERO32)
    reverts(impl, setup["other"], error="0xf92ee8a9")


def test_initialize_refuses_zero_owner(setup):
    w3, owner = setup["w3"], setup["owner"]
    init = setup["app_impl"].encode_abi("initialize", args=["0x" + "00" * 20, False, False, False, ZERO32, ZERO32])
    with pytest.raises(Exception, match="invalid owner address"):
        deploy(w3, "ERC1967Proxy", setup["app_impl"].address, init, sender=owner)


def test_upgrade_by_owner_then_disabled(setup):
    w3, owner = setup["w3"], setup["owner"]
    app = deploy_app(setup, compose=h32("c1"))[0]
    new_impl = deploy(w3, "DstackApp", sender=owner)
    reverts(app.functions.upgradeToAndCall(new_impl.address, b""), setup["other"], error=not_owner(setup["other"]))
    receipt = send(app.functions.upgradeToAndCall(new_impl.address, b""), owner)
    assert events(app, "Upgraded", receipt) == [{"implementation": new_impl.address}]
    assert app.functions.allowedComposeHashes(h32("c1")).call() is True  # state kept
    send(app.functions.disableUpgrades(), owner)
    reverts(app.functions.upgradeToAndCall(setup["app_impl"].address, b""), owner,
            reason="Upgrades are permanently disabled")


def test_disable_upgrades_at_deploy(setup):
    app = deploy_app(setup, disable_upgrades=True)[0]
    assert app.functions.upgradesDisabled().call() is True
    reverts(app.functions.upgradeToAndCall(setup["app_impl"].address, b""), setup["owner"],
            reason="Upgrades are permanently disabled")


def test_app_owned_by_someone_else_than_the_deployer(setup):
    app, receipt = deploy_app(setup, owner=setup["third"], sender=setup["other"])
    assert app.functions.owner().call() == setup["third"]
    assert events(setup["kms"], "AppDeployedViaFactory", receipt) == [
        {"appId": app.address, "deployer": setup["other"]}]
    reverts(app.functions.addComposeHash(h32("c")), setup["other"], error=not_owner(setup["other"]))
    contract_at(setup["w3"], "DstackApp", app.address)
