# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Host names: what a server's name (in a certificate, an endpoint) may be. Standard library only,
so that anything may import it without pulling in cryptography or eth-keys."""

import ipaddress
import re

# A DNS name (RFC 1123 labels, a trailing dot allowed).
HOST_NAME_RE = re.compile(r"\A(?=.{1,253}\Z)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                          r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?\Z")


def is_server_name(name):
    """Whether `name` can be a server's name in a certificate: an IP address or a DNS name."""
    if not isinstance(name, str):
        return False
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return bool(HOST_NAME_RE.match(name))
