#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
---
module: tdx_host_facts
short_description: Read whether a host is ready to run Intel TDX guests, and what is missing
version_added: 0.1.0
description:
  - Reads a host's Intel TDX readiness from its files and commands, and returns the facts and the
    list of what is missing, each item with the fix in words (a BIOS setting by name, a package,
    a kernel parameter) and a kind that says who can fix it.
  - >-
    Reads the CPU model and flags (C(/proc/cpuinfo); C(tdx_host_platform) is the kernel's flag for
    a CPU whose BIOS enabled TDX), the kernel release and command line, the kernel build config
    (C(/boot/config-<release>)), C(/sys/module/kvm_intel/parameters/tdx), the kernel log lines of
    TDX (C(virt/tdx: BIOS enabled: private KeyID range), C(virt/tdx: module initialized),
    C(virt/tdx: module initialization failed), C(virt/tdx: module not loaded)), of TME
    (C(x86/tme: enabled by BIOS), C(x86/mktme)) and of SGX (C(x86/cpu: SGX disabled by BIOS.)),
    the SGX devices (C(/dev/sgx_enclave), C(/dev/sgx_provision)), the QGS (C(qgsd)) and PCCS
    (C(pccs)) service states, the QEMU and libvirt versions, the installed packages
    (C(/var/lib/dpkg/status)), the TDX firmware (OVMF/TDVF) and the memory (C(/proc/meminfo),
    NUMA nodes, the DIMMs EDAC lists).
  - >-
    Every file is read under O(sysroot). Commands run only when O(sysroot) is C(/); under another
    sysroot each command's output is read from C(<sysroot>/.dstack-commands/<name>.txt), and a
    missing file means the command is absent (not installed, or its output unknown).
    The names are C(dmesg) (the kernel log; on a live host C(journalctl -k -b 0), else C(dmesg)),
    C(qemu-system-x86_64-version) (C(qemu-system-x86_64 --version)), C(libvirtd-version)
    (C(libvirtd --version)), C(systemctl-is-active-qgsd) and C(systemctl-is-active-pccs)
    (C(systemctl is-active qgsd), C(systemctl is-active pccs)).
  - The kernel log needs root where C(kernel.dmesg_restrict=1) (Ubuntu's default); run the module
    with C(become). Without the log, C(kvm_intel.tdx=Y) alone shows an initialized TDX module.
  - Reads only; never changes anything (C(changed) is always false).
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
  sysroot:
    description:
      - The folder every file is read under. V(/) reads the host itself and runs its commands;
        another folder is a copy of a host's files (tests point it at fixture trees).
    type: path
    default: /
extends_documentation_fragment:
  - dstack.tee.attributes
"""

EXAMPLES = r"""
- name: Read the host's TDX readiness
  dstack.tee.tdx_host_facts:
  become: true
  register: tdx

- name: Stop on what no playbook can fix
  ansible.builtin.fail:
    msg: "{{ tdx.missing | selectattr('kind', 'in', ['hardware', 'bios', 'kernel'])
             | map(attribute='fix') | list }}"
  when: tdx.missing | selectattr('kind', 'in', ['hardware', 'bios', 'kernel']) | list

- name: Read a copy of a host's files (the tests' fixtures)
  dstack.tee.tdx_host_facts:
    sysroot: tests/fixtures/tdx_host/ready
"""

RETURN = r"""
ready:
  description: Whether nothing is missing (RV(missing) is empty).
  returned: always
  type: bool
  sample: true
missing:
  description:
    - What stops the host from running TDX guests, hardware first, then BIOS, kernel, config, package.
    - The kinds V(hardware), V(bios) and V(kernel) need a person (another CPU, a BIOS setting, a
      kernel to boot); V(package) and V(config) are what the dstack.tee.tdx_host role fixes.
  returned: always
  type: list
  elements: dict
  contains:
    item:
      description:
        - A short id, such as V(cpu), V(bios_vmx), V(bios_tme), V(bios_tdx), V(bios_tdx_keyids),
          V(bios_seam_loader), V(tdx_module_version), V(tdx_module), V(bios_sgx), V(sgx_driver),
          V(sgx_provision), V(kernel_tdx), V(kvm_intel), V(kernel_param_tdx),
          V(kernel_param_nohibernate), V(qemu), V(qemu_tdx), V(libvirt), V(libvirt_tdx), V(ovmf),
          V(qgs), V(pccs), V(unreadable).
      type: str
    found:
      description: What was seen (a kernel log line, a version, a file that is missing).
      type: str
    fix:
      description: The fix in words.
      type: str
    kind:
      description: Who can fix it.
      type: str
      choices: [hardware, bios, kernel, package, config]
  sample:
    - item: bios_tdx
      found: "the kernel log has no 'virt/tdx: BIOS enabled: private KeyID range' line"
      fix: "BIOS: Socket Configuration > Processor Configuration > TME, TME-MT, TDX: set ..."
      kind: bios
