#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
---
module: ports_free
short_description: Check that host ports are free, or held only by processes of given supervisords
version_added: 0.1.0
description:
  - For each port, tries to bind it as the service that needs it would. When the bind fails,
    names the processes that hold the port (pid and command line, from C(/proc)), and fails
    unless every one of them runs under one of the supervisords of O(supervisors) (a service
    of the same deployment, started earlier, that keeps its port).
  - Meant to run before anything is started or written, so that a port another program holds
    stops the run naming that program, instead of a service failing to start or a client
    talking to the wrong server.
  - Linux only; the ports of this network namespace. Another user's process is named only to root.
  - Reads only; never changes anything.
author:
  - dstack.tee contributors (@dstack-tee)
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  idempotent:
    support: full
options:
  ports:
    description: The ports to check.
    type: list
    elements: dict
    required: true
    suboptions:
      name:
        description: What sets the port (a variable, a setting); errors start with it.
        type: str
        required: true
      port:
        description: The port number (a number or a string of digits).
        type: raw
        required: true
      address:
        description: The address the port is bound on (V(0.0.0.0) or V(::) for every address).
        type: str
        default: 0.0.0.0
      protocol:
        description: The protocol.
        type: str
        choices: [tcp, udp]
        default: tcp
  supervisors:
    description:
      - supervisord folders (each with C(supervisord.conf) and C(supervisord.pid), as
        M(dstack.tee.supervisor_program) makes them) whose processes, and their children, may hold the ports.
    type: list
    elements: path
    default: []
extends_documentation_fragment:
  - dstack.tee.attributes
"""

EXAMPLES = r"""
- name: Check the VMM's port before starting it
  dstack.tee.ports_free:
    ports:
      - {name: dstack_vmm_listen, address: 127.0.0.1, port: 9080}
      - {name: dstack_gateway_wg_listen_port, port: 51830, protocol: udp}
    supervisors: [/var/lib/dstack/services]
"""

RETURN = r"""
ports:
  description: Each port, whether it is free, and the processes that hold it.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: The port's O(ports[].name).
      type: str
    port:
      description: The port number.
      type: int
    address:
      description: The address.
      type: str
    protocol:
      description: tcp or udp.
      type: str
    free:
      description: Whether the bind succeeded.
      type: bool
    holders:
      description: The processes with the port's socket open (pid, cmdline, the supervisord folder they run under or null).
      type: list
      elements: dict
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.dstack.tee.plugins.module_utils import host_ports
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError


def main():
    module = AnsibleModule(
        argument_spec=dict(
            ports=dict(type="list", elements="dict", required=True, options=dict(
                name=dict(type="str", required=True), port=dict(type="raw", required=True),
                address=dict(type="str", default="0.0.0.0"),
                protocol=dict(type="str", choices=list(host_ports.PROTOCOLS), default="tcp"))),
            supervisors=dict(type="list", elements="path", default=[]),
        ),
        supports_check_mode=True,
    )
    try:
        results = host_ports.check_ports(module.params["ports"], module.params["supervisors"])
    except DstackError as exc:
        module.fail_json(msg=str(exc), field=exc.field)
    module.exit_json(changed=False, ports=results)


if __name__ == "__main__":
    main()
