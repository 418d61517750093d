#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
---
module: app_contract
short_description: Deploy a DstackApp contract and manage its compose hashes and devices on chain
version_added: 0.1.0
description:
  - Deploys a C(DstackApp) through the KMS contract's C(deployAndRegisterApp) factory when
    O(address) is not given, or attaches to an existing one. The app id is the contract's address.
    A new app gets its first compose hash and device in the factory call itself (one transaction).
  - When a change fails after a deployment, the failure still returns the new contract's RV(address).
  - Makes the listed compose hashes and devices allowed (O(state=present)) or not allowed
    (O(state=absent)), and sets whether any device may run the app. Only the transactions
    needed are sent, each waited for.
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
  kms_address:
    description:
      - The DstackKms whose factory deploys and registers the app; required when O(address) is
        absent.
    type: str
  address:
    description: The address of an existing DstackApp (its proxy). When absent, one is deployed.
    type: str
  compose_hashes:
    description: Compose hashes (32 bytes, hex) to allow or disallow.
    type: list
    elements: str
    default: []
  devices:
    description: Device ids (32 bytes, hex) to allow or disallow.
    type: list
    elements: str
    default: []
  allow_any_device:
    description: Whether the app may run on any device.
    type: bool
  state:
    description: Whether the listed compose hashes and devices are allowed or not.
    type: str
    choices: [present, absent]
    default: present
extends_documentation_fragment:
  - dstack.tee.attributes
  - dstack.tee.contract
"""

EXAMPLES = r"""
- name: Deploy the hello app's contract and allow its compose hash
  dstack.tee.app_contract:
    rpc_url: http://127.0.0.1:8545
    chain_id: 1337
    private_key: "{{ owner_key }}"
    kms_address: "{{ kms.address }}"
    compose_hashes: ["{{ app.compose_hash }}"]
    allow_any_device: true
  register: hello

- name: Withdraw an old compose hash
  dstack.tee.app_contract:
    rpc_url: http://127.0.0.1:8545
    chain_id: 1337
    private_key: "{{ owner_key }}"
    address: "{{ hello.address }}"
    compose_hashes: ["{{ old_hash }}"]
    state: absent
"""

RETURN = r"""
address:
  description: The DstackApp address (checksummed); null when it would be deployed in check mode.
  returned: always
  type: str
app_id:
  description: The app id (the address as lowercase hex without 0x); null when it would be deployed in check mode.
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
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError

# option -> (view, add, remove)
_SETS = {
    "compose_hashes": ("allowedComposeHashes", "addComposeHash", "removeComposeHash"),
    "devices": ("allowedDeviceIds", "addDevice", "removeDevice"),
}


def scalars(params):
    """The single values to set: (getter, setter, option, wanted or None to leave it)."""
    return [("allowAnyDevice", "setAllowAnyDevice", "allow_any_device", params["allow_any_device"])]


def deployer(w3, params):
    """A new DstackApp through the DstackKms factory at kms_address: deploy(signer) -> its address."""
    if params["kms_address"] is None:
        raise DstackError("kms_address", "is required to deploy a DstackApp (no address given)")
    kms = contracts.contract(w3, "DstackKms", params["kms_address"])

    def deploy(signer):
        # The first hash and device go into the factory call itself, so a new app is deployed
        # and allowed in one transaction: no contract is left behind without its hash.
        first = {field: contracts.bytes32(params[field][0], field)
                 if params["state"] == "present" and params[field] else b"\0" * 32
                 for field in _SETS}
        return contracts.deploy_app(signer, kms, allow_any_device=bool(params["allow_any_device"]),
                                    compose_hash=first["compose_hashes"], device_id=first["devices"])
    return deploy


def app_id_of(address):
    """The app id is the contract's address: lowercase hex without 0x (None before the deployment)."""
    return {"app_id": address[2:].lower() if address else None}


def main():
    module = AnsibleModule(
        argument_spec=contract_module.argument_spec(
            kms_address=dict(type="str"),
            compose_hashes=dict(type="list", elements="str", default=[]),
            devices=dict(type="list", elements="str", default=[]),
            allow_any_device=dict(type="bool"),
        ),
        required_one_of=[("address", "kms_address")],
        supports_check_mode=True,
    )
    contract_module.main(module, "app_contract", "DstackApp", _SETS, scalars, deployer, app_id_of)


if __name__ == "__main__":
    main()
