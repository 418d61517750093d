# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Host ports: whether one is free, which processes hold it, and whether those run under given
supervisord folders (module_utils.supervisor: the folder holds supervisord.conf and .pid).

Linux only: the holders come from /proc/net/{tcp,tcp6,udp,udp6} (this network namespace's
sockets) and the socket inodes in /proc/<pid>/fd. Another user's process is visible only to root.
"""

import errno
import ipaddress
import os
import socket

from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError

PROTOCOLS = ("tcp", "udp")
_TCP_LISTEN = "0A"
CMDLINE_MAX = 200


def bind_error(protocol, address, port):
    """None when this host could bind (protocol, address, port) now, else the errno."""
    kind = socket.SOCK_DGRAM if protocol == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, kind) as sock:
        if kind == socket.SOCK_STREAM:
            # TCP: a port in TIME_WAIT is free. (On UDP SO_REUSEADDR would let the bind share a
            # port another socket holds, hiding the conflict.)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
            return None
        except OSError as exc:
            return exc.errno


def port_free(protocol, address, port):
    """Whether this host could bind (protocol, address, port) now."""
    return bind_error(protocol, address, port) is None


def _proc_address(text):
    """The address of /proc/net/tcp's hex notation (each 32-bit word in host order, little-endian here)."""
    raw = bytes.fromhex(text)
    return ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))


def _overlaps(held, wanted):
    """Whether a socket bound to `held` keeps a bind to `wanted` (same port) from succeeding."""
    if getattr(held, "ipv4_mapped", None):
        held = held.ipv4_mapped
    return held.is_unspecified or wanted.is_unspecified or held == wanted


def socket_inodes(protocol, address, port):
    """The inodes of this namespace's sockets on `port` that overlap `address`: listening ones for
    TCP (a connection's port does not keep a listener out), every bound one for UDP."""
    wanted = ipaddress.ip_address(address)
    inodes = set()
    for table in (protocol, protocol + "6"):
        try:
            with open(f"/proc/net/{table}", encoding="ascii") as handle:
                lines = handle.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_address, local_port = fields[1].split(":")
            if int(local_port, 16) != port or (protocol == "tcp" and fields[3] != _TCP_LISTEN):
                continue
            if _overlaps(_proc_address(local_address), wanted) and fields[9] != "0":
                inodes.add(fields[9])
    return inodes


def argv(pid):
    """A process's arguments, [] when it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            data = handle.read()
    except OSError:
        return []
    return [word.decode("utf-8", "replace") for word in data.rstrip(b"\0").split(b"\0")] if data else []


def cmdline(pid):
    """A process's command line to show (at most CMDLINE_MAX characters), "" when it is gone."""
    text = " ".join(argv(pid))
    return text if len(text) <= CMDLINE_MAX else text[:CMDLINE_MAX - 3] + "..."


def parent(pid):
    """A process's parent pid, 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as handle:
            stat = handle.read()
    except OSError:
        return 0
    # The command name (field 2) is in parentheses and may hold spaces: count from its end.
    return int(stat.rpartition(")")[2].split()[1])


def holders(inodes):
    """The pids (sorted) with a file descriptor on one of the socket inodes."""
    if not inodes:
        return []
    links = {f"socket:[{inode}]" for inode in inodes}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:  # gone, or another user's
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}") in links:
                    found.append(int(entry))
                    break
            except OSError:
                continue
    return sorted(found)


def supervisord_pids(folders):
    """{pid: folder} of the supervisords running on these folders' supervisord.conf (their pid
    file, checked against the process's command line: a stale pid file names another process)."""
    running = {}
    for folder in folders:
        folder = os.path.abspath(folder)
        try:
            with open(os.path.join(folder, "supervisord.pid"), encoding="ascii") as handle:
                pid = int(handle.read().strip() or 0)
        except (OSError, ValueError):
            continue
        if pid > 0 and os.path.join(folder, "supervisord.conf") in argv(pid):
            running[pid] = folder
    return running


def supervisor_of(pid, supervisors):
    """The folder of the supervisord in `supervisors` ({pid: folder}) that `pid` runs under, or None."""
    seen = set()
    while pid > 1 and pid not in seen:
        if pid in supervisors:
            return supervisors[pid]
        seen.add(pid)
        pid = parent(pid)
    return None


def refuse_if_held(field, protocol, address, port, supervisors=None, where=None, fix="stop it, or choose another port"):
    """Whether this host could bind (protocol, address, port) now; when it cannot, the processes that
    hold it ([{pid, cmdline, supervisor}]), and DstackError(field) naming them (pid and command
    line) and `fix`, unless every one runs under a supervisord of `supervisors` ({pid: folder},
    from supervisord_pids: the services of the same deployment). Returns (free, holders)."""
    supervisors = supervisors or {}
    where = where or f"port {port}/{protocol} on {address}"
    code = bind_error(protocol, address, port)
    if code is None:
        return True, []
    if code == errno.EACCES:
        raise DstackError(field, f"{where} cannot be bound by this user (ports below 1024 need root)")
    if code == errno.EADDRNOTAVAIL:
        raise DstackError(field, f"{where}: no interface of this host has the address {address}")
    found = [{"pid": pid, "cmdline": cmdline(pid), "supervisor": supervisor_of(pid, supervisors)}
             for pid in holders(socket_inodes(protocol, address, port))]
    others = [h for h in found if h["supervisor"] is None]
    if not found:
        raise DstackError(field, f"{where} is in use by a process this user cannot see (`ss -ltnup` as root names it): {fix}")
    if others:
        named = "; ".join(f"pid {h['pid']} ({h['cmdline'] or 'gone'})" for h in others[:3])
        raise DstackError(field, f"{where} is held by {named}: {fix}")
    return False, found


def check_ports(ports, supervisor_folders=()):
    """Each port (dicts: name, port, address, protocol) free or held only by processes under the
    supervisord folders. Returns [{name, port, address, protocol, free, holders: [{pid, cmdline,
    supervisor}]}]; raises DstackError(name) for the first port another process holds."""
    supervisors = supervisord_pids(supervisor_folders)
    folders = " or ".join(sorted({os.path.abspath(f) for f in supervisor_folders}))
    fix = (f"it is not a process of the supervisord in {folders}: " if folders else "") + "stop it, or choose another port"
    results = []
    for item in ports:
        name, protocol, address = item["name"], item.get("protocol") or "tcp", item.get("address") or "0.0.0.0"
        port = _port_number(item["port"], name)
        if protocol not in PROTOCOLS:
            raise DstackError(name, f"protocol must be tcp or udp, not {protocol!r}")
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise DstackError(name, f"{address!r} is not an IP address") from None
        free, found = refuse_if_held(name, protocol, address, port, supervisors, fix=fix)
        results.append({"name": name, "port": port, "address": address, "protocol": protocol, "free": free,
                        "holders": found})
    return results


def _port_number(value, name):
    text = str(value).strip()
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise DstackError(name, f"{text[:40]!r} is not a port number (1 to 65535)")
    return int(text)
