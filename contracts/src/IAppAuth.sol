// SPDX-License-Identifier: GPL-3.0-or-later
// dstack.tee: the boot-authorization interface shared by DstackKms and every app contract.
// ABI-compatible with dstack's kms/auth-eth IAppAuth (ERC-165 interface id 0x1e079198).

pragma solidity ^0.8.22;

import "@openzeppelin/contracts/utils/introspection/IERC165.sol";

interface IAppAuth is IERC165 {
    /// What the KMS learned from a verified attestation (see 7.4 of the reference).
    struct AppBootInfo {
        address appId;
        bytes32 composeHash;
        address instanceId;
        bytes32 deviceId;
        bytes32 mrAggregated;
        bytes32 mrSystem;
        bytes32 osImageHash;
        string tcbStatus;
        string[] advisoryIds;
    }

    /// Whether a boot described by `bootInfo` may receive its keys; `reason` says why not.
    function isAppAllowed(AppBootInfo calldata bootInfo)
        external
        view
        returns (bool isAllowed, string memory reason);
}
