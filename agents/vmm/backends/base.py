# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The interface every CVM backend implements (process: supervised local processes; libvirt: VMs).

The VMM (agents/vmm/service.py) owns the VM's run directory (dstack-reference 2.2):
    <run_path>/<vm-id>/vm-manifest.json   what the VM is (VmRecord.manifest)
    <run_path>/<vm-id>/vm-state.json      {"started": bool}
    <run_path>/<vm-id>/shared/            the config share (app-compose.json, .sys-config.json, ...)
    <run_path>/<vm-id>/stdout.log, stderr.log, serial.log
A backend turns a VmRecord into something running, and reports its state. It never writes the
manifest or the config share; it may keep its own files in the run directory.
"""

import os
from dataclasses import dataclass, field

# VM status values (dstack-reference 2.1 VmInfo.status).
RUNNING, STOPPED, EXITED, STOPPING = "running", "stopped", "exited", "stopping"


@dataclass
class VmRecord:
    """One CVM as the VMM keeps it. `manifest` holds the fields of vm-manifest.json."""
    id: str
    run_dir: str
    manifest: dict = field(default_factory=dict)

    name = property(lambda self: self.manifest.get("name", ""))
    shared_dir = property(lambda self: os.path.join(self.run_dir, "shared"))
    work_dir = property(lambda self: os.path.join(self.run_dir, "work"))
    stdout_log = property(lambda self: os.path.join(self.run_dir, "stdout.log"))
    stderr_log = property(lambda self: os.path.join(self.run_dir, "stderr.log"))
    serial_log = property(lambda self: os.path.join(self.run_dir, "serial.log"))

    @property
    def port_map(self):
        """[{protocol, host_address, host_port, vm_port}] of the manifest (dstack's port_map)."""
        return list(self.manifest.get("port_map") or [])


class Backend:
    """Base class: create -> start -> (stop | shutdown) -> remove; status() at any time."""

    name = "base"
    # The host's address on the VM's network, where the VM reaches what listens on the host's
    # loopback (the VMM rewrites loopback URLs in .sys-config.json to it); None: the VM shares the
    # host's loopback, or reaches it by its own means (the process backend).
    guest_host_address = None

    def create(self, vm):
        """Prepare what the VM needs (define a domain, write a process entry). Idempotent."""
        raise NotImplementedError

    def start(self, vm):
        raise NotImplementedError

    def stop(self, vm, force=True):
        """Stop the VM: force=True is a power-off (StopVm), False a graceful shutdown (ShutdownVm)."""
        raise NotImplementedError

    def remove(self, vm):
        """Stop if needed and undefine; leave no process and nothing of the backend's behind."""
        raise NotImplementedError

    def status(self, vm):
        """RUNNING, STOPPED, EXITED or STOPPING."""
        raise NotImplementedError

    def os_image_hash(self, vm):  # pylint: disable=unused-argument
        """The os_image_hash of the image the VM boots, when the backend boots one ("" otherwise:
        the VMM's configured os_image_hash stands for the host it runs CVMs on)."""
        return ""

    def images(self):
        """The guest images a CVM can name (ListImages): [{name, version, is_dev, os_image_hash}];
        [] for a backend that boots none."""
        return []
