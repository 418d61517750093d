"""examples/notes deployed by deploy-app.yml, its images shipped to a VMM host whose podman store
lacked them (issue 15 point 6).

One stack (site.yml's KMS and VMM, no gateway, in a short temporary root with its own ports). The
notes app is copied with image names of this run's own (so other tests and a running demo are not
touched), its archives built by image/build.sh and its images absent from the store. Then: check
mode says the images would be loaded and loads nothing; the run loads them (each ID is the
SHA-256 of its archive's config, recomputed here from the tar), both services answer and share
the volume, the secret outside allowed_envs is in no container's env; a second run and check mode
change nothing. A wrong archive is refused naming its app.yml entry, before anything changes. The
images given by name are saved on one store and loaded into another (a second podman store).
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, free_port, needs_podman, run_module, run_playbook
from test_demo_playbook import TOKEN, _recap, _teardown, _vmm

DEPLOY = ROOT / "playbooks" / "deploy-app.yml"
NOTES_TOKEN = "notes-test-token-0123"
ADMIN_PASSWORD = "admin-password-never-sent-4567"


def _podman(*args):
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=120, check=False)


def _store_id(name):
    found = _podman("image", "inspect", "--format", "{{.Id}}", name)
    return found.stdout.strip() if found.returncode == 0 else None


def _archive_id(path):
    """The image ID an archive loads as, by hand: the SHA-256 of the config its manifest names."""
    with tarfile.open(path) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
        return hashlib.sha256(tar.extractfile(manifest[0]["Config"]).read()).hexdigest(), manifest[0]["RepoTags"]


@pytest.fixture(scope="module")
def stack():
    root = Path(tempfile.mkdtemp(prefix="dno-", dir="/tmp"))
    ports = {"kms": free_port(), "vmm": free_port(), "web": free_port(), "store": free_port()}
    prefix = f"localhost/dstack-notes-test-{os.getpid()}"
    names = {"web": f"{prefix}-web:latest", "store": f"{prefix}-store:latest"}
    extra = ["-e", json.dumps({
        "dstack_root": str(root), "dstack_kms_listen": f"127.0.0.1:{ports['kms']}",
        "dstack_kms_url": f"https://127.0.0.1:{ports['kms']}", "dstack_vmm_listen": f"127.0.0.1:{ports['vmm']}",
        "dstack_vmm_url": f"http://127.0.0.1:{ports['vmm']}", "dstack_vmm_tokens": [TOKEN],
        "dstack_gateway_enabled": False})]
    app = root / "notes"
    shutil.copytree(ROOT / "examples" / "notes", app, ignore=shutil.ignore_patterns("*.tar", "secrets.env"))
    # As the README says: the example's secrets, copied and changed.
    secrets = (app / "secrets.env.example").read_text()
    secrets = re.sub(r"(?m)^NOTES_TOKEN=.*$", f"NOTES_TOKEN={NOTES_TOKEN}", secrets)
    (app / "secrets.env").write_text(re.sub(r"(?m)^ADMIN_PASSWORD=.*$", f"ADMIN_PASSWORD={ADMIN_PASSWORD}", secrets))
    compose = (app / "docker-compose.yaml").read_text()
    for service, name in names.items():
        compose = compose.replace(f"localhost/dstack-notes-{service}:latest", name)
    (app / "docker-compose.yaml").write_text(compose)
    spec = (app / "app.yml").read_text().replace("host_port: 8081", f"host_port: {ports['web']}")
    (app / "app.yml").write_text(spec.replace("host_port: 8082", f"host_port: {ports['store']}"))
    try:
        built = subprocess.run([str(app / "image" / "build.sh"), str(app / "image"), prefix],
                               capture_output=True, text=True, timeout=120, check=False)
        assert built.returncode == 0, built.stderr
        site = run_playbook(ROOT / "playbooks" / "site.yml", *extra)
        assert site.returncode == 0, site.stdout[-4000:] + site.stderr[-2000:]
        yield dict(root=root, app=app, ports=ports, names=names, extra=extra)
    finally:
        project = None
        try:
            project = [f"dstack-{vm['id'][:8]}" for vm in _vmm(ports, "Status").get("vms", [])]
        except Exception:  # pylint: disable=broad-except
            pass
        _teardown(root, ports)
        for name in project or []:  # the compose's named volume outlives its containers
            for volume in _podman("volume", "ls", "-q", "--filter", f"label=io.podman.compose.project={name}").stdout.split():
                _podman("volume", "rm", "-f", volume)
        _podman("rmi", "-f", *names.values())
        shutil.rmtree(root, ignore_errors=True)


def _deploy(stack, *flags, app=None):
    return run_playbook(DEPLOY, *stack["extra"], "-e", f"app_dir={app or stack['app']}", *flags)


def _get(url, data=None, headers=None):
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@needs_podman
def test_notes_deploys_with_its_images_shipped_to_a_store_that_lacked_them(stack):
    ports, names, app = stack["ports"], stack["names"], stack["app"]
    archives = {service: _archive_id(app / "image" / f"notes-{service}.tar") for service in names}
    for service, name in names.items():
        assert archives[service][1] == [name]
        _podman("rmi", "-f", name)
        assert _store_id(name) is None

    # Check mode: the images would be loaded; none is, and no CVM is made.
    check = _deploy(stack, "--check", "--diff")
    assert check.returncode == 0, check.stdout[-4000:]
    assert re.search(r"TASK \[dstack.tee.app : Load the images into the VMM host's podman store[^\n]*\]\s*\**\n"
                     r"(?:.*\n)*?changed: \[localhost", check.stdout), check.stdout[-4000:]
    assert f"images[0]: {names['web']}: sha256:{archives['web'][0]}" in check.stdout
    assert all(_store_id(name) is None for name in names.values())
    assert _vmm(ports, "Status")["vms"] == []

    first = _deploy(stack)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
    # Loaded: each name is the image its archive holds.
    for service, name in names.items():
        assert _store_id(name) == archives[service][0], service
    assert "not in allowed_envs, so left out: ADMIN_PASSWORD" in first.stdout

    # Both services answer; a note given to web is added by store to the shared volume.
    status, page = _get(f"http://127.0.0.1:{ports['web']}/")
    assert status == 200 and "<h1>Notes from a confidential VM</h1>" in page, page
    assert "ADMIN_PASSWORD is\nnot set" in page
    status, text = _get(f"http://127.0.0.1:{ports['web']}/", b"note <one>", {"X-Notes-Token": "wrong"})
    assert status == 403, text
    status, text = _get(f"http://127.0.0.1:{ports['web']}/", b"note <one>", {"X-Notes-Token": NOTES_TOKEN})
    assert status == 202, text
    deadline = time.monotonic() + 30
    while True:
        status, notes = _get(f"http://127.0.0.1:{ports['store']}/")
        if status == 200 and "note <one>" in notes or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert status == 200 and re.fullmatch(r"1 \S+Z note <one>\n", notes), notes
    assert "note &lt;one&gt;" in _get(f"http://127.0.0.1:{ports['web']}/")[1]

    # The secret outside allowed_envs is in no container's env (the compose asks for it in web's).
    vm = _vmm(ports, "Status")["vms"][0]
    containers = _podman("ps", "-q", "--filter", f"label=io.podman.compose.project=dstack-{vm['id'][:8]}").stdout.split()
    assert len(containers) == 2
    envs = [json.loads(_podman("inspect", "--format", "{{json .Config.Env}}", c).stdout) for c in containers]
    for env in envs:
        assert not any(ADMIN_PASSWORD in item for item in env), env
        assert "ADMIN_PASSWORD" not in {item.split("=", 1)[0] for item in env if item.split("=", 1)[1]}, env
    assert any(f"NOTES_TOKEN={NOTES_TOKEN}" in env for env in envs)  # the allowed secret did arrive
    assert ADMIN_PASSWORD not in first.stdout + first.stderr

    # A second run and check mode change nothing: the store holds the images.
    again = _deploy(stack)
    assert again.returncode == 0 and _recap(again.stdout)["changed"] == 0, again.stdout[-4000:]
    assert "Copy the archives to the VMM host" in again.stdout and \
        not re.search(r"TASK \[dstack.tee.app : Copy the archives[^\n]*\]\s*\**\n(?:ok|changed)", again.stdout)
    check = _deploy(stack, "--check", "--diff")
    assert check.returncode == 0 and _recap(check.stdout)["changed"] == 0, check.stdout[-4000:]


@needs_podman
def test_a_wrong_archive_is_refused_naming_its_entry_before_anything_changes(stack):
    root = stack["root"]
    bad = root / "notes-bad"
    shutil.copytree(stack["app"], bad, dirs_exist_ok=True)
    spec = (bad / "app.yml").read_text().replace("image/notes-store.tar", "image/nothing.tar")
    spec = spec.replace(f"host_port: {stack['ports']['web']}", f"host_port: {free_port()}")
    (bad / "app.yml").write_text(spec.replace(f"host_port: {stack['ports']['store']}", f"host_port: {free_port()}")
                                 .replace("name: notes", "name: notes-bad"))
    allowlist = (root / "kms" / "auth-config.json").read_text()
    cvms = _cvms(stack)
    failed = _deploy(stack, app=bad)
    assert failed.returncode != 0
    assert f"{bad}/app.yml: images[1].archive: {bad}/image/nothing.tar does not exist" in failed.stdout, \
        failed.stdout[-3000:]
    assert (root / "kms" / "auth-config.json").read_text() == allowlist
    assert _cvms(stack) == cvms and not (root / "build" / "notes-bad").exists()


def _cvms(stack):
    return [(vm["id"], vm["name"], vm["app_id"], vm["compose_hash"], vm.get("encrypted_env_sha256"))
            for vm in _vmm(stack["ports"], "Status")["vms"]]


@needs_podman
def test_an_image_given_by_name_is_saved_from_one_store_and_loaded_into_another(stack, short_tmp):
    """dstack.tee.container_image as the role runs it for {name: IMAGE}: query and podman save on
    the controller's store, podman load into the host's (here a second store, its own root)."""
    tmp_path = short_tmp  # podman refuses a run root longer than 50 characters
    name = stack["names"]["web"]
    image_id = _store_id(name) or _archive_id(stack["app"] / "image" / "notes-web.tar")[0]
    other = tmp_path / "podman-other"
    other.write_text(f"#!/bin/sh\nexec podman --root {tmp_path}/root --runroot {tmp_path}/run "
                     "--storage-driver vfs \"$@\"\n")
    other.chmod(0o755)
    if _store_id(name) is None:
        assert _podman("load", "-q", "-i", str(stack["app"] / "image" / "notes-web.tar")).returncode == 0
    images = [{"entry": "app.yml: images[0]", "id": image_id, "names": [name], "archive": ""}]
    try:
        on_host = run_module("container_image", dict(state="query", images=images, podman=str(other)))
        assert not on_host.get("failed") and [m["id"] for m in on_host["missing"]] == [image_id], on_host
        saved = run_module("container_image", dict(state="archived", images=on_host["missing"], archive_dir=str(tmp_path)))
        assert saved["changed"] and _archive_id(tmp_path / f"{image_id}.tar") == (image_id, [name]), saved
        args = dict(state="present", images=on_host["missing"], archive_dir=str(tmp_path), podman=str(other))
        assert run_module("container_image", args, check=True)["changed"]
        loaded = run_module("container_image", args)
        assert loaded["changed"] and not loaded.get("failed"), loaded
        found = subprocess.run([str(other), "image", "inspect", "--format", "{{.Id}}", name],
                               capture_output=True, text=True, check=False)
        assert found.stdout.strip() == image_id
        assert not run_module("container_image", args)["changed"]
        # An archive that holds another image is refused naming it, and nothing is loaded.
        wrong = dict(args, images=[dict(images[0], id="ab" * 32, names=["localhost/dstack-notes-test-wrong:1"])])
        shutil.copy(tmp_path / f"{image_id}.tar", tmp_path / f"{'ab' * 32}.tar")
        refused = run_module("container_image", wrong)
        assert refused.get("failed") and refused["msg"].startswith("app.yml: images[0]: the archive ") and \
            f"holds the image sha256:{image_id}, not the expected sha256:{'ab' * 32}" in refused["msg"], refused
    finally:
        subprocess.run([str(other), "rmi", "-a", "-f"], capture_output=True, check=False, timeout=120)
