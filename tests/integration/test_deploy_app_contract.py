"""deploy-app.yml with the app contract instead of the local allowlist, end to end on ganache.

A DstackKms is deployed with the kms_contract module (allowing the simulated OS image), site.yml
brings up the KMS with the ethereum auth backend on that contract, and deploy-app.yml runs with
`dstack_app_auth=contract`: it deploys the app's DstackApp through the DstackKms factory, allows
the compose_hash on it, and the CVM boots with the contract's address as its app_id; the KMS
releases its keys because the chain says so. A run that stopped after deploying the contract
leaves its address in the build folder and the next run reuses it. Then: a second run sends no
transaction and changes nothing, check mode sends none either, and a key that does not own the
contract, or a wrong chain id, stops the run before the CVM or the build folder changes.
"""

import hashlib
import json
import shutil
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("web3", reason="web3 is installed by scripts/setup.sh --test")

from conftest import CHAIN_ID, KEY, OTHER_KEY, ROOT, free_port, ganache_chain, needs_podman, run_module, run_playbook  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.contract_artifacts import ARTIFACTS  # noqa: E402
from test_demo_playbook import TOKEN, _recap, _teardown, _vmm  # noqa: E402

# What the simulated VMM reports as the OS image (vm_config.os_image_hash; roles/vmm's default).
OS_IMAGE = "00" * 32
OTHER_PUBKEY = "027f31ebc5462c1fdce1b737ecff52d37d75dea43ce11c74d25aa297165faa2007"  # OTHER_KEY's, not the KMS's


def _nonce(w3, key):
    return w3.eth.get_transaction_count(w3.eth.account.from_key(key).address)


@pytest.fixture(scope="module")
def chain():
    yield from ganache_chain()


@pytest.fixture
def stack(chain):
    """A DstackKms on the chain, and a short root with its own ports for the KMS, the VMM and the app."""
    url, w3 = chain
    kms = run_module("kms_contract", dict(rpc_url=url, chain_id=CHAIN_ID, private_key=KEY, os_images=[OS_IMAGE]))
    assert kms["changed"] and not kms.get("failed"), kms
    root = Path(tempfile.mkdtemp(prefix="dc-", dir="/tmp"))
    app = root / "hello"
    shutil.copytree(ROOT / "examples" / "hello", app)
    ports = {"kms": free_port(), "vmm": free_port(), "app": free_port()}
    (app / "app.yml").write_text((app / "app.yml").read_text().replace("host_port: 8080", f"host_port: {ports['app']}"))
    extra = ["-e", json.dumps({
        "dstack_root": str(root), "dstack_kms_listen": f"127.0.0.1:{ports['kms']}",
        "dstack_kms_url": f"https://127.0.0.1:{ports['kms']}", "dstack_vmm_listen": f"127.0.0.1:{ports['vmm']}",
        "dstack_vmm_url": f"http://127.0.0.1:{ports['vmm']}", "dstack_vmm_tokens": [TOKEN],
        # The KMS asks the chain; deploy-app.yml reuses these for the app's contract.
        "dstack_kms_auth_type": "ethereum", "dstack_kms_eth_rpc_url": url, "dstack_kms_eth_chain_id": CHAIN_ID,
        "dstack_kms_contract_address": kms["address"],
        # The gateway's own app would need its own DstackApp on this chain: this test is about the app's.
        "dstack_gateway_enabled": False})]
    try:
        yield dict(root=root, app=app, ports=ports, extra=extra, url=url, w3=w3, kms=kms["address"])
    finally:
        _teardown(root, ports)
        shutil.rmtree(root, ignore_errors=True)


def _deploy(stack, *flags, key=KEY):
    return run_playbook(ROOT / "playbooks" / "deploy-app.yml", *stack["extra"], "-e", f"app_dir={stack['app']}",
                        "-e", "dstack_app_auth=contract", "-e", f"dstack_app_eth_private_key={key}", *flags)


def _allowed(w3, address, compose_hash):
    app = w3.eth.contract(address=w3.to_checksum_address(address), abi=ARTIFACTS["DstackApp"]["abi"])
    return app.functions.allowedComposeHashes(bytes.fromhex(compose_hash)).call()


