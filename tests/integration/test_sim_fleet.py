"""scripts/sim-fleet.sh: simulated hosts that are really separate, reached by Ansible over real SSH.

One fleet of three hosts serves most tests (its own --id and --dir, so a developer's fleet 0 is
left alone) and is taken down at the end, even on failure. The last test makes a second fleet,
breaks it, and checks that down removes every trace of it.
"""

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from fleet_fixtures import PRIVATE, ROOT, VENV_BIN, Fleet, alive, free_fleet_id, sim_fleet

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/usr/sbin/sshd") or not shutil.which("ip"),
    reason="needs root, iproute2 and openssh-server (scripts/setup.sh --test installs it)")

# The last task of every play here: the host's `report`, as JSON in a folder on the controller.
REPORT_TASK = """
    - name: Hand the report to the test
      ansible.builtin.copy:
        content: "{{ report | to_json }}"
        dest: "{{ report_dir }}/{{ inventory_hostname }}.json"
        mode: "0600"
      delegate_to: localhost
"""


@pytest.fixture(scope="module")
def fleet3():
    folder = Path(tempfile.mkdtemp(prefix="fleet-", dir="/tmp")) / "f"
    three = Fleet(free_fleet_id(), folder)
    try:
        three.up_output = three.run("up", "3").stdout
        yield three
    finally:
        try:
            three.run("down")   # a failing down is an error of the module's last test
        finally:
            shutil.rmtree(folder.parent, ignore_errors=True)


def test_up_prints_each_host_and_writes_the_inventory(fleet3):
    assert f"bridge dstack-fleet{fleet3.id} 10.231.{fleet3.id}.1/24: created" in fleet3.up_output
    for n in (1, 2, 3):
        assert f"host{n} {fleet3.addr(n)}: started (sshd pid " in fleet3.up_output
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"))
    listing = json.loads(subprocess.run([str(VENV_BIN / "ansible-inventory"), "-i", str(fleet3.inventory), "--list"],
                                        capture_output=True, text=True, cwd=ROOT, env=env, check=True).stdout)
    assert listing["dstack_kms"]["hosts"] == ["host1"]
    assert listing["dstack_gateway"]["hosts"] == ["host1"]
    assert listing["dstack_vmm"]["hosts"] == ["host2", "host3"]
    hostvars = listing["_meta"]["hostvars"]
    assert {h: v["ansible_host"] for h, v in hostvars.items()} == {f"host{n}": fleet3.addr(n) for n in (1, 2, 3)}
    for values in hostvars.values():
        assert values["ansible_user"] == "root"
        assert values["ansible_python_interpreter"] == str(VENV_BIN / "python")
        assert values["dstack_root"] == "/var/lib/dstack"
        assert "StrictHostKeyChecking=yes" in values["ansible_ssh_common_args"]


def test_ansible_reaches_every_host_over_ssh_at_its_own_address(fleet3):
    rc, output, reports = fleet3.play("""
- name: Every host of the inventory
  hosts: all
  gather_facts: true
  gather_subset: [network]
  tasks:
    - name: Ping
      ansible.builtin.ping:
      register: pong
    - name: The next host's sshd, by name, across the bridge
      ansible.builtin.wait_for:
        host: "{{ groups.all[(groups.all.index(inventory_hostname) + 1) % 3] }}"
        port: 22
        timeout: 5
    - name: What the host says it is
      ansible.builtin.set_fact:
        report:
          ping: "{{ pong.ping }}"
          address: "{{ ansible_default_ipv4.address }}"
          gateway: "{{ ansible_default_ipv4.gateway }}"
          hostname: "{{ ansible_hostname }}"
          interfaces: "{{ ansible_interfaces | sort }}"
""" + REPORT_TASK)
    assert rc == 0, output
    assert reports == {
        f"host{n}": {"ping": "pong", "address": fleet3.addr(n), "gateway": f"10.231.{fleet3.id}.1",
                     "hostname": f"host{n}", "interfaces": ["eth0", "lo"]} for n in (1, 2, 3)}
    # Each host's own sshd took the controller's key, from the bridge's address.
    for n in (1, 2, 3):
        log = (fleet3.dir / "hosts" / f"host{n}" / "sshd.log").read_text()
        assert f"Accepted publickey for root from 10.231.{fleet3.id}.1 " in log


