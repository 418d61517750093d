#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
---
module: verify_app
short_description: Check a deployed app from outside, from its URL, its compose file and the trust roots
version_added: 0.1.0
description:
  - An outsider's check of an app behind the dstack gateway. It needs nothing but the app's URL,
    its compose file (or app folder) and the trust roots; no access to the VMM, the KMS or the CVM.
  - Sends a fresh random nonce to the CVM's public Worker API through the gateway
    (C(https://<id>-8090.<base_domain>/prpc/Worker.Attest)) and verifies the quote that comes back
    with the project's one verifier (DCAP under the trust root, TCB policy, no debug TD,
    report_data bound to the nonce, the event log replayed to RTMR3).
  - Checks that the attested compose_hash is the local compose file's (computed as the
    M(dstack.tee.app_compose) module and the C(dstack.tee.app) role compute it), and that the
    attested app_id is the expected one, or the URL's instance_id the answering CVM's.
  - Checks that the certificate served for O(app_url) validates for its name under O(ca_cert).
    When it carries dstack's attestation extension (a passthrough C(<id>-<port>s) app with its own
    RA-TLS certificate), its quote is verified too and must be the same app; otherwise it is
    reported as terminated by the gateway (the gateway's own certificate is not bound to an
    attestation yet).
  - Fetches O(app_url) and reports its HTTP status (a status of 500 or more fails).
  - Fails naming the first check that failed. Reads only; never changes anything.
  - Host names under C(.localhost) are connected at 127.0.0.1 (RFC 6761, as curl and browsers do),
    with SNI and Host the name.
author:
  - dstack.tee contributors (@dstack-tee)
attributes:
  check_mode:
    support: full
    details: It only reads, so check mode runs every check too.
  diff_mode:
    support: none
  idempotent:
    support: full
options:
  app_url:
    description:
      - The app's URL, C(https://<id>.<base_domain>[:port]/). C(<id>) is an app_id or an
        instance_id (40 hex digits); C(<id>-<port>[s|g].<base_domain>) is accepted too (the id is
        the part before the dash).
    type: str
    required: true
  compose:
    description:
      - The app's docker-compose file. Exactly one of O(compose) and O(app_dir).
      - The app name is O(name), else the name of the file's folder.
    type: path
  app_dir:
    description:
      - An app folder as C(deploy-app.yml) takes it, C(docker-compose.yaml) and an optional
        C(app.yml), read as the C(dstack.tee.app) role reads it (M(dstack.tee.app_compose)'s
        O(dstack.tee.app_compose#module:app_yml)) - every app-compose field it sets. The name is
        C(app.yml)'s, else the folder's name.
    type: path
  name:
    description: The app name, as the deploy gave it (wins over C(app.yml)'s).
    type: str
  allowed_envs:
    description: app-compose's C(allowed_envs), as the deploy gave it (wins over C(app.yml)'s).
    type: list
    elements: str
  public_logs:
    description: app-compose's C(public_logs) (wins over C(app.yml)'s).
    type: bool
  public_sysinfo:
    description: app-compose's C(public_sysinfo) (wins over C(app.yml)'s).
    type: bool
  gateway_enabled:
    description: app-compose's C(gateway_enabled) (wins over C(app.yml)'s).
    type: bool
  key_provider:
    description: app-compose's C(key_provider) (wins over C(app.yml)'s).
    type: str
  no_instance_id:
    description: app-compose's C(no_instance_id) (wins over C(app.yml)'s).
    type: bool
  storage_fs:
    description: app-compose's C(storage_fs) (wins over C(app.yml)'s).
    type: str
    choices: [zfs, ext4]
  ca_cert:
    description:
      - PEM file of the CA (or CAs) the HTTPS of O(app_url) must validate under, e.g. the gateway's
        local CA (C(<gateway state dir>/tls/ca.crt)). For a passthrough app, a file with both the
        gateway's CA (the Worker's URL) and the KMS root CA (the app's RA-TLS certificate).
      - The system's trust store when unset.
    type: path
  expected_app_id:
    description:
      - The app_id the CVM must attest (40 hex digits; a DstackApp address for a contract-governed app).
      - When unset, the URL's id must be the attested app_id or the attested instance_id.
    type: str
  wait_timeout:
    description:
      - Seconds to keep retrying while the URL does not answer yet (connection refused, an id the
        gateway does not route yet, HTTP 502 to 504).
    type: int
    default: 0
  timeout:
    description: Seconds each network operation may take.
    type: int
    default: 30
  connect_address:
    description:
      - The address (IP or host name) to connect to instead of the URL's host, as curl's
        C(--connect-to) does; SNI, the certificate check and the Host header stay the URL's name.
      - E.g. the gateway host's address when C(*.<base_domain>) is not in DNS (C(deploy-app.yml)
        passes the inventory address of a gateway on another host).
    type: str
extends_documentation_fragment:
  - dstack.tee.attributes
  - dstack.tee.quote_trust
seealso:
  - module: dstack.tee.verify_quote
  - module: dstack.tee.app_compose
