# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The Ansible side of kms_contract and app_contract: one run for both (connect, deploy or attach,
plan the changes, send them) and its exit. The chain logic itself is contracts.py's."""

import traceback

from ansible.module_utils.basic import missing_required_lib
from ansible_collections.dstack.tee.plugins.module_utils import contracts
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError


def argument_spec(**options):
    """The options every contract module takes (the chain, the owner's key, the contract's address,
    state) plus the module's own."""
    return dict(rpc_url=dict(type="str", required=True), chain_id=dict(type="int", required=True),
                private_key=dict(type="str", no_log=True), address=dict(type="str"),
                state=dict(type="str", default="present", choices=["present", "absent"]), **options)


def run(module, name, sets, scalars, deployer):
    """Deploy or attach to the contract `name` and bring its allowlists to module.params: the result.

    sets maps the options holding 32-byte values to (view, add, remove) functions; scalars(params)
    lists the single values to set, (getter, setter, field, wanted or None) (contracts.plan).
    deployer(w3, params) is called when no address is given: it checks what a deployment needs and
    returns deploy(signer) -> the new address.
    """
    params = module.params
    contracts.check_values(params, sets)  # malformed input fails before anything is sent
    wanted = scalars(params)
    w3 = contracts.connect(params["rpc_url"], params["chain_id"])
    signer = contracts.Signer(w3, params["private_key"]) if params["private_key"] is not None else None
    address = params["address"]
    deployed = False
    if address is None:
        deploy = deployer(w3, params)
        if signer is None:
            raise DstackError("private_key", f"is required to deploy a {name} (no address given)")
        if module.check_mode:
            return dict(changed=True, address=None, tx_hashes=[])
        address = deploy(signer)
        deployed = True
    return _settle(module, contracts.contract(w3, name, address), signer, sets, wanted, deployed, name)


def _settle(module, target, signer, sets, scalars, deployed, name):
    """Plan the module's changes on `target` and make them: the module's result.

    The owner is checked first, then one transaction each, none in check mode. Check mode without
    a key only previews (a read-only question: "is this allowed on chain?"); with a key it also
    checks that the key owns the contract. A failure after a deployment says where the new
    contract is (main returns it), so the next run attaches to it instead of deploying again.
    """
    try:
        changes, before, after = contracts.plan(target, module.params, sets, scalars)
        if changes and not deployed:
            if signer is None and not module.check_mode:
                raise DstackError("private_key", f"is required to change the {name} at {target.address}")
            if signer is not None:
                contracts.require_owner(target, signer)
        if not module.check_mode:
            for function, arg, field in changes:
                signer.transact(target.functions[function](arg), field)
    except DstackError as exc:
        if deployed:
            exc.deployed = target.address
        raise
    result = dict(changed=deployed or bool(changes), address=target.address,
                  tx_hashes=signer.tx_hashes if signer else [])
    if module._diff:  # pylint: disable=protected-access
        result["diff"] = dict(before=before, after=after)
    return result


def main(module, module_name, name, sets, scalars, deployer, describe=lambda address: {}):
    """run() and exit with its result, or fail with a clear message.

    module_name names the module in an unexpected error; name is the contract (DstackKms, ...).
    describe(address) adds fields derived from the contract's address (app_contract's app_id),
    on success and on a failure after a deployment alike.
    """
    if not contracts.HAS_WEB3:
        module.fail_json(msg=missing_required_lib("web3"), exception=contracts.WEB3_IMPORT_ERROR)
    try:
        result = run(module, name, sets, scalars, deployer)
    except DstackError as exc:
        deployed = getattr(exc, "deployed", None)
        extra = dict(address=deployed, **describe(deployed)) if deployed else {}
        module.fail_json(msg=str(exc) + (f" (the {name} was deployed at {deployed})" if deployed else ""),
                         field=exc.field, **extra)
    except Exception as exc:  # pylint: disable=broad-except
        module.fail_json(msg=f"{module_name}: {type(exc).__name__}: {exc}", exception=traceback.format_exc())
    result.update(describe(result.get("address")))
    module.exit_json(**result)
