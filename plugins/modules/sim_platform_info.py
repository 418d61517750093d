#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
---
module: sim_platform_info
short_description: Read a simulated TDX platform's files (its PKI and quoting key), to copy them to another host
version_added: 0.1.0
description:
  - Reads the files of the simulated TDX's platform (the simulated Intel PKI, the quoting enclave's
    attestation key and C(platform.json)) from its state directory in one run, for
    M(dstack.tee.sim_platform) to write on another host (a VMM or a gateway on another host than
    the KMS, which signs or verifies quotes of the same simulated platform).
  - Every name is checked before any file is read; a name with a C(/) or C(..), a missing or
    unreadable file, or a file that is not UTF-8 text fails naming the option.
  - The result holds private keys; the task must set C(no_log) to V(true).
  - Reads only; never changes anything (C(changed) is always false).
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
  path:
    description: The simulated TDX's state directory (the KMS's C(<dstack_kms_state_dir>/tdx-sim)).
    type: path
    required: true
  names:
    description:
      - The files to read, names in O(path) (no C(/) or C(..)).
      - The default is the simulated platform's files, as C(plugins/module_utils/tdx_sim.py) names
        them (C(PLATFORM_FILES)); C(rtmrs.json), a TD's measurements, is not one of them.
    type: list
    elements: str
    default: [root-ca.key, root-ca.crt, pck-ca.key, pck-ca.crt, pck.key, pck.crt, tcb-signing.key, tcb-signing.crt,
              attestation.key, platform.json]
extends_documentation_fragment:
  - dstack.tee.attributes
seealso:
  - module: dstack.tee.sim_platform
"""

EXAMPLES = r"""
- name: Read the simulated TDX platform on the KMS host
  dstack.tee.sim_platform_info:
    path: /var/lib/dstack/kms/tdx-sim
  delegate_to: kms1
  check_mode: false
  no_log: true  # the result holds private keys
  register: sim_platform

- name: Write it on this host
  dstack.tee.sim_platform:
    path: /var/lib/dstack/vmm/tdx-sim
    files: "{{ sim_platform.files }}"
  no_log: true
"""

RETURN = r"""
files:
  description: Each file's name and its text (private keys among them).
  returned: success
  type: dict
  sample: {"platform.json": "{\n  \"fmspc\": \"...\"\n}\n", "root-ca.crt": "-----BEGIN CERTIFICATE-----\n..."}
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.dstack.tee.plugins.module_utils import sim_platform
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            names=dict(type="list", elements="str", default=list(sim_platform.PLATFORM_FILES)),
        ),
        supports_check_mode=True,
    )
    try:
        files = sim_platform.read_platform(module.params["path"], module.params["names"])
    except DstackError as exc:
        module.fail_json(msg=str(exc), field=exc.field)
    module.exit_json(changed=False, files=files)


if __name__ == "__main__":
    main()
