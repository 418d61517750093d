"""The asyncio worker's fast path (agents/wsgi.py FastPrpc) on a real gunicorn: a plain pRPC POST is
answered with the bytes gunicorn's own protocol gives, pipelined answers come in order (on the
loop and on the pool's threads), the first request the fast path does not take hands that
connection and every byte after it to gunicorn's parser, each request leaves one access line in
gunicorn's format, and an answer is sent only once the work it deferred (defer_until_answered,
the KMS's audit fdatasync) is done, never if that work fails."""

import json
import socket
import time
from pathlib import Path

import pytest

import asgi_fixtures
from asgi_fixtures import AsgiServer, server_factory

ECHO = b"POST /prpc/T.Echo HTTP/1.1\r\nHost: t\r\nUser-Agent: fast\r\nContent-Length: %d\r\n\r\n%s"
# The same request with a header the fast path leaves to gunicorn's parser.
ECHO_VIA_GUNICORN = b"POST /prpc/T.Echo HTTP/1.1\r\nHost: t\r\nUser-Agent: fast\r\nX-Via: parser\r\n" \
                    b"Content-Length: %d\r\n\r\n%s"
CHUNKED = b"POST /prpc/T.Echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n7\r\n{\"n\":9}\r\n0\r\n\r\n"


@pytest.fixture
def servers():
    yield from server_factory(AsgiServer)


def echo(template, number):
    body = json.dumps({"n": number}).encode()
    return template % (len(body), body)


def read_answers(sock, count):
    """`count` answers from a kept connection: [(head lines without Date, body)]."""
    data, answers = b"", []
    while len(answers) < count:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if sep:
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:")))
            if len(rest) >= length:
                lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"date:")]
                answers.append((lines, json.loads(rest[:length])))
                data = rest[length:]
                continue
        chunk = sock.recv(65536)
        assert chunk, f"closed after {len(answers)} answers"
        data += chunk
    return answers


@pytest.mark.parametrize("inline", [True, False], ids=["loop", "pool"])
def test_pipelined_answers_in_order_across_the_hand_over(servers, inline):
    server = servers(inline=inline)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        # Five plain POSTs in one segment, then one the fast path leaves (chunked), then two more
        # plain ones, which gunicorn's parser now reads too.
        sock.sendall(b"".join(echo(ECHO, n) for n in range(5)) + CHUNKED + echo(ECHO, 10) + echo(ECHO, 11))
        answers = read_answers(sock, 8)
        assert [body["params"]["n"] for _head, body in answers] == [0, 1, 2, 3, 4, 9, 10, 11]
        assert all(head[0] == b"HTTP/1.1 200 OK" and body["remote"] == "127.0.0.1" for head, body in answers)
        # Still kept alive.
        sock.sendall(echo(ECHO, 12))
        assert read_answers(sock, 1)[0][1]["params"] == {"n": 12}
    output = server.stop()
    assert output.count('"POST /prpc/T.Echo HTTP/1.1" 200 ') == 9, output
    assert output.count('"-" "fast"\n') == 8, output   # the access line's user agent, as gunicorn's format has it


def test_the_fast_answer_is_gunicorns_answer(servers):
    server = servers()
    answers = []
    for template in (ECHO, ECHO_VIA_GUNICORN):
        for body in (b'{"a": [1, 2]}', b"[1]", b"{" + b" " * 2000 + b"}"):   # 200, a 400, a 413 past 1024 bytes
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                sock.sendall(template % (len(body), body))
                answers.append(read_answers(sock, 1)[0])
    fast, parsed = answers[:3], answers[3:]
    assert [head[0] for head, _body in fast] == [b"HTTP/1.1 200 OK", b"HTTP/1.1 400 Bad Request",
                                                 b"HTTP/1.1 413 Payload Too Large"]
    assert fast == parsed


