"""deploy-app.yml -e app_state=absent (issue 14 point 5): the app removed from every VMM host, its
containers and volumes with its CVMs, its build folder; its compose hashes withdrawn with revoke.

One stack (site.yml's KMS and VMM, no gateway, in a short temporary root with its own ports) and a
second VMM on the same KMS (its own run path and supervisord: another VMM host, as the inventory's
dstack_vmm group names it). examples/notes (two services sharing a named volume; its images built
with names of this run's own) is deployed on both. A note written is kept across a stop and a start
(a VM's disk). Then, with an inventory naming both VMMs: check mode removes nothing; the run leaves
no CVM of the app in either VMM's list, no container nor volume with either CVM's project label
(dstack-<id8>), no build folder, and the allowlist as it was; its summary names the app_id and what
keeps it; a second run and check mode change nothing. With revoke=true, on one host: the app's
compose hashes leave the allowlist (the others' stay), and a later deploy of the same folder gets the
app_id, and the same app key from the CVM's GetKey, as before. With dstack_app_auth=contract (on
ganache): revoke removes the compose_hash from the app's DstackApp before the CVM goes, and without
the owner's key it stops with the CVM still there.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import CHAIN_ID, KEY, ROOT, free_port, ganache_chain, needs_podman, run_module, run_playbook, stop_process_group
from test_demo_playbook import TOKEN, _recap, _teardown
from ansible_collections.dstack.tee.plugins.module_utils import guest_client
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.vmm_client import VmmClient

DEPLOY = ROOT / "playbooks" / "deploy-app.yml"
BIN = Path(sys.executable).parent
LABEL = "io.podman.compose.project"
NOTES_TOKEN = "absent-test-token-0123"


def _podman(*args):
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=120, check=False)


def _labelled(kind, project):
    """The podman containers (kind "ps") or volumes ("volume") of a compose project."""
    argv = ["ps", "-a", "-q"] if kind == "ps" else ["volume", "ls", "-q"]
    return _podman(*argv, "--filter", f"label={LABEL}={project}").stdout.split()


def _start_second_vmm(root, kms_port, port):
    """`dstack-vmm serve` as the vmm role runs it, on the stack's KMS, with its own run path."""
    kms = root / "kms"
    argv = [str(BIN / "dstack-vmm"), "serve", "--run-path", str(root / "run2"), "--listen", f"127.0.0.1:{port}",
            "--backend", "process", "--kms-url", f"https://127.0.0.1:{kms_port}", "--kms-ca-cert",
            str(kms / "root-ca.crt"), "--sim-state", str(kms / "tdx-sim"), "--os-image-hash", "0" * 64]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,  # pylint: disable=consider-using-with
                            env=dict(os.environ, DSTACK_VMM_TOKENS=TOKEN))
    client = VmmClient(f"http://127.0.0.1:{port}", token=TOKEN)
    deadline = time.monotonic() + 30
    while True:
        try:
            client.call("Version")
            return proc
        except DstackError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("the second dstack-vmm did not answer") from None
            time.sleep(0.1)


