# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A host's Intel TDX readiness, read from its files and commands (dstack.tee.tdx_host_facts).

Everything is read under a sysroot, so tests point it at a fixture tree. Commands run only when
the sysroot is "/"; under another sysroot their outputs are the files
<sysroot>/.dstack-commands/<name>.txt (COMMANDS), a missing file meaning the command is absent.

The result is the facts plus `missing`: what stops this host from running TDX guests, each with
the fix in words and a kind. The tdx_host role stops on kinds hardware, bios and kernel (no
playbook can fix those) and fixes kinds package and config itself, so the kind is the contract.
"""

import glob
import os
import re

from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError

KINDS = ("hardware", "bios", "kernel", "package", "config")

# Name of the output file under <sysroot>/.dstack-commands/ -> the commands that make it on a
# real host, tried in order (the first that runs and exits 0 wins).
COMMANDS = {
    # journalctl keeps the whole boot's kernel log; dmesg's ring buffer may have lost the TDX
    # lines of boot on a host that has been up for long.
    "dmesg": (("journalctl", "-k", "-b", "0", "--no-pager", "-q", "-o", "short-monotonic"), ("dmesg",)),
    "qemu-system-x86_64-version": (("qemu-system-x86_64", "--version"),),
    "libvirtd-version": (("libvirtd", "--version"),),
    "systemctl-is-active-qgsd": (("systemctl", "is-active", "qgsd"),),
    "systemctl-is-active-pccs": (("systemctl", "is-active", "pccs"),),
}
# systemctl is-active exits 3 for an inactive unit, and its output is still the answer.
ANY_EXIT = ("systemctl-is-active-qgsd", "systemctl-is-active-pccs")

# CPUs with TDX (family 6 model numbers), as Canonical's and Intel's guides list them.
TDX_CPU_MODELS = {
    143: "Sapphire Rapids (4th Gen Xeon Scalable; only select SKUs have TDX)",
    207: "Emerald Rapids (5th Gen Xeon Scalable)",
    173: "Granite Rapids (Xeon 6 with P-cores)",
    175: "Sierra Forest (Xeon 6 with E-cores)",
    221: "Clearwater Forest (Xeon 6+)",
}

# Upstream releases with TDX; older ones have it only as Canonical's PPA builds (+tdx in the version).
QEMU_TDX_UPSTREAM = (10, 1)
LIBVIRT_TDX_UPSTREAM = (11, 7)

OVMF_PATHS = (
    "/usr/share/ovmf/OVMF.inteltdx.fd",      # ovmf-inteltdx (Ubuntu 25.10 and later)
    "/usr/share/ovmf/OVMF.inteltdx.ms.fd",
    "/usr/share/qemu/OVMF.inteltdx.fd",
)
# Canonical's 24.04 PPA puts its TDX-capable build at the generic path, recognisable only by the
# ovmf package's version (+tdx).
OVMF_GENERIC = "/usr/share/ovmf/OVMF.fd"

PACKAGES = ("qemu-system-x86", "libvirt-daemon-system", "libvirt-clients", "ovmf", "ovmf-inteltdx",
            "tdx-qgs", "sgx-dcap-pccs", "libsgx-dcap-default-qpl", "sgx-ra-service",
            "linux-image-intel", "linux-image-generic")

PPA = "Canonical's TDX PPA (ppa:kobuk-team/tdx-release, as canonical/tdx's setup-tdx-host.sh adds it)"
BIOS_TDX_MENU = "Socket Configuration > Processor Configuration > TME, TME-MT, TDX"
BIOS_SGX_MENU = "Socket Configuration > Processor Configuration > Software Guard Extension (SGX)"
FIX_KERNEL = ("boot a kernel with TDX host support: on Ubuntu 24.04, the kernel of " + PPA + ", pinned "
              "above the archive (linux-image-generic, or its linux-image-intel), which the "
              "dstack.tee.tdx_host role installs and selects for the next boot; or Ubuntu 25.10 and "
              "later, whose generic kernel has it; then reboot into it")
FIX_BIOS_TDX = (f"BIOS: {BIOS_TDX_MENU}: set 'Memory Encryption (TME)' to Enable, 'Total Memory "
                "Encryption Multi-Tenant (TME-MT)' to Enable, 'TME-MT memory integrity' to Disable, "
                "'Trust Domain Extension (TDX)' to Enable, 'TDX Secure Arbitration Mode Loader (SEAM "
                "Loader)' to Enable and 'TME-MT/TDX key split' to a non-zero value; save and reboot")

LOG_PATTERNS = {
    "tdx_init": re.compile(r"\b(?:virt/)?tdx: (?:TDX )?module initialized\b"),
    "tdx_init_failed": re.compile(r"\b(?:virt/)?tdx: (?:TDX )?module initialization failed \((-?\d+)\)"),
    "tdx_not_loaded": re.compile(r"\b(?:virt/)?tdx: (?:TDX )?module not loaded\b"),
    "tdx_failed": re.compile(r"\b(?:virt/)?tdx: initialization failed: (.*)"),
    "tdx_keyids": re.compile(r"\b(?:virt/)?tdx: BIOS enabled: private KeyID range:? \[(\d+), (\d+)\)"),
    "tdx_module_v1": re.compile(r"tdx: TDX module: attributes (0x[0-9a-f]+), vendor_id (0x[0-9a-f]+), "
                                r"major_version (\d+), minor_version (\d+), build_date (\d+), build_num (\d+)"),
    "tdx_module_v2": re.compile(r"tdx: TDX module (\d+\.\d+(?:\.\d+)*), build number (\d+)"),
    "tme_on": re.compile(r"\bx86/tme: enabled by BIOS\b"),
    "tme_off": re.compile(r"\bx86/tme: not enabled by BIOS\b"),
    "mktme": re.compile(r"\bx86/mktme: (.*)"),
    "mktme_keyids": re.compile(r"\bx86/mktme: (\d+) KeyIDs available\b"),
    "sgx_off": re.compile(r"\bSGX disabled by BIOS\b"),
    "vmx_off": re.compile(r"\bVMX \(outside TXT\) disabled by BIOS\b"),
    "hibernation": re.compile(r"tdx: initialization failed: Hibernation support is enabled"),
}
# The kernel log lines the facts keep, for the operator to read.
LOG_KEEP = re.compile(r"\b(?:virt/tdx|tdx|x86/tme|x86/mktme|sgx|kvm_intel)\b|SGX disabled|VMX \(outside TXT\)",
                      re.IGNORECASE)
LOG_KEEP_MAX = 60


class Sysroot:
    """Reads files under a root folder and command outputs (run at "/", recorded elsewhere)."""

    def __init__(self, sysroot, run=None):
        if not isinstance(sysroot, str) or not sysroot:
            raise DstackError("sysroot", "must be a path")
        if not os.path.isdir(sysroot):
            raise DstackError("sysroot", f"{sysroot} is not a directory")
        self.root = os.path.abspath(sysroot)
        self.live = self.root == "/"
        self.run = run
        self.unreadable = {}  # path -> reason, for the files that exist but cannot be read

    def path(self, path):
        return os.path.join(self.root, path.lstrip("/"))

    def exists(self, path):
        return os.path.exists(self.path(path))

    def read(self, path):
        """The file's text, or None when it does not exist or cannot be read (then noted)."""
        full = self.path(path)
        try:
            with open(full, "rb") as handle:
                return handle.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.unreadable[path] = exc.strerror or type(exc).__name__
            return None

    def glob(self, pattern):
        return sorted("/" + os.path.relpath(p, self.root) for p in glob.glob(self.path(pattern)))

    def command(self, name):
        """(output, source) of a command of COMMANDS; (None, why) when it is absent or failed."""
        if not self.live:
            rel = f"/.dstack-commands/{name}.txt"
            text = self.read(rel)
            return (text, rel) if text is not None else (None, f"{rel} is missing")
        if self.run is None:
            return None, "no command runner"
        why = []
        for argv in COMMANDS[name]:
            result = self.run(list(argv))
            if result is None:
                why.append(f"{argv[0]} is not installed")
                continue
            rc, out, err = result
            if name == "dmesg" and rc == 0 and not out.strip():
                # journalctl exits 0 with nothing for a user who may not read the system journal.
                why.append(f"{' '.join(argv)} printed nothing")
                continue
            if rc == 0 or name in ANY_EXIT:
                return out, " ".join(argv)
            why.append(f"{' '.join(argv)} exited {rc}: {(err or out).strip()[:200]}")
        return None, "; ".join(why)


