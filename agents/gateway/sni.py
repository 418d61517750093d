# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The TLS ClientHello as the gateway reads it before any termination, and dstack's SNI routes.

`read_client_hello(data)` looks at the first bytes a client sent (RFC 8446 4.1.2; a ClientHello
may span several handshake records) and returns the server name and the ALPN protocols it
offers, `Incomplete(needed)` while more bytes must arrive, or raises SniError. `parse_route`
splits a server name at the first dot into dstack's `<id>[-<port>][s|g]` label and a base domain.
Both are pure functions over untrusted bytes: the only exception they raise is SniError.
"""

import re
from typing import NamedTuple

from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError

# A ClientHello message larger than this is refused. Real ones (post-quantum key shares
# included) are 0.5-2 KiB; the limit bounds what a client can make the gateway buffer.
MAX_CLIENT_HELLO = 16384
RECORD_HEADER = 5
HANDSHAKE_RECORD = 22
CLIENT_HELLO = 1
EXT_SERVER_NAME = 0
EXT_ALPN = 16
MAX_RECORD = 16384 + 256   # plaintext records are at most 2^14 bytes; a little slack for odd stacks

MODE_TERMINATE = "terminate"       # <id>[-<port>]: TLS ends at the gateway, plain TCP to the app
MODE_PASSTHROUGH = "passthrough"   # <id>-<port>s: the client's TLS bytes go to the app untouched
MODE_H2 = "h2"                     # <id>-<port>g: terminated, ALPN h2 only (gRPC)

_LABEL_RE = re.compile(r"\A[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
_ID_RE = re.compile(r"\A[a-z0-9]{1,63}\Z")
_PORT_RE = re.compile(r"\A[0-9]{1,5}\Z")


class SniError(DstackError):
    """The first bytes are not an acceptable TLS ClientHello, or its server name is no route."""


class ClientHello(NamedTuple):
    server_name: str | None   # lower-cased host_name, None when the client sent no SNI
    alpn: tuple               # offered ALPN protocol names (bytes), in the client's order
    length: int               # bytes of `data` the ClientHello's records take


class Incomplete(NamedTuple):
    needed: int               # the total number of bytes to wait for before reading again


class Route(NamedTuple):
    id: str                   # an instance_id, an app_id or a reserved name such as "gateway"
    port: int
    mode: str                 # MODE_TERMINATE, MODE_PASSTHROUGH or MODE_H2
    base_domain: str


class _Reader:
    """Bounds-checked reads over one buffer; every overrun is a SniError naming the field."""

    __slots__ = ("data", "pos", "end")

    def __init__(self, data, pos=0, end=None):
        self.data, self.pos = data, pos
        self.end = len(data) if end is None else end

    def take(self, count, field):
        if self.pos + count > self.end:
            raise SniError(field, "is cut short")
        chunk = self.data[self.pos:self.pos + count]
        self.pos += count
        return chunk

    def uint(self, size, field):
        return int.from_bytes(self.take(size, field), "big")

    def vector(self, len_size, field, min_len=0, max_len=None):
        length = self.uint(len_size, field)
        if length < min_len or (max_len is not None and length > max_len):
            raise SniError(field, f"has a bad length ({length})")
        start = self.pos
        self.take(length, field)
        return _Reader(self.data, start, start + length)

    def rest(self):
        return self.end - self.pos


def _handshake_bytes(data):
    """Join the handshake records' payloads until the first message is whole.

    Returns (message bytes, bytes of `data` used) or Incomplete.
    """
    message = bytearray()
    pos = 0
    want = None
    while want is None or len(message) < want:
        if len(data) < pos + RECORD_HEADER:
            return Incomplete(pos + RECORD_HEADER)
        if data[pos] != HANDSHAKE_RECORD:
            raise SniError("record.type", "is not a TLS handshake record")
        if data[pos + 1] != 3:
            raise SniError("record.version", "is not TLS")
        length = int.from_bytes(data[pos + 3:pos + 5], "big")
        if length == 0 or length > MAX_RECORD:
            raise SniError("record.length", f"is out of range ({length})")
        if len(data) < pos + RECORD_HEADER + length:
            return Incomplete(pos + RECORD_HEADER + length)
        message += data[pos + RECORD_HEADER:pos + RECORD_HEADER + length]
        pos += RECORD_HEADER + length
        if want is None and len(message) >= 4:
            if message[0] != CLIENT_HELLO:
                raise SniError("handshake.type", "is not a ClientHello")
            want = 4 + int.from_bytes(message[1:4], "big")
            if want > MAX_CLIENT_HELLO:
                raise SniError("handshake.length", f"is over {MAX_CLIENT_HELLO} bytes")
    if len(message) > want:
        # Another handshake message after the ClientHello in the same flight: no client does that.
        raise SniError("handshake", "has bytes after the ClientHello")
    return bytes(message), pos


def _server_name(body):
    names = body.vector(2, "server_name.list", min_len=1)
    host = None
    while names.rest():
        name_type = names.uint(1, "server_name.type")
        name = names.vector(2, "server_name.name", min_len=1)
        if name_type != 0:
            continue          # unknown name types are skipped (RFC 6066 3)
        if host is not None:
            raise SniError("server_name", "has two host names")
        host = name.take(name.rest(), "server_name.name")
    if body.rest():
        raise SniError("server_name", "has bytes after its list")
    if host is None:
        return None
    try:
        text = host.decode("ascii").lower()
    except UnicodeDecodeError:
        raise SniError("server_name", "is not ASCII") from None
    if len(text) > 253 or not all(_LABEL_RE.match(label) for label in text.split(".")):
        raise SniError("server_name", "is not a host name")
    return text


def _alpn(body):
    names = body.vector(2, "alpn.list", min_len=2)
    protocols = []
    while names.rest():
        name = names.vector(1, "alpn.name", min_len=1)
        protocols.append(bytes(name.take(name.rest(), "alpn.name")))
    if body.rest():
        raise SniError("alpn", "has bytes after its list")
    return tuple(protocols)


def read_client_hello(data):
    """Read the ClientHello at the start of `data` (bytes a client sent first).

    Returns a ClientHello, or Incomplete(needed) when `data` is a valid prefix and at least
    `needed` bytes in all are required; raises SniError for anything that is not a ClientHello.
    """
    joined = _handshake_bytes(bytes(data))
    if isinstance(joined, Incomplete):
        return joined
    message, used = joined
    # Index arithmetic rather than a reader object: this runs once per connection, on the event loop.
    end = len(message)
    if end < 6:
        raise SniError("client_hello.version", "is cut short")
    if end < 38:
        raise SniError("client_hello.random", "is cut short")
    pos = _skip_vector(message, 38, 1, "client_hello.session_id", 0, 32)
    pos = _skip_vector(message, pos, 2, "client_hello.cipher_suites", 2)
    pos = _skip_vector(message, pos, 1, "client_hello.compression_methods", 1)
    server_name, alpn = None, ()
    if pos < end:
        ext_end = _skip_vector(message, pos, 2, "client_hello.extensions", 0)
        if ext_end != end:
            raise SniError("client_hello", "has bytes after its extensions")
        pos += 2
        seen = set()
        while pos < ext_end:
            if pos + 2 > ext_end:
                raise SniError("extension.type", "is cut short")
            ext_type = (message[pos] << 8) | message[pos + 1]
            body_end = _skip_vector(message, pos + 2, 2, "extension.data", 0, limit=ext_end)
            if ext_type in seen:
                raise SniError("client_hello.extensions", f"repeat extension {ext_type}")
            seen.add(ext_type)
            if ext_type == EXT_SERVER_NAME:
                server_name = _server_name(_Reader(message, pos + 4, body_end))
            elif ext_type == EXT_ALPN:
                alpn = _alpn(_Reader(message, pos + 4, body_end))
            pos = body_end
    return ClientHello(server_name, alpn, used)


def _skip_vector(message, pos, len_size, field, min_len, max_len=None, limit=None):
    """The end of the length-prefixed vector at `pos` (checked against `limit`, default the end)."""
    limit = len(message) if limit is None else limit
    if pos + len_size > limit:
        raise SniError(field, "is cut short")
    length = int.from_bytes(message[pos:pos + len_size], "big")
    if length < min_len or (max_len is not None and length > max_len):
        raise SniError(field, f"has a bad length ({length})")
    if pos + len_size + length > limit:
        raise SniError(field, "is cut short")
    return pos + len_size + length


def parse_route(server_name, base_domains):
    """dstack's route for a server name: `<id>[-<port>][s|g].<base>` (base one of base_domains).

    No port means 80 (443 with `s`); `s` passes TLS through, `g` terminates with ALPN h2 only.
    Raises SniError for no name, a base domain not served, a second dash, `gs`, a bad port.
    """
    if not server_name:
        raise SniError("server_name", "is missing")
    label, dot, base = server_name.partition(".")
    if not dot or base not in base_domains:
        raise SniError("server_name", "is not under a base domain of this gateway")
    ident, dash, suffix = label.partition("-")
    if not _ID_RE.match(ident):
        raise SniError("server_name", "has a malformed id")
    mode, port = MODE_TERMINATE, None
    if dash:
        if suffix.endswith("g"):
            mode, suffix = MODE_H2, suffix[:-1]
        if suffix.endswith("s"):
            if mode == MODE_H2:
                raise SniError("server_name", "asks for both s and g")
            mode, suffix = MODE_PASSTHROUGH, suffix[:-1]
        if suffix:
            if not _PORT_RE.match(suffix) or not 0 < int(suffix) < 65536:
                raise SniError("server_name", "has a bad port")
            port = int(suffix)
    if port is None:
        port = 443 if mode == MODE_PASSTHROUGH else 80
    return Route(ident, port, mode, base)


def is_custom_domain(server_name, base_domains):
    """True for a server name that is neither a base domain nor under one: a custom domain, routed
    by its DNS TXT record (custom_domains.py). Names under a base domain stay parse_route's."""
    if not server_name:
        return False
    return not any(server_name == base or server_name.endswith("." + base) for base in base_domains)
