#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
---
module: verify_quote
short_description: Get a fresh quote from a CVM's guest agent and verify it
version_added: 0.1.0
description:
  - Asks a CVM's guest agent (its dstack socket) for a quote over a fresh random nonce, or takes a
    quote (GetQuote JSON) from a file, and verifies it with the project's one verifier, that is
    DCAP through dcap-qvl under Intel's root (or the simulator's root when O(sim_state_dir) is
    given), the TCB policy, no debug TD, the nonce in report_data, and the event log replayed to RTMR3.
  - Fails, naming the check, when any check fails, or when the quote's app_id or compose_hash is
    not the expected one.
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
  socket:
    description: The guest agent's socket (C(dstack.sock)). Exactly one of O(socket) and O(quote_file).
    type: path
  quote_file:
    description: A GetQuote response JSON (or raw quote) to verify instead.
    type: path
  expected_compose_hash:
    description: The compose_hash the quote's event log must show.
    type: str
  expected_app_id:
    description: The app_id the quote's event log must show.
    type: str
extends_documentation_fragment:
  - dstack.tee.attributes
  - dstack.tee.quote_trust
"""

EXAMPLES = r"""
- name: Verify the CVM's attestation
  dstack.tee.verify_quote:
    socket: /var/lib/dstack/vmm/run/{{ cvm.id }}/dstack.sock
    sim_state_dir: /var/lib/dstack/kms/tdx-sim
    expected_compose_hash: "{{ app.compose_hash }}"
  register: quote
"""

RETURN = r"""
ok:
  description: Whether every check passed (the task fails otherwise).
  returned: always
  type: bool
attestation_mode:
  description: V(dstack-tdx) or V(dstack-sim).
  returned: always
  type: str
tcb_status:
  description: The TCB status from the collateral.
  returned: always
  type: str
boot_info:
  description: app_id, compose_hash, instance_id, device_id, mr_aggregated, mr_system, os_image_hash, key provider.
  returned: always
  type: dict
checks:
  description: Every check with its result.
  returned: always
  type: list
  elements: dict
"""

import json
import os
import traceback

from ansible.module_utils.basic import AnsibleModule, missing_required_lib
from ansible_collections.dstack.tee.plugins.module_utils import attestation, guest_client
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError, parse_hex


def main():
    module = AnsibleModule(
        argument_spec=dict(
            socket=dict(type="path"),
            quote_file=dict(type="path"),
            expected_compose_hash=dict(type="str"),
            expected_app_id=dict(type="str"),
            **attestation.module_trust_argument_spec(),
        ),
        mutually_exclusive=[("socket", "quote_file")],
        required_one_of=[("socket", "quote_file"), ("collateral", "sim_state_dir")],
        supports_check_mode=True,
    )
    if not attestation.HAS_DCAP_QVL:
        module.fail_json(msg=missing_required_lib("dcap-qvl"), exception=traceback.format_exc())
    p = module.params
    try:
        nonce = os.urandom(32)
        if p["socket"]:
            answer = guest_client.get_quote(p["socket"], nonce)
            expected_report_data = nonce
        else:
            with open(p["quote_file"], "rb") as handle:
                answer = json.loads(handle.read())
            expected_report_data = None
        quote = parse_hex(answer.get("quote", ""), "quote")
        trust = attestation.ModuleTrust(p["sim_state_dir"], p["collateral"], tuple(p["allowed_tcb_statuses"]))
        result = trust.verify(quote, answer.get("event_log"), expected_report_data)
    except (DstackError, OSError, ValueError) as exc:
        module.fail_json(msg=str(exc), field=getattr(exc, "field", "quote"))
    info = result.boot_info
    for name, expected in (("compose_hash", p["expected_compose_hash"]), ("app_id", p["expected_app_id"])):
        if expected:
            ok = info.get(name) == parse_hex(expected, f"expected_{name}").hex()
            result.add(f"expected_{name}", ok, "matches" if ok else f"the quote shows {info.get(name)!r}")
    out = dict(changed=False, ok=result.ok, attestation_mode=result.attestation_mode, tcb_status=result.tcb_status,
               boot_info=info, checks=[c.to_dict() for c in result.checks])
    if not result.ok:
        failed = result.failures[0]
        module.fail_json(msg=f"{failed.name}: {failed.detail}", **out)
    module.exit_json(**out)


if __name__ == "__main__":
    main()
