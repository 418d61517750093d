"""The real `dstack-kms serve` process over HTTPS: bootstrap, key release, allowlist reload, restart."""

import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import dstack_sdk
import pytest

from ansible_collections.dstack.tee.plugins.module_utils.app_certs import key_provider_id
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.kms_client import KmsClient, KmsRefused
from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx
from conftest import free_port, stop_process_group
from test_kms import APP_ID, COMPOSE_HASH, KMS_ROOTS, VM_CONFIG, allowlist, boot

KMS = str(Path(sys.executable).parent / "dstack-kms")


class KmsProcess:
    def __init__(self, state_dir, port, *extra_args):
        self.state_dir, self.port, self.extra_args = state_dir, port, extra_args
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
            [KMS, "serve", "--simulated", "--state-dir", str(self.state_dir), "--listen", f"127.0.0.1:{self.port}",
             "--workers", "2", *self.extra_args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("dstack-kms exited:\n" + self.proc.stdout.read())
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    # CVMs on its simulated platform measure this KMS as their key provider (boot()).
                    KMS_ROOTS[os.path.abspath(self.state_dir / "tdx-sim")] = key_provider_id(
                        (self.state_dir / "root-ca.crt").read_bytes())
                    return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError("dstack-kms did not listen within 30 s")

    def stop(self):
        stop_process_group(self.proc)
        return self.proc.stdout.read() if self.proc else ""

    def client(self):
        return KmsClient(f"https://127.0.0.1:{self.port}", ca_cert=str(self.state_dir / "root-ca.crt"))


@pytest.fixture
def kms(tmp_path):
    server = KmsProcess(tmp_path / "kms", free_port())
    yield server
    server.stop()


def test_serve_release_reload_restart(kms, tmp_path):
    kms.start()
    assert (kms.state_dir / "root-ca.crt").exists()
    assert oct((kms.state_dir / "root-k256.key").stat().st_mode & 0o777) == "0o600"
    client = kms.client()
    meta = client.get_meta()
    assert meta["mode"] == "simulation"
    answer = client.get_app_env_encrypt_pubkey(APP_ID)
    assert dstack_sdk.verify_env_encrypt_public_key(bytes.fromhex(answer["public_key"]),
                                                    bytes.fromhex(answer["signature_v1"]), APP_ID,
                                                    answer["timestamp"]) == "0x" + meta["k256_pubkey"]

    # A CVM on the same simulated platform, with its own RTMRs.
    cvm = SimTdx(str(kms.state_dir / "tdx-sim"), rtmr_state=str(tmp_path / "cvm-rtmrs.json"))
    # The fresh allowlist allows nothing...
    with pytest.raises(KmsRefused, match="OS image is not allowed|app not registered"):
        client.get_app_key(cvm, boot(cvm), VM_CONFIG)
    # ... until the operator adds the app; the KMS re-reads the file on change.
    allowlist(kms.state_dir / "auth-config.json")
    keys = client.get_app_key(cvm, boot(cvm), VM_CONFIG)
    assert len(bytes.fromhex(keys["env_crypt_key"])) == 32

    kms.stop()
    kms.start()
    again = kms.client().get_app_key(cvm, boot(cvm), VM_CONFIG)
    assert again["disk_crypt_key"] == keys["disk_crypt_key"] and again["k256_key"] == keys["k256_key"]
    audit = [json.loads(line) for line in (kms.state_dir / "audit.log").read_text().splitlines()]
    assert [a["decision"] for a in audit] == ["refuse", "release", "release"]
    assert all(a["compose_hash"] == COMPOSE_HASH for a in audit)


def test_https_is_checked_against_the_kms_root(kms, tmp_path):
    kms.start()
    other = tmp_path / "other.crt"
    other.write_bytes(SimTdx(str(tmp_path / "x")).root_ca_pem)
    with pytest.raises(DstackError, match="cannot reach the KMS"):
        KmsClient(f"https://127.0.0.1:{kms.port}", ca_cert=str(other)).get_meta()


def test_corrupt_root_key_refuses_to_start(tmp_path):
    server = KmsProcess(tmp_path / "kms", free_port())
    server.start()
    server.stop()
    (server.state_dir / "root-ca.key").write_text("garbage")
    proc = subprocess.run([KMS, "serve", "--simulated", "--state-dir", str(server.state_dir), "--listen",
                           f"127.0.0.1:{server.port}"], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and "root-ca.key: is corrupt" in proc.stderr
    assert (server.state_dir / "root-ca.key").read_text() == "garbage"


def test_env_encrypt_module_fetches_the_key_from_the_kms(kms, tmp_path, module):
    from ansible_collections.dstack.tee.plugins.module_utils import env_crypt, kdf
    from ansible_collections.dstack.tee.plugins.module_utils import root_keys
    kms.start()
    meta = kms.client().get_meta()
    args = {"env": {"TOKEN": "a-secret-token-value"}, "kms_url": f"https://127.0.0.1:{kms.port}",
            "kms_ca_cert": str(kms.state_dir / "root-ca.crt"), "app_id": APP_ID,
            "kms_k256_pubkey": meta["k256_pubkey"], "dest": str(tmp_path / "enc"),
            "fingerprint_key_file": str(tmp_path / "fp.key")}
    result = module("env_encrypt", args)
    assert result["changed"] and result["signature"] == "v1", result.get("msg")
    root = root_keys.load(str(kms.state_dir))
    secret = kdf.env_crypt_key(root.ca_key, APP_ID)
    assert env_crypt.decrypt_env((tmp_path / "enc").read_bytes(), secret) == [("TOKEN", "a-secret-token-value")]
    # A KMS whose k256 key is not the trusted one is refused.
    wrong = module("env_encrypt", dict(args, kms_k256_pubkey="02" + "11" * 32))
    assert wrong["failed"] and "not made by the trusted KMS key" in wrong["msg"]
    unreachable = module("env_encrypt", dict(args, kms_url="https://127.0.0.1:9"))
    assert unreachable["failed"] and unreachable["msg"].startswith("kms_url: cannot reach the KMS")


def test_no_access_log_keeps_the_refusals_in_the_error_log(tmp_path):
    server = KmsProcess(tmp_path / "kms", free_port(), "--no-access-log").start()
    try:
        client = server.client()
        client.get_meta()
        with pytest.raises(KmsRefused):
            client.call("GetAppKey", {"nonce": "00" * 32, "ephemeral_public_key": "11" * 32})
    finally:
        output = server.stop()
    assert "/prpc/KMS.GetMeta" not in output, output[-2000:]  # no access line
    assert "403 /prpc/KMS.GetAppKey from 127.0.0.1" in output, output[-2000:]
    assert [line["decision"] for line in map(json.loads, (tmp_path / "kms" / "audit.log").read_text().splitlines())] \
        == ["refuse"]


def test_the_access_log_has_a_line_per_request_in_gunicorns_format(tmp_path):
    server = KmsProcess(tmp_path / "kms", free_port()).start()
    try:
        server.client().get_meta()
        context = ssl.create_default_context(cafile=str(server.state_dir / "root-ca.crt"))
        with context.wrap_socket(socket.create_connection(("127.0.0.1", server.port), timeout=10),
                                 server_hostname="127.0.0.1") as conn:
            # A GET with a query string goes to Flask (on threads); the client's quote is escaped.
            conn.sendall(b'GET /prpc/KMS.GetMeta?x=1 HTTP/1.1\r\nHost: k\r\nUser-Agent: t"ua\r\n'
                         b"Connection: close\r\n\r\n")
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    finally:
        output = server.stop()
    lines = [line for line in output.splitlines() if '"POST /prpc/KMS.GetMeta' in line or '"GET /prpc/' in line]
    assert len(lines) == 2, output[-3000:]
    assert re.fullmatch(r'127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] "POST /prpc/KMS\.GetMeta '
                        r'HTTP/1\.1" 200 \d+ "-" "[^"]*"', lines[0]), lines
    assert re.search(r'"GET /prpc/KMS\.GetMeta\?x=1 HTTP/1\.1" 200 \d+ "-" "t\\"ua"$', lines[1]), lines


def _certificate_names_checked(port, state_dir, name):
    """Whether the KMS's HTTPS certificate on 127.0.0.1:port passes a client's check for `name`
    (what a guest checks when it reaches the host's loopback at another address)."""
    context = ssl.create_default_context(cafile=str(state_dir / "root-ca.crt"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with context.wrap_socket(raw, server_hostname=name):
                return True
        except ssl.SSLCertVerificationError:
            return False


def test_server_names_are_in_the_rpc_certificate(tmp_path):
    """kms.toml's server_names: a libvirt VM reaches the host's loopback at 10.0.2.2 and checks the
    KMS's certificate for that address. Without it the same check fails; a bad name is refused
    naming its place."""
    state = tmp_path / "kms"
    server = KmsProcess(state, free_port()).start()
    try:
        assert _certificate_names_checked(server.port, state, "127.0.0.1")
        assert not _certificate_names_checked(server.port, state, "10.0.2.2")
    finally:
        server.stop()
    config = tmp_path / "kms.toml"
    config.write_text('server_names = ["10.0.2.2", "kms.example.test"]\n')
    server = KmsProcess(state, free_port(), "--config", str(config)).start()
    try:
        for name in ("10.0.2.2", "kms.example.test", "127.0.0.1"):
            assert _certificate_names_checked(server.port, state, name), name
    finally:
        server.stop()
    config.write_text('server_names = ["10.0.2.2", "not a name"]\n')
    done = subprocess.run([KMS, "serve", "--simulated", "--state-dir", str(state), "--config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0 and "server_names[1]: 'not a name' is not a DNS name or an IP address" in done.stderr
