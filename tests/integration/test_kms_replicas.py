"""Two KMS replicas behind one address: real `dstack-kms serve` processes with the same root keys
(the second restored from the first's state directory) and state directories of their own, behind
HAProxy (TCP mode, TLS passed through, roundrobin). A nonce one replica issued is good at the
other; a replayed request is refused by the replica that used its nonce."""

import json
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from ansible_collections.dstack.tee.plugins.module_utils import key_release, tdx_quote
from ansible_collections.dstack.tee.plugins.module_utils.app_certs import key_provider_id
from ansible_collections.dstack.tee.plugins.module_utils.kms_client import KmsClient, KmsRefused
from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx
from conftest import free_port
from test_kms import INSTANCE_ID, VM_CONFIG, allowlist, boot
from test_kms_server import KMS, KmsProcess

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def haproxy_config(listen_port, replica_ports):
    """HAProxy in TCP mode: each client connection goes whole to one replica, in turn (TLS passes through)."""
    servers = "".join(f"  server kms{i} 127.0.0.1:{port}\n" for i, port in enumerate(replica_ports))
    return ("global\n  maxconn 4096\n"
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n"
            f"frontend kms\n  bind 127.0.0.1:{listen_port}\n  default_backend replicas\n"
            f"backend replicas\n  balance roundrobin\n{servers}")


def start_haproxy(folder, listen_port, replica_ports):
    config = folder / "haproxy.cfg"
    config.write_text(haproxy_config(listen_port, replica_ports))
    proc = subprocess.Popen([HAPROXY, "-f", str(config), "-db"], stdout=subprocess.PIPE,  # pylint: disable=consider-using-with
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 10
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError("haproxy exited:\n" + proc.stdout.read())
        try:
            with socket.create_connection(("127.0.0.1", listen_port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.05)
    raise AssertionError("haproxy did not listen within 10 s")


@pytest.fixture
def replicas(tmp_path):
    if not os.path.exists(HAPROXY):
        pytest.skip("haproxy is installed by scripts/setup.sh")
    sim_dir = tmp_path / "tdx-sim"
    sim = SimTdx(str(sim_dir))  # one simulated platform whose root both replicas trust
    first = KmsProcess(tmp_path / "kms-a", free_port(), "--sim-state", str(sim_dir)).start()
    restored = subprocess.run([KMS, "restore", "--state-dir", str(tmp_path / "kms-b"), "--backup",
                               str(first.state_dir)], capture_output=True, text=True, timeout=60, check=False)
    assert restored.returncode == 0, restored.stderr
    second = KmsProcess(tmp_path / "kms-b", free_port(), "--sim-state", str(sim_dir)).start()
    for server in (first, second):
        allowlist(server.state_dir / "auth-config.json")
    port = free_port()
    proxy = start_haproxy(tmp_path, port, [first.port, second.port])
    yield sim, first, second, port
    os.killpg(proxy.pid, signal.SIGTERM)
    proxy.wait(timeout=10)
    for server in (first, second):
        server.stop()


def _release_request(sim, nonce, provider_id):
    """A GetAppKey request over this nonce: (request, ephemeral private key)."""
    private, public = key_release.new_ephemeral_key()
    event_log = boot(sim, key_provider_id=provider_id)
    quote = sim.get_quote(key_release.key_release_report_data(nonce, public))
    return {"nonce": nonce.hex(), "ephemeral_public_key": public.hex(), "quote": quote.hex(), "event_log": event_log,
            "vm_config": VM_CONFIG}, private


def _audit(server):
    path = server.state_dir / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_nonce_from_one_replica_key_from_the_other(replicas):
    sim, first, second, port = replicas
    assert first.client().get_meta()["k256_pubkey"] == second.client().get_meta()["k256_pubkey"]
    provider_id = key_provider_id((first.state_dir / "root-ca.crt").read_bytes())
    url, ca = f"https://127.0.0.1:{port}", str(first.state_dir / "root-ca.crt")
    # Two kept connections through HAProxy: roundrobin gives each its own replica.
    one, other = KmsClient(url, ca_cert=ca), KmsClient(url, ca_cert=ca)
    one.get_meta()
    other.get_meta()

    released = []
    for nonce_client, key_client in ((one, other), (other, one)):
        nonce = bytes.fromhex(nonce_client.call("GetNonce")["nonce"])
        request, private = _release_request(sim, nonce, provider_id)
        released.append((request, key_release.open_sealed(key_client.call("GetAppKey", request), nonce, private)))
    assert released[0][1]["k256_key"] == released[1][1]["k256_key"]  # same root keys, same app keys
    assert released[0][1]["disk_crypt_key"] == released[1][1]["disk_crypt_key"]

    # Each replica released one key, for a nonce the other issued (the access logs name who served what).
    audits = {server.port: _audit(server) for server in (first, second)}
    assert all([a["decision"] for a in audit] == ["release"] for audit in audits.values()), audits
    assert all(audit[0]["instance_id"] == INSTANCE_ID for audit in audits.values())

    # The replayed first request, at the replica that used its nonce: refused, and audited there.
    request, _private = released[0]
    user = next(s for s in (first, second) if _audit(s)[0]["quote_identity"] == _quote_identity(request))
    with pytest.raises(KmsRefused, match="already used"):
        user.client().call("GetAppKey", request)
    assert [a["decision"] for a in _audit(user)] == ["release", "refuse"]

    logs = {server.port: server.stop() for server in (first, second)}
    for served in logs.values():
        assert served.count("/prpc/KMS.GetNonce") == 1 and "/prpc/KMS.GetAppKey" in served, served[-2000:]


def _quote_identity(request):
    return tdx_quote.parse_quote(bytes.fromhex(request["quote"])).identity()
