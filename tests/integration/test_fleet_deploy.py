"""The fleet end to end: three simulated hosts (scripts/sim-fleet.sh up 3 --private-podman: host1
runs the KMS and the gateway, host2 and host3 a VMM each, every host its own podman store),
site.yml and deploy-app.yml run from the inventory over SSH, nothing read across hosts by path.

In order, on one fleet: site.yml (a second run changes nothing); an app with replicas: 2 answers
through the gateway from an instance on each VMM host (a second deploy changes nothing); a change
rolls through the instances one host at a time; a broken version stops after the first instance
with the second still serving; fewer replicas remove the surplus instance; app_state=absent leaves
no instance, container, volume or build folder on any host.
"""

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from fleet_fixtures import ROOT, VENV_BIN, Fleet, free_fleet_id
from ansible_collections.dstack.tee.plugins.module_utils import gateway_http

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/usr/sbin/sshd") or not shutil.which("podman")
    or not os.path.exists("/bin/busybox"),
    reason="needs root, openssh-server, podman and busybox-static (scripts/setup.sh --test installs them)")

APP = "fleetapp"
VMM_HOSTS = ("host2", "host3")
# The page names the version and the container (its hostname is its short ID), so that each
# answer through the gateway says which instance gave it.
COMMAND = '["sh", "-c", "mkdir -p /www && echo \\"{version} from $$(cat /etc/hostname)\\" > /www/index.html && exec httpd -f -p 80 -h /www"]'
BROKEN = '["sh", "-c", "echo this version never listens; exit 3"]'


class World:
    """The fleet and what the tests learn of it as they go."""

    def __init__(self, fleet, app_dir, image):
        self.fleet, self.app_dir, self.image = fleet, app_dir, image
        self.instances = {}     # host -> instance_id
        self.app_url = self.app_id = ""

    def write_app(self, version, broken=False):
        command = BROKEN if broken else COMMAND.format(version=version)
        (self.app_dir / "docker-compose.yaml").write_text(
            f"services:\n  web:\n    image: {self.image}\n    command: {command}\n    ports:\n      - \"80:80\"\n")
        (self.app_dir / "app.yml").write_text(
            f"name: {APP}\ngateway_enabled: true\nreplicas: 2\nimages:\n  - name: {self.image}\n")

    def playbook(self, name, *extra):
        env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
        proc = subprocess.run([str(VENV_BIN / "ansible-playbook"), "-i", str(self.fleet.inventory),
                               str(ROOT / "playbooks" / name), *extra], capture_output=True, text=True, cwd=ROOT,
                              env=env, timeout=1200, check=False)
        return proc.returncode, proc.stdout + proc.stderr

    def deploy(self, *extra):
        return self.playbook("deploy-app.yml", "-e", f"app_dir={self.app_dir}", *extra)

    def ssh(self, host, command):
        """A shell command line on the host (over its sshd): its output."""
        return self.fleet.run("ssh", host, command).stdout

    def containers(self, host):
        """The short IDs of the app's containers on a host (its own podman store)."""
        out = self.ssh(host, "podman ps -a --format '{{.ID}} {{.Labels}}'")
        return {line.split()[0] for line in out.splitlines() if "dstack-" in line}

    def get(self, url):
        """The page at url, through the gateway on host1 (the names under dstack.localhost are not
        in any DNS: the connection goes to host1's address, SNI and Host stay the name)."""
        answer = gateway_http.fetch(url, ca_cert=str(self.fleet.dir / "build" / "gateway-ca.crt"),
                                    connect_to=self.fleet.addr(1), timeout=10)
        assert answer.status == 200, (url, answer.status)
        return answer.body.decode().strip()

    def instance_url(self, host):
        return f"https://{self.instances[host]}.dstack.localhost:8443/"


def recap(output):
    """{host: {"ok": n, "changed": n, "failed": n}} from the PLAY RECAP."""
    found = {}
    for host, counts in re.findall(r"^(\S+)\s+:\s+(ok=.*)$", output, re.M):
        found[host] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", counts)}
    assert found, output[-3000:]
    return found


@pytest.fixture(scope="module")
def world(busybox_image):
    folder = Path(tempfile.mkdtemp(prefix="fleet-", dir="/tmp")) / "f"
    fleet = Fleet(free_fleet_id(), folder)
    app_dir = folder.parent / APP
    app_dir.mkdir()
    try:
        fleet.run("up", "3", "--private-podman")
        yield World(fleet, app_dir, busybox_image)
    finally:
        try:
            fleet.run("down")
        finally:
            shutil.rmtree(folder.parent, ignore_errors=True)


def test_site_brings_up_each_group_on_its_own_host_and_a_second_run_changes_nothing(world):
    rc, out = world.playbook("site.yml")
    assert rc == 0, out[-5000:]
    # Each service on its own host, with its own state: the KMS's on host1 only; the VMM hosts
    # hold the KMS root CA their role wrote from the KMS host's facts.
    assert world.ssh("host1", "ls /var/lib/dstack/kms").split().count("auth-config.json") == 1
    for host in VMM_HOSTS:
        assert "kms" not in world.ssh(host, "ls /var/lib/dstack").split()
        assert "kms-root-ca.crt" in world.ssh(host, "ls /var/lib/dstack/run").split()
    rc, out = world.playbook("site.yml")
    assert rc == 0 and all(counts["changed"] == 0 for counts in recap(out).values()), out[-5000:]


