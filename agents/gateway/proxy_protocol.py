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