def _version_tuple(text):
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    return tuple(int(g or 0) for g in match.groups()) if match else None


def parse_cpuinfo(text):
    """vendor, model name, family, model, flags of the first processor; the socket count."""
    cpu = {"vendor": None, "model": None, "family": None, "model_number": None, "sockets": None,
           "flags": []}
    if text is None:
        return cpu
    sockets = set()
    first = True
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if not line.strip() and cpu["vendor"] is not None:
                first = False
            continue
        key, value = key.strip(), value.strip()
        if key == "physical id":
            sockets.add(value)
        if not first:
            continue
        if key == "vendor_id":
            cpu["vendor"] = value
        elif key == "model name":
            cpu["model"] = value
        elif key == "cpu family" and value.isdigit():
            cpu["family"] = int(value)
        elif key == "model" and value.isdigit():
            cpu["model_number"] = int(value)
        elif key == "flags":
            cpu["flags"] = value.split()
    cpu["sockets"] = len(sockets) or None
    return cpu


def _installed_stanzas(text):
    """The fields of each installed package in a dpkg status file (continuation lines skipped)."""
    for stanza in (text or "").split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t"):
                continue
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        if fields.get("Package") and fields.get("Status", "").endswith(" installed"):
            yield fields


def parse_dpkg_status(text):
    """{package: version} of the installed packages of PACKAGES."""
    return {f["Package"]: f.get("Version") for f in _installed_stanzas(text) if f["Package"] in PACKAGES}


