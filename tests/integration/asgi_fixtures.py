"""Shared by the tests of gunicorn's asyncio worker as the agents run it (agents/wsgi.py
run_gunicorn(asgi=...)): a real gunicorn on a loopback port serving a small Flask app with direct
pRPC routes (T.Echo: its params, the client's address and the handler's thread; T.Big: a 200 kB
answer) and a Flask route (/health)."""

import socket
import ssl
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from ansible_collections.dstack.tee.plugins.module_utils import acme_lab
from conftest import free_port, stop_process_group

SERVER = textwrap.dedent('''
    import logging, sys, threading
    from flask import Flask, jsonify
    from ansible_collections.dstack.tee.agents import wsgi
    port, timeout, cap, inline, max_bytes, cert, key = (int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]),
                                                        sys.argv[4] == "inline", int(sys.argv[5]), sys.argv[6], sys.argv[7])
    wsgi.CLIENT_IO_TIMEOUT = timeout
    app = Flask("t")
    app.config["MAX_CONTENT_LENGTH"] = max_bytes
    wsgi.add_prpc_routes(app, "/prpc/T.", {
        "Echo": lambda params: {"params": params, "remote": wsgi.remote_addr(),
                                "thread": threading.current_thread().name},
        "Big": lambda params: {"x": "a" * 200000}}, direct=True)
    @app.get("/health")
    def health():
        return jsonify({"ok": True})
    wsgi.install_json_errors(app, logging.getLogger("t"))
    tls = {"certfile": cert, "keyfile": key} if cert else {}
    # timeout=60 as the KMS: gunicorn's wait for a body's next bytes is that long.
    wsgi.run_gunicorn(app, asgi={"inline": inline, "threads": 2}, bind=f"127.0.0.1:{port}", workers=1,
                      worker_connections=cap, timeout=60, accesslog="-", errorlog="-", **tls)
''')


class AsgiServer:
    """The server above: CLIENT_IO_TIMEOUT `timeout`, worker_connections `cap`, handlers on the
    loop (`inline`) or on threads, MAX_CONTENT_LENGTH `max_bytes`; over TLS (a certificate made in
    `folder`) when a folder is given."""

    def __init__(self, timeout=30.0, cap=1000, inline=True, max_bytes=1024, folder=None):
        self.port = free_port()
        self.context = None
        cert = key = ""
        if folder is not None:
            _ca, cert_pem, key_pem = acme_lab.listener_tls(("localhost", "127.0.0.1"), days=2)
            cert, key = str(folder / "server.pem"), str(folder / "server.key")
            Path(cert).write_text(cert_pem, encoding="ascii")
            Path(key).write_text(key_pem, encoding="ascii")
            self.context = ssl.create_default_context()
            self.context.check_hostname, self.context.verify_mode = False, ssl.CERT_NONE
        self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
            [sys.executable, "-c", SERVER, str(self.port), str(timeout), str(cap), "inline" if inline else "pool",
             str(max_bytes), cert, key],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8", start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("the server did not listen")

    def connect(self, rcvbuf=None):
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(5)
        sock.connect(("127.0.0.1", self.port))
        return self.context.wrap_socket(sock) if self.context else sock

    def stop(self):
        """Stop it; its output (the access lines, the error log)."""
        stop_process_group(self.proc)
        return self.proc.stdout.read()


def server_factory(server_class):
    """A fixture's body: a function making server_class(**kw), all stopped at the end."""
    made = []
    yield lambda **kw: made.append(server_class(**kw)) or made[-1]
    for server in made:
        server.stop()
