"""Shared by the tests that run scripts/sim-fleet.sh: a fleet of simulated hosts (its id, folder,
inventory), ansible-playbook on it, and what it leaves on the machine."""

import json
import os
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "sim-fleet.sh"
VENV_BIN = ROOT / ".venv" / "bin"
CGROUP_ROOTS = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))   # cgroup v2, or hybrid
PRIVATE = ("/var/lib/dstack", "/run/dstack", "/etc/dstack")


def free_fleet_id():
    """A fleet id whose bridge and namespaces do not exist (test runs side by side)."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    for offset in range(100):
        fleet_id = 100 + (os.getpid() + offset) % 100
        if not os.path.exists(f"/sys/class/net/dstack-fleet{fleet_id}") and f"dstack-fleet{fleet_id}-" not in netns:
            return fleet_id
    raise AssertionError("no free fleet id in 100..199")


def sim_fleet(*args, check=True):
    proc = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=120, check=False)
    if check:
        assert proc.returncode == 0, f"sim-fleet.sh {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def alive(pid):
    """Whether the process runs (a zombie, dead but not reaped by its parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class Fleet:
    def __init__(self, fleet_id, folder):
        self.id, self.dir = fleet_id, folder
        self.inventory = folder / "inventory.yml"
        self.up_output = ""

    def addr(self, n):
        return f"10.231.{self.id}.{10 + n}"

    def run(self, *args, check=True):
        return sim_fleet("--dir", str(self.dir), "--id", str(self.id), *args, check=check)

    def play(self, playbook_text):
        """ansible-playbook (the venv's, the project's config) on the fleet's inventory: rc, its
        output, and {host: report} from REPORT_TASK."""
        reports = Path(tempfile.mkdtemp(prefix="reports-", dir=self.dir.parent))
        (reports / "playbook.yml").write_text(playbook_text)
        env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
        proc = subprocess.run([str(VENV_BIN / "ansible-playbook"), "-i", str(self.inventory),
                               "-e", f"report_dir={reports}", str(reports / "playbook.yml")],
                              capture_output=True, text=True, cwd=ROOT, env=env, timeout=120, check=False)
        found = {p.stem: json.loads(p.read_text()) for p in reports.glob("*.json")}
        return proc.returncode, proc.stdout + proc.stderr, found

    def pids(self):
        """Every process in the fleet's cgroups."""
        return {int(pid) for root in CGROUP_ROOTS for procs in root.glob(f"dstack-fleet{self.id}/*/cgroup.procs")
                for pid in procs.read_text().split()}

    def traces(self):
        """What is left of the fleet on the machine: namespaces, links, cgroup, processes, folder."""
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
        names = [line.split(": ")[1].split("@")[0] for line in links.splitlines()]
        procs = subprocess.run(["ps", "-eo", "args="], capture_output=True, text=True, check=True).stdout
        nat = subprocess.run(["iptables", "-t", "nat", "-S", "POSTROUTING"], capture_output=True, text=True,
                             check=True).stdout
        return {
            "netns": [n.split()[0] for n in netns.splitlines() if n.startswith(f"dstack-fleet{self.id}-")],
            "links": [n for n in names if n == f"dstack-fleet{self.id}" or n.startswith(f"dsf{self.id}h")],
            "cgroups": [str(p) for p in CGROUP_ROOTS if (p / f"dstack-fleet{self.id}").exists()],
            "processes": [line for line in procs.splitlines() if str(self.dir) in line],
            "nat": [line for line in nat.splitlines() if f"dstack-fleet{self.id} " in line],
            "folder": self.dir.exists(),
        }
