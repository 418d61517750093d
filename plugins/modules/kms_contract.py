#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
---
module: kms_contract
short_description: Deploy a DstackKms governance contract and manage its allowlists on chain
version_added: 0.1.0
description:
  - Deploys a C(DstackKms) contract (behind an ERC-1967 proxy) when O(address) is not given, or
    attaches to an existing one.
  - When a change fails after a deployment, the failure still returns the new contract's RV(address).
  - Makes the listed OS images, KMS aggregated measurements and KMS devices allowed
    (O(state=present)) or not allowed (O(state=absent)), and sets the gateway app id and the app
    implementation. Only the transactions needed are sent, each waited for.
  - The current membership is read with the contract's view functions; in check mode no
    transaction is sent.
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
  address:
    description:
      - The address of an existing DstackKms (its proxy). When absent, a new DstackKms is deployed
        and its address returned.
    type: str
  os_images:
    description: OS image hashes (32 bytes, hex) to allow or disallow.
    type: list
    elements: str
    default: []
  kms_aggregated_mrs:
    description: KMS aggregated measurements (32 bytes, hex) to allow or disallow.
    type: list
    elements: str
    default: []
  kms_devices:
    description: KMS device ids (32 bytes, hex) to allow or disallow.
    type: list
    elements: str
    default: []
  gateway_app_id:
    description: The gateway's app id the KMS tells apps.
    type: str
  app_implementation:
    description: The address of the DstackApp implementation the factory deploys.
    type: str
  state:
    description: Whether the listed OS images, measurements and devices are allowed or not.
    type: str
    choices: [present, absent]
    default: present
extends_documentation_fragment:
  - dstack.tee.attributes
  - dstack.tee.contract
"""

EXAMPLES = r"""
- name: Deploy a KMS contract allowing one OS image
  dstack.tee.kms_contract:
    rpc_url: http://127.0.0.1:8545
    chain_id: 1337
    private_key: "{{ owner_key }}"
    os_images: ["{{ os_image_hash }}"]
  register: kms

- name: Withdraw an old OS image
  dstack.tee.kms_contract:
    rpc_url: http://127.0.0.1:8545
    chain_id: 1337
    private_key: "{{ owner_key }}"
    address: "{{ kms.address }}"
    os_images: ["{{ old_os_image_hash }}"]
    state: absent
"""

RETURN = r"""
address:
  description: The DstackKms address (checksummed); null when it would be deployed in check mode.
  returned: always
  type: str
tx_hashes:
  description: The hashes of the transactions sent, in order.
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.dstack.tee.plugins.module_utils import contract_module, contracts

# option -> (view, add, remove)
_SETS = {
    "os_images": ("allowedOsImages", "addOsImageHash", "removeOsImageHash"),
    "kms_aggregated_mrs": ("kmsAllowedAggregatedMrs", "addKmsAggregatedMr", "removeKmsAggregatedMr"),
    "kms_devices": ("kmsAllowedDeviceIds", "addKmsDevice", "removeKmsDevice"),
}


def scalars(params):
    """The single values to set: (getter, setter, option, wanted or None to leave it)."""
    implementation = params["app_implementation"]
    if implementation is not None:
        implementation = contracts.address(implementation, "app_implementation")
    return [("gatewayAppId", "setGatewayAppId", "gateway_app_id", params["gateway_app_id"]),
            ("appImplementation", "setAppImplementation", "app_implementation", implementation)]


def deployer(_w3, _params):
    """A new DstackKms (its implementations and proxy): deploy(signer) -> the proxy's address."""
    return lambda signer: contracts.deploy_kms(signer)["kms_contract_address"]


def main():
    module = AnsibleModule(
        argument_spec=contract_module.argument_spec(
            os_images=dict(type="list", elements="str", default=[]),
            kms_aggregated_mrs=dict(type="list", elements="str", default=[]),
            kms_devices=dict(type="list", elements="str", default=[]),
            gateway_app_id=dict(type="str"),
            app_implementation=dict(type="str"),
        ),
        supports_check_mode=True,
    )
    contract_module.main(module, "kms_contract", "DstackKms", _SETS, scalars, deployer)


if __name__ == "__main__":
    main()
