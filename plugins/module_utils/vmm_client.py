# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A client of the VMM API (/prpc/Vmm.*): the cvm module, the playbooks and tests use it."""

import time

from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.prpc import PrpcClient


class VmmClient(PrpcClient):
    def __init__(self, url, token=None, ca_cert=None, timeout=60.0):
        super().__init__(url, "Vmm", field="vmm_url", ca_cert=ca_cert, token=token, timeout=timeout)

    def find(self, name):
        """The VmInfo of the VM with this name (full), or None."""
        for vm in self.call("Status", {"keyword": name}).get("vms", []):
            if vm.get("name") == name:
                return self.call("GetInfo", {"id": vm["id"]}).get("info")
        return None

    def wait_running(self, vm_id, timeout=300, poll=0.1):
        """Wait until the guest reports its boot done ("running"), or fail with its boot error.

        The guest pushes its progress to the VMM (the host API); this asks the VMM for it every
        `poll` seconds (a GetInfo costs the VMM about 3 ms; a boot takes about a second)."""
        deadline = time.time() + timeout
        info = {}
        while time.time() < deadline:
            info = self.call("GetInfo", {"id": vm_id}).get("info") or {}
            if info.get("boot_error"):
                raise DstackError("boot", info["boot_error"])
            if info.get("boot_progress") == "running":
                return info
            if info.get("status") == "exited":
                raise DstackError("boot", "the CVM exited before its boot finished (see its logs)")
            time.sleep(poll)
        raise DstackError("wait_timeout", f"the CVM did not finish booting in {timeout} s "
                                          f"(last progress: {info.get('boot_progress', '')!r})")
