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
import subprocess
import sys
import time
import xmlrpc.client

from supervisor.xmlrpc import SupervisorTransport

from ansible_collections.dstack.tee.agents.vmm.backends.base import EXITED, RUNNING, STOPPED, STOPPING, Backend
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.fileio import atomic_write

SUPERVISORD_CONF = """[unix_http_server]
file = {sock}
chmod = 0700

[supervisord]
pidfile = {dir}/supervisord.pid
logfile = {dir}/supervisord.log
logfile_maxbytes = 10MB
childlogdir = {dir}
nodaemon = false
silent = true

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl = unix://{sock}

[include]
files = {dir}/conf.d/*.conf
"""

PROGRAM_CONF = """[program:{name}]
command = {command}
directory = {run_dir}
autostart = false
autorestart = false
startsecs = 1
stopsignal = TERM
stopwaitsecs = {stop_wait}
stopasgroup = true
killasgroup = true
stdout_logfile = {run_dir}/stdout.log
stdout_logfile_maxbytes = 10MB
stderr_logfile = {run_dir}/stderr.log
stderr_logfile_maxbytes = 10MB
environment = {environment}
"""


class ProcessBackend(Backend):
    name = "process"

    def __init__(self, run_path, sim_state_dir, guest_agent=None, stop_wait=60, extra_env=None):
        self.dir = os.path.join(run_path, "supervisor")
        self.sock = os.path.join(self.dir, "supervisor.sock")
        self.sim_state_dir = sim_state_dir
        self.guest_agent = guest_agent or [os.path.join(os.path.dirname(sys.executable), "dstack-guest-agent")]
        self.stop_wait = stop_wait
        self.extra_env = dict(extra_env or {})
        os.makedirs(os.path.join(self.dir, "conf.d"), mode=0o700, exist_ok=True)
        self._proxy = None

    # ---- supervisord --------------------------------------------------------------------------

    @property
    def rpc(self):
        if self._proxy is None:
            self.ensure_supervisord()
            self._proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=SupervisorTransport(
                None, None, serverurl="unix://" + self.sock)).supervisor
        return self._proxy

    def _alive(self):
        try:
            xmlrpc.client.ServerProxy("http://127.0.0.1", transport=SupervisorTransport(
                None, None, serverurl="unix://" + self.sock)).supervisor.getState()
            return True
        except (OSError, xmlrpc.client.Fault):
            return False

    def ensure_supervisord(self):
        """Start this VMM's supervisord unless it is running (it outlives the VMM)."""
        if os.path.exists(self.sock) and self._alive():
            return
        conf = os.path.join(self.dir, "supervisord.conf")
        atomic_write(conf, SUPERVISORD_CONF.format(sock=self.sock, dir=self.dir).encode(), mode=0o600)
        supervisord = os.path.join(os.path.dirname(sys.executable), "supervisord")
        proc = subprocess.run([supervisord, "-c", conf], capture_output=True, text=True, timeout=30, check=False)
        if proc.returncode != 0:
            raise DstackError("supervisord", f"did not start: {proc.stderr.strip()[-300:]}")
        for _attempt in range(100):
            if self._alive():
                return
            time.sleep(0.1)
        raise DstackError("supervisord", f"did not answer on {self.sock}")

    def shutdown_supervisord(self):
        if os.path.exists(self.sock) and self._alive():
            self.rpc.shutdown()
        self._proxy = None

    # ---- the backend ---------------------------------------------------------------------------

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
        env = {"PYTHONUNBUFFERED": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin"), **self.extra_env}
        environment = ",".join(f'{k}="{v}"' for k, v in sorted(env.items()))
        conf = PROGRAM_CONF.format(name=self.program(vm), command=self._command(vm), run_dir=vm.run_dir,
                                   stop_wait=self.stop_wait, environment=environment.replace("%", "%%"))
        path = os.path.join(self.dir, "conf.d", self.program(vm) + ".conf")
        atomic_write(path, conf.encode(), mode=0o600)
        self.rpc.reloadConfig()
        try:
            self.rpc.addProcessGroup(self.program(vm))
        except xmlrpc.client.Fault as fault:
            if "ALREADY_ADDED" not in fault.faultString:
                raise DstackError("supervisord", f"cannot add {self.program(vm)}: {fault.faultString}") from None

    def _info(self, vm):
        try:
            return self.rpc.getProcessInfo(self.program(vm))
        except xmlrpc.client.Fault as fault:
            if "BAD_NAME" in fault.faultString:
                return None
            raise

    def start(self, vm):
        if self._info(vm) is None:
            self.create(vm)
        try:
            self.rpc.startProcess(self.program(vm), False)
        except xmlrpc.client.Fault as fault:
            if "ALREADY_STARTED" not in fault.faultString:
                raise DstackError("start", f"supervisord could not start {vm.id}: {fault.faultString}") from None

    def stop(self, vm, force=True):
        info = self._info(vm)
        if info is None or info["statename"] not in ("RUNNING", "STARTING", "BACKOFF"):
            return
        if force:
            # A power-off: the guest agent still gets SIGTERM first so its containers go down.
            self.rpc.stopProcess(self.program(vm), True)
        else:
            self.rpc.signalProcess(self.program(vm), "TERM")

    def remove(self, vm):
        if self._info(vm) is not None:
            self.stop(vm, force=True)
            try:
                self.rpc.removeProcessGroup(self.program(vm))
            except xmlrpc.client.Fault as fault:
                if "BAD_NAME" not in fault.faultString:
                    raise
        path = os.path.join(self.dir, "conf.d", self.program(vm) + ".conf")
        if os.path.exists(path):
            os.unlink(path)
        self.rpc.reloadConfig()

    def status(self, vm):
        info = self._info(vm)
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
        info = self._info(vm)
        return info["pid"] if info else 0