def test_replicas_answer_through_the_gateway_from_an_instance_on_each_vmm_host(world):
    world.write_app("v1")
    # Check mode first: the placement and the checks, and no instance made on any host.
    rc, out = world.deploy("--check")
    assert rc == 0 and "instances:      2: host2 (no instance_id yet), host3 (no instance_id yet)" in out, out[-4000:]
    assert not world.containers("host2") and not world.containers("host3")
    rc, out = world.deploy()
    assert rc == 0, out[-6000:]
    line = re.search(r"instances:\s+2: host2 \(([0-9a-f]{40})\), host3 \(([0-9a-f]{40})\)", out)
    assert line, out[-4000:]
    world.instances = dict(zip(VMM_HOSTS, line.groups()))
    world.app_url = re.search(r"url:\s+(https://[0-9a-f]{40}\.dstack\.localhost:8443/)", out).group(1)
    world.app_id = re.search(r"app_id:\s+([0-9a-f]{40})", out).group(1)
    expected = {f"v1 from {cid}" for host in VMM_HOSTS for cid in world.containers(host)}
    assert len(expected) == 2, expected   # one container on each VMM host
    # The gateway balances the app's URL over both instances; each instance's own URL is its own.
    assert {world.get(world.app_url) for _attempt in range(12)} == expected
    for host in VMM_HOSTS:
        assert world.get(world.instance_url(host)) in {f"v1 from {cid}" for cid in world.containers(host)}
    rc, out = world.deploy()
    assert rc == 0 and recap(out)["localhost"]["changed"] == 0, out[-5000:]


def test_a_change_rolls_through_the_instances_one_host_at_a_time(world):
    world.write_app("v2")
    rc, out = world.deploy("-e", "revoke_old=true")
    assert rc == 0, out[-6000:]
    # Every instance runs v2, so revoke_old withdrew v1's compose_hash from the allowlist on host1.
    new_hash = re.search(r"compose_hash:\s+([0-9a-f]{64})", out).group(1)
    allowlist = json.loads(world.ssh("host1", "cat /var/lib/dstack/kms/auth-config.json"))
    entry = next(v for k, v in allowlist["apps"].items() if k.lower().removeprefix("0x") == world.app_id)
    assert [h.lower().removeprefix("0x") for h in entry["composeHashes"]] == [new_hash]
    # host2's instance is updated and answers through the gateway with the new compose_hash (its
    # Worker's quote checked by verify_app) before host3's is touched.
    steps = [m.start() for m in (re.search(r"TASK \[dstack.tee.app : Create or update the CVM on host2", out),
                                 re.search(r"TASK \[dstack.tee.app : Wait for the instance at its gateway URL", out),
                                 re.search(r"TASK \[dstack.tee.app : Create or update the CVM on host3", out))]
    assert steps == sorted(steps), out[-6000:]
    assert "compose_hash matches (each of the 2 instances)" in out, out[-3000:]
    for host in VMM_HOSTS:
        assert world.get(world.instance_url(host)).startswith("v2 from ")
    assert {world.get(world.app_url).split()[0] for _attempt in range(6)} == {"v2"}


def test_a_broken_version_stops_after_the_first_instance_with_the_second_still_serving(world):
    world.write_app("v3", broken=True)
    rc, out = world.deploy("-e", "dstack_app_gateway_wait_timeout=20")
    assert rc != 0, out[-4000:]
    assert "the rollout stopped at instance 1 of 2, on host2" in out, out[-4000:]
    assert "Not touched, still on their previous version: host3" in out, out[-4000:]
    assert "Create or update the CVM on host3" not in out
    assert world.get(world.instance_url("host3")).startswith("v2 from ")
    # The app's URL still answers: the gateway passes over the instance that refuses.
    assert {world.get(world.app_url).split()[0] for _attempt in range(4)} == {"v2"}


def test_fewer_replicas_remove_the_surplus_instance(world):
    world.write_app("v2")
    rc, out = world.deploy("-e", "dstack_app_replicas=1")
    assert rc == 0 and re.search(r"instances:\s+1: host2 \(", out), out[-4000:]
    assert world.containers("host2") and not world.containers("host3")
    assert {world.get(world.app_url).split()[0] for _attempt in range(3)} == {"v2"}


def test_absent_leaves_no_instance_container_volume_or_build_folder_on_any_host(world):
    rc, out = world.deploy("-e", "app_state=absent")
    assert rc == 0, out[-5000:]
    for host in VMM_HOSTS:
        assert not world.containers(host), host
        assert not [v for v in world.ssh(host, "podman volume ls -q").split() if v.startswith("dstack-")]
        left = [name for name in world.ssh(host, "ls /var/lib/dstack/run").split() if re.fullmatch(r"[0-9a-f-]{36}", name)]
        assert not left, (host, left)
    assert not (world.fleet.dir / "build" / APP).exists()