tdx_host:
  description: The facts read.
  returned: always
  type: dict
  contains:
    sysroot:
      description: The absolute sysroot.
      type: str
    os:
      description: C(/etc/os-release)'s V(id), V(version_id) and V(pretty_name).
      type: dict
    cpu:
      description:
        - V(vendor), V(model) (the model name), V(family), V(model_number), V(codename) (for a
          CPU with TDX), V(sockets), V(flags_tdx) (the C(tdx_host_platform) flag) and
          V(flags_present) (which of vmx, tme, sgx, sgx_lc, tdx_host_platform the CPU shows).
      type: dict
    kernel:
      description:
        - V(release), V(cmdline), V(tdx_param) (C(/sys/module/kvm_intel/parameters/tdx), V(Y),
          V(N) or null), V(tdx_supported) (the kernel's KVM can run TDs; null when unknown),
          V(kvm_intel_loaded), V(kvm_device) (C(/dev/kvm)), V(config_tdx), V(cmdline_tdx)
          (C(kvm_intel.tdx=1) on the command line), V(nohibernate), and V(packages) (each installed
          kernel meta package (C(linux-image-generic), C(linux-image-intel)) with the kernel release
          it brings, what C(uname -r) says once that kernel boots).
      type: dict
    kernel_log:
      description:
        - V(available), V(source) (the command or file, or why there is none), and the V(lines)
          about TDX, TME, SGX and kvm_intel.
      type: dict
    tdx_module:
      description: V(initialized), V(line) (the kernel's C(module initialized) line), V(version) and V(error) (a failure line).
      type: dict
    tme:
      description: V(enabled) (null when unknown), V(line) (the C(x86/tme) line) and V(mktme_line).
      type: dict
    keys:
      description:
        - V(tdx_keyid_range) ([start, end)), V(tdx_keyids) (the TDX private KeyIDs the BIOS split
          off), V(tdx_line) and V(mktme_keyids) (older kernels' C(x86/mktme) count).
      type: dict
    sgx:
      description: V(cpu_flag), V(enclave), V(provision), V(vepc) (the devices exist) and V(bios_disabled_line).
      type: dict
    services:
      description: V(qgs) and V(pccs), the output of C(systemctl is-active) (V(active), V(inactive), ...), or null.
      type: dict
    qemu:
      description: V(version) (C(qemu-system-x86_64 --version)), V(package_version) and V(tdx).
      type: dict
    libvirt:
      description: V(version) (C(libvirtd --version)), V(package_version) and V(tdx).
      type: dict
    firmware:
      description: V(ovmf), the path of a TDX-capable OVMF or null, and its V(package_version).
      type: dict
    memory:
      description: V(total_kb), V(hugepages_total), V(hugepage_size_kb), V(numa_nodes) and V(dimms) (null where not visible).
      type: dict
    packages:
      description: The installed versions of the packages of Canonical's TDX stack.
      type: dict
    unreadable:
      description: The files that exist but could not be read, with the reason.
      type: dict
"""

import shutil

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.dstack.tee.plugins.module_utils import system_path, tdx_host
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError


def main():
    module = AnsibleModule(
        argument_spec=dict(sysroot=dict(type="path", default="/")),
        supports_check_mode=True,
    )

    def run(argv):
        program = shutil.which(argv[0], path=system_path.with_sbin())
        if program is None:
            return None
        return module.run_command([program] + argv[1:], environ_update={"LC_ALL": "C"})

    try:
        ready, facts, missing = tdx_host.gather(module.params["sysroot"], run)
    except DstackError as exc:
        module.fail_json(msg=str(exc), field=exc.field)
    module.exit_json(changed=False, ready=ready, tdx_host=facts, missing=missing)


if __name__ == "__main__":
    main()
