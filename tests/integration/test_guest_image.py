"""scripts/build-guest-image.sh: the guest image from Debian packages, in dstack's image layout, and
reproducible (two builds from the same inputs give the same os_image_hash).

Two builds (they share the downloaded .debs): the first through the machine's image cache, which
test_guest_vm_boot boots from, the second afresh; a few minutes.
No skip: where the build cannot run (no root, no debootstrap, no Debian mirror) the test fails and
says why.
"""

import _imp
import hashlib
import json
import os
import re
import shutil
import subprocess

import pytest

from conftest import ROOT

AGENT_IN_ROOTFS = "opt/dstack/ansible_collections/dstack/tee/agents/guest/cli.py"


def snapshot(dest):
    """The script and the collection files it puts in the image, as a git checkout of their own: both
    builds read the same inputs even while someone edits this worktree."""
    files = subprocess.run(["git", "ls-files", "--", "scripts/build-guest-image.sh", "agents/guest", "agents/*.py",
                            "plugins/module_utils", "galaxy.yml"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in files:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "--", *files], cwd=dest, check=True)
    return dest / "scripts" / "build-guest-image.sh"


def build(script, *args):
    proc = subprocess.run([str(script), *map(str, args)], capture_output=True, text=True, timeout=1200,
                          check=False)
    if proc.returncode != 0:
        pytest.fail(f"build-guest-image.sh {' '.join(map(str, args))} failed (exit {proc.returncode}):\n"
                    f"{proc.stderr[-4000:]}")
    return proc.stderr


def inputs_hash(log):
    """The hash of a build's inputs (the script, the mirror's package indexes, the collection files),
    from its log: the image cache's key."""
    found = re.search(r"inputs hash ([0-9a-f]{64})", log)
    assert found, f"build-guest-image.sh's log names no inputs hash:\n{log[-2000:]}"
    return found.group(1)


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as src:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_layout(image):
    """metadata.json names files that exist, sha256sum.txt covers every image file with its real
    hash, digest.txt is sha256(sha256sum.txt), and the rootfs's dm-verity root hash checks out."""
    meta = json.loads((image / "metadata.json").read_text())
    for field in ("kernel", "initrd", "bios", "rootfs"):
        assert (image / meta[field]).is_file(), f"metadata.json {field}: {meta[field]} is missing"
    assert meta["is_dev"] is False and meta["version"]
    listed = {}
    for line in (image / "sha256sum.txt").read_text().splitlines():
        digest, name = line.split("  ", 1)
        listed[name] = digest
    files = {p.name for p in image.iterdir()} - {"sha256sum.txt", "digest.txt"}
    assert set(listed) == files
    for name, digest in listed.items():
        assert sha256_file(image / name) == digest, f"sha256sum.txt: {name} does not match"
    digest = (image / "digest.txt").read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert digest == sha256_file(image / "sha256sum.txt")

    rootfs_hash = meta["rootfs_hash"]
    assert f"dstack.rootfs_hash={rootfs_hash}" in meta["cmdline"]
    size = int(re.search(r"dstack\.rootfs_size=(\d+)", meta["cmdline"]).group(1))
    rootfs = image / meta["rootfs"]
    subprocess.run(["veritysetup", "verify", f"--hash-offset={size}", str(rootfs), str(rootfs), rootfs_hash],
                   check=True, capture_output=True)
    return meta, digest


def rootfs_listing(image):
    """The paths in the image's squashfs rootfs, relative to its root."""
    meta = json.loads((image / "metadata.json").read_text())
    out = subprocess.run(["unsquashfs", "-l", "-d", "", str(image / meta["rootfs"])], check=True,
                         capture_output=True, text=True).stdout
    return {line.lstrip("/") for line in out.splitlines() if line.startswith("/")}


