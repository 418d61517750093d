#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
---
module: app_compose
short_description: Render a dstack app-compose.json and compute its compose_hash and app_id
version_added: 0.1.0
description:
  - Builds the dstack C(app-compose.json) of an app from a docker-compose file plus options,
    writes it with deterministic bytes, and returns C(compose_hash) (SHA-256 of the exact bytes
    written), C(app_id) and C(mrconfigid).
  - The bytes are what C(dstack_sdk.get_compose_hash) hashes (keys sorted, compact JSON, UTF-8),
    so allowlists built with the dstack SDK match.
  - Options left unset take dstack's defaults; optional fields left unset are not written.
  - The docker-compose text is parsed as YAML and refused, naming the line, when it does not parse.
author:
  - dstack.tee contributors (@dstack-tee)
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
    details: >-
      The diff shows app-compose.json before and after as YAML, one field a line and the
      docker-compose text line by line.
  idempotent:
    support: full
    details: The file is written only when its bytes change.
options:
  compose_file:
    description: Path of the docker-compose file. Exactly one of O(compose_file) and O(compose).
    type: path
  compose:
    description: The docker-compose text itself.
    type: str
  app_yml:
    description:
      - An app folder's C(app.yml) - its app-compose fields (any of this module's field options, by
        the same names) are used as options; an option given to the module wins. Its C(name) and
        C(ports) are skipped (C(dstack.tee.app) reads them); any other key is refused, naming it.
      - A path that does not exist gives no options.
    type: path
  dest:
    description:
      - Where to write app-compose.json. Its folder must exist.
      - When unset, nothing is written and the hashes are only computed.
    type: path
  name:
    description: The app name (letters, digits, spaces and C(-_.@~!$^())).
    type: str
    required: true
  app_id:
    description:
      - The app_id to use instead of C(compose_hash[0:20]), for example a DstackApp contract
        address (20 bytes, hex).
    type: str
  manifest_version:
    description: The manifest version, V(2) by default.
    type: raw
  runner:
    description: How the app starts. V(docker-compose) by default.
    type: str
    choices: [docker-compose, bash, nerdctl-compose]
  kms_enabled:
    description: Whether the app gets its keys from a KMS. Follows O(key_provider) when unset.
    type: bool
  gateway_enabled:
    description: Whether the app joins the gateway (V(true) by default).
    type: bool
  local_key_provider_enabled:
    description: Whether the app uses the local key provider. Follows O(key_provider) when unset.
    type: bool
  key_provider:
    description: Where the app's keys come from. V(kms) by default.
    type: str
  key_provider_id:
    description: Hex id that pins the key provider (the KMS root public key or the provider MR).
    type: str
  public_logs:
    description: Whether container logs are public on the guest agent's port (V(false) by default).
    type: bool
  public_sysinfo:
    description: Whether system information is public (V(false) by default).
    type: bool
  public_tcbinfo:
    description: Whether the TCB info is public (V(true) by default).
    type: bool
  allowed_envs:
    description: Names of the env variables the app accepts; the guest drops any other.
    type: list
    elements: str
  no_instance_id:
    description: Whether the app has no instance id (V(false) by default).
    type: bool
  secure_time:
    description: Whether the guest waits for a synchronised clock before setup (V(true) by default).
    type: bool
  bash_script:
    description: The script for O(runner=bash) (legacy).
    type: str
  pre_launch_script:
    description: A script run before the runner.
    type: str
  init_script:
    description: An init script, or a list of at most 5.
    type: raw
  features:
    description: Deprecated dstack feature flags (V(kms), V(tproxy-net)).
    type: list
    elements: str
  storage_fs:
    description: The data disk file system; dstack's default (zfs) when unset.
    type: str
    choices: [zfs, ext4]
  swap_size:
    description: Swap size in bytes or like V(2G).
    type: raw
  docker_config:
    description: Registry settings C(registry), C(username), C(token_key).
    type: dict
  port_policy:
    description: Per-port PROXY protocol settings and C(restrict_mode).
    type: dict
  requirements:
    description: Requirements (needs manifest version 3).
    type: dict
  verity_volumes:
    description: Verity volumes.
    type: raw
  event_log_version:
    description: The RTMR3 event log version (1 or 2).
    type: int
extends_documentation_fragment:
  - dstack.tee.attributes
  - ansible.builtin.files
seealso:
  - module: dstack.tee.env_encrypt
"""

EXAMPLES = r"""
- name: Render app-compose.json for the hello app
  dstack.tee.app_compose:
    compose_file: examples/hello/docker-compose.yaml
    name: hello
    allowed_envs: [GREETING, API_TOKEN]
    dest: build/hello/app-compose.json
  register: app

