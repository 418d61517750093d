"""An attacker's review of the KMS on gunicorn's asyncio worker (agents/wsgi.py: asgi_app,
deadline_asgi_worker_class, AccessLine), with any bytes on its port.

As found (each test names what held a connection, or what reached a log):
- a client that pipelined requests and never read the answers kept its connection for good (the
  write waited on gunicorn's flow control with no deadline, and no timer runs meanwhile);
- a TLS connection whose handshake never came was kept 60 s (asyncio's handshake timeout), outside
  worker_connections: a few hundred of them took a worker's file descriptors, and honest clients
  were reset;
- a TLS connection closed by the keepalive timer was kept 30 s more, counted in worker_connections,
  while the client did not answer the close_notify;
- a pipelined request with a short body was kept 60 s (gunicorn's worker timeout), not
  CLIENT_IO_TIMEOUT: no data_received armed its deadline;
- a Content-Length of 4301+ digits raised ValueError out of gunicorn's parser: a traceback in the
  error log per request, and no answer;
- a User-Agent with the bytes 0x85 or 0x9b reached the access log as U+0085 (a line break for
  str.splitlines: a forged line) and U+009B (a terminal's CSI).

Real processes on loopback: a small Flask app on run_gunicorn(asgi=...) with CLIENT_IO_TIMEOUT 1 s,
and `dstack-kms serve` for the TLS handshake.
"""

import json
import resource
import socket
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))

# pylint: disable=wrong-import-position
from ansible_collections.dstack.tee.agents.wsgi import CLIENT_IO_TIMEOUT  # noqa: E402
from asgi_fixtures import AsgiServer, server_factory  # noqa: E402
from conftest import free_port  # noqa: E402
from test_kms_server import KmsProcess  # noqa: E402

TIMEOUT = 1.0  # the servers' CLIENT_IO_TIMEOUT here

ECHO = b"POST /prpc/T.Echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}"
ECHO_CLOSE = b"POST /prpc/T.Echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"


class Server(AsgiServer):
    """asgi_fixtures' server with CLIENT_IO_TIMEOUT 1 s and the KMS's 256 KiB request limit."""

    def __init__(self, folder=None, cap=1000):
        super().__init__(timeout=TIMEOUT, cap=cap, max_bytes=256 * 1024, folder=folder)

    def request(self, raw):
        """(status, whole answer) of one request on its own connection; status 0 if none came."""
        try:
            with self.connect() as conn:
                conn.sendall(raw)
                answer = b""
                while chunk := conn.recv(65536):
                    answer += chunk
        except OSError:
            return 0, b""
        return (int(answer.split()[1]) if answer.startswith(b"HTTP/") else 0), answer

    def echo(self):
        return self.request(ECHO_CLOSE)[0]


@pytest.fixture
def servers():
    yield from server_factory(Server)


def _served_within(server, seconds):
    """Seconds until an honest request is answered 200 (polling), or None past `seconds`."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if server.echo() == 200:
            return time.monotonic() - started
        time.sleep(0.2)
    return None


def _closed_within(sock, seconds):
    """Whether the server closed (EOF or reset) this connection within `seconds`, reading all it sent."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            if sock.recv(65536) == b"":
                return True
        except (socket.timeout, TimeoutError):
            return False
        except OSError:
            return True
    return False


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_a_client_that_never_reads_its_answers_is_closed(servers, tmp_path, tls):
    # Two connections fill the worker (cap 2): each pipelines answers far past every buffer, then
    # neither reads nor sends. Before, they stayed for good and every honest client was refused.
    server = servers(folder=tmp_path if tls else None, cap=2)
    big = b'POST /prpc/T.Big HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}'
    held = []
    try:
        for _number in range(2):
            sock = server.connect(rcvbuf=4096)
            sock.sendall(big * 40)     # 8 MB of answers
            held.append(sock)
        time.sleep(TIMEOUT + 0.5)
        assert _served_within(server, TIMEOUT + 8) is not None
    finally:
        for sock in held:
            sock.close()


def test_a_tls_close_the_client_leaves_unfinished_frees_its_connection(servers, tmp_path):
    # One request each, then silence: the keepalive timer (2 s) closes them, and the TLS close waits
    # for a close_notify that never comes (asyncio: 30 s, counted in worker_connections meanwhile).
    server = servers(folder=tmp_path, cap=2)
    held = []
    try:
        for _number in range(2):
            sock = server.connect()
            sock.sendall(ECHO)
            held.append(sock)
        waited = _served_within(server, 15)
        assert waited is not None and waited < 2 + TIMEOUT + 5, waited
    finally:
        for sock in held:
            sock.close()