"""

EXAMPLES = r"""
- name: Check the demo app from outside, through the gateway
  dstack.tee.verify_app:
    app_url: https://{{ app_id }}.dstack.localhost:8443
    app_dir: examples/hello
    ca_cert: .demo/gateway/tls/ca.crt
    sim_state_dir: .demo/kms/tdx-sim
    wait_timeout: 60
  register: verified

- name: Show the report
  ansible.builtin.debug:
    msg: "{{ verified.report }}"

- name: A production app (Intel's root), its compose file, a public CA
  dstack.tee.verify_app:
    app_url: https://0123456789abcdef0123456789abcdef01234567.apps.example.com
    compose: ./docker-compose.yaml
    name: web
    collateral: ./collateral.json
"""

RETURN = r"""
ok:
  description: Whether every check passed (the task fails otherwise).
  returned: always
  type: bool
checks:
  description: Every check made, in order, with its result.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description:
        - C(worker), the verifier's checks (C(dcap), C(tcb_status), C(report_data), C(rtmr3_replay), ...),
          C(compose_hash), C(app_id) or C(instance_id), C(tls), C(app).
      type: str
    ok:
      description: Whether it passed.
      type: bool
    detail:
      description: What was found.
      type: str
app_id:
  description: The attested app_id (hex).
  returned: when the Worker answered with a quote
  type: str
instance_id:
  description: The attested instance_id (hex; empty for an app without instance ids).
  returned: when the Worker answered with a quote
  type: str
compose_hash:
  description: The attested compose_hash (hex).
  returned: when the Worker answered with a quote
  type: str
local_compose_hash:
  description: The compose_hash of the local compose file.
  returned: always
  type: str
tcb_status:
  description: The TCB status from the collateral.
  returned: when the Worker answered with a quote
  type: str
attestation_mode:
  description: V(dstack-tdx) or V(dstack-sim).
  returned: when the Worker answered with a quote
  type: str
boot_info:
  description:
    - What the verified quote and event log say (as M(dstack.tee.verify_quote) returns it), for
      comparisons this module does not make, such as os_image_hash, mr_aggregated, mrtd, rtmr0 to rtmr2.
  returned: when the Worker answered with a quote
  type: dict
report:
  description: Short lines for a person.
  returned: always
  type: list
  elements: str
"""

import traceback

from ansible.module_utils.basic import AnsibleModule, missing_required_lib
from ansible_collections.dstack.tee.plugins.module_utils import app_compose, app_verify, attestation, gateway_http, ra_tls
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError


# The app-compose fields given as options here (app.yml, with app_dir, may set any of them).
FIELD_OPTIONS = ("allowed_envs", "public_logs", "public_sysinfo", "gateway_enabled", "key_provider", "no_instance_id",
                 "storage_fs")


def main():
    module = AnsibleModule(
        argument_spec=dict(
            app_url=dict(type="str", required=True),
            compose=dict(type="path"),
            app_dir=dict(type="path"),
            name=dict(type="str"),
            allowed_envs=dict(type="list", elements="str"),
            public_logs=dict(type="bool"),
            public_sysinfo=dict(type="bool"),
            gateway_enabled=dict(type="bool"),
            key_provider=dict(type="str", no_log=False),
            no_instance_id=dict(type="bool"),
            storage_fs=dict(type="str", choices=list(app_compose.STORAGE_FS)),
            ca_cert=dict(type="path"),
            expected_app_id=dict(type="str"),
            wait_timeout=dict(type="int", default=0),
            timeout=dict(type="int", default=30),
            connect_address=dict(type="str"),
            **attestation.module_trust_argument_spec(),
        ),
        mutually_exclusive=[("compose", "app_dir")],
        required_one_of=[("compose", "app_dir"), ("collateral", "sim_state_dir")],
        supports_check_mode=True,
    )
    if not attestation.HAS_DCAP_QVL:
        module.fail_json(msg=missing_required_lib("dcap-qvl"), exception=traceback.format_exc())
    if not ra_tls.HAS_CRYPTOGRAPHY:
        module.fail_json(msg=missing_required_lib("cryptography"), exception=traceback.format_exc())
    if app_compose.yaml is None:
        module.fail_json(msg=missing_required_lib("PyYAML"), exception=traceback.format_exc())
    p = module.params
    try:
        url = gateway_http.parse_app_url(p["app_url"])
        local = app_verify.local_app(p["compose"], p["app_dir"], p["name"], {k: p[k] for k in FIELD_OPTIONS})
        trust = attestation.ModuleTrust(p["sim_state_dir"], p["collateral"], tuple(p["allowed_tcb_statuses"]))
        check = app_verify.AppCheck(url, local, trust, ca_cert=p["ca_cert"], expected_app_id=p["expected_app_id"],
                                    timeout=p["timeout"], wait_timeout=p["wait_timeout"],
                                    connect_to=p["connect_address"] or None).run()
    except DstackError as exc:
        module.fail_json(msg=str(exc), field=exc.field)
    result = dict(changed=False, **check.result())
    if not check.ok:
        failed = check.failed
        module.fail_json(msg=f"{failed.name}: {failed.detail}", **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