# A kernel meta package (linux-image-generic, linux-image-intel) depends on its current release's
# image: "linux-image-6.8.0-60-generic" (or linux-image-unsigned-...), the release `uname -r` names.
KERNEL_META_DEPENDS = re.compile(r"(?:^|,)\s*linux-image-(?:unsigned-)?([0-9][^\s,(|]*)")


def kernel_meta_releases(text):
    """{meta package: the kernel release it brings} of the installed linux-image-<flavour> packages."""
    releases = {}
    for fields in _installed_stanzas(text):
        name = fields["Package"]
        match = KERNEL_META_DEPENDS.search(fields.get("Depends", ""))
        if name.startswith("linux-image-") and not name[len("linux-image-"):][:1].isdigit() and match:
            releases[name] = match.group(1)
    return releases


def parse_meminfo(text):
    values = {}
    for line in (text or "").splitlines():
        key, sep, value = line.partition(":")
        if sep and value.split() and value.split()[0].isdigit():
            values[key.strip()] = int(value.split()[0])
    return values


def _first(pattern, lines):
    for line in lines:
        match = pattern.search(line)
        if match:
            return line.strip(), match
    return None, None


def _kernel_log(root):
    text, source = root.command("dmesg")
    if text is None:
        return None, source
    return text.splitlines(), source


