# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The trust root of the modules that verify quotes (verify_quote, verify_app), described once."""


class ModuleDocFragment:  # pylint: disable=too-few-public-methods
    DOCUMENTATION = r"""
options:
  collateral:
    description:
      - DCAP collateral JSON file (TCB info, QE identity, CRLs) for the quote's platform.
      - Needed unless O(sim_state_dir) is given (the simulator makes its own); used instead of the
        simulator's when both are given.
    type: path
  sim_state_dir:
    description:
      - Trust the simulated TDX of this state directory (its root CA instead of Intel's SGX Root
        CA). For the simulated default only.
      - Without it, quotes must chain to Intel's SGX Root CA.
    type: path
  allowed_tcb_statuses:
    description: TCB statuses to accept.
    type: list
    elements: str
    default: [UpToDate]
"""
