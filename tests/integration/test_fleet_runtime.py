"""site.yml with dstack_runtime_install on a simulated fleet: each host gets the agents in a runtime
of its own (dstack.tee.runtime, its home in the host's private /var/lib/dstack), and the KMS and the
VMM then run from it, with the collection's modules run by its venv's Python: nothing of this
checkout's .venv is used on the hosts. A second run with another version of the agents
(dstack_runtime_source) switches each host to it and restarts the KMS and the VMM.

Two hosts (host1: the KMS; host2: the VMM), no gateway; the venvs from a folder of wheels, as on
hosts without PyPI.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import NO_COMPILE
from fleet_fixtures import CGROUP_ROOTS, ROOT, VENV_BIN, Fleet, free_fleet_id

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/usr/sbin/sshd"),
    reason="needs root and openssh-server (scripts/setup.sh --test installs them)")

HOME = "/var/lib/dstack/runtime"   # private to each host


@pytest.fixture(scope="module")
def fleet2():
    folder = Path(tempfile.mkdtemp(prefix="fleet-", dir="/tmp")) / "f"
    fleet = Fleet(free_fleet_id(), folder)
    try:
        fleet.run("up", "2")
        yield fleet
    finally:
        try:
            fleet.run("down")
        finally:
            shutil.rmtree(folder.parent, ignore_errors=True)


def serve_processes(fleet, host, agent):
    """{pid: command line} of the agent's `serve` processes in the host's cgroup."""
    found = {}
    for root in CGROUP_ROOTS:
        procs = root / f"dstack-fleet{fleet.id}" / host / "cgroup.procs"
        for pid in procs.read_text().split() if procs.exists() else []:
            try:
                line = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except FileNotFoundError:
                continue
            if f" {agent} serve " in f" {line} " or f"/{agent} serve " in line:
                found[pid] = line
    return found


def installed_release(fleet, host):
    """The host's one agents-<checksum> folder, which its collection link points at."""
    listing = fleet.run("ssh", host, f"ls -d {HOME}/agents-* && readlink "
                        f"{HOME}/collections/ansible_collections/dstack/tee").stdout.split()
    assert len(listing) == 2 and listing[0] == listing[1], listing
    return listing[0]


def run_site(fleet, extra):
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    proc = subprocess.run([str(VENV_BIN / "ansible-playbook"), "-i", str(fleet.inventory),
                           str(ROOT / "playbooks" / "site.yml"), "-e", json.dumps(extra)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=1200, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


def test_site_installs_the_agents_on_each_host_and_runs_them_from_there(fleet2, runtime_wheels, tmp_path):
    extra = {"dstack_runtime_install": True, "dstack_runtime_home": HOME,
             # The interpreter itself, not this checkout's venv or a shim that needs a login shell.
             "dstack_runtime_python": sys._base_executable,  # pylint: disable=protected-access
             "dstack_runtime_pip_extra_args": f"--no-index --find-links {runtime_wheels} {NO_COMPILE}",
             "dstack_gateway_enabled": False, "dstack_acme_lab_enabled": False}
    out = run_site(fleet2, extra)
    assert re.search(r"TASK \[dstack\.tee\.runtime : Install the requirements in the venv\]", out)

    venv_python = f"{HOME}/venv/bin/python"
    kms = serve_processes(fleet2, "host1", "dstack-kms")
    vmm = serve_processes(fleet2, "host2", "dstack-vmm")
    assert kms and all(c.startswith(f"{venv_python} {HOME}/venv/bin/dstack-kms serve") for c in kms.values()), kms
    assert vmm and all(c.startswith(f"{venv_python} {HOME}/venv/bin/dstack-vmm serve") for c in vmm.values()), vmm
    # Each host's runtime is its own (its private /var/lib/dstack), with the agents unpacked there.
    releases = {host: installed_release(fleet2, host) for host in ("host1", "host2")}
    assert str(VENV_BIN) not in " ".join(list(kms.values()) + list(vmm.values()))

    # Another version of the agents (dstack_runtime_source: a copy with one file changed): each host
    # switches to it, and the KMS and the VMM are restarted to run it.
    source = tmp_path / "source"
    for part in ("agents", "plugins/module_utils"):
        shutil.copytree(ROOT / part, source / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", source / "pyproject.toml")
    with open(source / "agents" / "kms" / "app.py", "a", encoding="utf-8") as changed:
        changed.write("# another version\n")
    run_site(fleet2, dict(extra, dstack_runtime_source=str(source)))
    for host in ("host1", "host2"):
        assert installed_release(fleet2, host) != releases[host], releases[host]
        # The payloads' bytecode cache comes from this collection, though the source had none.
        cached = fleet2.run("ssh", host, f"{venv_python} -c 'import zipimport; print(zipimport._compile_source.dstack_tee_cached)'")
        assert cached.stdout.split() == ["True"], (cached.stdout, cached.stderr)
    new_kms = serve_processes(fleet2, "host1", "dstack-kms")
    new_vmm = serve_processes(fleet2, "host2", "dstack-vmm")
    assert new_kms and not set(new_kms) & set(kms), (kms, new_kms)
    assert new_vmm and not set(new_vmm) & set(vmm), (vmm, new_vmm)
