# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The `process` backend, the embedded default: a CVM is a supervised process tree on this host.

Each CVM is a supervisord program running the guest agent (`dstack-guest-agent run`: serve the
dstack socket API, boot the app, keep its containers running). supervisord is driven through
its XML-RPC API on a unix socket in <run_path>/supervisor/; it runs on its own, so CVMs keep
running while the VMM restarts, and the VMM finds them again.
"""

import os
import shlex
import sys

from ansible_collections.dstack.tee.agents.vmm.backends.base import EXITED, RUNNING, STOPPED, STOPPING, Backend
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.supervisor import Supervisor, program_conf


class ProcessBackend(Backend):
    name = "process"

    def __init__(self, run_path, sim_state_dir, guest_agent=None, stop_wait=60, extra_env=None):
        self.supervisor = Supervisor(os.path.join(run_path, "supervisor"))
        self.sim_state_dir = sim_state_dir
        self.guest_agent = guest_agent or [os.path.join(os.path.dirname(sys.executable), "dstack-guest-agent")]
        self.stop_wait = stop_wait
        self.extra_env = dict(extra_env or {})

    @staticmethod
    def program(vm):
        return "cvm-" + vm.id

    def _command(self, vm):
        args = list(self.guest_agent) + [
            "run", "--config-dir", vm.shared_dir, "--work-dir", vm.work_dir, "--tee", "sim",
            "--sim-state", self.sim_state_dir, "--socket", os.path.join(vm.run_dir, "dstack.sock"),
            "--tappd-socket", os.path.join(vm.run_dir, "tappd.sock"), "--project", "dstack-" + vm.id[:8]]
        for port in vm.port_map:
            args += ["--port", f"{port['vm_port']}={port.get('host_address') or '127.0.0.1'}:{port['host_port']}"]
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
