#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
---
module: sim_platform
short_description: Write a simulated TDX platform's files (its PKI and quoting key) on this host
version_added: 0.1.0
description:
  - Makes a folder hold the simulated TDX's platform files that M(dstack.tee.sim_platform_info)
    read on another host (the KMS's), so that a VMM or a gateway on another host than the KMS signs
    or verifies quotes of the same simulated platform. One run writes every file.
  - The folder is made with mode 0700 when missing (an existing one is set to 0700). Each file whose
    content differs is written atomically, with mode 0600 for a name ending C(.key) (a private key)
    and 0644 for the others; a file with the right content and another mode gets its mode alone.
  - Every name and value is checked before anything is written; a name with a C(/) or C(..) fails
    naming the option. Files of the folder that O(files) does not name are left alone.
  - O(files) is C(no_log); the diff names the files, their modes and whether their content changes,
    never the content. The task should still set C(no_log) to V(true), as O(files) comes from a
    result that holds private keys.
author:
  - dstack.tee contributors (@dstack-tee)
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
    details: The diff lists the folder and the changed files by name and mode; contents show as C(<hidden>).
  idempotent:
    support: full
options:
  path:
    description: The folder to write the files in.
    type: path
    required: true
  files:
    description: Each file's name (a name in O(path), no C(/) or C(..)) and its text (the C(files) that M(dstack.tee.sim_platform_info) returns).
    type: dict
    required: true
extends_documentation_fragment:
  - dstack.tee.attributes
seealso:
  - module: dstack.tee.sim_platform_info
"""

EXAMPLES = r"""
- name: Read the simulated TDX platform on the KMS host
  dstack.tee.sim_platform_info:
    path: /var/lib/dstack/kms/tdx-sim
  delegate_to: kms1
  check_mode: false
  no_log: true
  register: sim_platform

- name: Write it on this host
  dstack.tee.sim_platform:
    path: /var/lib/dstack/vmm/tdx-sim
    files: "{{ sim_platform.files }}"
  no_log: true
"""

RETURN = r"""
written:
  description: The files written or given their mode (or that would be, in check mode), in the order of O(files).
  returned: success
  type: list
  elements: str
  sample: [pck.key, platform.json]
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.dstack.tee.plugins.module_utils import sim_platform
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            files=dict(type="dict", required=True, no_log=True),
        ),
        supports_check_mode=True,
    )
    try:
        plan = sim_platform.plan_platform(module.params["path"], module.params["files"])
        if plan.changed and not module.check_mode:
            plan.apply()
    except DstackError as exc:
        module.fail_json(msg=str(exc), field=exc.field)
    module.exit_json(changed=plan.changed, written=plan.written, diff=plan.diff())


if __name__ == "__main__":
    main()