def test_a_pipelined_request_with_a_short_body_is_closed_in_time(servers):
    server = servers()
    with server.connect() as sock:
        # The second request arrives with the first (one segment), its body never whole.
        sock.sendall(ECHO + b"POST /prpc/T.Echo HTTP/1.1\r\nHost: t\r\nContent-Length: 9\r\n\r\n{")
        started = time.monotonic()
        assert _closed_within(sock, 20)
        assert time.monotonic() - started < TIMEOUT + 5


def test_an_unfinished_tls_handshake_is_closed_in_time(tmp_path):
    kms = KmsProcess(tmp_path / "kms", free_port()).start()
    try:
        with socket.create_connection(("127.0.0.1", kms.port), timeout=5) as silent:
            started = time.monotonic()
            assert _closed_within(silent, 70)
            assert time.monotonic() - started < CLIENT_IO_TIMEOUT + 5
    finally:
        kms.stop()


def test_silent_tls_connections_do_not_take_a_workers_files(tmp_path):
    """A worker with 256 file descriptors (a service's soft limit is 1024): 300 connections that
    never start TLS, and an honest client is served once they time out (before: 60 s later)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        server = Server(folder=tmp_path)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    held = []
    try:
        held = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _number in range(300)]
        time.sleep(0.5)
        waited = _served_within(server, 20)
        assert waited is not None and waited < TIMEOUT + 8, waited
    finally:
        for sock in held:
            sock.close()
        server.stop()


def test_framing_the_parser_and_asgi_app_agree_on(servers):
    """What held: gunicorn's parser refuses what asgi_app could read otherwise (it takes the last of
    duplicate headers), and a chunked body never reaches a direct route."""
    server = servers()
    head = b"POST /prpc/T.Echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
    for framing in (b"Content-Length: 2\r\nContent-Length: 9\r\n", b"Content-Length: 2\r\nContent-Length: 2\r\n",
                    b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n", b"Content-Length: +2\r\n",
                    b"Content-Length: \xb2\r\n", b"Content-Length: 2, 2\r\n", b"Content-Length : 2\r\n",
                    b"Transfer-Encoding : chunked\r\n", b"Transfer-Encoding: gzip\r\n"):
        status, answer = server.request(head + framing + b"\r\n{}")
        assert status in (400, 501), (framing, answer)
        assert b"application/json" not in answer, framing     # refused before any route
    status, answer = server.request(b"POST /prpc/T.Echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
    assert status == 400
    status, answer = server.request(head + b"Expect: 100-continue\r\nContent-Length: 999999999\r\n\r\n")
    assert status == 413 and b"application/json" in answer


def test_a_huge_content_length_is_a_400_not_a_traceback(servers):
    server = servers()
    status, answer = server.request(b"POST /prpc/T.Echo HTTP/1.1\r\nHost: t\r\nContent-Length: " + b"1" * 5000
                                    + b"\r\n\r\n")
    assert status == 400, answer
    assert server.echo() == 200    # the worker still serves
    output = server.stop()
    assert "Traceback" not in output, output


def test_the_access_log_holds_no_control_character(servers):
    server = servers()
    assert server.request(b"POST /prpc/T.Echo HTTP/1.1\r\nHost: t\r\nUser-Agent: x\x85FORGED \x9b31m\r\n"
                          b"Referer: \xa0\"r\\\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")[0] == 200
    output = server.stop()
    lines = output.splitlines()    # str.splitlines: U+0085 would end a line here
    assert not any(line.startswith("FORGED") for line in lines), output
    access = [line for line in lines if "FORGED" in line]
    assert len(access) == 1 and '"x\\x85FORGED \\x9b31m"' in access[0], output
    assert '"\u00a0\\"r\\\\"' in access[0], access     # printable latin-1 kept, quote and backslash escaped
    assert all(ord(char) >= 0x20 and not 0x7f <= ord(char) < 0xa0 for line in lines for char in line), output


def test_remote_addr_under_concurrency(servers):
    """What held: each direct answer names its own client, with many clients at once on one loop."""
    import threading  # pylint: disable=import-outside-toplevel

    server = servers()
    wrong = []

    def client(number):
        source = f"127.0.0.{2 + number % 16}"
        for _request in range(10):
            with socket.socket() as sock:
                sock.settimeout(10)
                sock.bind((source, 0))
                sock.connect(("127.0.0.1", server.port))
                sock.sendall(ECHO_CLOSE)
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
            remote = json.loads(answer.partition(b"\r\n\r\n")[2])["remote"]
            if remote != source:
                wrong.append((source, remote))

    threads = [threading.Thread(target=client, args=(number,)) for number in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not wrong