@pytest.fixture(scope="module")
def stack():
    root = Path(tempfile.mkdtemp(prefix="dab-", dir="/tmp"))
    ports = {"kms": free_port(), "vmm": free_port(), "vmm2": free_port(), "web": free_port(), "store": free_port(),
             "web2": free_port(), "store2": free_port()}
    prefix = f"localhost/dstack-absent-test-{os.getpid()}"
    names = {"web": f"{prefix}-web:latest", "store": f"{prefix}-store:latest"}
    settings = {
        "dstack_root": str(root), "dstack_kms_listen": f"127.0.0.1:{ports['kms']}",
        "dstack_kms_url": f"https://127.0.0.1:{ports['kms']}", "dstack_vmm_listen": f"127.0.0.1:{ports['vmm']}",
        "dstack_vmm_url": f"http://127.0.0.1:{ports['vmm']}", "dstack_vmm_tokens": [TOKEN],
        "dstack_gateway_enabled": False}
    app = root / "notes"
    shutil.copytree(ROOT / "examples" / "notes", app, ignore=shutil.ignore_patterns("*.tar", "secrets.env"))
    secrets = (app / "secrets.env.example").read_text()
    (app / "secrets.env").write_text(re.sub(r"(?m)^NOTES_TOKEN=.*$", f"NOTES_TOKEN={NOTES_TOKEN}", secrets))
    compose = (app / "docker-compose.yaml").read_text()
    for service, name in names.items():
        compose = compose.replace(f"localhost/dstack-notes-{service}:latest", name)
    (app / "docker-compose.yaml").write_text(compose)
    spec = (app / "app.yml").read_text()
    (app / "app.yml").write_text(spec.replace("host_port: 8081", f"host_port: {ports['web']}")
                                 .replace("host_port: 8082", f"host_port: {ports['store']}"))
    replica = root / "notes-replica"
    vmm2 = None
    try:
        built = subprocess.run([str(app / "image" / "build.sh"), str(app / "image"), prefix],
                               capture_output=True, text=True, timeout=120, check=False)
        assert built.returncode == 0, built.stderr
        # The same app (its name and compose) with the second host's ports: its replica there.
        shutil.copytree(app, replica)
        (replica / "app.yml").write_text(spec.replace("host_port: 8081", f"host_port: {ports['web2']}")
                                         .replace("host_port: 8082", f"host_port: {ports['store2']}"))
        site = run_playbook(ROOT / "playbooks" / "site.yml", "-e", json.dumps(settings))
        assert site.returncode == 0, site.stdout[-4000:] + site.stderr[-2000:]
        vmm2 = _start_second_vmm(root, ports["kms"], ports["vmm2"])
        # The inventory of the removal: the play on localhost, the VMM hosts in the dstack_vmm group.
        inventory = root / "inventory.yml"
        host = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
                "dstack_vmm_tokens": [TOKEN]}
        inventory.write_text(json.dumps({"all": {
            "hosts": {"localhost": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}},
            "children": {"dstack_vmm": {"hosts": {
                "vmm-a": dict(host, dstack_vmm_url=f"http://127.0.0.1:{ports['vmm']}"),
                "vmm-b": dict(host, dstack_vmm_url=f"http://127.0.0.1:{ports['vmm2']}")}}}}}))
        yield dict(root=root, app=app, replica=replica, ports=ports, names=names, settings=settings,
                   inventory=inventory)
    finally:
        projects = []
        for port in (ports["vmm"], ports["vmm2"]):
            try:
                client = VmmClient(f"http://127.0.0.1:{port}", token=TOKEN)
                for vm in client.call("Status").get("vms", []):
                    projects.append(f"dstack-{vm['id'][:8]}")
                    client.call("RemoveVm", {"id": vm["id"]})
            except DstackError:
                pass
        stop_process_group(vmm2)
        subprocess.run([str(BIN / "supervisorctl"), "-c", str(root / "run2" / "supervisor" / "supervisord.conf"),
                        "shutdown"], capture_output=True, check=False, timeout=60)
        _teardown(root, ports)
        for project in projects:  # what a failed removal would leave
            for volume in _labelled("volume", project):
                _podman("volume", "rm", "-f", volume)
        _podman("rmi", "-f", *names.values())
        shutil.rmtree(root, ignore_errors=True)


def _client(stack, which="vmm"):
    return VmmClient(f"http://127.0.0.1:{stack['ports'][which]}", token=TOKEN)


def _deploy(stack, app, vmm="vmm"):
    settings = dict(stack["settings"], dstack_vmm_url=f"http://127.0.0.1:{stack['ports'][vmm]}",
                    dstack_vmm_run_path=str(stack["root"] / ("run" if vmm == "vmm" else "run2")))
    return run_playbook(DEPLOY, "-e", json.dumps(settings), "-e", f"app_dir={app}")


def _absent(stack, *flags, inventory=True):
    """deploy-app.yml -e app_state=absent; with the inventory, on both VMM hosts (each one's
    dstack_vmm_url from the inventory: the settings give no dstack_vmm_url, which would win)."""
    settings = {k: v for k, v in stack["settings"].items() if not k.startswith("dstack_vmm_")}
    where = ["-i", str(stack["inventory"])] if inventory else ["-e", json.dumps(
        {"dstack_vmm_url": stack["settings"]["dstack_vmm_url"], "dstack_vmm_tokens": [TOKEN]})]
    return run_playbook(DEPLOY, *where, "-e", json.dumps(settings), "-e", f"app_dir={stack['app']}",
                        "-e", "app_state=absent", *flags)


