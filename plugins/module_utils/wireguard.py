# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""WireGuard for the gateway and the CVMs: keys, the UAPI socket protocol, wireguard-go
interfaces, network namespaces, and the CVM's wg-quick file in dstack's layout.

Keys are base64, as `wg` prints them. The UAPI client speaks the cross-platform protocol
(https://www.wireguard.com/xplatform/): `get=1` / `set=1` over the unix socket a userspace
implementation (wireguard-go) opens at /var/run/wireguard/<interface>.sock. Everything a request
carries is checked before it is sent, because wireguard-go applies a `set=1` line by line: a bad
line in the middle would leave the lines before it applied.

Errors are DstackError(field, reason) naming the field; no private key appears in any of them.
pyroute2 (links, addresses, namespaces) and cryptography (keys) are optional for importers:
callers check HAS_PYROUTE2 / HAS_CRYPTOGRAPHY, and the functions that need them say so (and
import pyroute2 then).
"""

import base64
import binascii
import errno
import importlib.util
import ipaddress
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from ansible_collections.dstack.tee.plugins.module_utils.host_names import HOST_NAME_RE
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError

try:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
except ImportError:  # reported by callers through HAS_CRYPTOGRAPHY
    HAS_CRYPTOGRAPHY = False
else:
    HAS_CRYPTOGRAPHY = True

# pyroute2 is imported on first use (_require_pyroute2): it takes ~0.2 s, paid at every start of
# the guest agent and the gateway, most of which never touch a link.
HAS_PYROUTE2 = importlib.util.find_spec("pyroute2") is not None
IPRoute = NetNS = pyroute2_netns = NetlinkError = None
_PYROUTE2_IMPORT = threading.Lock()

UAPI_SOCKET_DIR = "/var/run/wireguard"
# dstack's CVM side: dstack-wg0 listens on UDP 9182; each gateway peer keeps the tunnel open.
CVM_INTERFACE = "dstack-wg0"
CVM_LISTEN_PORT = 9182
CVM_KEEPALIVE = 25
DEFAULT_MTU = 1420
KEY_LEN = 32

_IFNAME_RE = re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}\Z")  # IFNAMSIZ: 15 bytes
_NETNS_RE = re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\Z")
# What could be a key in text that comes from outside (wireguard-go's output): base64 of 32
# bytes, or 64 hex digits (the UAPI form). Cut out before such text goes into an error.
_KEYLIKE_RE = re.compile(r"[A-Za-z0-9+/]{42,43}=|[0-9a-fA-F]{64}")


def _require_cryptography():
    if not HAS_CRYPTOGRAPHY:
        raise DstackError("cryptography", "the cryptography package is not installed")


def _require_pyroute2():
    global IPRoute, NetNS, pyroute2_netns, NetlinkError
    if not HAS_PYROUTE2:
        raise DstackError("pyroute2", "the pyroute2 package is not installed")
    with _PYROUTE2_IMPORT:  # preload_pyroute2's thread may be half way: all four names, or none
        if NetlinkError is None:
            from pyroute2 import IPRoute, NetNS  # pylint: disable=import-outside-toplevel,redefined-outer-name
            from pyroute2 import netns as pyroute2_netns  # pylint: disable=import-outside-toplevel,redefined-outer-name
            from pyroute2.netlink.exceptions import NetlinkError  # pylint: disable=import-outside-toplevel,redefined-outer-name


def preload_pyroute2():
    """Import pyroute2 in a thread of its own, now (0.15-0.7 s of CPU here): for a caller that will
    need it soon and has other work to do meanwhile (the guest's boot, before its gateway step)."""
    if HAS_PYROUTE2 and NetlinkError is None:
        threading.Thread(target=_require_pyroute2, name="preload-pyroute2", daemon=True).start()


def _redact(text):
    return _KEYLIKE_RE.sub("<redacted>", text)


# --- keys ---------------------------------------------------------------------------------------

def parse_key(value, field_name):
    """Return the 32 bytes of a base64 WireGuard key; the error names the field, never the value."""
    if not isinstance(value, str):
        raise DstackError(field_name, f"must be a base64 string, not {type(value).__name__}")
    text = value.strip()
    if len(text) != 44 or not text.endswith("="):
        raise DstackError(field_name, f"must be 44 base64 characters (a 32-byte key), got {len(text)}")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise DstackError(field_name, "is not base64") from None
    if len(raw) != KEY_LEN:  # 44 characters can only be 32 bytes, but say so if not
        raise DstackError(field_name, f"must decode to {KEY_LEN} bytes, got {len(raw)}")
    return raw


def _b64(raw):
    return base64.b64encode(raw).decode("ascii")


def _clamp(raw):
    """Curve25519 clamping, as `wg genkey` does: clear the low 3 bits and bit 255, set bit 254."""
    key = bytearray(raw)
    key[0] &= 248
    key[31] = (key[31] & 127) | 64
    return bytes(key)


def generate_private_key():
    """A new private key: 32 random bytes, clamped as `wg genkey` clamps them, in base64."""
    return _b64(_clamp(os.urandom(KEY_LEN)))


def public_key(private_b64, field_name="private_key"):
    """The base64 public key of a base64 private key (what `wg pubkey` prints)."""
    raw = parse_key(private_b64, field_name)
    _require_cryptography()
    # X25519 clamps the scalar itself, as wg does, so an unclamped key gives wg's answer too.
    pub = X25519PrivateKey.from_private_bytes(raw).public_key()
    return _b64(pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


# --- the values the UAPI and wg-quick files carry ----------------------------------------------

def check_interface_name(name, field_name="interface"):
    """A Linux interface name wireguard-go accepts; not starting with '-' (it would be a flag)."""
    if not isinstance(name, str) or not _IFNAME_RE.match(name):
        raise DstackError(field_name, "must be 1-15 characters of letters, digits and _.- "
                                      "(not starting with - or .)")
    return name


def check_netns_name(name, field_name="netns"):
    if not isinstance(name, str) or not _NETNS_RE.match(name):
        raise DstackError(field_name, "must be 1-64 characters of letters, digits and _.- "
                                      "(not starting with - or .)")
    return name


def _port(value, field_name, allow_zero=False):
    if isinstance(value, bool) or not isinstance(value, int):
        raise DstackError(field_name, f"must be an integer, not {type(value).__name__}")
    if not (0 if allow_zero else 1) <= value <= 65535:
        raise DstackError(field_name, f"must be {'0' if allow_zero else '1'}-65535, got {value}")
    return value


def _keepalive(value, field_name):
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise DstackError(field_name, "must be seconds, 0-65535 (0 or None: off)")
    return value


def _allowed_ips(values, field_name):
    """Normalised prefixes ('10.0.0.2' -> '10.0.0.2/32'); host bits set are refused, not masked."""
    if isinstance(values, str) or not isinstance(values, (list, tuple)):
        raise DstackError(field_name, "must be a list of addresses or prefixes")
    out = []
    for i, value in enumerate(values):
        try:
            out.append(str(ipaddress.ip_network(value, strict=True)))
        except (TypeError, ValueError) as exc:
            raise DstackError(f"{field_name}[{i}]", f"is not an IP prefix: {exc}") from None
    return out


def _split_endpoint(value, field_name):
    """(host, port) of 'host:port' or '[v6]:port'; the host is an IP or a DNS name."""
    if not isinstance(value, str):
        raise DstackError(field_name, f"must be a 'host:port' string, not {type(value).__name__}")
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:([0-9]{1,5})|([^:\[\]\s]+):([0-9]{1,5})", value)
    if not match:
        raise DstackError(field_name, "must be host:port or [IPv6]:port")
    host = match.group(1) or match.group(3)
    port = _port(int(match.group(2) or match.group(4)), field_name)
    if match.group(1):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise DstackError(field_name, "the address in brackets is not IPv6") from None
    return host, port


def _ip_endpoint(value, field_name):
    """'ip:port' as the UAPI wants it (wireguard-go resolves no names)."""
    host, port = _split_endpoint(value, field_name)
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise DstackError(field_name, "must be an IP address and port (the UAPI takes no host names)") from None
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


def _host_endpoint(value, field_name):
    """'host:port' as wg-quick takes it: an IP or a DNS name (wg resolves it)."""
    host, port = _split_endpoint(value, field_name)
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        if not HOST_NAME_RE.match(host):
            raise DstackError(field_name, "the host is neither an IP address nor a DNS name") from None
        return f"{host}:{port}"
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


# --- the UAPI client ----------------------------------------------------------------------------

@dataclass
class Peer:
    """One peer as configured (public_key, allowed_ips, endpoint, persistent_keepalive) and as
    seen (last_handshake in unix seconds, 0 = never; rx_bytes, tx_bytes)."""
    public_key: str
    allowed_ips: list[str] = field(default_factory=list)
    endpoint: Optional[str] = None
    persistent_keepalive: Optional[int] = None
    last_handshake: float = 0.0
    rx_bytes: int = 0
    tx_bytes: int = 0


def _peer_lines(peer_key_raw, allowed_ips, endpoint, keepalive):
    lines = [f"public_key={peer_key_raw.hex()}", "replace_allowed_ips=true"]
    lines += [f"allowed_ip={prefix}" for prefix in allowed_ips]
    if endpoint is not None:
        lines.append(f"endpoint={endpoint}")
    lines.append(f"persistent_keepalive_interval={keepalive}")
    return lines


class Uapi:
    """The UAPI socket of one userspace WireGuard interface.

    One connection per call. A set is one `set=1` transaction, checked in full before it is sent.
    Peers are the hub's to manage: sync_peers reads the current set and sends the difference, so
    the process calling it should be the interface's one writer of peers.
    """

    def __init__(self, interface, socket_dir=UAPI_SOCKET_DIR, timeout=5.0):
        self.interface = check_interface_name(interface)
        self.socket_dir = socket_dir
        self.timeout = timeout

    @property
    def path(self):
        return os.path.join(self.socket_dir, f"{self.interface}.sock")

    def __repr__(self):
        return f"Uapi({self.interface!r}, socket_dir={self.socket_dir!r})"

    def _exchange(self, request, operation):
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(self.path)
                sock.sendall(request.encode("ascii"))
                data = b""
                while not data.endswith(b"\n\n"):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
        except (FileNotFoundError, ConnectionRefusedError):
            raise DstackError("interface", f"no WireGuard UAPI socket answers at {self.path} "
                                           f"(is wireguard-go running for {self.interface}?)") from None
        except socket.timeout:
            raise DstackError("interface", f"the UAPI socket {self.path} did not answer {operation} "
                                           f"in {self.timeout} s") from None
        except OSError as exc:
            raise DstackError("interface", f"UAPI {operation} on {self.path} failed: {exc.strerror or exc}") from None
        lines = data.decode("ascii", "replace").split("\n")
        match = re.fullmatch(r"errno=(-?\d{1,9})", lines[-3]) if len(lines) >= 3 else None
        if not data.endswith(b"\n\n") or not match:
            raise DstackError("interface", f"the UAPI socket {self.path} closed without an answer to {operation}")
        return lines[:-3], abs(int(match.group(1)))

    def _set(self, lines, operation):
        """Send one set=1 transaction; the errno wireguard-go answers (0: done)."""
        if not lines:
            return 0
        request = "set=1\n" + "".join(line + "\n" for line in lines) + "\n"
        return self._exchange(request, operation)[1]

    @staticmethod
    def _refused(field_name, code):
        if code:
            raise DstackError(field_name, f"wireguard-go refused the change: errno {code} ({os.strerror(code)})")

    def get(self):
        """{"private_key", "public_key", "listen_port", "peers": [Peer]}; the keys are None when the
        device has no private key. The result holds the private key: never log it."""
        lines, code = self._exchange("get=1\n\n", "get")
        if code:
            raise DstackError("interface", f"wireguard-go refused get: errno {code} ({os.strerror(code)})")
        device = {"private_key": None, "public_key": None, "listen_port": 0, "peers": []}
        peer = None
        for line in lines:
            key, value = line.split("=", 1) if "=" in line else (line, "")
            if key == "public_key":
                peer = Peer(public_key=_b64(bytes.fromhex(value)))
                device["peers"].append(peer)
            elif peer is None:
                if key == "private_key":
                    device["private_key"] = _b64(bytes.fromhex(value))
                elif key == "listen_port":
                    device["listen_port"] = int(value)
            elif key == "allowed_ip":
                peer.allowed_ips.append(value)
            elif key == "endpoint":
                peer.endpoint = value
            elif key == "persistent_keepalive_interval":
                peer.persistent_keepalive = int(value) or None
            elif key == "last_handshake_time_sec":
                peer.last_handshake = float(int(value))
            elif key == "last_handshake_time_nsec" and peer.last_handshake:
                peer.last_handshake += int(value) / 1e9
            elif key == "rx_bytes":
                peer.rx_bytes = int(value)
            elif key == "tx_bytes":
                peer.tx_bytes = int(value)
        if device["private_key"] is not None and HAS_CRYPTOGRAPHY:
            device["public_key"] = public_key(device["private_key"])
        return device

    def set_device(self, private_key=None, listen_port=None):
        """Set the private key and/or the UDP listen port (None: leave it as it is)."""
        lines = []
        if private_key is not None:
            lines.append(f"private_key={parse_key(private_key, 'private_key').hex()}")
        if listen_port is not None:
            lines.append(f"listen_port={_port(listen_port, 'listen_port', allow_zero=True)}")
        code = self._set(lines, "set_device")
        if code == errno.EADDRINUSE:
            raise DstackError("listen_port", f"UDP port {listen_port} is in use")
        self._refused("set_device", code)

    def set_peer(self, public_key, allowed_ips, endpoint=None, persistent_keepalive=None):  # pylint: disable=redefined-outer-name
        """Add the peer or update it; its allowed IPs become exactly `allowed_ips`.
        endpoint None leaves the endpoint (a roaming peer's, learned from its packets);
        persistent_keepalive None or 0 turns the keepalive off."""
        lines = _peer_lines(parse_key(public_key, "public_key"), _allowed_ips(allowed_ips, "allowed_ips"),
                            None if endpoint is None else _ip_endpoint(endpoint, "endpoint"),
                            _keepalive(persistent_keepalive, "persistent_keepalive"))
        self._refused("set_peer", self._set(lines, "set_peer"))

    def remove_peer(self, public_key):  # pylint: disable=redefined-outer-name
        """Remove the peer; nothing happens when there is no such peer."""
        lines = [f"public_key={parse_key(public_key, 'public_key').hex()}", "remove=true"]
        self._refused("remove_peer", self._set(lines, "remove_peer"))

    def sync_peers(self, peers):
        """Make the peer set exactly `peers` (Peer objects) in one set=1 transaction: the peers not
        listed are removed, the listed ones added or updated (allowed IPs replaced). Peers that
        stay keep their sessions: no `replace_peers`, which would drop every tunnel's handshake."""
        if isinstance(peers, (str, bytes)) or not hasattr(peers, "__iter__"):
            raise DstackError("peers", "must be a list of Peer")
        wanted = []
        seen_keys = {}
        seen_prefixes = {}
        for i, peer in enumerate(peers):
            where = f"peers[{i}]"
            if not isinstance(peer, Peer):
                raise DstackError(where, f"must be a Peer, not {type(peer).__name__}")
            raw = parse_key(peer.public_key, f"{where}.public_key")
            if raw in seen_keys:
                raise DstackError(f"{where}.public_key", f"is also peers[{seen_keys[raw]}]'s")
            seen_keys[raw] = i
            prefixes = _allowed_ips(peer.allowed_ips, f"{where}.allowed_ips")
            for j, prefix in enumerate(prefixes):
                # WireGuard would silently move the prefix to the later peer: an allocation bug.
                if prefix in seen_prefixes:
                    raise DstackError(f"{where}.allowed_ips[{j}]", f"{prefix} is also {seen_prefixes[prefix]}'s")
                seen_prefixes[prefix] = where
            endpoint = None if peer.endpoint is None else _ip_endpoint(peer.endpoint, f"{where}.endpoint")
            keepalive = _keepalive(peer.persistent_keepalive, f"{where}.persistent_keepalive")
            wanted.append((raw, prefixes, endpoint, keepalive))
        lines = []
        for current in self.get()["peers"]:
            raw = base64.b64decode(current.public_key)
            if raw not in seen_keys:
                lines += [f"public_key={raw.hex()}", "remove=true"]
        for raw, prefixes, endpoint, keepalive in wanted:
            lines += _peer_lines(raw, prefixes, endpoint, keepalive)
        self._refused("peers", self._set(lines, "sync_peers"))


# --- links and network namespaces (pyroute2) ----------------------------------------------------

def _netlink_error(field_name, exc):
    return DstackError(field_name, f"{getattr(exc, 'args', [''])[-1] or exc} (netlink error {exc.code})")


def _open_ns(netns):
    """An IPRoute for the current namespace or a NetNS for a named one (never created here)."""
    _require_pyroute2()
    if netns is None:
        return IPRoute()
    check_netns_name(netns)
    if not netns_exists(netns):
        raise DstackError("netns", f"no network namespace {netns}")
    return NetNS(netns, flags=0)


def netns_exists(name):
    return os.path.exists(os.path.join("/var/run/netns", check_netns_name(name)))


def netns_add(name):
    """Create a network namespace (/var/run/netns/NAME); it must not exist yet."""
    _require_pyroute2()
    if netns_exists(name):
        raise DstackError("netns", f"network namespace {name} exists already")
    pyroute2_netns.create(name)


def netns_remove(name):
    """Remove a network namespace and, with it, every link still in it. Nothing if it is gone."""
    _require_pyroute2()
    if netns_exists(name):
        pyroute2_netns.remove(name)


def netns_exec_argv(netns, argv):
    """argv run inside netns (through `ip netns exec`), or as it is when netns is None."""
    return list(argv) if netns is None else ["ip", "netns", "exec", check_netns_name(netns), *argv]


def link_exists(name, netns=None):
    with _open_ns(netns) as ipr:
        return bool(ipr.link_lookup(ifname=check_interface_name(name, "link")))


def configure_link(name, netns=None, address=None, mtu=None, up=True):
    """Give a link an address ('10.0.0.1/24'), an MTU, and bring it up."""
    check_interface_name(name, "link")
    iface = None
    if address is not None:
        try:
            iface = ipaddress.ip_interface(address)
        except (TypeError, ValueError) as exc:
            raise DstackError("address", f"is not an address with a prefix length: {exc}") from None
    if mtu is not None and (isinstance(mtu, bool) or not isinstance(mtu, int) or not 576 <= mtu <= 65535):
        raise DstackError("mtu", "must be an integer, 576-65535")
    with _open_ns(netns) as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            raise DstackError("link", f"no link {name} in {netns or 'this namespace'}")
        index = found[0]
        try:
            if iface is not None:
                ipr.addr("add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
            changes = {}
            if mtu is not None:
                changes["mtu"] = mtu
            if up:
                changes["state"] = "up"
            if changes:
                ipr.link("set", index=index, **changes)
        except NetlinkError as exc:
            raise _netlink_error("address" if iface is not None else "link", exc) from None


def move_link(name, netns, to_netns):
    """Move a link from namespace `netns` (None: this one) into namespace `to_netns`."""
    check_interface_name(name, "link")
    check_netns_name(to_netns)
    if not netns_exists(to_netns):
        raise DstackError("netns", f"no network namespace {to_netns}")
    with _open_ns(netns) as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            raise DstackError("link", f"no link {name} in {netns or 'this namespace'}")
        try:
            ipr.link("set", index=found[0], net_ns_fd=to_netns)
        except NetlinkError as exc:
            raise _netlink_error("link", exc) from None


CLONE_NEWNET = 0x40000000


def enter_netns(netns):
    """Move the calling thread into network namespace NAME (setns(2) changes that thread only: a
    short thread can make a socket there, a single-threaded child can live there)."""
    import ctypes  # pylint: disable=import-outside-toplevel
    fd = os.open(os.path.join("/var/run/netns", check_netns_name(netns)), os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"setns into {netns}: {os.strerror(code)}")
    finally:
        os.close(fd)


def delete_link(name, netns=None):
    """Delete a link (a veth pair goes with either end). Nothing if it or its namespace is gone."""
    check_interface_name(name, "link")
    if netns is not None and not netns_exists(netns):
        return
    with _open_ns(netns) as ipr:
        found = ipr.link_lookup(ifname=name)
        if found:
            try:
                ipr.link("del", index=found[0])
            except NetlinkError as exc:
                if exc.code != errno.ENODEV:
                    raise _netlink_error("link", exc) from None


def veth_pair(name_a, netns_a, name_b, netns_b):
    """A veth pair: name_a in netns_a, name_b in netns_b (None: the current namespace)."""
    check_interface_name(name_a, "name_a")
    check_interface_name(name_b, "name_b")
    for netns in (netns_a, netns_b):
        if netns is not None and not netns_exists(netns):
            raise DstackError("netns", f"no network namespace {netns}")
    _require_pyroute2()
    with IPRoute() as ipr:
        peer = {"ifname": name_b}
        if netns_b is not None:
            peer["net_ns_fd"] = netns_b
        try:
            ipr.link("add", ifname=name_a, kind="veth", peer=peer)
        except NetlinkError as exc:  # e.g. a name in use: nothing was made
            raise _netlink_error("name_a", exc) from None
        if netns_a is not None:
            try:
                ipr.link("set", index=ipr.link_lookup(ifname=name_a)[0], net_ns_fd=netns_a)
            except NetlinkError as exc:
                delete_link(name_a)  # ours: made just above; its peer goes with it
                raise _netlink_error("netns_a", exc) from None


# --- a wireguard-go interface -------------------------------------------------------------------

class WgInterface:
    """A wireguard-go interface, optionally in a network namespace, run in the foreground under
    this object's supervision: up() starts it and waits for its UAPI socket, then sets the
    address, MTU and link state; down() stops it and removes what is left (the link, the socket).
    A failed up() leaves nothing behind. The UAPI socket directory is the same for every namespace,
    so interface names must be unique across namespaces.

    link_netns: move the interface into this namespace once wireguard-go made it, while its UDP
    socket stays where wireguard-go runs (`netns`). The namespace trick of WireGuard: the tunnel's
    addresses are reachable only from inside link_netns (the gateway keeps the CVMs' tunnel
    addresses out of its host's namespace), the encrypted packets travel on the outer network.
    """

    def __init__(self, name, netns=None, socket_dir=UAPI_SOCKET_DIR, wireguard_go="wireguard-go", link_netns=None):
        self.name = check_interface_name(name)
        self.netns = None if netns is None else check_netns_name(netns)
        self.link_netns = self.netns if link_netns is None else check_netns_name(link_netns)
        self.wireguard_go = wireguard_go
        self.uapi = Uapi(self.name, socket_dir)
        self.process = None
        self._stderr = None
        self._owned = False  # set once our wireguard-go runs: only then is the name's link ours

    def __repr__(self):
        return f"WgInterface({self.name!r}, netns={self.netns!r}, link_netns={self.link_netns!r})"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.down()

    def _socket_answers(self):
        try:
            self.uapi.get()
        except DstackError:
            return False
        return True

    def up(self, address=None, mtu=DEFAULT_MTU, private_key=None, listen_port=None, timeout=10.0):
        """Start wireguard-go, then the address ('10.0.0.1/24'), MTU, private key and listen port
        (each optional), and the link up. Returns the Uapi client."""
        if self.process is not None:
            raise DstackError("interface", f"{self.name} is up already")
        if address is not None:
            try:
                ipaddress.ip_interface(address)
            except (TypeError, ValueError) as exc:
                raise DstackError("address", f"is not an address with a prefix length: {exc}") from None
        if private_key is not None:
            parse_key(private_key, "private_key")
        if listen_port is not None:
            _port(listen_port, "listen_port", allow_zero=True)
        for netns in dict.fromkeys((self.netns, self.link_netns)):
            if netns is not None and not netns_exists(netns):
                raise DstackError("netns", f"no network namespace {netns}")
        if self._socket_answers():
            raise DstackError("interface", f"{self.name} is in use: a WireGuard UAPI socket answers at {self.uapi.path}")
        for netns in dict.fromkeys((self.netns, self.link_netns)):
            if link_exists(self.name, netns):
                raise DstackError("interface", f"a link named {self.name} exists in {netns or 'this namespace'}")
        self._start(timeout)
        try:
            self.uapi.set_device(private_key=private_key, listen_port=listen_port)
            if self.link_netns != self.netns:
                move_link(self.name, self.netns, self.link_netns)
            configure_link(self.name, self.link_netns, address=address, mtu=mtu, up=True)
        except BaseException:
            self.down()
            raise
        return self.uapi

    def _start(self, timeout):
        # Foreground (-f and the environment variable) so the process is ours to stop; its output
        # goes to a file that only an early exit reads (wireguard-go logs no keys at its level).
        env = dict(os.environ, WG_PROCESS_FOREGROUND="1", LOG_LEVEL="error")
        self._stderr = tempfile.TemporaryFile()  # pylint: disable=consider-using-with
        try:
            self.process = subprocess.Popen(  # pylint: disable=consider-using-with
                netns_exec_argv(self.netns, [self.wireguard_go, "-f", self.name]), env=env,
                stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=subprocess.STDOUT,
                start_new_session=True)
        except OSError as exc:
            self._stderr.close()
            self._stderr = None
            raise DstackError("wireguard_go", f"cannot run {self.wireguard_go}: {exc.strerror or exc}") from None
        self._owned = True
        deadline = time.monotonic() + timeout
        while True:
            status = self.process.poll()
            if status is not None:
                output = self._output()
                self.down()
                raise DstackError("interface", f"wireguard-go for {self.name} exited with status "
                                               f"{status}: {output or 'no output'}")
            if self._socket_answers():
                return
            if time.monotonic() > deadline:
                self.down()
                raise DstackError("interface", f"wireguard-go for {self.name} opened no UAPI socket in {timeout} s")
            time.sleep(0.02)

    def _output(self):
        self._stderr.seek(0)
        text = self._stderr.read()[-2000:].decode("utf-8", "replace")
        # Its box about the kernel module is noise here; keep the lines that say what happened.
        lines = [line for line in text.splitlines() if line.strip() and not line.startswith(("│", "┌", "└"))]
        return _redact(" / ".join(lines))

    @property
    def running(self):
        return self.process is not None and self.process.poll() is None

    def down(self, timeout=5.0):
        """Stop wireguard-go (TERM, then KILL), then delete the link and the socket if they remain.
        Nothing when this object started no wireguard-go (the name may be another's)."""
        if not self._owned:
            return
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            self.process = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if HAS_PYROUTE2:
            for netns in dict.fromkeys((self.link_netns, self.netns)):
                delete_link(self.name, netns)
        # A socket left by our stopped process (none answered before we started).
        if not self._socket_answers():
            try:
                os.unlink(self.uapi.path)
            except FileNotFoundError:
                pass
        self._owned = False


# --- the CVM's wg-quick file --------------------------------------------------------------------

def render_wg_quick(private_key, client_ip, servers, listen_port=CVM_LISTEN_PORT, keepalive=CVM_KEEPALIVE):
    """/etc/wireguard/dstack-wg0.conf as dstack's CVM writes it from RegisterCvm's answer.

    client_ip is wg.client_ip; servers is wg.servers, a list of {pk, ip, endpoint}. The peers are
    sorted by pk (a stable file, so an unchanged answer gives the same bytes); each accepts its
    gateway's ip alone (/32, or /128 for IPv6). The text holds the private key: write it 0600.
    """
    raw = parse_key(private_key, "private_key")
    try:
        address = ipaddress.ip_address(client_ip)
    except (TypeError, ValueError):
        raise DstackError("client_ip", "is not an IP address") from None
    _port(listen_port, "listen_port")
    keepalive = _keepalive(keepalive, "keepalive")
    if isinstance(servers, (str, bytes, dict)) or not isinstance(servers, (list, tuple)):
        raise DstackError("servers", "must be a list of {pk, ip, endpoint}")
    peers = []
    for i, server in enumerate(servers):
        where = f"servers[{i}]"
        if not isinstance(server, dict):
            raise DstackError(where, "must be a mapping with pk, ip and endpoint")
        for key in ("pk", "ip", "endpoint"):
            if key not in server:
                raise DstackError(f"{where}.{key}", "is missing")
        peer_key = _b64(parse_key(server["pk"], f"{where}.pk"))
        ip_text = server["ip"]
        if not isinstance(ip_text, str):
            raise DstackError(f"{where}.ip", "must be a string")
        try:
            gateway_ip = ipaddress.ip_address(ip_text.split("/", 1)[0])  # dstack drops a prefix length
        except ValueError:
            raise DstackError(f"{where}.ip", "is not an IP address") from None
        peers.append((peer_key, gateway_ip, _host_endpoint(server["endpoint"], f"{where}.endpoint")))
    peers.sort(key=lambda peer: peer[0])
    text = (f"[Interface]\nPrivateKey = {_b64(raw)}\nListenPort = {listen_port}\n"
            f"Address = {address}/{address.max_prefixlen}\n\n")
    for peer_key, gateway_ip, endpoint in peers:
        text += (f"[Peer]\nPublicKey = {peer_key}\nAllowedIPs = {gateway_ip}/{gateway_ip.max_prefixlen}\n"
                 f"Endpoint = {endpoint}\nPersistentKeepalive = {keepalive}\n")
    return text
