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
    assert facts["kernel"]["packages"] == {"linux-image-intel": "6.8.0-1028-intel"}
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


def _edit(root, path, text):
    target = root / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


def test_every_missing_item_has_a_kind_the_role_knows_and_words_for_the_fix(tmp_path):
    for name in ("ready", "tdx_off_in_bios", "old_kernel"):
        for item in tdx_host.gather(str(FIXTURES / name))[2]:
            assert set(item) == {"item", "found", "fix", "kind"} and item["kind"] in tdx_host.KINDS
            assert item["found"] and item["fix"]
    for item in tdx_host.gather(str(tmp_path))[2]:
        assert item["kind"] in tdx_host.KINDS and item["fix"]


def test_an_empty_tree_is_named_item_by_item_not_a_traceback(tmp_path):
    result = run_module("tdx_host_facts", {"sysroot": str(tmp_path)})
    assert not result.get("failed"), result.raw
    items = _items(result["missing"])
    assert result["ready"] is False
    assert items["cpu"]["kind"] == "hardware" and "/proc/cpuinfo" in items["cpu"]["found"]
    assert result["tdx_host"]["kernel_log"]["available"] is False
    assert ".dstack-commands/dmesg.txt is missing" in result["tdx_host"]["kernel_log"]["source"]


def test_a_sysroot_that_is_not_a_folder_fails_naming_the_option(tmp_path):
    result = run_module("tdx_host_facts", {"sysroot": str(tmp_path / "nowhere")})
    assert result.get("failed") and result["field"] == "sysroot", result.raw
    assert "is not a directory" in result["msg"]
    with pytest.raises(DstackError) as exc:
        tdx_host.gather("")
    assert exc.value.field == "sysroot"


def test_an_unreadable_file_is_named_with_its_reason(tmp_path):
    root = _copy(tmp_path)
    (root / "proc/cpuinfo").unlink()
    (root / "proc/cpuinfo").mkdir()  # open() fails on it even as root
    param = root / "sys/module/kvm_intel/parameters/tdx"
    param.unlink()
    param.mkdir()
    ready, facts, missing = tdx_host.gather(str(root))
    items = _items(missing)
    assert not ready
    assert items["cpu"]["kind"] == "hardware" and "directory" in items["cpu"]["found"].lower()
    assert "/sys/module/kvm_intel/parameters/tdx" in facts["unreadable"]
    unreadable = [m for m in missing if m["item"] == "unreadable"]
    assert [m["found"].split(":")[0] for m in unreadable] == ["/sys/module/kvm_intel/parameters/tdx"]
    # The parameter file is there, so the kernel has TDX; the log still shows the module up.
    assert facts["kernel"]["tdx_supported"] is True and facts["tdx_module"]["initialized"] is True


def test_without_the_kernel_log_kvm_intel_tdx_y_still_shows_the_module_up(tmp_path):
    root = _copy(tmp_path)
    (root / ".dstack-commands/dmesg.txt").unlink()
    ready, facts, missing = tdx_host.gather(str(root))
    assert ready and missing == [], missing
    assert facts["tdx_module"] == {"initialized": True, "line": None, "version": None, "error": None}
    assert facts["kernel_log"]["available"] is False


def test_a_missing_kvm_intel_tdx_parameter_on_the_command_line_is_config(tmp_path):
    root = _copy(tmp_path)
    _edit(root, "proc/cmdline", "BOOT_IMAGE=/boot/vmlinuz-6.8.0-1028-intel root=UUID=4f1c2a9e ro\n")
    _edit(root, "sys/module/kvm_intel/parameters/tdx", "N\n")
    log = (root / ".dstack-commands/dmesg.txt").read_text().splitlines()
    dropped = ("virt/tdx: TDX module", "PAMT", "CMR", "module initialized")
    _edit(root, ".dstack-commands/dmesg.txt",
          "\n".join(line for line in log if not any(d in line for d in dropped)) + "\n")
    ready, _facts, missing = tdx_host.gather(str(root))
    items = _items(missing)
    assert not ready
    assert set(items) == {"kernel_param_tdx", "kernel_param_nohibernate"}, missing
    assert all(m["kind"] == "config" for m in missing)
    assert "kvm_intel.tdx=1" in items["kernel_param_tdx"]["fix"] and "update-grub" in items["kernel_param_tdx"]["fix"]