@needs_podman
def test_deploy_app_with_the_app_contract(stack):
    root, ports, w3 = stack["root"], stack["ports"], stack["w3"]
    # The KMS role refuses an ethereum backend without its contract, before anything is made.
    incomplete = run_playbook(ROOT / "playbooks" / "site.yml", *stack["extra"], "-e", "dstack_kms_contract_address=")
    assert incomplete.returncode != 0 and "dstack_kms_contract_address: is required" in incomplete.stdout, \
        incomplete.stdout[-3000:]
    assert not (root / "kms").exists()
    site = run_playbook(ROOT / "playbooks" / "site.yml", *stack["extra"])
    assert site.returncode == 0, site.stdout[-4000:] + site.stderr[-2000:]
    kms_toml = (root / "kms" / "kms.toml").read_text()
    assert 'type = "ethereum"' in kms_toml and stack["kms"] in kms_toml
    image = subprocess.run([str(ROOT / "examples" / "hello" / "image" / "build.sh"), "localhost/dstack-hello:latest"],
                           capture_output=True, text=True, check=False)
    assert image.returncode == 0, image.stderr

    # Check mode first: the contract would be deployed; no transaction, no CVM, nothing recorded.
    nonce = _nonce(w3, KEY)
    preview = _deploy(stack, "--check", "--diff")
    assert preview.returncode == 0, preview.stdout[-4000:]
    assert _recap(preview.stdout)["changed"] > 0 and "app_id:         (would be deployed" in preview.stdout
    assert _nonce(w3, KEY) == nonce and _vmm(ports, "Status")["vms"] == []
    assert not (root / "build" / "hello" / "app-contract-address").exists()

    # The DstackApp is deployed through the factory with the compose_hash allowed (one
    # transaction), then the run
    # stops before the CVM (here: the KMS signing key given is not the KMS's). Its address is
    # recorded in the build folder...
    broken = _deploy(stack, "-e", f"dstack_kms_k256_pubkey={OTHER_PUBKEY}")
    assert broken.returncode != 0 and "signature_v1: was not made by the trusted KMS key" in broken.stdout, \
        broken.stdout[-3000:]
    assert _vmm(ports, "Status")["vms"] == []
    assert _nonce(w3, KEY) == nonce + 1
    address = (root / "build" / "hello" / "app-contract-address").read_text().strip()

    # ... and the next run uses it: no second DstackApp; the CVM gets its keys through the chain.
    first = _deploy(stack)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
    assert _nonce(w3, KEY) == nonce + 1
    compose_hash = hashlib.sha256((root / "build" / "hello" / "app-compose.json").read_bytes()).hexdigest()
    app_id = address[2:].lower()
    assert w3.eth.get_code(address) and _allowed(w3, address, compose_hash)
    vm = _vmm(ports, "Status")["vms"][0]
    assert vm["app_id"] == app_id and f"app_id:         {app_id}" in first.stdout
    assert "compose_hash matches" in first.stdout
    with urllib.request.urlopen(f"http://127.0.0.1:{ports['app']}/", timeout=10) as response:
        page = response.read().decode()
    assert "Hello from a confidential VM" in page and "App key fingerprint" in page and "(no key" not in page
    releases = [json.loads(line) for line in (root / "kms" / "audit.log").read_text().splitlines()]
    assert any(r["decision"] == "release" and r.get("app_id") == app_id for r in releases), releases[-3:]
    assert KEY[2:] not in first.stdout + first.stderr

    # Again, and in check mode: no transaction, nothing changes.
    again = _deploy(stack)
    assert again.returncode == 0 and _recap(again.stdout)["changed"] == 0, again.stdout[-3000:]
    check = _deploy(stack, "--check", "--diff")
    assert check.returncode == 0 and _recap(check.stdout)["changed"] == 0, check.stdout[-3000:]
    assert _nonce(w3, KEY) == nonce + 1

    # A new compose_hash needs a change on chain: a key that does not own the DstackApp, a wrong
    # chain id, or an OS image the DstackKms does not allow stops the run before the build folder
    # or the CVM changes.
    (stack["app"] / "docker-compose.yaml").write_text((stack["app"] / "docker-compose.yaml").read_text() + "# v2\n")
    build = (root / "build" / "hello" / "app-compose.json").read_bytes()
    other_nonce = _nonce(w3, OTHER_KEY)
    other = w3.eth.account.from_key(OTHER_KEY).address
    for flags, key, reason in (
            ([], OTHER_KEY, f"dstack.tee.app_contract: private_key: the key's address {other} is not the owner"),
            (["-e", f"dstack_app_eth_chain_id={CHAIN_ID + 1}"], KEY,
             f"chain_id: the RPC serves chain id {CHAIN_ID}, not {CHAIN_ID + 1}"),
            (["-e", "dstack_vmm_os_image_hash=" + "11" * 32], KEY,
             f"os_image_hash: {'11' * 32} is not allowed on the DstackKms {stack['kms']}")):
        refused = _deploy(stack, *flags, key=key)
        assert refused.returncode != 0 and reason in refused.stdout, (reason, refused.stdout[-3000:])
        assert key[2:] not in refused.stdout + refused.stderr
        assert (root / "build" / "hello" / "app-compose.json").read_bytes() == build
        assert _vmm(ports, "GetInfo", {"id": vm["id"]})["info"]["compose_hash"] == compose_hash
    assert _nonce(w3, OTHER_KEY) == other_nonce and _nonce(w3, KEY) == nonce + 1
