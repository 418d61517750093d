"""Slow clients (found by a review of issue 11's fixes): half a request, then silence.

As found: 8 TLS connections to the KMS that each sent a request line and one header, then
nothing, took all its worker threads (2 workers x 4), for as long as they stayed open: GetMeta,
GetNonce and GetAppKey timed out for every CVM. 40 such connections (or bodies shorter than their
Content-Length) did the same to the VMM's API and its guests' host API, before any token check.
gunicorn read requests with blocking reads that had no deadline; now every read and write of a
client connection gives up after agents.wsgi.CLIENT_IO_TIMEOUT seconds of silence.

Real processes on loopback: `dstack-kms serve` and `dstack-vmm serve`.
"""

import socket
import ssl
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))

# pylint: disable=wrong-import-position
from ansible_collections.dstack.tee.agents.wsgi import CLIENT_IO_TIMEOUT  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.kms_client import KmsClient  # noqa: E402
from conftest import free_port  # noqa: E402
from test_kms_server import KmsProcess  # noqa: E402
from .test_vmm import _start, _stop  # noqa: E402

ANSWER_WITHIN = CLIENT_IO_TIMEOUT + 15  # the held connections time out, then the honest one is served


def _closed_by_server(sockets, within, enough=None):
    """Whether the server closed `enough` of these connections (default all) within `within` seconds."""
    deadline = time.monotonic() + within
    open_ones = list(sockets)
    enough = len(sockets) if enough is None else enough
    while len(sockets) - len(open_ones) < enough and time.monotonic() < deadline:
        for sock in list(open_ones):
            sock.settimeout(0.2)
            try:
                if sock.recv(1024) == b"":
                    open_ones.remove(sock)
            except (socket.timeout, TimeoutError, ssl.SSLWantReadError):
                pass
            except OSError:
                open_ones.remove(sock)
    return len(sockets) - len(open_ones) >= enough


def test_half_requests_do_not_stop_the_kms(tmp_path):
    kms = KmsProcess(tmp_path / "kms", free_port()).start()
    held = []
    try:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        for _i in range(8):  # as many as the KMS has threads (2 workers x 4)
            try:
                sock = context.wrap_socket(socket.create_connection(("127.0.0.1", kms.port), timeout=5))
                sock.sendall(b"POST /prpc/KMS.GetMeta HTTP/1.1\r\nHost: x\r\n")
                held.append(sock)
            except OSError:
                pass  # the threads are taken already: this one waits in the backlog
        assert len(held) >= 6
        started = time.monotonic()
        client = KmsClient(f"https://127.0.0.1:{kms.port}", ca_cert=str(kms.state_dir / "root-ca.crt"),
                           timeout=ANSWER_WITHIN)
        assert client.get_meta()["mode"] == "simulation"
        assert time.monotonic() - started < ANSWER_WITHIN
        assert _closed_by_server(held, CLIENT_IO_TIMEOUT + 10)
    finally:
        for sock in held:
            sock.close()
        kms.stop()


def test_half_requests_and_short_bodies_do_not_stop_the_vmm(short_tmp):
    vmm = _start(short_tmp)
    held = []
    try:
        for number in range(40):
            sock = socket.create_connection(("127.0.0.1", vmm.port), timeout=5)
            if number % 2:
                sock.sendall(b"POST /prpc/Vmm.Status HTTP/1.1\r\nHost: x\r\n")  # headers never finished
            else:
                sock.sendall(f"POST /prpc/Vmm.Status HTTP/1.1\r\nHost: 127.0.0.1:{vmm.port}\r\n"
                             "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{".encode())
            held.append(sock)
        time.sleep(0.5)
        started = time.monotonic()
        status, answer = vmm.call("Status", timeout=ANSWER_WITHIN)
        assert status == 200 and answer["vms"] == []
        assert time.monotonic() - started < ANSWER_WITHIN
        # Before, none was ever closed; now they time out (gunicorn drains them a few at a time).
        assert _closed_by_server(held, 2 * CLIENT_IO_TIMEOUT + 10, enough=3)
    finally:
        for sock in held:
            sock.close()
        _stop(vmm, short_tmp)
