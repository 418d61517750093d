# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The chain options of the contract modules (kms_contract, app_contract), described once."""


class ModuleDocFragment:  # pylint: disable=too-few-public-methods
    DOCUMENTATION = r"""
options:
  rpc_url:
    description: The chain's JSON-RPC endpoint (http:// or https://).
    type: str
    required: true
  chain_id:
    description: The chain id the RPC must serve.
    type: int
    required: true
  private_key:
    description:
      - The owner's private key (32 bytes, hex). Required when a deployment or a change is needed.
    type: str
requirements:
  - web3
"""
