"""The fast path of the asyncio worker's protocol (agents/wsgi.py FastPrpc): which requests it answers
itself and which it leaves, with every byte after them, to gunicorn's parser. It takes only what
our own client sends; whatever gunicorn's parser would refuse, or read otherwise, is never read
here. A real Flask app with direct pRPC routes (add_prpc_routes(direct=True))."""

import logging
import random

import flask
import pytest

from ansible_collections.dstack.tee.agents import wsgi

GET_META = b"POST /prpc/T.Echo HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nAccept-Encoding: identity\r\n"


@pytest.fixture(name="fast")
def fixture_fast():
    app = flask.Flask("t")
    app.config["MAX_CONTENT_LENGTH"] = 1024
    wsgi.add_prpc_routes(app, "/prpc/T.", {"Echo": lambda params: params}, direct=True)
    wsgi.install_json_errors(app, logging.getLogger("t"))
    return wsgi.FastPrpc(app.extensions["dstack.direct_prpc"], None, None)


def _request(headers=b"Content-Length: 2\r\nContent-Type: application/json\r\n", body=b"{}", start=GET_META):
    return start + headers + b"\r\n" + body


def test_what_prpc_client_sends_is_answered_here(fast):
    raw = _request()
    handler, path, headers, start, end = fast.parse(raw + b"POST /next")
    assert path == "/prpc/T.Echo" and handler({"a": 1}) == {"a": 1}
    assert raw[start:end] == b"{}" and end == len(raw)
    assert headers[b"content-length"] == b"2" and headers[b"host"] == b"127.0.0.1:8000"
    # Any case of the names, keep-alive said or not.
    assert fast.parse(_request(b"CONTENT-length:  2 \r\nConnection: Keep-Alive\r\n")) != wsgi.FAST_FALLBACK


@pytest.mark.parametrize("partial,wanted", [
    (b"", 0), (b"PO", 0), (b"POST /prpc/T.Ec", 0), (GET_META, 0), (GET_META + b"Content-Length: 2\r", 0),
    (_request()[:-2], len(_request())), (_request()[:-1], len(_request())),
])
def test_a_request_still_arriving_is_waited_for(fast, partial, wanted):
    # An int: the bytes to wait for (0 while its head is not whole). The protocol's deadline runs meanwhile.
    assert fast.parse(partial) == wanted


@pytest.mark.parametrize("raw", [
    # What test_kms_asgi_attacks' framing test sends: gunicorn refuses each, so they must reach it.
    _request(b"Content-Length: 2\r\nContent-Length: 9\r\n"),
    _request(b"Content-Length: 2\r\nContent-Length: 2\r\n"),
    _request(b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n"),
    _request(b"Content-Length: +2\r\n"), _request(b"Content-Length: \xb2\r\n"),
    _request(b"Content-Length: 2, 2\r\n"), _request(b"Content-Length : 2\r\n"),
    _request(b"Transfer-Encoding: chunked\r\n", b"2\r\n{}\r\n0\r\n\r\n"),
    _request(b"Expect: 100-continue\r\nContent-Length: 2\r\n"),
    _request(b"Content-Length: " + b"1" * 5000 + b"\r\n"),                     # gunicorn's 400
    _request(b"Content-Length: 2000\r\n", b"{" + b" " * 1998 + b"}"),          # past MAX_CONTENT_LENGTH: its 413
    _request(b""),                                                              # no Content-Length
    _request(b"Content-Length: 2\r\nConnection: close\r\n"),                     # gunicorn closes after it
    _request(b"Content-Length: 2\r\nUpgrade: websocket\r\n"),
    _request(b"Content-Length: 2\r\nX-Forwarded-For: 10.0.0.1\r\n"),           # any other header
    _request(b"Content-Length: 2\r\n User-Agent: folded\r\n"),                   # obs-fold
    _request(b"Content-Length: 2\r\nUser-Agent: a\x00b\r\n"),                    # a control character
    _request(b"Content-Length: 2\r\nUser-Agent: a\rb\r\n"),
    _request(start=b"POST /prpc/T.Echo HTTP/1.0\r\n"),
    _request(start=b"POST /prpc/T.Echo?x=1 HTTP/1.1\r\n"),
    _request(start=b"POST /prpc/T.Nope HTTP/1.1\r\n"),                            # not a direct route
    _request(start=b"GET /prpc/T.Echo HTTP/1.1\r\n"),
    _request(start=b"POST  /prpc/T.Echo HTTP/1.1\r\n"),
    _request(start=b"\r\nPOST /prpc/T.Echo HTTP/1.1\r\n"),
    _request(start=b"POST /prpc/T.Ech\xf6 HTTP/1.1\r\n"),
    b"POST /prpc/T.Echo HTTP/1.1\nContent-Length: 2\n\n{}",                    # bare LF line ends
    b"GET /",                                                                   # not a POST, before its head is whole
    b"POST /prpc/T.Echo HTTP/1.1\r\nHost: t\r\nX-Long: " + b"a" * 9000,        # a head past the limit
])
def test_anything_else_goes_to_gunicorns_parser(fast, raw):
    assert fast.parse(raw) is wsgi.FAST_FALLBACK


def test_an_app_with_request_hooks_is_never_answered_here(fast):
    fast.direct.app.before_request(lambda: None)
    assert fast.parse(_request()) is wsgi.FAST_FALLBACK


def test_what_is_taken_here_gunicorns_parser_reads_the_same_way(fast):
    # Mutations of a plain POST (CR, LF, NUL, spaces, tabs, colons, obs-fold, commas, signs, latin-1,
    # a second Content-Length or a Transfer-Encoding spliced in): whenever the fast path takes one,
    # gunicorn's own parser (the one it hands the connection to) accepts it too, as a POST of the
    # same path whose body is the same bytes, with no chunked framing.
    from gunicorn.asgi.parser import PythonProtocol  # pylint: disable=import-outside-toplevel

    base = _request(b"User-Agent: u\r\nContent-Length: 2\r\nConnection: keep-alive\r\n")
    atoms = [b"\r", b"\n", b"\x00", b" ", b"\t", b":", b"\x0b", b"\x85", b"\xff", b"1", b"0", b",", b"+",
             b"\r\n", b"\r\n ", b"\r\nTransfer-Encoding: chunked", b"\r\nContent-Length: 3", b"\r\nContent-length: 2"]
    rand = random.Random(7)
    taken = 0
    for _number in range(20000):
        raw = bytearray(base)
        for _edit in range(rand.randint(1, 3)):
            pos = rand.randrange(len(raw) + 1)
            if rand.random() < 0.5:
                raw[pos:pos] = rand.choice(atoms)
            else:
                raw[pos:pos + 1] = rand.choice(atoms) if rand.random() < 0.5 else b""
        raw = bytes(raw) + b"POST /next"
        parsed = fast.parse(raw)
        if not isinstance(parsed, tuple):
            continue
        taken += 1
        _handler, path, _headers, start, end = parsed
        body, done = [], []
        parser = PythonProtocol(on_body=body.append, on_message_complete=lambda: done.append(True))
        parser.feed(raw)
        assert (parser.method, parser.path, parser.is_chunked, parser.content_length, done, b"".join(body)) \
            == (b"POST", path.encode(), False, end - start, [True], raw[start:end]), raw
    assert taken > 1000   # the mutations that keep a plain POST (spaces in values, ...) are taken
