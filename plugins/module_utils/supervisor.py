# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""supervisord as dstack.tee uses it: one supervisord per folder, driven through its XML-RPC API.

Used by the VMM's process backend (a CVM is a program) and by the supervisor_program module
(the KMS and VMM services on the simulated default). The folder holds supervisord.conf, the
unix socket (mode 0700), the pid file and log, and conf.d/<program>.conf, one per program.
supervisord runs on its own: it outlives whoever started it.
"""

import os
import re
import subprocess
import sys
import time
import xmlrpc.client

from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.fileio import atomic_write, read_text

try:
    from supervisor.datatypes import dict_of_key_value_pairs
    from supervisor.xmlrpc import SupervisorTransport
except ImportError:
    HAS_SUPERVISOR = False
else:
    HAS_SUPERVISOR = True

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
directory = {directory}
autostart = {autostart}
autorestart = {autorestart}
startsecs = 1
stopsignal = TERM
stopwaitsecs = {stop_wait}
stopasgroup = true
killasgroup = true
stdout_logfile = {stdout}
stdout_logfile_maxbytes = 10MB
stderr_logfile = {stderr}
stderr_logfile_maxbytes = 10MB
environment = {environment}
"""
RUNNING_STATES = ("RUNNING", "STARTING", "BACKOFF")


def program_conf(name, command, directory, stdout, stderr, environment=None, autostart=False, autorestart=False,
                 stop_wait=60):
    """The [program:name] section; `command` is a shell-quoted string; values are escaped for supervisor."""
    env = ",".join(f'{k}="{v}"' for k, v in sorted((environment or {}).items()))
    return PROGRAM_CONF.format(name=name, command=command.replace("%", "%%"), directory=directory,
                               autostart=str(autostart).lower(), autorestart=str(autorestart).lower(),
                               stop_wait=stop_wait, stdout=stdout, stderr=stderr, environment=env.replace("%", "%%"))


# What a program's environment values show as in a module's output (they often hold tokens).
HIDDEN = "<hidden>"
HIDDEN_CHANGED = "<hidden, changed>"
_ENVIRONMENT_LINE = re.compile(r"^environment = (.*)$", re.M)


def conf_environment(conf):
    """The environment of a section program_conf wrote, read as supervisord reads it ({} if none)."""
    match = _ENVIRONMENT_LINE.search(conf or "")
    if not match or not match.group(1):
        return {}
    try:
        return dict_of_key_value_pairs(match.group(1).replace("%%", "%"))
    except ValueError:
        return {}


def redacted_conf(conf):
    """The section with every environment value replaced by HIDDEN (names stay, for the diff)."""
    if not conf:
        return conf
    hidden = ",".join(f'{k}="{HIDDEN}"' for k in sorted(conf_environment(conf)))
    return _ENVIRONMENT_LINE.sub(lambda _match: f"environment = {hidden}", conf, count=1)


def redacted_environment(environment, before=None):
    """{name: HIDDEN}, or HIDDEN_CHANGED for a name whose value differs from the one in `before`."""
    before = before or {}
    return {k: HIDDEN if k not in before or before[k] == v else HIDDEN_CHANGED for k, v in environment.items()}


class Supervisor:
    def __init__(self, folder):
        self.dir = os.path.abspath(folder)
        self.sock = os.path.join(self.dir, "supervisor.sock")
        self._started = False

    def _server(self):
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=SupervisorTransport(
            None, None, serverurl="unix://" + self.sock)).supervisor

    def alive(self):
        if not os.path.exists(self.sock):
            return False
        try:
            self._server().getState()
            return True
        except (OSError, xmlrpc.client.Fault):
            return False

    @property
    def rpc(self):
        """A fresh XML-RPC proxy: one connection per call, so threads (the VMM's) never share one."""
        if not self._started:
            self.ensure()
            self._started = True
        return self._server()

    def ensure(self):
        """Start this folder's supervisord unless it runs already."""
        if self.alive():
            return False
        os.makedirs(os.path.join(self.dir, "conf.d"), mode=0o700, exist_ok=True)
        conf = os.path.join(self.dir, "supervisord.conf")
        atomic_write(conf, SUPERVISORD_CONF.format(sock=self.sock, dir=self.dir).encode(), mode=0o600)
        supervisord = os.path.join(os.path.dirname(sys.executable), "supervisord")
        proc = subprocess.run([supervisord, "-c", conf], capture_output=True, text=True, timeout=30, check=False)
        if proc.returncode != 0:
            raise DstackError("supervisord", f"did not start: {(proc.stderr or proc.stdout).strip()[-300:]}")
        for _attempt in range(100):
            if self.alive():
                return True
            time.sleep(0.1)
        raise DstackError("supervisord", f"did not answer on {self.sock}")

    def conf_path(self, name):
        return os.path.join(self.dir, "conf.d", name + ".conf")

    def read_conf(self, name):
        """A program's section as installed, None when there is none."""
        return read_text(self.conf_path(name), name, missing_ok=True)

    def define(self, name, conf):
        """Install or replace a program's section; a replaced running program is restarted."""
        os.makedirs(os.path.join(self.dir, "conf.d"), mode=0o700, exist_ok=True)
        atomic_write(self.conf_path(name), conf.encode(), mode=0o600)
        added, changed, removed = self.rpc.reloadConfig()[0]
        if name in changed:
            self._remove_group(name)
            added = [name]
        if name in added:
            self.rpc.addProcessGroup(name)
        del removed

    def _remove_group(self, name):
        info = self.info(name)
        if info and info["statename"] in RUNNING_STATES:
            self.rpc.stopProcess(name, True)
        try:
            self.rpc.removeProcessGroup(name)
        except xmlrpc.client.Fault as fault:
            if "BAD_NAME" not in fault.faultString:
                raise

    def undefine(self, name):
        if self.info(name) is not None:
            self._remove_group(name)
        if os.path.exists(self.conf_path(name)):
            os.unlink(self.conf_path(name))
        self.rpc.reloadConfig()

    def info(self, name):
        try:
            return self.rpc.getProcessInfo(name)
        except xmlrpc.client.Fault as fault:
            if "BAD_NAME" in fault.faultString:
                return None
            raise

    def start(self, name, wait=False):
        try:
            self.rpc.startProcess(name, wait)
        except xmlrpc.client.Fault as fault:
            if "ALREADY_STARTED" not in fault.faultString:
                raise DstackError(name, f"supervisord could not start it: {fault.faultString}") from None

    def stop(self, name, wait=True):
        info = self.info(name)
        if info is not None and info["statename"] in RUNNING_STATES:
            self.rpc.stopProcess(name, wait)

    def signal(self, name, sig):
        self.rpc.signalProcess(name, sig)

    def shutdown(self):
        if self.alive():
            self._server().shutdown()
        self._started = False
