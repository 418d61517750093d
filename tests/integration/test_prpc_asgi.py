"""gunicorn's asyncio worker as the agents run it (agents/wsgi.py run_gunicorn(asgi=...)): a real
gunicorn on a loopback port, a small Flask app with direct pRPC routes.

What it must keep of the threaded worker: direct routes answered as under WSGI, the rest through
Flask, a deadline on a request that never arrives whole, and a cap on a worker's connections."""

import json
import socket
import time

import pytest

from asgi_fixtures import AsgiServer, server_factory


class Server(AsgiServer):
    def request(self, raw):
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as conn:
            conn.sendall(raw)
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        head, _sep, body = answer.partition(b"\r\n\r\n")
        return int(head.split()[1]), head, json.loads(body) if body.startswith(b"{") else body

    def post(self, path, body):
        return self.request(f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n"
                            f"Connection: close\r\n\r\n".encode() + body)


@pytest.fixture
def servers():
    yield from server_factory(Server)


def _closed(sock, within):
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except (socket.timeout, TimeoutError):
        return False
    except OSError:
        return True


@pytest.mark.parametrize("inline", [True, False])
def test_direct_routes_and_flask_routes(servers, inline):
    server = servers(inline=inline)
    status, head, answer = server.post("/prpc/T.Echo", b'{"a": 1}')
    assert status == 200 and b"content-type: application/json" in head.lower()
    assert answer["params"] == {"a": 1} and answer["remote"] == "127.0.0.1"
    # On the event loop's thread, or on the pool's.
    assert answer["thread"].startswith("prpc") is not inline, answer
    # The same JSON errors and limits as under WSGI: a bad body 400, past MAX_CONTENT_LENGTH 413.
    assert server.post("/prpc/T.Echo", b"[1]")[0] == 400
    assert server.post("/prpc/T.Echo", b"{" + b" " * 2000 + b"}")[0] == 413
    # What is not a plain POST goes to Flask: GET with a query string, other paths, 404s as JSON.
    status, _head, answer = server.request(b"GET /prpc/T.Echo?b=2 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert status == 200 and answer["params"] == {"b": "2"}
    assert server.request(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")[2] == {"ok": True}
    # A chunked body goes to Flask too, and is read whole.
    status, _head, answer = server.request(b"POST /prpc/T.Echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
                                           b"Connection: close\r\n\r\n4\r\n{\"c\"\r\n4\r\n: 3}\r\n0\r\n\r\n")
    assert status == 200 and answer["params"] == {"c": 3}, answer
    status, _head, answer = server.request(b"GET /nope HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert status == 404 and "error" in answer
    output = server.stop()
    assert output.count('"POST /prpc/T.Echo HTTP/1.1" 200 ') == 2 and '"GET /health HTTP/1.1" 200 ' in output, output


def test_a_request_that_never_arrives_whole_is_closed(servers):
    server = servers(timeout=1.0)
    held = []
    for raw in (b"", b"POST /prpc/T.Echo HTTP/1.1\r\nHost: t\r\n",
                b"POST /prpc/T.Echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{"):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        if raw:
            sock.sendall(raw)
        held.append(sock)
    try:
        # Silent after connecting, headers never finished, a body short of its Content-Length: each
        # closed by the server (the deadline is 1 s here; without it they stay open for good).
        assert [_closed(sock, 10) for sock in held] == [True, True, True]
        # A kept-alive connection: the second request's body never comes either.
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as conn:
            conn.sendall(b'POST /prpc/T.Echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}')
            assert conn.recv(65536).startswith(b"HTTP/1.1 200")
            conn.sendall(b"POST /prpc/T.Echo HTTP/1.1\r\nHost: t\r\nContent-Length: 9\r\n\r\n{")
            assert _closed(conn, 10)
        assert server.post("/prpc/T.Echo", b"{}")[0] == 200
    finally:
        for sock in held:
            sock.close()


def test_a_worker_takes_no_more_than_worker_connections(servers):
    server = servers(cap=4)
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _number in range(4)]
    try:
        time.sleep(0.3)
        extra = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        assert _closed(extra, 5)                      # the fifth: closed at once
        assert not any(_closed(sock, 0.2) for sock in held)
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    assert server.post("/prpc/T.Echo", b"{}")[0] == 200
