#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
---
module: allowlist
short_description: Authorize apps in a dstack KMS's local allowlist (auth-simple's auth-config.json)
version_added: 0.1.0
description:
  - Adds or removes an app's compose hashes, and the allowed OS images and devices, in the JSON
    allowlist the KMS's C(local) auth backend reads (the format of dstack's auth-simple, so an
    existing auth-config.json works unchanged). The KMS re-reads the file when it changes.
  - The file is written atomically and only when its content changes.
  - Each edit (read, change, write) holds an exclusive lock on C(<path>.lock), so that edits made at
    the same time (several deployments, a fleet's rollouts) all keep their entries.
author:
  - dstack.tee contributors (@dstack-tee)
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
  idempotent:
    support: full
options:
  path:
    description: The allowlist file (the KMS's C(auth-config.json)); made when missing.
    type: path
    required: true
  app_id:
    description: The app (20 bytes, hex).
    type: str
  compose_hashes:
    description: Compose hashes of the app to add (O(state=present)) or remove (O(state=absent)).
    type: list
    elements: str
  state:
    description: Whether O(compose_hashes) are allowed or not.
    type: str
    choices: [present, absent]
    default: present
  os_images:
    description: OS image hashes to allow (32 bytes, hex).
    type: list
    elements: str
    default: []
  devices:
    description: Device ids to allow for the app.
    type: list
    elements: str
  allow_any_device:
    description: Whether the app may run on any device.
    type: bool
  gateway_app_id:
    description: The gateway's app id, as the KMS tells apps.
    type: str
extends_documentation_fragment:
  - dstack.tee.attributes
  - ansible.builtin.files
"""

EXAMPLES = r"""
- name: Allow the new compose hash of the hello app
  dstack.tee.allowlist:
    path: /var/lib/dstack/kms/auth-config.json
    app_id: "{{ app.app_id }}"
    compose_hashes: ["{{ app.compose_hash }}"]
    allow_any_device: true
    os_images: ["{{ os_image_hash }}"]

- name: Withdraw an old compose hash
  dstack.tee.allowlist:
    path: /var/lib/dstack/kms/auth-config.json
    app_id: "{{ app.app_id }}"
    compose_hashes: ["{{ old_hash }}"]
    state: absent
"""

RETURN = r"""
allowlist:
  description: The allowlist after the change.
  returned: always
  type: dict
"""

import json
from contextlib import nullcontext

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.dstack.tee.plugins.module_utils import allowlist
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.fileio import locked
from ansible_collections.dstack.tee.plugins.module_utils.module_support import apply_file_attributes, read_bytes, write_file


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            app_id=dict(type="str"),
            compose_hashes=dict(type="list", elements="str"),
            state=dict(type="str", default="present", choices=["present", "absent"]),
            os_images=dict(type="list", elements="str", default=[]),
            devices=dict(type="list", elements="str"),
            allow_any_device=dict(type="bool"),
            gateway_app_id=dict(type="str"),
        ),
        required_by={"compose_hashes": "app_id", "devices": "app_id"},
        supports_check_mode=True,
        add_file_common_args=True,
    )
    p = module.params
    # Deployments edit one allowlist at once (several apps, a fleet's rollouts): each read, change
    # and write holds the lock file beside it, so that none overwrites another's entry.
    with nullcontext() if module.check_mode else locked(p["path"] + ".lock"):
        try:
            before_bytes = read_bytes(p["path"])
            before = allowlist.parse(before_bytes.decode("utf-8") if before_bytes is not None else None)
            after = allowlist.apply(before, app_id=p["app_id"], compose_hashes=p["compose_hashes"] or (),
                                    state=p["state"], os_images=p["os_images"], devices=p["devices"] or (),
                                    allow_any_device=p["allow_any_device"], gateway_app_id=p["gateway_app_id"])
        except DstackError as exc:
            module.fail_json(msg=str(exc), field=exc.field)
        data = allowlist.render(after)
        # An equal allowlist is left as it is written (its formatting too); a different one is rewritten.
        changed = before_bytes is None or before != after
        if changed:
            changed = write_file(module, p["path"], data, "path")
        changed = apply_file_attributes(module, p["path"], changed)
    module.exit_json(changed=changed, allowlist=after,
                     diff=dict(before=json.dumps(before, indent=2, sort_keys=True) + "\n" if before_bytes else "",
                               after=data.decode("utf-8")))


if __name__ == "__main__":
    main()