def _kernel(root):
    release = (root.read("/proc/sys/kernel/osrelease") or "").strip() or None
    cmdline = (root.read("/proc/cmdline") or "").strip() or None
    args = (cmdline or "").split()
    param_path = "/sys/module/kvm_intel/parameters/tdx"
    param = root.read(param_path)
    param = param.strip() if param is not None else None
    kvm_loaded = root.exists("/sys/module/kvm_intel")
    config_text = root.read(f"/boot/config-{release}") if release else None
    config_tdx = None
    if config_text is not None:
        config_tdx = bool(re.search(r"^CONFIG_(?:KVM_INTEL_TDX|INTEL_TDX_HOST)=y$", config_text, re.M))
    if param is not None:
        supported = True
    elif root.exists(param_path):  # there but unreadable: the kernel has the parameter
        supported = True
    elif kvm_loaded:
        # kvm_intel is loaded and has no tdx parameter: this kernel's KVM cannot run TDs.
        supported = False
    else:
        supported = config_tdx
    return {
        "release": release,
        "cmdline": cmdline,
        "tdx_param": param,
        "tdx_supported": supported,
        "kvm_intel_loaded": kvm_loaded,
        "kvm_device": root.exists("/dev/kvm"),
        "config_tdx": config_tdx,
        "cmdline_tdx": any(a in ("kvm_intel.tdx=1", "kvm_intel.tdx=Y", "kvm_intel.tdx=y") for a in args),
        "nohibernate": "nohibernate" in args,
    }


def _os_release(root):
    values = {}
    for line in (root.read("/etc/os-release") or "").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip().strip('"')
    return {"id": values.get("ID"), "version_id": values.get("VERSION_ID"),
            "pretty_name": values.get("PRETTY_NAME")}


def _version_line(text, pattern):
    if text is None:
        return None
    match = re.search(pattern, text)
    return match.group(1) if match else (text.strip().splitlines() or [None])[0]


