"""The gateway's ClientHello reader and SNI routes (agents/gateway/sni.py).

Real ClientHellos come from OpenSSL (ssl.SSLObject over memory BIOs); the hand-built ones from an
encoder written here from RFC 8446 4.1.2 / RFC 6066 3 / RFC 7301, not from the code under test.
"""

import ssl
import struct

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from ansible_collections.dstack.tee.agents.gateway import proxy_protocol, sni
from ansible_collections.dstack.tee.agents.gateway.sni import (
    MODE_H2, MODE_PASSTHROUGH, MODE_TERMINATE, ClientHello, Incomplete, SniError, parse_route, read_client_hello)

BASES = frozenset({"gw.test", "dstack.localhost"})


def openssl_hello(server_name=None, alpn=None):
    """The first flight of a real TLS client."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def _vec(size, body):
    return len(body).to_bytes(size, "big") + body


def build_hello(server_names=(), alpn=(), extra_extensions=(), session_id=b"\x11" * 32, record_sizes=None):
    """A ClientHello encoded by hand; record_sizes splits the handshake message into records."""
    extensions = b""
    if server_names:
        entries = b"".join(b"\x00" + _vec(2, name) for name in server_names)
        extensions += struct.pack("!H", 0) + _vec(2, _vec(2, entries))
    if alpn:
        extensions += struct.pack("!H", 16) + _vec(2, _vec(2, b"".join(_vec(1, p) for p in alpn)))
    for ext_type, body in extra_extensions:
        extensions += struct.pack("!H", ext_type) + _vec(2, body)
    body = (b"\x03\x03" + b"\x22" * 32 + _vec(1, session_id) + _vec(2, b"\x13\x01\x13\x02")
            + _vec(1, b"\x00") + _vec(2, extensions))
    message = b"\x01" + _vec(3, body)
    sizes = list(record_sizes or [len(message)])
    records, pos = b"", 0
    for size in sizes:
        chunk = message[pos:pos + size]
        records += b"\x16\x03\x01" + _vec(2, chunk)
        pos += size
    assert pos >= len(message)
    return records


# ----------------------------------------------------------------------------- real clients

def test_openssl_hello_gives_its_server_name_and_alpn():
    data = openssl_hello("App1-8080s.GW.test", ["h2", "http/1.1"])
    hello = read_client_hello(data)
    assert hello == ClientHello("app1-8080s.gw.test", (b"h2", b"http/1.1"), len(data))


def test_openssl_hello_without_sni():
    hello = read_client_hello(openssl_hello())
    assert hello.server_name is None and hello.alpn == ()


def test_bytes_after_the_hello_are_not_part_of_it():
    data = openssl_hello("a.gw.test")
    hello = read_client_hello(data + b"\x14\x03\x03\x00\x01\x01" + b"\x17\x03\x03\x00\x05hello")
    assert hello.length == len(data) and hello.server_name == "a.gw.test"


def test_every_prefix_of_a_real_hello_asks_for_more():
    data = openssl_hello("x" * 40 + ".dstack.localhost", ["h2"])
    for cut in range(len(data)):
        result = read_client_hello(data[:cut])
        assert isinstance(result, Incomplete), cut
        assert cut < result.needed <= len(data), (cut, result)


def test_a_hello_split_over_records_is_joined():
    whole = build_hello([b"abc.gw.test"], [b"h2"])
    message_len = len(whole) - 5
    split = build_hello([b"abc.gw.test"], [b"h2"], record_sizes=[3, 20, message_len - 23])
    assert read_client_hello(split).server_name == "abc.gw.test"
    assert read_client_hello(split).length == len(split)
    # Cut inside the second record: it asks for that record's end, then for the next header.
    assert read_client_hello(split[:5 + 3 + 5 + 4]) == Incomplete(5 + 3 + 5 + 20)
    assert read_client_hello(split[:5 + 3 + 5 + 20]) == Incomplete(5 + 3 + 5 + 20 + 5)


# ----------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("data, field", [
    (b"GET / HTTP/1.1\r\nHost: a.gw.test\r\n\r\n", "record.type"),
    (b"\x80\x2e\x01\x03\x01", "record.type"),                        # SSLv2-compatible hello
    (b"\x16\x02\x00\x00\x10", "record.version"),
    (b"\x16\x03\x01\x00\x00", "record.length"),
    (b"\x16\x03\x01\x50\x00", "record.length"),
    (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "handshake.type"),      # a ServerHello
    (b"\x16\x03\x01\x00\x04\x01\x01\x00\x00", "handshake.length"),   # 64 KiB announced
    (b"\x16\x03\x01\x00\x05\x01\x00\x00\x00\x00", "handshake"),      # a byte after the message
    (b"\x16\x03\x01\x00\x04\x01\x00\x00\x00", "client_hello.version"),
])
def test_what_is_not_a_client_hello_is_refused(data, field):
    with pytest.raises(SniError) as error:
        read_client_hello(data)
    assert error.value.field == field


def test_a_record_of_another_type_mid_hello_is_refused():
    split = build_hello([b"abc.gw.test"], record_sizes=[10, 1000])
    tampered = split[:15] + b"\x17" + split[16:]
    with pytest.raises(SniError, match="record.type"):
        read_client_hello(tampered)


@pytest.mark.parametrize("kwargs, field", [
    ({"server_names": [b"a.gw.test", b"b.gw.test"]}, "server_name"),
    ({"server_names": [b"caf\xc3\xa9.gw.test"]}, "server_name"),
    ({"server_names": [b"a_b.gw.test"]}, "server_name"),
    ({"server_names": [b"a..gw.test"]}, "server_name"),
    ({"server_names": [b"-a.gw.test"]}, "server_name"),
    ({"server_names": [b"a" * 64 + b".gw.test"]}, "server_name"),
    ({"server_names": [b"a.gw.test"], "extra_extensions": [(0, b"\x00\x00")]},
     "client_hello.extensions"),                                     # SNI twice
    ({"extra_extensions": [(16, b"\x00\x02\x00\x00")]}, "alpn.name"),  # an empty protocol name
    ({"extra_extensions": [(16, b"\x00\x00")]}, "alpn.list"),
    ({"extra_extensions": [(0, b"\x00\x05\x00\x00\x05ab")]}, "server_name.name"),
    ({"session_id": b"\x00" * 33}, "client_hello.session_id"),
])
def test_bad_extensions_are_refused(kwargs, field):
    with pytest.raises(SniError) as error:
        read_client_hello(build_hello(**kwargs))
    assert error.value.field == field


def test_an_unknown_name_type_is_skipped():
    body = b"\x01" + _vec(2, b"opaque") + b"\x00" + _vec(2, b"a.gw.test")
    hello = read_client_hello(build_hello(extra_extensions=[(0, _vec(2, body))]))
    assert hello.server_name == "a.gw.test"


def test_the_hello_size_limit():
    padding = [(21, b"\x00" * (sni.MAX_CLIENT_HELLO - 200))]
    assert read_client_hello(build_hello([b"a.gw.test"], extra_extensions=padding,
                                         record_sizes=[16000, 1000])).server_name == "a.gw.test"
    too_big = [(21, b"\x00" * sni.MAX_CLIENT_HELLO)]
    with pytest.raises(SniError, match="handshake.length"):
        read_client_hello(build_hello([b"a.gw.test"], extra_extensions=too_big, record_sizes=[16000, 1000]))


# ----------------------------------------------------------------------------- routes

@pytest.mark.parametrize("name, route", [
    ("myapp.gw.test", ("myapp", 80, MODE_TERMINATE)),
    ("myapp-8080.gw.test", ("myapp", 8080, MODE_TERMINATE)),
    ("myapp-443s.gw.test", ("myapp", 443, MODE_PASSTHROUGH)),
    ("myapp-8443s.gw.test", ("myapp", 8443, MODE_PASSTHROUGH)),
    ("myapps.gw.test", ("myapps", 80, MODE_TERMINATE)),               # s without a dash is the id
    ("myapp-s.gw.test", ("myapp", 443, MODE_PASSTHROUGH)),
    ("myapp-g.gw.test", ("myapp", 80, MODE_H2)),
    ("myapp-50051g.gw.test", ("myapp", 50051, MODE_H2)),
    ("myapp-65535.dstack.localhost", ("myapp", 65535, MODE_TERMINATE)),
    ("0123abcd-1.gw.test", ("0123abcd", 1, MODE_TERMINATE)),
])
def test_routes_as_dstack_reads_them(name, route):
    parsed = parse_route(name, BASES)
    assert (parsed.id, parsed.port, parsed.mode) == route
    assert parsed.base_domain == name.split(".", 1)[1]


@pytest.mark.parametrize("name", [
    None, "", "gw.test", "myapp", "myapp.gw.test.evil", "myapp.other.test", "a.b.gw.test",
    "myapp-80-1.gw.test", "myapp--80.gw.test", "myapp-80gs.gw.test", "myapp-80sg.gw.test",
    "myapp-gs.gw.test", "myapp-0.gw.test", "myapp-65536.gw.test", "myapp-999999.gw.test",
    "myapp-+80.gw.test", "myapp-8o.gw.test", "myapp-80x.gw.test", "-80.gw.test", "my_app.gw.test",
])
def test_routes_refused(name):
    with pytest.raises(SniError) as error:
        parse_route(name, BASES)
    assert error.value.field == "server_name"


# ----------------------------------------------------------------------------- properties

@given(st.binary(max_size=600))
def test_fuzz_arbitrary_bytes(data):
    try:
        result = read_client_hello(data)
    except SniError:
        return
    assert isinstance(result, (ClientHello, Incomplete))
    if isinstance(result, Incomplete):
        assert result.needed > len(data)


@given(st.data())
def test_fuzz_mutated_real_hello(data):
    base = bytearray(data.draw(st.sampled_from(HELLOS)))
    for _round in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        pos = data.draw(st.integers(0, len(base)))
        if kind == "flip" and pos < len(base):
            base[pos] = data.draw(st.integers(0, 255))
        elif kind == "cut":
            del base[pos:]
        elif kind == "insert":
            base[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif pos < len(base):
            del base[pos:pos + data.draw(st.integers(1, 8))]
    try:
        result = read_client_hello(bytes(base))
    except SniError:
        return
    assert isinstance(result, (ClientHello, Incomplete))
    if isinstance(result, ClientHello):
        assert result.length <= len(base)
        assert result.server_name is None or result.server_name == result.server_name.lower()


HOST_LABEL = st.from_regex(r"\A[A-Za-z0-9]([A-Za-z0-9-]{0,20}[A-Za-z0-9])?\Z")


@given(st.lists(HOST_LABEL, min_size=1, max_size=5), st.lists(st.binary(min_size=1, max_size=20), max_size=4),
       st.lists(st.integers(1, 300), max_size=4))
def test_built_hellos_round_trip(labels, alpn, record_sizes):
    name = ".".join(labels)
    assume(len(name) <= 253)
    records = None
    if record_sizes:
        message_len = len(build_hello([name.encode()], alpn)) - 5
        records = [size for size in record_sizes if size > 0]
        total = sum(records)
        records = records + [message_len - total] if total < message_len else None
    data = build_hello([name.encode()], alpn, record_sizes=records)
    hello = read_client_hello(data)
    assert hello == ClientHello(name.lower(), tuple(alpn), len(data))


@given(st.text(max_size=80))
def test_fuzz_routes(name):
    try:
        route = parse_route(name, BASES)
    except SniError:
        return
    assert 0 < route.port < 65536 and route.base_domain in BASES
    assert route.mode in (MODE_TERMINATE, MODE_PASSTHROUGH, MODE_H2)
    assert route.id.isalnum() and route.id.isascii()


HELLOS = [openssl_hello("app1.gw.test", ["h2", "http/1.1"]), openssl_hello(),
          build_hello([b"x.gw.test"], [b"h2"], record_sizes=[7, 40, 200])]


# ----------------------------------------------------------------------------- PROXY protocol (inbound)

V2_SAMPLE = proxy_protocol.header_v2(("203.0.113.7", 4242), ("198.51.100.1", 443))
V1_SAMPLE = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n"


def test_proxy_headers_read():
    assert proxy_protocol.read_header(V2_SAMPLE + b"\x16") == (28, ("203.0.113.7", 4242), ("198.51.100.1", 443))
    assert proxy_protocol.read_header(V1_SAMPLE) == (len(V1_SAMPLE), ("2001:db8::1", 1), ("2001:db8::2", 65535))
    assert proxy_protocol.read_header(b"PROXY UNKNOWN ffff\r\n") == (20, None, None)
    local = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"
    assert proxy_protocol.read_header(local) == (16, None, None)
    for cut in range(len(V2_SAMPLE)):
        assert cut < proxy_protocol.read_header(V2_SAMPLE[:cut]) <= len(V2_SAMPLE)


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\n", b"\x16\x03\x01\x02\x00", b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", b"PROXY " + b"1" * 120,
    b"\r\n\r\n\x00\r\nQUIT\n\x22\x11\x00\x0c" + b"\x00" * 12,          # version 2, command 2
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x31\x00\x0c" + b"\x00" * 12,          # a unix socket family
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x04" + b"\x00" * 4,           # addresses cut short
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff",                         # 64 KiB announced
])
def test_proxy_headers_refused(data):
    with pytest.raises(proxy_protocol.ProxyHeaderError):
        proxy_protocol.read_header(data)


@given(st.one_of(st.binary(max_size=120), st.binary(max_size=60).map(lambda tail: V2_SAMPLE[:16] + tail),
                 st.binary(max_size=60).map(lambda tail: b"PROXY TCP4 " + tail)))
def test_fuzz_proxy_header(data):
    try:
        result = proxy_protocol.read_header(data)
    except proxy_protocol.ProxyHeaderError:
        return
    assert isinstance(result, int) and result > len(data) or result[0] <= len(data)
