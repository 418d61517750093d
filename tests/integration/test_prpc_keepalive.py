"""The pRPC client keeps its connection: a key release (GetNonce, GetAppKey) over one TLS
connection to the real `dstack-kms serve`, a dropped keep-alive reopened once, a connection per
thread. Connections are counted by a TCP relay between client and KMS."""

import socket
import threading

import pytest

from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.kms_client import KmsClient
from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx
from conftest import free_port
from test_kms import VM_CONFIG, allowlist, boot
from test_kms_server import KmsProcess


class Relay:
    """A TCP relay to a port that counts the connections it accepts and can cut them all."""

    def __init__(self, port):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target = port
        self.accepted = 0
        self.open = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _addr = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.accepted += 1
            self.open += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        """Close every relayed connection, as a server's keep-alive timeout does."""
        for sock in self.open:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self.open = []

    def close(self):
        self.listener.close()
        self.cut()


@pytest.fixture
def relayed_kms(tmp_path):
    server = KmsProcess(tmp_path / "kms", free_port()).start()
    allowlist(tmp_path / "kms" / "auth-config.json")
    relay = Relay(server.port)
    yield server, relay
    relay.close()
    server.stop()


def test_a_release_goes_over_one_kept_connection(relayed_kms):
    server, relay = relayed_kms
    sim = SimTdx(str(server.state_dir / "tdx-sim"))
    client = KmsClient(f"https://127.0.0.1:{relay.port}", ca_cert=str(server.state_dir / "root-ca.crt"))
    meta = client.get_meta()
    keys = client.get_app_key(sim, boot(sim), VM_CONFIG)
    keys_again = client.get_app_key(sim, boot(sim), VM_CONFIG)
    assert keys["k256_key"] == keys_again["k256_key"] and meta["mode"] == "simulation"
    assert relay.accepted == 1  # GetMeta, 2 x (GetNonce + GetAppKey): one TCP and TLS connection

    relay.cut()  # the kept connection is gone: the next call opens one new connection, once
    assert client.get_meta() == meta
    assert relay.accepted == 2


def test_threads_get_a_connection_each(relayed_kms):
    server, relay = relayed_kms
    client = KmsClient(f"https://127.0.0.1:{relay.port}", ca_cert=str(server.state_dir / "root-ca.crt"))
    answers = []

    def worker():
        answers.extend(client.get_meta()["k256_pubkey"] for _i in range(5))

    threads = [threading.Thread(target=worker) for _i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(answers) == 15 and len(set(answers)) == 1
    assert relay.accepted == 3


def test_certificate_checks_are_kept(relayed_kms, tmp_path):
    server, relay = relayed_kms
    other = tmp_path / "other.crt"
    other.write_bytes(SimTdx(str(tmp_path / "x")).root_ca_pem)
    with pytest.raises(DstackError, match="cannot reach the KMS.*CERTIFICATE_VERIFY_FAILED"):
        KmsClient(f"https://127.0.0.1:{relay.port}", ca_cert=str(other)).get_meta()
    with pytest.raises(DstackError, match="CERTIFICATE_VERIFY_FAILED"):  # the system store knows no KMS root
        KmsClient(f"https://127.0.0.1:{relay.port}").get_meta()
    assert KmsClient(f"https://127.0.0.1:{relay.port}", validate_certs=False).get_meta()["mode"] == "simulation"
    with pytest.raises(DstackError, match="cannot load the CA certificate"):
        KmsClient(f"https://127.0.0.1:{relay.port}", ca_cert=str(tmp_path / "missing.crt")).get_meta()