def gather(sysroot="/", run=None):
    """(ready, facts, missing) of the host under `sysroot`. `run(argv)` runs a command at "/" and
    returns (rc, stdout, stderr), or None when the program is not installed."""
    root = Sysroot(sysroot, run)
    osr = _os_release(root)
    cpuinfo_text = root.read("/proc/cpuinfo")
    cpu = parse_cpuinfo(cpuinfo_text)
    flags = set(cpu.pop("flags"))
    cpu["flags_tdx"] = "tdx_host_platform" in flags
    cpu["flags_present"] = sorted(flags & {"vmx", "tme", "sgx", "sgx_lc", "tdx_host_platform"})
    cpu["codename"] = TDX_CPU_MODELS.get(cpu["model_number"]) if cpu["family"] == 6 else None
    kernel = _kernel(root)
    log, log_source = _kernel_log(root)
    lines = log or []

    found = {}
    for key, pattern in LOG_PATTERNS.items():
        found[key] = _first(pattern, lines)

    init_line = found["tdx_init"][0]
    module_version = None
    if found["tdx_module_v1"][1]:
        m = found["tdx_module_v1"][1]
        module_version = f"{m.group(3)}.{m.group(4)} build {m.group(6)} ({m.group(5)})"
    elif found["tdx_module_v2"][1]:
        m = found["tdx_module_v2"][1]
        module_version = f"{m.group(1)} build {m.group(2)}"
    error_line = (found["tdx_init_failed"][0] or found["tdx_not_loaded"][0] or found["tdx_failed"][0])
    tdx_module = {
        # kvm_intel.tdx reads Y only once KVM has brought the TDX module up, which also covers a
        # kernel log that has lost its boot lines.
        "initialized": bool(init_line) or kernel["tdx_param"] == "Y",
        "line": init_line,
        "version": module_version,
        "error": error_line,
    }
    keyid_match = found["tdx_keyids"][1]
    keys = {
        "tdx_keyid_range": [int(keyid_match.group(1)), int(keyid_match.group(2))] if keyid_match else None,
        "tdx_keyids": int(keyid_match.group(2)) - int(keyid_match.group(1)) if keyid_match else None,
        "tdx_line": found["tdx_keyids"][0],
        "mktme_keyids": int(found["mktme_keyids"][1].group(1)) if found["mktme_keyids"][1] else None,
    }
    if found["tme_on"][0]:
        tme_enabled = True
    elif found["tme_off"][0]:
        tme_enabled = False
    else:
        tme_enabled = ("tme" in flags) if cpuinfo_text is not None and log is not None else None
    tme = {"enabled": tme_enabled, "line": found["tme_on"][0] or found["tme_off"][0],
           "mktme_line": found["mktme"][0]}
    sgx = {
        "cpu_flag": "sgx" in flags,
        "enclave": root.exists("/dev/sgx_enclave"),
        "provision": root.exists("/dev/sgx_provision"),
        "vepc": root.exists("/dev/sgx_vepc"),
        "bios_disabled_line": found["sgx_off"][0],
    }
    dpkg_status = root.read("/var/lib/dpkg/status")
    packages = parse_dpkg_status(dpkg_status)
    kernel["packages"] = kernel_meta_releases(dpkg_status)

    services = {}
    for key, name in (("qgs", "qgsd"), ("pccs", "pccs")):
        out, _why = root.command(f"systemctl-is-active-{name}")
        services[key] = (out.strip().splitlines() or [None])[0] if out is not None else None

    qemu_out, _why = root.command("qemu-system-x86_64-version")
    qemu_version = _version_line(qemu_out, r"QEMU emulator version (\S+(?: \([^)]*\))?)")
    qemu_upstream = _version_tuple(qemu_version)
    qemu_pkg = packages.get("qemu-system-x86")
    qemu_tdx = ("tdx" in qemu_version.lower() or "tdx" in (qemu_pkg or "")
                or (qemu_upstream is not None and qemu_upstream >= QEMU_TDX_UPSTREAM)) if qemu_version else False
    qemu = {"version": qemu_version, "package_version": qemu_pkg, "tdx": qemu_tdx}
    libvirt_out, _why = root.command("libvirtd-version")
    libvirt_version = _version_line(libvirt_out, r"libvirtd \(libvirt\) (\S+)")
    libvirt_upstream = _version_tuple(libvirt_version)
    libvirt_pkg = packages.get("libvirt-daemon-system")
    libvirt = {
        "version": libvirt_version,
        "package_version": libvirt_pkg,
        "tdx": bool(libvirt_version) and ("tdx" in (libvirt_pkg or "")
                                          or (libvirt_upstream is not None
                                              and libvirt_upstream >= LIBVIRT_TDX_UPSTREAM)),
    }
    ovmf = next((p for p in OVMF_PATHS if root.exists(p)), None)
    if ovmf is None and root.exists(OVMF_GENERIC) and "tdx" in (packages.get("ovmf") or ""):
        ovmf = OVMF_GENERIC
    firmware = {"ovmf": ovmf, "package_version": packages.get("ovmf-inteltdx") or packages.get("ovmf")}

    meminfo = parse_meminfo(root.read("/proc/meminfo"))
    dimm_sizes = [(root.read(p) or "").strip() for p in root.glob("/sys/devices/system/edac/mc/mc*/dimm*/size")]
    memory = {
        "total_kb": meminfo.get("MemTotal"),
        "hugepages_total": meminfo.get("HugePages_Total"),
        "hugepage_size_kb": meminfo.get("Hugepagesize"),
        "numa_nodes": len(root.glob("/sys/devices/system/node/node[0-9]*")) or None,
        # EDAC lists the populated DIMMs where the memory controller driver is loaded; MCHECK
        # wants every memory channel of every socket populated the same way.
        "dimms": sum(1 for s in dimm_sizes if s.isdigit() and int(s) > 0) if dimm_sizes else None,
    }

    facts = {
        "sysroot": root.root,
        "os": osr,
        "cpu": cpu,
        "kernel": kernel,
        "kernel_log": {"available": log is not None, "source": log_source,
                       "lines": [line.strip() for line in lines if LOG_KEEP.search(line)][:LOG_KEEP_MAX]},
        "tdx_module": tdx_module,
        "tme": tme,
        "keys": keys,
        "sgx": sgx,
        "services": services,
        "qemu": qemu,
        "libvirt": libvirt,
        "firmware": firmware,
        "memory": memory,
        "packages": packages,
        "unreadable": dict(root.unreadable),
    }
    missing = assess(facts, flags, found, cpuinfo_read=cpuinfo_text is not None)
    return not missing, facts, missing