def _get(url, data=None, headers=None):
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        return getattr(exc, "code", 0), str(exc)


def _wait_note(url, note, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        status, notes = _get(url)
        if status == 200 and note in notes or time.monotonic() > deadline:
            return status, notes
        time.sleep(0.3)


def _instances(stack):
    """{vmm: [(id, name, app_id, compose_hash)]} of both VMMs."""
    return {which: [(vm["id"], vm["name"], vm["app_id"], vm["compose_hash"])
                    for vm in _client(stack, which).call("Status").get("vms", [])] for which in ("vmm", "vmm2")}


@needs_podman
def test_absent_removes_every_instance_its_containers_volumes_and_build_folder(stack):
    root, ports = stack["root"], stack["ports"]
    for app, vmm in ((stack["app"], "vmm"), (stack["replica"], "vmm2")):
        deployed = _deploy(stack, app, vmm)
        assert deployed.returncode == 0, deployed.stdout[-4000:] + deployed.stderr[-2000:]
    cvms = _instances(stack)
    assert [len(cvms["vmm"]), len(cvms["vmm2"])] == [1, 1]
    (vm_a, name, app_id, _hash), (vm_b, *_rest) = cvms["vmm"][0], cvms["vmm2"][0]
    assert name == "notes" and cvms["vmm2"][0][1:] == cvms["vmm"][0][1:]  # a replica: the same app and compose
    projects = [f"dstack-{vm_a[:8]}", f"dstack-{vm_b[:8]}"]

    # A note written goes to the volume, which a stop and a start keep (as a VM keeps its disk).
    status, text = _get(f"http://127.0.0.1:{ports['web']}/", b"kept across a restart", {"X-Notes-Token": NOTES_TOKEN})
    assert status == 202, text
    assert "kept across a restart" in _wait_note(f"http://127.0.0.1:{ports['store']}/", "kept across a restart")[1]
    client = _client(stack)
    client.call("StopVm", {"id": vm_a})
    assert _labelled("volume", projects[0]) and not _labelled("ps", projects[0])
    client.call("StartVm", {"id": vm_a})
    client.wait_running(vm_a, timeout=120)
    assert "kept across a restart" in _wait_note(f"http://127.0.0.1:{ports['store']}/", "kept across a restart")[1]
    for project in projects:
        assert len(_labelled("ps", project)) == 2 and len(_labelled("volume", project)) == 1, project
    allowlist = (root / "kms" / "auth-config.json").read_bytes()
    build = root / "build" / "notes"
    assert (build / "app-compose.json").is_file()

    # Check mode: says what would go, removes nothing.
    check = _absent(stack, "--check", "--diff")
    assert check.returncode == 0, check.stdout[-4000:] + check.stderr[-2000:]
    assert "instances:      would remove the CVM notes on vmm-a, vmm-b, with their containers and volumes" in check.stdout
    assert f"build folder:   would remove {build}" in check.stdout
    assert _instances(stack) == cvms and build.is_dir()
    assert all(len(_labelled("volume", project)) == 1 for project in projects)

    removed = _absent(stack)
    assert removed.returncode == 0, removed.stdout[-4000:] + removed.stderr[-2000:]
    assert _instances(stack) == {"vmm": [], "vmm2": []}
    for project in projects:
        assert _labelled("ps", project) == [] and _labelled("volume", project) == [], project
    assert not build.exists() and not (root / "run" / vm_a).exists() and not (root / "run2" / vm_b).exists()
    assert (root / "kms" / "auth-config.json").read_bytes() == allowlist  # no revoke: left as it was
    assert "instances:      removed the CVM notes on vmm-a, vmm-b, with their containers and volumes" in removed.stdout
    assert (f"authorization:  left as it is (-e revoke=true withdraws it): the compose hashes of app_id {app_id} "
            f"stay allowed in the KMS allowlist {root}/kms/auth-config.json") in removed.stdout
    assert (f"app_id:         {app_id} is gone with its instances, and with it the keys of the app, unless a later "
            "deploy has this app_id: the KMS derives them from the app_id, so the same app_id gets the same keys "
            f"(this app folder, as it is, deploys with app_id {app_id} again") in removed.stdout, removed.stdout[-3000:]

    # Nothing left to remove: a second run and check mode change nothing.
    for flags in ((), ("--check", "--diff")):
        again = _absent(stack, *flags)
        assert again.returncode == 0 and _recap(again.stdout)["changed"] == 0, again.stdout[-4000:]
        assert "instances:      none left: no CVM named notes on vmm-a, vmm-b" in again.stdout


@needs_podman
def test_absent_with_revoke_withdraws_the_hashes_and_the_same_app_id_gets_the_same_keys(stack):
    root = stack["root"]
    deployed = _deploy(stack, stack["app"])
    assert deployed.returncode == 0, deployed.stdout[-4000:] + deployed.stderr[-2000:]
    (vm_id, _name, app_id, compose_hash), = _instances(stack)["vmm"]
    key = guest_client.call(str(root / "run" / vm_id / "dstack.sock"), "GetKey", {"path": "absent-test"})["key"]
    path = root / "kms" / "auth-config.json"
    other = "ab" * 20
    doc = json.loads(path.read_text())  # another app's entry, which the revoke leaves alone
    doc["apps"]["0x" + other] = {"composeHashes": ["0x" + "cd" * 32], "devices": [], "allowAnyDevice": True}
    path.write_text(json.dumps(doc))
    assert doc["apps"]["0x" + app_id]["composeHashes"] == ["0x" + compose_hash]

    check = _absent(stack, "-e", "revoke=true", "--check", "--diff", inventory=False)
    assert check.returncode == 0, check.stdout[-4000:]
    assert json.loads(path.read_text()) == doc and len(_instances(stack)["vmm"]) == 1
    assert f'-        "0x{compose_hash}"' in check.stdout  # the allowlist's diff

    revoked = _absent(stack, "-e", "revoke=true", inventory=False)
    assert revoked.returncode == 0, revoked.stdout[-4000:] + revoked.stderr[-2000:]
    after = json.loads(path.read_text())
    assert after["apps"]["0x" + app_id]["composeHashes"] == []
    assert after["apps"]["0x" + other] == doc["apps"]["0x" + other]
    assert (f"authorization:  revoked in the KMS allowlist {path} on localhost: app_id {app_id} ({compose_hash})"
            in revoked.stdout), revoked.stdout[-3000:]
    assert _instances(stack)["vmm"] == [] and _labelled("volume", f"dstack-{vm_id[:8]}") == []
    again = _absent(stack, "-e", "revoke=true", inventory=False)
    assert again.returncode == 0 and _recap(again.stdout)["changed"] == 0, again.stdout[-4000:]
    assert "authorization:  nothing to revoke: the KMS allowlist allows no compose hash of app_id" in again.stdout

    # The same folder deploys with the same app_id again (authorized anew), and its key is the same.
    redeployed = _deploy(stack, stack["app"])
    assert redeployed.returncode == 0, redeployed.stdout[-4000:] + redeployed.stderr[-2000:]
    (new_id, _name, new_app_id, _hash), = _instances(stack)["vmm"]
    assert new_id != vm_id and new_app_id == app_id
    assert guest_client.call(str(root / "run" / new_id / "dstack.sock"), "GetKey", {"path": "absent-test"})["key"] == key


@pytest.fixture(scope="module")
def chain():
    pytest.importorskip("web3", reason="web3 is installed by scripts/setup.sh --test")
    yield from ganache_chain()


def _allowed(w3, address, compose_hash):
    from ansible_collections.dstack.tee.plugins.module_utils.contract_artifacts import ARTIFACTS  # pylint: disable=import-outside-toplevel
    app = w3.eth.contract(address=w3.to_checksum_address(address), abi=ARTIFACTS["DstackApp"]["abi"])
    return app.functions.allowedComposeHashes(bytes.fromhex(compose_hash)).call()


@needs_podman
def test_absent_with_revoke_on_the_app_contract(chain):
    url, w3 = chain
    kms = run_module("kms_contract", dict(rpc_url=url, chain_id=CHAIN_ID, private_key=KEY, os_images=["00" * 32]))
    assert kms["changed"] and not kms.get("failed"), kms
    root = Path(tempfile.mkdtemp(prefix="dac-", dir="/tmp"))
    ports = {"kms": free_port(), "vmm": free_port(), "app": free_port()}
    app = root / "hello"
    shutil.copytree(ROOT / "examples" / "hello", app, ignore=shutil.ignore_patterns("image"))
    (app / "app.yml").write_text((app / "app.yml").read_text().replace("host_port: 8080", f"host_port: {ports['app']}"))
    settings = [
        "-e", json.dumps({
            "dstack_root": str(root), "dstack_kms_listen": f"127.0.0.1:{ports['kms']}",
            "dstack_kms_url": f"https://127.0.0.1:{ports['kms']}", "dstack_vmm_listen": f"127.0.0.1:{ports['vmm']}",
            "dstack_vmm_url": f"http://127.0.0.1:{ports['vmm']}", "dstack_vmm_tokens": [TOKEN],
            "dstack_kms_auth_type": "ethereum", "dstack_kms_eth_rpc_url": url, "dstack_kms_eth_chain_id": CHAIN_ID,
            "dstack_kms_contract_address": kms["address"], "dstack_gateway_enabled": False}),
        "-e", f"app_dir={app}", "-e", "dstack_app_auth=contract"]
    client = VmmClient(f"http://127.0.0.1:{ports['vmm']}", token=TOKEN)
    try:
        site = run_playbook(ROOT / "playbooks" / "site.yml", *settings)
        assert site.returncode == 0, site.stdout[-4000:] + site.stderr[-2000:]
        image = subprocess.run([str(ROOT / "examples" / "hello" / "image" / "build.sh"), "localhost/dstack-hello:latest"],
                               capture_output=True, text=True, check=False)
        assert image.returncode == 0, image.stderr
        deployed = run_playbook(DEPLOY, *settings, "-e", f"dstack_app_eth_private_key={KEY}")
        assert deployed.returncode == 0, deployed.stdout[-4000:] + deployed.stderr[-2000:]
        address = (root / "build" / "hello" / "app-contract-address").read_text().strip()
        compose_hash = hashlib.sha256((root / "build" / "hello" / "app-compose.json").read_bytes()).hexdigest()
        (vm,) = client.call("Status")["vms"]
        assert vm["app_id"] == address[2:].lower() and _allowed(w3, address, compose_hash)

        # Without the owner's key nothing can be revoked: the run stops before the CVM goes.
        refused = run_playbook(DEPLOY, *settings, "-e", "app_state=absent", "-e", "revoke=true")
        assert refused.returncode != 0 and f"dstack.tee.app_contract (0x{vm['app_id']}): private_key: is required" \
            in refused.stdout, refused.stdout[-3000:]
        assert KEY[2:] not in refused.stdout + refused.stderr
        assert [v["id"] for v in client.call("Status")["vms"]] == [vm["id"]] and _allowed(w3, address, compose_hash)

        removed = run_playbook(DEPLOY, *settings, "-e", "app_state=absent", "-e", "revoke=true",
                               "-e", f"dstack_app_eth_private_key={KEY}")
        assert removed.returncode == 0, removed.stdout[-4000:] + removed.stderr[-2000:]
        assert not _allowed(w3, address, compose_hash) and client.call("Status")["vms"] == []
        assert not (root / "build" / "hello").exists() and KEY[2:] not in removed.stdout + removed.stderr
        assert (f"authorization:  revoked {compose_hash} on the DstackApp 0x{vm['app_id']} (transactions sent: 1)"
                in removed.stdout), removed.stdout[-3000:]
        assert f"a deploy with -e dstack_app_contract_address=0x{vm['app_id']} keeps it" in removed.stdout

        again = run_playbook(DEPLOY, *settings, "-e", "app_state=absent", "-e", "revoke=true",
                             "-e", f"dstack_app_eth_private_key={KEY}")
        assert again.returncode == 0 and _recap(again.stdout)["changed"] == 0, again.stdout[-4000:]
    finally:
        _teardown(root, ports)
        shutil.rmtree(root, ignore_errors=True)
