#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
---
module: supervisor_program
short_description: Run a dstack.tee service under a supervisord of its own (the simulated default)
version_added: 0.1.0
description:
  - On hosts without systemd (the simulated default, containers, CI) the roles run the KMS and the
    VMM as supervisord programs. This module keeps one program defined and started or stopped,
    in a supervisord that lives in O(supervisor_dir) and is started when it is not running.
  - A changed command or environment redefines the program and restarts it when it was running.
author:
  - dstack.tee contributors (@dstack-tee)
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
    details: The diff shows the program's supervisord section (environment values hidden) and its state.
  idempotent:
    support: full
options:
  name:
    description: The program's name.
    type: str
    required: true
  command:
    description: The command line (as a list of arguments). Required unless O(state=absent).
    type: list
    elements: str
  directory:
    description: The working directory.
    type: path
    default: /
  environment:
    description:
      - Environment variables of the program.
      - The values are secret (no_log) and never shown, in the diff neither; the diff names the
        variables and marks a variable whose value changes as C(<hidden, changed>).
    type: dict
    default: {}
  log_dir:
    description: Where <name>.out.log and <name>.err.log go (default O(supervisor_dir)).
    type: path
  supervisor_dir:
    description: The supervisord's folder (config, socket, logs).
    type: path
    required: true
  state:
    description:
      - started (defined and running), stopped (defined, not running), absent, or restarted
        (started, and restarted when it was running; always reports a change).
    type: str
    choices: [started, stopped, restarted, absent]
    default: started
  autorestart:
    description:
      - Whether supervisord starts the program again when it exits. V(false) (the default) leaves it
        stopped; V(unexpected) restarts it after an exit with a code other than 0 (a service that
        stops whole with an error when a part of it dies, as C(dstack-gateway serve) does); V(true)
        always restarts it.
    type: str
    choices: ["false", "true", unexpected]
    default: "false"
  wait_port:
    description: After starting, wait until this TCP port on 127.0.0.1 accepts connections.
    type: int
  wait_timeout:
    description: Seconds to wait for O(wait_port).
    type: int
    default: 60
extends_documentation_fragment:
  - dstack.tee.attributes
"""

EXAMPLES = r"""
- name: Run the KMS
  dstack.tee.supervisor_program:
    name: dstack-kms
    command: [/opt/dstack/.venv/bin/dstack-kms, serve, --state-dir, /var/lib/dstack/kms, --listen, "127.0.0.1:9201"]
    supervisor_dir: /var/lib/dstack/supervisor
    wait_port: 9201
"""

RETURN = r"""
pid:
  description: The program's process id (0 when not running).
  returned: unless O(state=absent)
  type: int
statename:
  description: supervisord's state name of the program.
  returned: unless O(state=absent)
  type: str
"""

import os
import shlex
import socket
import time
import traceback

from ansible.module_utils.basic import AnsibleModule, missing_required_lib
from ansible_collections.dstack.tee.plugins.module_utils import supervisor as sv
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError


def _wait_port(port, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise DstackError("wait_port", f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            command=dict(type="list", elements="str"),
            directory=dict(type="path", default="/"),
            environment=dict(type="dict", default={}, no_log=True),
            log_dir=dict(type="path"),
            supervisor_dir=dict(type="path", required=True),
            state=dict(type="str", default="started", choices=["started", "stopped", "restarted", "absent"]),
            autorestart=dict(type="str", default="false", choices=["false", "true", "unexpected"]),
            wait_port=dict(type="int"),
            wait_timeout=dict(type="int", default=60),
        ),
        required_if=[("state", "started", ("command",)), ("state", "stopped", ("command",)),
                     ("state", "restarted", ("command",))],
        supports_check_mode=True,
    )
    if not sv.HAS_SUPERVISOR:
        module.fail_json(msg=missing_required_lib("supervisor"), exception=traceback.format_exc())
    p = module.params
    supervisor = sv.Supervisor(p["supervisor_dir"])
    name = p["name"]
    try:
        result = _apply(module, supervisor, name)
    except DstackError as exc:
        module.fail_json(msg=str(exc), field=exc.field)
    module.exit_json(**result)


def _apply(module, supervisor, name):
    p = module.params
    running = supervisor.alive()
    before_conf = supervisor.read_conf(name)
    info = supervisor.info(name) if running else None
    before_state = info["statename"] if info else "absent" if before_conf is None else "STOPPED"
    # The diff shows the sections with their environment values hidden (they hold tokens); a
    # variable whose value changes is marked as changed. The decision compares the real sections.
    before_env = sv.conf_environment(before_conf)
    before = {"conf": sv.redacted_conf(before_conf) or "", "environment": sv.redacted_environment(before_env),
              "state": before_state}
    if p["state"] == "absent":
        changed = before_conf is not None or info is not None
        if changed and not module.check_mode:
            supervisor.undefine(name)
        return dict(changed=changed, diff=dict(before=before, after={"conf": "", "environment": {}, "state": "absent"}))
    log_dir = p["log_dir"] or supervisor.dir
    environment = {k: str(v) for k, v in p["environment"].items()}
    conf = sv.program_conf(name, " ".join(shlex.quote(a) for a in p["command"]), p["directory"],
                           os.path.join(log_dir, name + ".out.log"), os.path.join(log_dir, name + ".err.log"),
                           environment=environment, autorestart=p["autorestart"])
    want_running = p["state"] in ("started", "restarted")
    is_running = before_state in sv.RUNNING_STATES
    restart = p["state"] == "restarted" and is_running
    changed = conf != before_conf or info is None or want_running != is_running or restart
    after = {"conf": sv.redacted_conf(conf), "environment": sv.redacted_environment(environment, before_env),
             "state": "RUNNING" if want_running else "STOPPED"}
    if module.check_mode or not changed:
        return dict(changed=changed, diff=dict(before=before, after=after), pid=info["pid"] if info else 0,
                    statename=before_state)
    if not module.check_mode:
        os.makedirs(log_dir, mode=0o700, exist_ok=True)
        if conf != before_conf or info is None:
            supervisor.define(name, conf)
        if restart and conf == before_conf:
            supervisor.stop(name)
        if want_running:
            supervisor.start(name, wait=True)
            if p["wait_port"]:
                _wait_port(p["wait_port"], p["wait_timeout"])
        else:
            supervisor.stop(name)
    info = supervisor.info(name)
    if want_running and info["statename"] not in sv.RUNNING_STATES:
        raise DstackError(name, f"did not stay running ({info['statename']}); see {log_dir}/{name}.err.log")
    return dict(changed=True, diff=dict(before=before, after=after), pid=info["pid"], statename=info["statename"])


if __name__ == "__main__":
    main()