def test_private_dirs_are_private_to_each_host(fleet3):
    token = secrets.token_hex(8)
    name = f"written-by-host1-{token}"
    rc, output, reports = fleet3.play(f"""
- name: The KMS host writes its state
  hosts: dstack_kms
  gather_facts: false
  tasks:
    - name: A file in each private folder
      ansible.builtin.shell: "for d in {' '.join(PRIVATE)}; do printf {token} > $d/{name}; done"
      changed_when: true

- name: A role-like task on a VMM host reads the KMS host's path, as a role without delegate_to would
  hosts: host2
  gather_facts: false
  tasks:
    - name: Read host1's file
      ansible.builtin.slurp:
        src: /var/lib/dstack/{name}
      register: read_here
      ignore_errors: true
    - name: Look for the three files
      ansible.builtin.find:
        paths: {list(PRIVATE)}
        patterns: {name}
      register: seen
    - name: The same read delegated to the KMS host of the inventory
      ansible.builtin.slurp:
        src: /var/lib/dstack/{name}
      delegate_to: "{{{{ groups.dstack_kms[0] }}}}"
      register: read_there
    - name: What host2 saw
      ansible.builtin.set_fact:
        report:
          here_failed: "{{{{ read_here.failed }}}}"
          here_msg: "{{{{ read_here.msg | default('') }}}}"
          seen: "{{{{ seen.matched }}}}"
          there: "{{{{ read_there.content | b64decode }}}}"
""" + REPORT_TASK)
    assert rc == 0, output
    report = reports["host2"]
    assert report["here_failed"] is True and "not found" in report["here_msg"]
    assert report["seen"] == 0
    assert report["there"] == token
    # The files are in host1's folders under the fleet's state, not host2's nor the controller's.
    for path in PRIVATE:
        folder = path.lstrip("/").replace("/", "-")
        assert (fleet3.dir / "hosts" / "host1" / folder / name).read_text() == token
        assert not (fleet3.dir / "hosts" / "host2" / folder / name).exists()
        assert not Path(path, name).exists()


def test_namespaces_a_host_names_stay_on_it(fleet3):
    """A CVM's or the gateway's namespace made on host1 is host1's: the same name is free on
    host2 and on this machine (each host has its own /run/netns)."""
    name = f"fleet-probe-{secrets.token_hex(4)}"
    try:
        made = fleet3.run("ssh", "host1", f"ip netns add {name} && ip netns list").stdout
        assert name in made.split()
        assert name not in fleet3.run("ssh", "host2", "ip netns list").stdout.split()
        assert not Path("/run/netns", name).exists()
        assert (fleet3.dir / "hosts" / "host1" / "run-netns" / name).exists()
        fleet3.run("ssh", "host2", f"ip netns add {name}")   # the same name, another namespace
    finally:
        for n in (1, 2):
            fleet3.run("ssh", f"host{n}", f"ip netns del {name} 2>/dev/null; true", check=False)


