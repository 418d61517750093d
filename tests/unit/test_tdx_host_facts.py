"""dstack.tee.tdx_host_facts on fixture sysroots (tests/fixtures/tdx_host/): a TDX-ready Ubuntu
24.04 host with Canonical's TDX kernel, the same host with TDX off in the BIOS, and a host whose
kernel predates TDX; then broken trees (missing and unreadable files), which give named missing
items and never a traceback."""

import os
import shutil
from pathlib import Path

import pytest
from conftest import run_module

from ansible_collections.dstack.tee.plugins.module_utils import tdx_host
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "tdx_host"


def _items(missing):
    return {m["item"]: m for m in missing}


def _copy(tmp_path, name="ready"):
    root = tmp_path / name
    shutil.copytree(FIXTURES / name, root)
    return root


def test_the_ready_host_is_ready_and_its_facts_are_read():
    result = run_module("tdx_host_facts", {"sysroot": str(FIXTURES / "ready")}, check=True)
    assert not result.get("failed"), result.raw
    assert result["changed"] is False
    assert result["ready"] is True and result["missing"] == []
    facts = result["tdx_host"]
    assert facts["cpu"]["model"] == "INTEL(R) XEON(R) PLATINUM 8570" and facts["cpu"]["flags_tdx"] is True
    assert facts["kernel"]["release"] == "6.8.0-1028-intel" and facts["kernel"]["tdx_param"] == "Y"
    assert "kvm_intel.tdx=1" in facts["kernel"]["cmdline"]
    assert facts["tdx_module"]["initialized"] is True
    assert facts["tdx_module"]["line"].endswith("virt/tdx: module initialized")
    assert facts["keys"]["tdx_keyid_range"] == [32, 64] and facts["keys"]["tdx_keyids"] == 32
    assert facts["tme"]["enabled"] is True
    assert facts["sgx"]["enclave"] and facts["sgx"]["provision"]
    assert facts["services"] == {"qgs": "active", "pccs": "active"}
    assert facts["qemu"]["tdx"] and facts["qemu"]["version"].startswith("8.2.2")
    assert facts["libvirt"]["tdx"] and facts["libvirt"]["version"] == "10.0.0"
    assert facts["firmware"]["ovmf"] == "/usr/share/ovmf/OVMF.fd"
    assert facts["memory"]["numa_nodes"] == 2 and facts["memory"]["dimms"] == 16


def test_tdx_off_in_the_bios_names_each_setting_and_nothing_else():
    ready, _facts, missing = tdx_host.gather(str(FIXTURES / "tdx_off_in_bios"))
    items = _items(missing)
    assert not ready
    assert set(items) == {"bios_tme", "bios_tdx", "bios_sgx"}, missing
    assert all(m["kind"] == "bios" for m in missing)
    assert "'Trust Domain Extension (TDX)' to Enable" in items["bios_tdx"]["fix"]
    assert "'TME-MT/TDX key split' to a non-zero value" in items["bios_tdx"]["fix"]
    assert "SEAM Loader" in items["bios_tdx"]["fix"]
    assert "'Memory Encryption (TME)' to Enable" in items["bios_tme"]["fix"]
    assert "x86/tme: not enabled by BIOS" in items["bios_tme"]["found"]
    assert "'SW Guard Extensions (SGX)' to Enable" in items["bios_sgx"]["fix"]
    assert "SGX disabled by BIOS" in items["bios_sgx"]["found"]


def test_an_old_kernel_is_a_kernel_item_and_the_packages_it_lacks_are_package_items():
    ready, facts, missing = tdx_host.gather(str(FIXTURES / "old_kernel"))
    items = _items(missing)
    assert not ready
    assert items["kernel_tdx"]["kind"] == "kernel"
    assert "5.15.0-122-generic" in items["kernel_tdx"]["found"]
    assert "linux-image-intel" in items["kernel_tdx"]["fix"] and "Ubuntu 24.04" in items["kernel_tdx"]["fix"]
    # The BIOS cannot be judged through a kernel without TDX: no BIOS item is guessed.
    assert not [m for m in missing if m["kind"] in ("bios", "hardware")], missing
    assert {m["item"] for m in missing if m["kind"] == "package"} == {"qemu_tdx", "libvirt_tdx", "ovmf", "qgs", "pccs"}
    assert facts["kernel"]["tdx_supported"] is False and facts["kernel"]["tdx_param"] is None
    assert facts["keys"]["mktme_keyids"] == 63
