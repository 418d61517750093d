# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The `process` backend, the embedded default: a CVM is a supervised process tree on this host.

Each CVM is a supervisord program running the guest agent (`dstack-guest-agent run`: serve the
dstack socket API, boot the app, keep its containers running). supervisord is driven through
its XML-RPC API on a unix socket in <run_path>/supervisor/; it runs on its own, so CVMs keep
running while the VMM restarts, and the VMM finds them again.

With cvm_netns (opt-in; vmm.toml `cvm_netns = true`, `--cvm-netns`), each CVM gets its own network
namespace `dstack-<vm id>` (made at start, kept across restarts, removed with the CVM) and a veth
pair to the host: `dh<id>` (here, 10.213.X.Y/30) and `eth0` (there, the next address, with the
default route through the host), for the WireGuard UDP to the gateway. The guest agent gets
`--netns`: its gateway interface and containers go into the namespace. What leaves the host from
the namespaces is masqueraded to the host's address (forwarding on, one iptables nat rule for the
range, made at the first CVM and kept), as a VM's user-mode network (QEMU's passt) does: a
gateway on another host answers the CVM's WireGuard packets.

A CVM's containers and named volumes are in this host's podman store, under its compose project
(`project`). The guest agent's `compose down` removes the containers and keeps the volumes, as a
VM keeps its disk across a stop, a start or an UpdateVm; RemoveVm removes them too, as a VM's disk
goes with the VM.
"""

import ipaddress
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading

from ansible_collections.dstack.tee.plugins.module_utils.compose_runner import PODMAN_PROJECT_LABEL, ComposeRunner
from ansible_collections.dstack.tee.agents.vmm.backends.base import EXITED, RUNNING, STOPPED, STOPPING, Backend
from ansible_collections.dstack.tee.plugins.module_utils import wireguard
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.supervisor import Supervisor, program_conf


CVM_NETNS_RANGE = "10.213.0.0/16"   # the veths' /30s, one per CVM with cvm_netns


class ProcessBackend(Backend):
    name = "process"

    def __init__(self, run_path, sim_state_dir, guest_agent=None, stop_wait=60, extra_env=None, cvm_netns=False,
                 cvm_netns_range=CVM_NETNS_RANGE):
        self.supervisor = Supervisor(os.path.join(run_path, "supervisor"))
        self.sim_state_dir = sim_state_dir
        self.guest_agent = guest_agent or [os.path.join(os.path.dirname(sys.executable), "dstack-guest-agent")]
        self.stop_wait = stop_wait
        self.extra_env = dict(extra_env or {})
        self.cvm_netns = bool(cvm_netns)
        try:
            self.cvm_netns_range = ipaddress.ip_network(cvm_netns_range)
        except ValueError as exc:
            raise DstackError("cvm_netns_range", f"is not an IPv4 network: {exc}") from None
        self._netns_lock = threading.Lock()
        self._egress_ready = False

    @staticmethod
    def program(vm):
        return "cvm-" + vm.id

    @staticmethod
    def project(vm):
        """The CVM's compose project (the guest agent's --project), the label of its containers,
        networks and volumes."""
        return "dstack-" + vm.id[:8]

    @staticmethod
    def netns(vm):
        return "dstack-" + vm.id

    @staticmethod
    def host_veth(vm):
        return "dh" + vm.id.replace("-", "")[:12]

    def _ensure_netns(self, vm):
        """The CVM's namespace and its veth to the host (made once; kept while the CVM exists)."""
        name = self.netns(vm)
        with self._netns_lock:
            if wireguard.netns_exists(name) and wireguard.link_exists(self.host_veth(vm)):
                return
            host_ip, cvm_ip, prefix = self._free_pair()
            if not wireguard.netns_exists(name):
                wireguard.netns_add(name)
            try:
                wireguard.configure_link("lo", name)
                wireguard.veth_pair(self.host_veth(vm), None, "eth0", name)
                wireguard.configure_link(self.host_veth(vm), None, address=f"{host_ip}/{prefix}")
                wireguard.configure_link("eth0", name, address=f"{cvm_ip}/{prefix}")
                subprocess.run(["ip", "-n", name, "route", "replace", "default", "via", str(host_ip)], check=True,
                               capture_output=True, timeout=10)
                self._ensure_egress()
            except (DstackError, OSError, subprocess.SubprocessError) as exc:
                self._remove_netns(vm)
                raise DstackError("cvm_netns", f"cannot make the network namespace {name}: {exc}") from None

    def _ensure_egress(self):
        """Forwarding on and the range's traffic beyond itself masqueraded (once per VMM process;
        the rule stays, as the rules of a libvirt NAT network do)."""
        if self._egress_ready:
            return
        with open("/proc/sys/net/ipv4/ip_forward", "w", encoding="ascii") as handle:
            handle.write("1")
        span = str(self.cvm_netns_range)
        rule = ["POSTROUTING", "-s", span, "!", "-d", span, "-j", "MASQUERADE"]
        iptables = [shutil.which("iptables") or "/usr/sbin/iptables", "-w", "10", "-t", "nat"]
        if subprocess.run(iptables + ["-C"] + rule, capture_output=True, timeout=20, check=False).returncode != 0:
            subprocess.run(iptables + ["-A"] + rule, capture_output=True, timeout=20, check=True)
        self._egress_ready = True

    def _free_pair(self):
        """(host address, CVM address, prefix length) of the first /30 of cvm_netns_range that no
        address of this host's namespace is in."""
        used = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True,
                              timeout=10).stdout
        taken = [ipaddress.ip_interface(word) for line in used.splitlines() for word in line.split()
                 if "/" in word and word[0].isdigit()]
        for subnet in self.cvm_netns_range.subnets(new_prefix=30):
            if not any(address.ip in subnet for address in taken):
                host_ip, cvm_ip = list(subnet.hosts())[:2]
                return host_ip, cvm_ip, 30
        raise DstackError("cvm_netns_range", f"{self.cvm_netns_range} has no free /30 left")

    def _remove_netns(self, vm):
        """What runs in the namespace is killed (a wireguard-go a killed agent left), then the
        veth and the namespace go."""
        name = self.netns(vm)
        if wireguard.netns_exists(name):
            found = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=False,
                                   timeout=10)
            for pid in found.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        wireguard.delete_link(self.host_veth(vm))
        wireguard.netns_remove(name)

    def _command(self, vm):
        args = list(self.guest_agent) + [
            "run", "--config-dir", vm.shared_dir, "--work-dir", vm.work_dir, "--tee", "sim",
            "--sim-state", self.sim_state_dir, "--socket", os.path.join(vm.run_dir, "dstack.sock"),
            "--tappd-socket", os.path.join(vm.run_dir, "tappd.sock"), "--project", self.project(vm)]
        for port in vm.port_map:
            args += ["--port", f"{port['vm_port']}={port.get('host_address') or '127.0.0.1'}:{port['host_port']}"]
        if self.cvm_netns:
            args += ["--netns", self.netns(vm)]
        return " ".join(shlex.quote(a) for a in args)

    def create(self, vm):
        longest = os.path.join(vm.run_dir, "tappd.sock")
        if len(longest.encode()) > 107:
            raise DstackError("run_path", f"is too deep: the CVM's socket {longest} would pass the 107-byte limit of "
                                          "a unix socket path; use a shorter run path")
        env = {"PYTHONUNBUFFERED": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin"), **self.extra_env}
        conf = program_conf(self.program(vm), self._command(vm), vm.run_dir, vm.stdout_log, vm.stderr_log,
                            environment=env, stop_wait=self.stop_wait)
        if self.supervisor.read_conf(self.program(vm)) != conf or self.supervisor.info(self.program(vm)) is None:
            self.supervisor.define(self.program(vm), conf)

    def start(self, vm):
        if self.supervisor.info(self.program(vm)) is None:
            self.create(vm)
        if self.cvm_netns:
            self._ensure_netns(vm)
        self.supervisor.start(self.program(vm))

    def stop(self, vm, force=True):
        # The guest agent gets SIGTERM either way, so that its containers go down with it;
        # a forced stop waits for it (and supervisord kills it after stopwaitsecs).
        if force:
            self.supervisor.stop(self.program(vm), wait=True)
        else:
            info = self.supervisor.info(self.program(vm))
            if info and info["statename"] == "RUNNING":
                self.supervisor.signal(self.program(vm), "TERM")

    def remove(self, vm):
        self.supervisor.undefine(self.program(vm))
        self._remove_project(vm)
        if self.cvm_netns:
            self._remove_netns(vm)

    def _podman(self, vm, *args):
        """A podman command on the store and with the settings the CVM's agent had; its output's words."""
        env = dict(os.environ, **self.extra_env)
        conf = os.path.join(vm.work_dir, "containers.conf")  # the agent's (runc), when it wrote one
        if "CONTAINERS_CONF" not in env and os.path.exists(conf):
            env["CONTAINERS_CONF"] = conf
        found = subprocess.run(["podman", *args], capture_output=True, text=True, env=env, timeout=120, check=False)
        return found.stdout.split() if found.returncode == 0 else []

    def _remove_project(self, vm):
        """What the CVM's compose project leaves in the store once its agent is stopped: its named
        volumes (`compose down` keeps them), and the containers of an agent killed before its own
        `down` (taken down as the agent does, in the CVM's namespace, then removed by force)."""
        if shutil.which("podman") is None:
            return
        label = f"label={PODMAN_PROJECT_LABEL}={self.project(vm)}"
        if self._podman(vm, "ps", "-a", "-q", "--filter", label):
            ComposeRunner(self.project(vm), vm.work_dir, engine="podman",
                          netns=self.netns(vm) if self.cvm_netns and wireguard.netns_exists(self.netns(vm)) else None).down()
            left = self._podman(vm, "ps", "-a", "-q", "--filter", label)
            if left:
                self._podman(vm, "rm", "-f", "-t", "0", *left)
        volumes = self._podman(vm, "volume", "ls", "-q", "--filter", label)
        if volumes:
            self._podman(vm, "volume", "rm", "-f", *volumes)

    def status(self, vm):
        info = self.supervisor.info(self.program(vm))
        if info is None:
            return STOPPED
        state = info["statename"]
        if state in ("RUNNING", "STARTING", "BACKOFF"):
            return RUNNING
        if state == "STOPPING":
            return STOPPING
        if state in ("EXITED", "FATAL"):
            return EXITED
        return STOPPED

    def pid(self, vm):
        info = self.supervisor.info(self.program(vm))
        return info["pid"] if info else 0