def _item(item, found, fix, kind):
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")
    return {"item": item, "found": found, "fix": fix, "kind": kind}


def assess(facts, flags, found, cpuinfo_read=True):
    """The `missing` list: what stops the host from running TDs, hardware first."""
    missing = []
    cpu, kernel, module = facts["cpu"], facts["kernel"], facts["tdx_module"]
    log_available = facts["kernel_log"]["available"]
    unreadable = facts["unreadable"]

    # Hardware: an Intel Xeon with TDX.
    if not cpuinfo_read:
        why = unreadable.get("/proc/cpuinfo", "missing")
        missing.append(_item("cpu", f"/proc/cpuinfo cannot be read ({why}), so the CPU is unknown",
                             "run on the TDX host itself (a Linux host with /proc mounted)", "hardware"))
    elif not cpu["flags_tdx"] and (cpu["vendor"] != "GenuineIntel" or cpu["family"] != 6
                                   or cpu["model_number"] not in TDX_CPU_MODELS):
        missing.append(_item(
            "cpu", f"{cpu['vendor']} {cpu['model']} (family {cpu['family']}, model {cpu['model_number']})",
            "TDX needs an Intel Xeon with TDX: " + "; ".join(TDX_CPU_MODELS.values()), "hardware"))
        return missing  # nothing else matters on a CPU without TDX

    # BIOS: VMX, TME and TME-MT, TDX with its key split, SEAM loader, SGX.
    if cpuinfo_read and "vmx" not in flags:
        missing.append(_item("bios_vmx", found["vmx_off"][0] or "the CPU flags lack vmx",
                             "BIOS: Socket Configuration > Processor Configuration: set 'VMX' "
                             "(Intel Virtualization Technology) to Enable", "bios"))
    tdx_enabled_by_bios = bool(cpu["flags_tdx"] or facts["keys"]["tdx_keyids"] or module["initialized"])
    if facts["tme"]["enabled"] is False:
        missing.append(_item(
            "bios_tme", facts["tme"]["line"] or "the CPU flags lack tme",
            f"BIOS: {BIOS_TDX_MENU}: set 'Memory Encryption (TME)' to Enable and 'Total Memory "
            "Encryption Multi-Tenant (TME-MT)' to Enable, 'TME-MT memory integrity' to Disable", "bios"))
    if kernel["tdx_supported"] and not tdx_enabled_by_bios:
        if log_available or cpuinfo_read:
            what = "the kernel log has no 'virt/tdx: BIOS enabled: private KeyID range' line"
            if not log_available:
                what = "the CPU flags lack tdx_host_platform (and the kernel log cannot be read)"
            fix = FIX_BIOS_TDX
            if cpu["model_number"] == 143:
                fix += "; on Sapphire Rapids only select SKUs have TDX"
            missing.append(_item("bios_tdx", what, fix, "bios"))
    keyids = facts["keys"]["tdx_keyids"]
    if keyids is not None and keyids < 2:
        missing.append(_item("bios_tdx_keyids", facts["keys"]["tdx_line"],
                             f"BIOS: {BIOS_TDX_MENU}: raise 'TME-MT/TDX key split' (TDX needs at least "
                             "2 private KeyIDs: one for the TDX module, the rest for TDs)", "bios"))
    if found["tdx_not_loaded"][0] and not module["initialized"]:
        missing.append(_item("bios_seam_loader", found["tdx_not_loaded"][0],
                             f"BIOS: {BIOS_TDX_MENU}: set 'TDX Secure Arbitration Mode Loader (SEAM Loader)' "
                             "to Enable (it loads the TDX module from the ESP or the BIOS); update the BIOS "
                             "if the setting is missing", "bios"))
    if found["tdx_init_failed"][0] and not module["initialized"]:
        missing.append(_item("tdx_module_version", found["tdx_init_failed"][0],
                             "update the TDX module to Intel's latest release for this CPU (a BIOS update, "
                             "or the binary deployment of Intel's TDX enabling guide), then reboot", "bios"))
    sgx = facts["sgx"]
    if not sgx["enclave"]:
        if sgx["bios_disabled_line"] or (cpuinfo_read and not sgx["cpu_flag"]):
            missing.append(_item("bios_sgx", sgx["bios_disabled_line"] or "the CPU flags lack sgx",
                                 f"BIOS: {BIOS_SGX_MENU}: set 'SW Guard Extensions (SGX)' to Enable (and "
                                 "'SGX Auto MP Registration' to Enable, for attestation)", "bios"))
        else:
            missing.append(_item("sgx_driver", "the CPU has SGX but /dev/sgx_enclave is missing",
                                 "boot a kernel with the in-tree SGX driver (CONFIG_X86_SGX, Linux 5.11 and "
                                 "later): " + FIX_KERNEL, "kernel"))
    elif not sgx["provision"]:
        missing.append(_item("sgx_provision", "/dev/sgx_provision is missing",
                             "boot a kernel with the in-tree SGX driver (Linux 5.11 and later): " + FIX_KERNEL,
                             "kernel"))

    # Kernel: KVM with TDX.
    release = kernel["release"] or "an unknown kernel"
    osr = facts["os"]
    os_name = osr["pretty_name"] or "this OS"
    if kernel["tdx_supported"] is False:
        why = "kvm_intel has no 'tdx' parameter" if kernel["kvm_intel_loaded"] else \
            f"/boot/config-{kernel['release']} has neither CONFIG_KVM_INTEL_TDX nor CONFIG_INTEL_TDX_HOST"
        fix = FIX_KERNEL
        if osr["id"] != "ubuntu" or (_version_tuple(osr["version_id"]) or (0, 0)) < (24, 4):
            fix = f"install Ubuntu 24.04 ({os_name} is not supported by Canonical's TDX stack), then " + fix
        missing.append(_item("kernel_tdx", f"{release} on {os_name}: {why}", fix, "kernel"))
    elif kernel["tdx_supported"] is None:
        missing.append(_item("kernel_tdx", f"{release}: kvm_intel is not loaded and the kernel's config "
                             "cannot be read, so TDX host support is unknown",
                             FIX_KERNEL + " (or load kvm_intel: modprobe kvm_intel)", "kernel"))
    elif not kernel["kvm_intel_loaded"] and "vmx" in flags:
        missing.append(_item("kvm_intel", "kvm_intel is not loaded (/sys/module/kvm_intel is missing)",
                             "load it: modprobe kvm_intel (and list it in /etc/modules-load.d/)", "config"))

    # Kernel parameters: what the role can set (then reboot).
    if kernel["tdx_supported"]:
        if not module["initialized"] and not kernel["cmdline_tdx"]:
            missing.append(_item("kernel_param_tdx",
                                 f"kvm_intel.tdx is {kernel['tdx_param'] or 'unset'} and /proc/cmdline lacks "
                                 "kvm_intel.tdx=1",
                                 "add kvm_intel.tdx=1 to GRUB_CMDLINE_LINUX_DEFAULT in /etc/default/grub, "
                                 "run update-grub and reboot", "config"))
        if not module["initialized"] and not kernel["nohibernate"] and (
                found["hibernation"][0] or (kernel["release"] or "").endswith("-intel")):
            missing.append(_item("kernel_param_nohibernate",
                                 found["hibernation"][0] or "/proc/cmdline lacks nohibernate",
                                 "add nohibernate to GRUB_CMDLINE_LINUX_DEFAULT in /etc/default/grub, run "
                                 "update-grub and reboot (the TDX module does not survive S3 or hibernation)",
                                 "config"))
        if (tdx_enabled_by_bios and kernel["cmdline_tdx"] and not module["initialized"]
                and not any(m["item"] in ("bios_seam_loader", "tdx_module_version", "bios_tdx_keyids")
                            for m in missing)):
            missing.append(_item("tdx_module", module["error"] or
                                 f"kvm_intel.tdx is {kernel['tdx_param']} and the kernel log has no "
                                 "'virt/tdx: module initialized' line",
                                 "read 'journalctl -k -b | grep -i tdx' for the reason; usually a TDX module "
                                 "too old for the kernel (update it, Intel's TDX enabling guide) or a BIOS "
                                 "setting of " + BIOS_TDX_MENU, "bios"))

    # Packages and services: what the role installs and configures.
    qemu, libvirt, firmware, services = facts["qemu"], facts["libvirt"], facts["firmware"], facts["services"]
    packages = facts["packages"]
    if not qemu["version"]:
        missing.append(_item("qemu", "qemu-system-x86_64 is not installed",
                             f"install qemu-system-x86 from {PPA}", "package"))
    elif not qemu["tdx"]:
        missing.append(_item("qemu_tdx", f"QEMU {qemu['version']} has no TDX support",
                             f"install qemu-system-x86 from {PPA} (a +tdx build), or QEMU 10.1 or later",
                             "package"))
    if not libvirt["version"]:
        missing.append(_item("libvirt", "libvirtd is not installed",
                             f"install libvirt-daemon-system and libvirt-clients from {PPA}", "package"))
    elif not libvirt["tdx"]:
        missing.append(_item("libvirt_tdx", f"libvirt {libvirt['version']} ({libvirt['package_version'] or 'no dpkg record'}) "
                             "has no TDX support",
                             f"install libvirt-daemon-system and libvirt-clients from {PPA} (a +tdx build), or "
                             "libvirt 11.7 or later", "package"))
    if not firmware["ovmf"]:
        missing.append(_item("ovmf", "no TDX-capable OVMF (TDVF) in /usr/share/ovmf",
                             f"install ovmf from {PPA} (a +tdx build, /usr/share/ovmf/OVMF.fd), or "
                             "ovmf-inteltdx on Ubuntu 25.10 and later", "package"))
    for key, unit, package, setup in (
            ("qgs", "qgsd", "tdx-qgs", "it serves quotes to TDs on vsock port 4050"),
            ("pccs", "pccs", "sgx-dcap-pccs", "set its Intel PCS API key in /opt/intel/sgx-dcap-pccs/config/default.json")):
        state = services[key]
        if state == "active":
            continue
        seen = f"systemctl is-active {unit}: {state}" if state else f"the {unit} service state is unknown"
        if package not in packages:
            missing.append(_item(key, f"{seen}; {package} is not installed",
                                 f"install {package} from Canonical's attestation PPA (ppa:kobuk-team/tdx-attestation-release, "
                                 f"canonical/tdx's setup-attestation-host.sh) and start {unit} ({setup})", "package"))
        else:
            missing.append(_item(key, f"{seen} ({package} {packages[package]} is installed)",
                                 f"configure and start it: systemctl enable --now {unit} ({setup})", "config"))

    # Files that exist but cannot be read: name them rather than guess.
    for path, why in sorted(unreadable.items()):
        if path == "/proc/cpuinfo":
            continue
        missing.append(_item("unreadable", f"{path}: {why}",
                             "run the facts module as root (become: true)", "config"))
    order = {kind: n for n, kind in enumerate(KINDS)}
    missing.sort(key=lambda m: order[m["kind"]])
    return missing
