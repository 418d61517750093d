// SPDX-License-Identifier: GPL-3.0-or-later
// dstack.tee: allowlist management of an app contract, as UI tools see it.
// ABI-compatible with dstack's IAppAuthBasicManagement (ERC-165 interface id 0x8fd37527).

pragma solidity ^0.8.22;

import "@openzeppelin/contracts/utils/introspection/IERC165.sol";

interface IAppAuthBasicManagement is IERC165 {
    event ComposeHashAdded(bytes32 composeHash);
    event ComposeHashRemoved(bytes32 composeHash);
    event DeviceAdded(bytes32 deviceId);
    event DeviceRemoved(bytes32 deviceId);

    function addComposeHash(bytes32 composeHash) external;
    function removeComposeHash(bytes32 composeHash) external;
    function addDevice(bytes32 deviceId) external;
    function removeDevice(bytes32 deviceId) external;
}