def bytecode_of(module, listed):
    """The .pyc of `module` (a .py path) among the `listed` paths, or None."""
    folder, _sep, name = module.rpartition("/")
    found = [path for path in listed if path.startswith(f"{folder}/__pycache__/{name[:-3]}.cpython-")
             and path.endswith(".pyc")]
    return found[0] if len(found) == 1 else None


def rootfs_file(image, path):
    """A file's bytes from the image's squashfs rootfs (the verity tree after it is ignored)."""
    meta = json.loads((image / "metadata.json").read_text())
    return subprocess.run(["unsquashfs", "-cat", str(image / meta["rootfs"]), path],
                          check=True, capture_output=True).stdout


@pytest.mark.slow
def test_two_builds_give_the_same_os_image_hash_and_the_cache_reuses_it(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("build-guest-image.sh needs root (debootstrap, chroot, mounts); run the tests as root")
    src = tmp_path / "src"
    src.mkdir()
    script = snapshot(src)
    first, second = tmp_path / "first", tmp_path / "second"
    # The first build goes through the machine's image cache (built and stored there, or, when these
    # inputs were built before, that earlier build reused): test_guest_vm_boot then boots it without a
    # third build. The second is built afresh: two builds, one os_image_hash.
    log = build(script, "--out", first)
    log_again = build(script, "--no-cache", "--out", second)
    if inputs_hash(log) != inputs_hash(log_again):
        # The snapshot fixes the script and the collection files, so only Debian's mirror moved between
        # the two builds (a security update published: its Packages index is an input). The first is
        # built again, through the cache, on the mirror's new state.
        log = build(script, "--out", first)
        assert inputs_hash(log) == inputs_hash(log_again), \
            "Debian's mirror published new package indexes during each of two pairs of builds; run the test again"

    digest = check_layout(first)[1]
    digest_again = check_layout(second)[1]
    assert digest == digest_again, "two builds from the same inputs gave different os_image_hashes"

    # The guest agent is this checkout's, under the collection's fixed path, with its launcher.
    assert rootfs_file(first, AGENT_IN_ROOTFS) == (src / "agents/guest/cli.py").read_bytes()
    assert b"agents.guest.cli" in rootfs_file(first, "usr/local/bin/dstack-guest-agent")
    # With its bytecode (the rootfs is read-only: without it each Python start in the VM compiles
    # every module it imports), hash-based and of this source, for each of the collection's modules
    # and the standard library's.
    listed = rootfs_listing(first)
    collection = [path for path in listed if path.startswith("opt/dstack/") and path.endswith(".py")]
    assert collection and not [path for path in collection if not bytecode_of(path, listed)], \
        "collection modules without bytecode in the image"
    pyc = rootfs_file(first, bytecode_of(AGENT_IN_ROOTFS, listed))
    assert int.from_bytes(pyc[4:8], "little") == 0b11, "the agent's .pyc is not checked-hash based"
    assert pyc[8:16] == _imp.source_hash(int.from_bytes(pyc[:4], "little"), (src / "agents/guest/cli.py").read_bytes())
    assert [path for path in listed if re.fullmatch(r"usr/lib/python3\.\d+/__pycache__/os\.cpython-\d+\.pyc", path)]
    manifest = (first / "packages.manifest").read_text()
    for package in ("podman", "python3", "linux-image-amd64"):
        assert re.search(rf"^{package} \S+ \S+$", manifest, re.M), f"{package} not in packages.manifest"
    assert rootfs_file(first, "opt/dstack/packages.manifest").decode() == manifest

    # With the cache: an image already built for these inputs is reused, not rebuilt.
    key = inputs_hash(log)
    cache = tmp_path / "cache"
    (cache / "images").mkdir(parents=True)
    shutil.copytree(first, cache / "images" / key)
    reused = tmp_path / "reused"
    log = build(script, "--cache", cache, "--out", reused)
    assert f"reusing the cached image for inputs {key}" in log
    assert (reused / "digest.txt").read_text() == (first / "digest.txt").read_text()
