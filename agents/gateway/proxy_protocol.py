# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""PROXY protocol version 2 (haproxy's proxy-protocol.txt, section 2.2): the header the gateway
sends an app whose port policy asks for it, so the app sees the client's address."""

import ipaddress
import struct

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
VERSION_PROXY = 0x21          # version 2, command PROXY
VERSION_LOCAL = 0x20          # version 2, command LOCAL (no addresses: health checks and the like)
TCP_OVER_IPV4 = 0x11
TCP_OVER_IPV6 = 0x21


def header_v2(source, destination):
    """The v2 header for a TCP connection from `source` to `destination` ((host, port, ...) tuples
    as getpeername/getsockname give them). Mixed families, or addresses that are not IP, give a
    LOCAL header: the app then knows nothing about the client, which is safer than a wrong one."""
    try:
        src = ipaddress.ip_address(source[0])
        dst = ipaddress.ip_address(destination[0])
    except (ValueError, TypeError, IndexError):
        return SIGNATURE + struct.pack("!BBH", VERSION_LOCAL, 0, 0)
    if src.version != dst.version:
        # An IPv4 client on a dual-stack listener shows as ::ffff:a.b.c.d: unmap both first.
        src = getattr(src, "ipv4_mapped", None) or src
        dst = getattr(dst, "ipv4_mapped", None) or dst
    if src.version != dst.version:
        return SIGNATURE + struct.pack("!BBH", VERSION_LOCAL, 0, 0)
    family = TCP_OVER_IPV4 if src.version == 4 else TCP_OVER_IPV6
    addresses = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    return SIGNATURE + struct.pack("!BBH", VERSION_PROXY, family, len(addresses)) + addresses


class ProxyHeaderError(ValueError):
    """The bytes are not a PROXY protocol header."""


V1_PREFIX = b"PROXY "
V1_MAX = 107                   # the longest v1 line, CRLF included (proxy-protocol.txt 2.1)
V2_MAX_PAYLOAD = 2048          # addresses and TLVs; a load balancer's header is far smaller


def read_header(data):
    """Read the PROXY header (v1 or v2) at the start of `data`, as a load balancer in front of the
    gateway sends it.

    Returns (length, source, destination) with (host, port) tuples, or (length, None, None) for a
    v2 LOCAL header or a v1 UNKNOWN one (the balancer's own connection: use the socket's address);
    an int: the total number of bytes needed when `data` is a valid prefix; raises ProxyHeaderError.
    """
    if not data:
        return 1
    if data[:len(SIGNATURE)] == SIGNATURE[:len(data)] and data[:1] == SIGNATURE[:1]:
        return _read_v2(data)
    if data[:len(V1_PREFIX)] == V1_PREFIX[:len(data)] and data[:1] == b"P":
        return _read_v1(data)
    raise ProxyHeaderError("no PROXY protocol header")


def _read_v2(data):
    if len(data) < 16:
        return 16
    version_command, family, length = struct.unpack("!BBH", data[12:16])
    if length > V2_MAX_PAYLOAD:
        raise ProxyHeaderError("header too long")
    if len(data) < 16 + length:
        return 16 + length
    payload = data[16:16 + length]
    if version_command == VERSION_LOCAL:
        return 16 + length, None, None
    if version_command != VERSION_PROXY:
        raise ProxyHeaderError("not version 2 PROXY or LOCAL")
    if family == TCP_OVER_IPV4 and length >= 12:
        src, dst = payload[0:4], payload[4:8]
        ports = payload[8:12]
    elif family == TCP_OVER_IPV6 and length >= 36:
        src, dst = payload[0:16], payload[16:32]
        ports = payload[32:36]
    else:
        raise ProxyHeaderError("not TCP over IPv4 or IPv6")
    src_port, dst_port = struct.unpack("!HH", ports)
    return (16 + length, (str(ipaddress.ip_address(src)), src_port),
            (str(ipaddress.ip_address(dst)), dst_port))


def _read_v1(data):
    end = data.find(b"\r\n")
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError("v1 line too long")
        return len(data) + 1
    if end + 2 > V1_MAX:
        raise ProxyHeaderError("v1 line too long")
    fields = data[:end].split(b" ")
    if fields[1:2] == [b"UNKNOWN"]:
        return end + 2, None, None
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("malformed v1 line")
    try:
        src, dst = (ipaddress.ip_address(f.decode("ascii")) for f in fields[2:4])
        src_port, dst_port = (_v1_port(f) for f in fields[4:6])
    except (ValueError, UnicodeDecodeError):
        raise ProxyHeaderError("malformed v1 addresses") from None
    if src.version != dst.version or src.version != (4 if fields[1] == b"TCP4" else 6):
        raise ProxyHeaderError("v1 addresses of the wrong family")
    return end + 2, (str(src), src_port), (str(dst), dst_port)


def _v1_port(field):
    if not field.isdigit() or len(field) > 5 or (len(field) > 1 and field[:1] == b"0"):
        raise ValueError("bad port")
    port = int(field)
    if port > 65535:
        raise ValueError("bad port")
    return port