def test_host_keys_are_checked(fleet3):
    """known_hosts pins each host's own key: host1 showing host2's key is refused."""
    lines = (fleet3.dir / "known_hosts").read_text().splitlines()
    assert len(lines) == 3
    swapped = fleet3.dir.parent / "known_hosts.swapped"
    swapped.write_text(f"{lines[0].split(' ', 1)[0]} {lines[1].split(' ', 1)[1]}\n")
    ssh = ["ssh", "-i", str(fleet3.dir / "id_ed25519"), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
           "-o", "StrictHostKeyChecking=yes", "-o", "GlobalKnownHostsFile=/dev/null", "-o", "ControlPath=none"]
    bad = subprocess.run([*ssh, "-o", f"UserKnownHostsFile={swapped}", f"root@{fleet3.addr(1)}", "true"],
                         capture_output=True, text=True, timeout=30, check=False)
    assert bad.returncode != 0 and "host key" in bad.stderr.lower()
    good = subprocess.run([*ssh, "-o", f"UserKnownHostsFile={fleet3.dir / 'known_hosts'}",
                           f"root@{fleet3.addr(1)}", "hostname"], capture_output=True, text=True, timeout=30,
                          check=False)
    assert (good.returncode, good.stdout) == (0, "host1\n"), good.stderr


def test_up_again_keeps_running_hosts_and_restarts_a_dead_one(fleet3):
    pids = {n: (fleet3.dir / "hosts" / f"host{n}" / "sshd.pid").read_text().strip() for n in (1, 2, 3)}
    os.kill(int(pids[3]), 15)
    deadline = time.monotonic() + 5
    while alive(pids[3]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    status = fleet3.run("status", check=False)
    assert status.returncode == 1 and f"host3 {fleet3.addr(3)}: not running" in status.stdout
    again = fleet3.run("up", "3").stdout
    for n in (1, 2):
        assert f"host{n} {fleet3.addr(n)}: running (sshd pid {pids[n]}), kept" in again
    assert f"host3 {fleet3.addr(3)}: started" in again
    assert fleet3.run("status").returncode == 0
    rc, output, reports = fleet3.play("""
- name: The restarted host
  hosts: host3
  gather_facts: false
  tasks:
    - name: Its name
      ansible.builtin.command: hostname
      register: name
      changed_when: false
    - name: Report
      ansible.builtin.set_fact:
        report: "{{ name.stdout }}"
""" + REPORT_TASK)
    assert (rc, reports) == (0, {"host3": "host3"}), output


def test_bad_arguments_are_named_and_change_nothing():
    folder = Path(tempfile.mkdtemp(prefix="fleet-", dir="/tmp")) / "f"
    try:
        fleet_id = free_fleet_id()
        bad = sim_fleet("--dir", str(folder), "--id", str(fleet_id), "up", "3", "--vmm", "2-4", check=False)
        assert bad.returncode == 1
        assert "--vmm '2-4': '2-4' is outside the hosts 1..3" in bad.stderr
        assert not folder.exists() and not os.path.exists(f"/sys/class/net/dstack-fleet{fleet_id}")
        bad = sim_fleet("--dir", str(folder), "--id", "256", "up", "1", check=False)
        assert bad.returncode == 1 and "--id '256': a number 0-255" in bad.stderr
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)


def test_down_removes_everything_after_a_broken_up():
    folder = Path(tempfile.mkdtemp(prefix="fleet-", dir="/tmp")) / "f"
    two = Fleet(free_fleet_id(), folder)
    outside = None
    try:
        two.run("up", "2")
        # A process started over SSH that left its session, one that entered host1's namespace
        # from outside, host2's sshd killed, and the namespace of a host 5 that an interrupted up
        # left behind.
        marker = f"sleep {600 + two.id}"
        two.run("ssh", "host1", f"setsid {marker} </dev/null >/dev/null 2>&1 &")
        outside = subprocess.Popen(["ip", "netns", "exec", f"dstack-fleet{two.id}-host1", "sleep", "602"],
                                   start_new_session=True)
        os.kill(int((folder / "hosts" / "host2" / "sshd.pid").read_text()), 9)
        subprocess.run(["ip", "netns", "add", f"dstack-fleet{two.id}-host5"], check=True)
        deadline = time.monotonic() + 5
        while subprocess.run(["pgrep", "-f", marker], capture_output=True, check=False).returncode != 0:
            assert time.monotonic() < deadline, f"{marker} did not start"
            time.sleep(0.05)
        before = two.pids() | {outside.pid}
        assert len(before) >= 3 and two.traces()["netns"] and two.traces()["nat"]

        down = two.run("down")
        assert "host5: removed" in down.stdout and f"bridge dstack-fleet{two.id}: removed" in down.stdout
        assert outside.wait(timeout=10) != 0
        assert subprocess.run(["pgrep", "-f", marker], capture_output=True, check=False).returncode == 1
        assert [pid for pid in before if alive(pid)] == []
        assert two.traces() == {"netns": [], "links": [], "cgroups": [], "processes": [], "nat": [],
                                "folder": False}
        assert f"no fleet {two.id} here" in two.run("down").stdout
    finally:
        two.run("down", check=False)
        if outside is not None and outside.poll() is None:
            outside.kill()
        shutil.rmtree(folder.parent, ignore_errors=True)