@pytest.mark.parametrize("line, item", [
    ("[   24.195098] virt/tdx: module initialization failed (-5)", "tdx_module_version"),
    ("[   24.195098] virt/tdx: module not loaded", "bios_seam_loader"),
])
def test_a_tdx_module_that_does_not_come_up_is_named_from_its_kernel_line(tmp_path, line, item):
    root = _copy(tmp_path)
    _edit(root, "sys/module/kvm_intel/parameters/tdx", "N\n")
    log = (root / ".dstack-commands/dmesg.txt").read_text().splitlines()
    _edit(root, ".dstack-commands/dmesg.txt",
          "\n".join(l for l in log if "module initialized" not in l) + "\n" + line + "\n")
    _ready, facts, missing = tdx_host.gather(str(root))
    assert [(m["item"], m["kind"]) for m in missing] == [(item, "bios")], missing
    assert missing[0]["found"] == line and facts["tdx_module"]["error"] == line


def test_too_small_a_key_split_names_the_setting(tmp_path):
    root = _copy(tmp_path)
    log = (root / ".dstack-commands/dmesg.txt").read_text()
    _edit(root, ".dstack-commands/dmesg.txt", log.replace("private KeyID range [32, 64)", "private KeyID range [63, 64)"))
    items = _items(tdx_host.gather(str(root))[2])
    assert items["bios_tdx_keyids"]["kind"] == "bios" and "'TME-MT/TDX key split'" in items["bios_tdx_keyids"]["fix"]


def test_services_are_config_when_installed_and_package_when_not(tmp_path):
    root = _copy(tmp_path)
    _edit(root, ".dstack-commands/systemctl-is-active-qgsd.txt", "failed\n")
    (root / ".dstack-commands/systemctl-is-active-pccs.txt").unlink()
    status = (root / "var/lib/dpkg/status").read_text()
    _edit(root, "var/lib/dpkg/status", "\n\n".join(s for s in status.split("\n\n") if "Package: sgx-dcap-pccs" not in s))
    items = _items(tdx_host.gather(str(root))[2])
    assert set(items) == {"qgs", "pccs"}
    assert items["qgs"]["kind"] == "config" and "systemctl enable --now qgsd" in items["qgs"]["fix"]
    assert items["pccs"]["kind"] == "package" and "sgx-dcap-pccs" in items["pccs"]["fix"]


def test_a_cpu_without_tdx_is_hardware_and_nothing_else(tmp_path):
    root = _copy(tmp_path, "tdx_off_in_bios")
    cpuinfo = (root / "proc/cpuinfo").read_text()
    _edit(root, "proc/cpuinfo", cpuinfo.replace("GenuineIntel", "AuthenticAMD").replace("model\t\t: 207", "model\t\t: 17")
          .replace("cpu family\t: 6", "cpu family\t: 25").replace("INTEL(R) XEON(R) PLATINUM 8570", "AMD EPYC 9654 96-Core Processor"))
    missing = tdx_host.gather(str(root))[2]
    assert [(m["item"], m["kind"]) for m in missing] == [("cpu", "hardware")], missing
    assert "AMD EPYC 9654" in missing[0]["found"]


def test_on_this_machine_the_module_runs_its_commands_and_reports_without_failing():
    result = run_module("tdx_host_facts", {}, check=True)
    assert not result.get("failed"), result.raw
    assert result["changed"] is False and result["tdx_host"]["sysroot"] == "/"
    assert result["tdx_host"]["kernel"]["release"] == os.uname().release
    assert all(m["kind"] in tdx_host.KINDS for m in result["missing"])


def test_kernel_packages_name_the_release_they_bring_and_only_installed_meta_packages_count():
    status = "\n\n".join([
        "Package: linux-image-generic\nStatus: install ok installed\nVersion: 6.8.0-60.63\n"
        "Depends: linux-image-6.8.0-60-generic, linux-firmware, intel-microcode",
        # The release's own image package is not a meta package.
        "Package: linux-image-6.8.0-60-generic\nStatus: install ok installed\nDepends: linux-modules-6.8.0-60-generic",
        "Package: linux-image-intel\nStatus: install ok installed\nDepends: linux-image-unsigned-6.8.0-1031-intel (= 6.8.0-1031.38)",
        # Removed, its configuration kept: not installed.
        "Package: linux-image-aws\nStatus: deinstall ok config-files\nDepends: linux-image-6.8.0-1020-aws",
        # A meta package of something else.
        "Package: linux-image-extra-virtual\nStatus: install ok installed\nDepends: linux-image-generic",
    ])
    assert tdx_host.kernel_meta_releases(status) == {"linux-image-generic": "6.8.0-60-generic",
                                                     "linux-image-intel": "6.8.0-1031-intel"}
    assert tdx_host.kernel_meta_releases(None) == {}