def test_a_kept_connection_left_idle_is_closed_by_the_keepalive_timer(servers):
    server = servers(timeout=30.0)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(echo(ECHO, 1))
        assert read_answers(sock, 1)[0][1]["params"] == {"n": 1}
        started = time.monotonic()
        sock.settimeout(15)
        assert sock.recv(1) == b""           # gunicorn's keepalive (2 s), not the 30 s request deadline
        assert time.monotonic() - started < 10


# Two more direct routes: T.Durable defers writing a file (slowly: an answer sent before it would be
# read before the file has its line) until before its answer is sent, as the KMS's audit log defers
# its fdatasync; T.Fails defers work that fails.
DEFERRING_SERVER = asgi_fixtures.SERVER.replace('''"Big": lambda params: {"x": "a" * 200000}}''', '''"Big": lambda params: {"x": "a" * 200000},
        "Durable": lambda params: {"deferred": wsgi.defer_until_answered(
            lambda: threading.Event().wait(0.2) or open(params["path"], "a", encoding="ascii").write(
                params["mark"] + "\\n"))},
        "Fails": lambda params: {"deferred": wsgi.defer_until_answered(lambda: 1 / 0)}}''')


def post(path, params):
    body = json.dumps(params).encode()
    return b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (path, len(body), body)


def test_an_answer_waits_for_what_it_deferred(monkeypatch, servers, tmp_path):
    assert "Durable" in DEFERRING_SERVER
    monkeypatch.setattr(asgi_fixtures, "SERVER", DEFERRING_SERVER)
    server = servers()
    marks = tmp_path / "marks"
    conns = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _number in range(4)]
    try:
        # Several connections, each with pipelined requests: every answer comes after its work was
        # done (the mark is in the file when the answer is read), in order, the plain ones too.
        for number, conn in enumerate(conns):
            conn.sendall(post(b"/prpc/T.Durable", {"path": str(marks), "mark": f"{number}-a"}) + echo(ECHO, number)
                         + post(b"/prpc/T.Durable", {"path": str(marks), "mark": f"{number}-b"}))
        for number, conn in enumerate(conns):
            answers = [body for _head, body in read_answers(conn, 3)]
            assert answers[0] == {"deferred": True} and answers[2] == {"deferred": True}
            assert answers[1]["params"] == {"n": number}
            assert {f"{number}-a", f"{number}-b"} <= set(marks.read_text().split())
        # Work that fails: no answer at all, the connection closed; the others are served on.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
            conn.sendall(post(b"/prpc/T.Fails", {}))
            assert conn.recv(65536) == b""
        conns[0].sendall(echo(ECHO, 7))
        assert read_answers(conns[0], 1)[0][1]["params"] == {"n": 7}
    finally:
        for conn in conns:
            conn.close()
    output = server.stop()
    assert "ZeroDivisionError" in output and '"POST /prpc/T.Fails' not in output, output


def _workers_rss_kib(server):
    children = (Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text(encoding="ascii")
                .split())
    return sum(int(next(line.split()[1] for line in Path(f"/proc/{child}/status").read_text(encoding="ascii")
                        .splitlines() if line.startswith("VmRSS:"))) for child in children)


def test_held_answers_keep_the_write_flow_control(monkeypatch, servers, tmp_path):
    # Answers held for deferred work are written together once it is done, with no look at the write
    # buffer: a client that reads nothing and pipelines a deferring request before 300 requests of a
    # 200 kB answer (20 kB sent) made them all at once, 60 MB in the worker. Only up to the write
    # buffer's limit is made before they are written; then the client's unread answers stop reading.
    monkeypatch.setattr(asgi_fixtures, "SERVER", DEFERRING_SERVER)
    server = servers()
    time.sleep(0.5)
    before = _workers_rss_kib(server)
    with server.connect(rcvbuf=4096) as conn:
        conn.sendall(post(b"/prpc/T.Durable", {"path": str(tmp_path / "marks"), "mark": "a"})
                     + post(b"/prpc/T.Big", {}) * 300)
        time.sleep(2)
        grown = _workers_rss_kib(server) - before
    assert grown < 20000, f"the worker grew by {grown} kB"