CONTAINERS_CONF = '[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]\n[engine]\nruntime = "runc"\n'


@pytest.mark.skipif(not (shutil.which("podman") and os.path.exists("/bin/busybox")),
                    reason="podman and busybox-static are installed by scripts/setup.sh")
def test_private_podman_gives_each_host_its_own_containers():
    folder = Path(tempfile.mkdtemp(prefix="fleet-", dir="/tmp")) / "f"
    two = Fleet(free_fleet_id(), folder)
    name = f"fleet-probe-{two.id}"
    image = f"localhost/fleet-probe-{two.id}:latest"
    # A busybox rootfs to import on each host: there is no registry, and no shared image store.
    rootfs = folder.parent / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", rootfs / "bin" / "busybox")
    os.symlink("busybox", rootfs / "bin" / "sh")
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(folder.parent / "rootfs.tar"), "."], check=True)
    (folder.parent / "containers.conf").write_text(CONTAINERS_CONF)
    podman = f"CONTAINERS_CONF={folder.parent}/containers.conf podman"
    try:
        two.run("up", "2", "--private-podman")
        for n in (1, 2):
            two.run("ssh", f"host{n}", f"{podman} import -q {folder.parent}/rootfs.tar {image} >/dev/null && "
                    f"{podman} run -d --name {name} -p {two.addr(n)}:8080:80 {image} "
                    f"busybox sh -c 'echo host{n} > /index.html; exec busybox httpd -f -p 80 -h /'")
        # The same container name on both hosts, each serving on its own address; neither this
        # machine's podman nor the other host sees it.
        for n in (1, 2):
            deadline = time.monotonic() + 10
            while True:
                got = subprocess.run(["curl", "-s", "--max-time", "2", f"http://{two.addr(n)}:8080/index.html"],
                                     capture_output=True, text=True, check=False).stdout
                if got or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert got == f"host{n}\n"
            listed = two.run("ssh", f"host{n}", f"{podman} ps -a --format '{{{{.Names}}}} {{{{.Image}}}}'").stdout
            assert listed.split() == [name, image]
        root_names = subprocess.run(["podman", "ps", "-a", "--format", "{{.Names}}"], capture_output=True, text=True,
                                    check=True).stdout.split()
        assert name not in root_names
        # The containers' processes (in cgroups and namespaces of their own, under their conmon).
        served_by = [int(two.run("ssh", f"host{n}", f"{podman} inspect --format '{{{{.State.Pid}}}}' {name}").stdout)
                     for n in (1, 2)]
        assert all(alive(pid) for pid in served_by)
        down = two.run("down")
        assert "host1: removing its 1 container(s)" in down.stdout
        assert [pid for pid in served_by if alive(pid)] == []
        assert two.traces() == {"netns": [], "links": [], "cgroups": [], "processes": [], "nat": [],
                                "folder": False}
    finally:
        two.run("down", check=False)
        shutil.rmtree(folder.parent, ignore_errors=True)
