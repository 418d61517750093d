# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The CVM's system information, as the Worker's /metrics shows it (dstack's metrics.tpl: the same
metric names, Prometheus text format), read from /proc, uname and the disk the work folder is on.
On the simulated process backend the "CVM" shares its host's kernel, so these are the host's."""

import os
import platform
import shutil


def _meminfo():
    values = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                name, _sep, rest = line.partition(":")
                values[name] = int(rest.split()[0]) * 1024 if rest.split() else 0
    except OSError:
        pass
    return values


def _read(path, default=""):
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return default


def _os_release():
    fields = dict(line.split("=", 1) for line in _read("/etc/os-release").splitlines() if "=" in line)
    return fields.get("NAME", "").strip('"'), fields.get("VERSION_ID", "").strip('"')


def _cpu_model():
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor()


def collect(disk_paths=("/",)):
    """The system info dict (dstack's SysInfo fields)."""
    mem = _meminfo()
    load = (_read("/proc/loadavg", "0 0 0").split() + ["0", "0", "0"])[:3]
    os_name, os_version = _os_release()
    disks = []
    for path in dict.fromkeys(disk_paths):
        try:
            usage = shutil.disk_usage(path)
        except OSError:
            continue
        disks.append({"name": path, "mount_point": path, "total_size": usage.total, "free_size": usage.free})
    return {
        "os_name": os_name, "os_version": os_version, "kernel_version": platform.release(),
        "cpu_model": _cpu_model(), "num_cpus": os.cpu_count() or 0,
        "total_memory": mem.get("MemTotal", 0), "available_memory": mem.get("MemAvailable", 0),
        "used_memory": mem.get("MemTotal", 0) - mem.get("MemAvailable", 0), "free_memory": mem.get("MemFree", 0),
        "total_swap": mem.get("SwapTotal", 0), "used_swap": mem.get("SwapTotal", 0) - mem.get("SwapFree", 0),
        "free_swap": mem.get("SwapFree", 0),
        "uptime": int(float((_read("/proc/uptime", "0").split() or ["0"])[0])),
        "loadavg_one": float(load[0]), "loadavg_five": float(load[1]), "loadavg_fifteen": float(load[2]),
        "disks": disks,
    }


def _label(value):
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus(info):
    """dstack's metrics.tpl, rendered: Prometheus text exposition."""
    lines = []

    def metric(name, help_text, samples):
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} gauge"])
        lines.extend(f"{name}{labels} {value}" for labels, value in samples)
        lines.append("")

    for key, help_text in (("os_name", "Operating system name"), ("os_version", "Operating system version"),
                           ("kernel_version", "Kernel version"), ("cpu_model", "CPU model information")):
        metric(f"system_{key}", help_text, [(f'{{{key}="{_label(info[key])}"}}', 1)])
    for name, key, help_text in (
            ("system_num_cpus", "num_cpus", "Number of logical CPUs"),
            ("system_memory_total", "total_memory", "Total memory in bytes"),
            ("system_memory_available", "available_memory", "Available memory in bytes"),
            ("system_memory_used", "used_memory", "Used memory in bytes"),
            ("system_memory_free", "free_memory", "Free memory in bytes"),
            ("system_swap_total", "total_swap", "Total swap memory in bytes"),
            ("system_swap_used", "used_swap", "Used swap memory in bytes"),
            ("system_swap_free", "free_swap", "Free swap memory in bytes"),
            ("system_uptime", "uptime", "System uptime in seconds"),
            ("system_load_average_1m", "loadavg_one", "System load average (1 minute)"),
            ("system_load_average_5m", "loadavg_five", "System load average (5 minutes)"),
            ("system_load_average_15m", "loadavg_fifteen", "System load average (15 minutes)")):
        metric(name, help_text, [("", info[key])])
    disks = info["disks"]

    def per_disk(value):
        return [(f'{{name="{_label(d["name"])}", mount_point="{_label(d["mount_point"])}"}}', value(d)) for d in disks]

    metric("disk_total_size", "Disk total size in bytes", per_disk(lambda d: d["total_size"]))
    metric("disk_free_size", "Disk free size in bytes", per_disk(lambda d: d["free_size"]))
    metric("disk_used_size", "Disk used size in bytes", per_disk(lambda d: d["total_size"] - d["free_size"]))
    metric("disk_usage_percentage", "Disk usage percentage",
           per_disk(lambda d: (d["total_size"] - d["free_size"]) / d["total_size"] * 100.0 if d["total_size"] else 0))
    return "\n".join(lines)