- name: Show the identity an allowlist needs
  ansible.builtin.debug:
    msg: "compose_hash={{ app.compose_hash }} app_id={{ app.app_id }}"

- name: Only compute the hash of an inline compose
  dstack.tee.app_compose:
    name: web
    compose: |
      services:
        web:
          image: nginx
"""

RETURN = r"""
compose_hash:
  description: SHA-256 of the exact app-compose.json bytes (hex, no 0x).
  returned: always
  type: str
  sample: 9f0d5f6c4a3e1b2a7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b
app_id:
  description: The app id (hex, no 0x), O(app_id) or the first 20 bytes of compose_hash.
  returned: always
  type: str
  sample: 9f0d5f6c4a3e1b2a7c8d9e0f1a2b3c4d5e6f7a8b
mrconfigid:
  description: The 48-byte mrconfigid (hex) the VMM sets for this app (v2 when key_provider_id is set).
  returned: always
  type: str
app_compose:
  description: The app-compose content as a dict.
  returned: always
  type: dict
dest:
  description: The path written (or that would be written).
  returned: when O(dest) is set
  type: str
"""

import os
import traceback

from ansible.module_utils.basic import AnsibleModule, missing_required_lib
from ansible_collections.dstack.tee.plugins.module_utils import app_compose as compose
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.module_support import (
    apply_file_attributes, read_bytes, read_text, write_file)

FIELD_SPECS = dict(
    manifest_version=dict(type="raw"),
    runner=dict(type="str", choices=list(compose.RUNNERS)),
    kms_enabled=dict(type="bool"),
    gateway_enabled=dict(type="bool"),
    local_key_provider_enabled=dict(type="bool"),
    key_provider=dict(type="str", no_log=False),
    key_provider_id=dict(type="str", no_log=False),
    public_logs=dict(type="bool"),
    public_sysinfo=dict(type="bool"),
    public_tcbinfo=dict(type="bool"),
    allowed_envs=dict(type="list", elements="str"),
    no_instance_id=dict(type="bool"),
    secure_time=dict(type="bool"),
    bash_script=dict(type="str"),
    pre_launch_script=dict(type="str"),
    init_script=dict(type="raw"),
    features=dict(type="list", elements="str"),
    storage_fs=dict(type="str", choices=list(compose.STORAGE_FS)),
    swap_size=dict(type="raw"),
    docker_config=dict(type="dict"),
    port_policy=dict(type="dict"),
    requirements=dict(type="dict"),
    verity_volumes=dict(type="raw"),
    event_log_version=dict(type="int"),
)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            compose_file=dict(type="path"),
            compose=dict(type="str"),
            app_yml=dict(type="path"),
            dest=dict(type="path"),
            name=dict(type="str", required=True),
            app_id=dict(type="str"),
            **FIELD_SPECS,
        ),
        mutually_exclusive=[("compose_file", "compose")],
        required_one_of=[("compose_file", "compose")],
        supports_check_mode=True,
        add_file_common_args=True,
    )
    if compose.yaml is None:
        module.fail_json(msg=missing_required_lib("PyYAML"), exception=traceback.format_exc())
    params = module.params
    text = params["compose"]
    source_field = "compose"
    if params["compose_file"]:
        text = read_text(module, params["compose_file"], "compose_file")
        source_field = "compose_file"

    try:
        # The compose text is checked under the option the user gave it as.
        if params["runner"] != "bash":
            compose.parse_compose_yaml(text, source_field)
        fields = {}
        if params["app_yml"]:
            yml_text = read_text(module, params["app_yml"], "app_yml") if os.path.exists(params["app_yml"]) else ""
            fields = compose.app_yml_options(yml_text, params["app_yml"])[1]
        fields.update({k: params[k] for k in FIELD_SPECS if params[k] is not None})
        app = compose.build(text, params["name"], **fields)
        data = compose.render(app)
        compose_hash = compose.compose_hash(data)
        app_id = compose.app_id_for(compose_hash, params["app_id"])
        mrconfigid = compose.mrconfigid(app, app_id).hex()
    except DstackError as exc:
        module.fail_json(msg=str(exc), field=exc.field)

    result = dict(changed=False, compose_hash=compose_hash, app_id=app_id, mrconfigid=mrconfigid,
                  app_compose=app)
    dest = params["dest"]
    if dest:
        before = read_bytes(dest)
        changed = write_file(module, dest, data)
        result["changed"] = apply_file_attributes(module, dest, changed)
        result["dest"] = dest
        if changed and module._diff:
            result["diff"] = dict(before_header=dest, after_header=dest,
                                  before=compose.diff_text(before), after=compose.diff_text(data))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
