"""The CVM boot: a config share made by the foundation modules boots to a running compose app.

Real parts: the simulated TDX, the KMS (in process, over its HTTP app), the dstack.tee modules,
and podman running a locally imported busybox image.
"""

import json
import os
import subprocess
import time
import urllib.request

import pytest

from ansible_collections.dstack.tee.agents.guest.boot import Boot, BootFailed
from ansible_collections.dstack.tee.plugins.module_utils.compose_runner import ComposeRunner
from ansible_collections.dstack.tee.agents.guest.context import GuestContext
from ansible_collections.dstack.tee.plugins.module_utils import attestation
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx
from conftest import IMAGE, free_port, needs_podman
from test_kms import make_kms

OS_IMAGE = "11" * 32  # what test_kms's allowlist allows
COMPOSE = f"""services:
  web:
    image: {IMAGE}
    command: ["/bin/sh", "-c", "mkdir -p /www && env > /www/env.txt && exec httpd -f -p 80 -h /www"]
    ports:
      - "8080:80"
    environment:
      GREETING: ${{GREETING}}
      API_TOKEN: ${{API_TOKEN}}
      NOT_DECLARED: ${{NOT_DECLARED}}
"""
SECRETS = {"GREETING": "hello-from-the-cvm", "API_TOKEN": "token-0123456789", "NOT_DECLARED": "must-not-arrive"}


def make_share(tmp_path, module, kms_client, secrets=None, compose=COMPOSE):
    """The config share as the VMM will lay it out, made with the foundation modules."""
    share = tmp_path / "share"
    share.mkdir()
    (tmp_path / "compose.yaml").write_text(compose)
    app = module("app_compose", {"compose_file": str(tmp_path / "compose.yaml"), "name": "boot-test",
                                 "allowed_envs": ["GREETING", "API_TOKEN"], "dest": str(share / "app-compose.json")})
    assert app["changed"], app
    meta = kms_client.get_meta()
    pub = kms_client.get_app_env_encrypt_pubkey(app["app_id"])
    sealed = module("env_encrypt", {"env": secrets or SECRETS, "public_key": pub["public_key"], "signature_v1": pub["signature_v1"],
                                    "timestamp": pub["timestamp"], "app_id": app["app_id"],
                                    "kms_k256_pubkey": meta["k256_pubkey"], "dest": str(share / ".encrypted-env"),
                                    "fingerprint_key_file": str(tmp_path / "fp.key")})
    assert sealed["changed"], sealed
    (share / ".sys-config.json").write_text(json.dumps({"kms_urls": ["http://kms.test"], "gateway_urls": [],
                                                        "vm_config": json.dumps({"os_image_hash": OS_IMAGE})}))
    return share, app


def allow(tmp_path, app):
    (tmp_path / "auth-config.json").write_text(json.dumps({
        "osImages": ["0x" + OS_IMAGE],
        "apps": {"0x" + app["app_id"]: {"composeHashes": ["0x" + app["compose_hash"]], "allowAnyDevice": True}}}))


@pytest.fixture
def world(tmp_path, module):
    sim = SimTdx(str(tmp_path / "sim"))
    kms_app, kms_client = make_kms(tmp_path, sim)
    return sim, kms_app, kms_client


@needs_podman
def test_boot_to_a_running_app(tmp_path, module, world, busybox_image):
    sim, _kms_app, kms_client = world
    share, app = make_share(tmp_path, module, kms_client)
    allow(tmp_path, app)
    ctx = GuestContext.open(str(share), str(tmp_path / "work"), tee="sim", sim_state_dir=sim.state_dir)
    sock = tmp_path / "dstack.sock"
    sock.touch()
    port = free_port()
    runner = ComposeRunner(f"dstack-test-{port}", str(tmp_path / "work"), engine="podman")
    try:
        Boot(ctx, kms_client=kms_client, runner=runner, sockets={"dstack": str(sock)},
             port_map={8080: f"127.0.0.1:{port}"}).run()
        env_page = _get(f"http://127.0.0.1:{port}/env.txt")
        assert "GREETING=hello-from-the-cvm" in env_page and "API_TOKEN=token-0123456789" in env_page
        # The undeclared variable was dropped by the guest: compose interpolates it to nothing.
        assert "must-not-arrive" not in env_page
    finally:
        runner.down()
    # down leaves no network behind (each one left would be read by every later podman call).
    assert subprocess.run(["podman", "network", "exists", f"dstack-test-{port}_default"], check=False).returncode == 1
    # RTMR3 holds the boot events in dstack's order, and a quote's event log replays to it.
    names = [e.name for e in ctx.runtime_events()]
    assert names == ["system-preparing", "app-id", "compose-hash", "instance-id", "os-image-hash", "key-provider",
                     "boot-mr-done", "storage-fs", "system-ready"]
    quote, log = ctx.quote(b"check")
    result = attestation.verify_quote(quote, sim.collateral(), sim.root_ca_der, event_log=log)
    assert result.ok and result.boot_info["compose_hash"] == app["compose_hash"]
    # Files: keys and env 0600, no value in the boot record.
    for name in (".appkeys.json", ".decrypted-env", ".decrypted-env.json"):
        assert oct(os.stat(tmp_path / "work" / name).st_mode & 0o777) == "0o600"
    assert json.loads((tmp_path / "work" / ".decrypted-env.json").read_text()) == {
        "API_TOKEN": "token-0123456789", "GREETING": "hello-from-the-cvm"}
    boot_state = (tmp_path / "work" / "boot.json").read_text()
    assert json.loads(boot_state)["done"] is True and "dropped NOT_DECLARED" in boot_state
    assert not any(v in boot_state for v in SECRETS.values())


def _get(url, attempts=50):
    for _attempt in range(attempts):
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.read().decode()
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer")


class NoContainers:
    def __init__(self):
        self.started = False
        self.downs = 0

    def up(self, *args):
        self.started = True

    def down(self):
        self.downs += 1


def _boot_without_containers(tmp_path, module, world, mutate=None):
    sim, _kms_app, kms_client = world
    share, app = make_share(tmp_path, module, kms_client)
    allow(tmp_path, app)
    if mutate:
        mutate(share, tmp_path, app)
    ctx = GuestContext.open(str(share), str(tmp_path / "work"), tee="sim", sim_state_dir=sim.state_dir)
    runner = NoContainers()
    return Boot(ctx, kms_client=kms_client, runner=runner), runner, ctx


def test_a_tampered_encrypted_env_fails_the_env_step(tmp_path, module, world):
    def tamper(share, _tmp, _app):
        blob = bytearray((share / ".encrypted-env").read_bytes())
        blob[-1] ^= 1
        (share / ".encrypted-env").write_bytes(bytes(blob))

    boot, runner, ctx = _boot_without_containers(tmp_path, module, world, tamper)
    with pytest.raises(BootFailed) as err:
        boot.run()
    assert err.value.field == "env" and "tampered" in err.value.reason
    assert not runner.started and not os.path.exists(ctx.paths.decrypted_env)
    state = json.loads(open(ctx.paths.boot_state, encoding="utf-8").read())
    assert state["stage"] == "env" and "tampered" in state["error"] and state["done"] is False


def test_a_missing_app_compose_fails_read_config(tmp_path, module, world):
    boot, runner, ctx = _boot_without_containers(tmp_path, module, world,
                                                 lambda share, _t, _a: (share / "app-compose.json").unlink())
    with pytest.raises(BootFailed) as err:
        boot.run()
    assert err.value.field == "read-config" and "app-compose.json" in err.value.reason
    assert not runner.started and ctx.runtime_events() == []


def test_a_kms_that_refuses_fails_the_keys_step(tmp_path, module, world):
    def forbid(_share, tmp, _app):
        (tmp / "auth-config.json").write_text(json.dumps({"osImages": ["0x" + OS_IMAGE], "apps": {}}))

    boot, runner, ctx = _boot_without_containers(tmp_path, module, world, forbid)
    with pytest.raises(BootFailed) as err:
        boot.run()
    assert err.value.field == "keys" and "app not registered" in err.value.reason
    assert not runner.started and not os.path.exists(ctx.paths.app_keys)
    assert [e.name for e in ctx.runtime_events()][-1] == "boot-mr-done"


def test_a_reboot_measures_a_fresh_td_with_the_same_identity(tmp_path, module, world):
    boot, _runner, ctx = _boot_without_containers(tmp_path, module, world)
    boot.run()
    first_rtmr3, first_keys = ctx.read_rtmrs()[3], ctx.app_keys()
    again = Boot(ctx, kms_client=boot.kms_client, runner=NoContainers()).run()
    # The instance id seed is kept, so the same events measure to the same RTMR3 and the KMS
    # gives the same keys (the disk stays readable across reboots).
    assert again.instance_id == boot.instance_id and ctx.read_rtmrs()[3] == first_rtmr3
    assert ctx.app_keys()["disk_crypt_key"] == first_keys["disk_crypt_key"]


def test_the_keys_a_boot_gets_are_dstacks_recomputed_by_hand(tmp_path, module, world):
    """Recompute dstack-reference 8 from the KMS's root key files, without the project's kdf."""
    import hashlib
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    boot, _runner, ctx = _boot_without_containers(tmp_path, module, world)
    boot.run()
    keys = ctx.app_keys()
    root_ca = serialization.load_pem_private_key((tmp_path / "kms" / "root-ca.key").read_bytes(), None)
    root_k256 = (tmp_path / "kms" / "root-k256.key").read_bytes()
    app_id, instance_id = bytes.fromhex(boot.app_id), bytes.fromhex(boot.instance_id)

    def hkdf(ikm, info):
        return HKDF(hashes.SHA256(), 32, b"RATLS", info).derive(ikm)

    def dh_secret(info):
        scalar = root_ca.private_numbers().private_value.to_bytes(32, "big")
        child = ec.derive_private_key(int.from_bytes(hkdf(scalar, info), "big"), ec.SECP256R1())
        der = child.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
        return hashlib.sha256(der).hexdigest()

    assert keys["disk_crypt_key"] == dh_secret(app_id + instance_id + b"app-disk-crypt-key")
    assert keys["env_crypt_key"] == dh_secret(app_id + b"env-encrypt-key")
    assert keys["k256_key"] == hkdf(root_k256, app_id + b"app-key").hex()
    # instance_id = SHA-256(seed || app_id)[0:20], with the seed the boot kept
    seed = bytes.fromhex(ctx.instance()["instance_id_seed"])
    assert boot.instance_id == hashlib.sha256(seed + app_id).digest()[:20].hex()


class HostApi:
    """A host API (the VMM's HostApi.Notify) on a local port: the events in arrival order, the
    connections they came on; each answer after `delay` seconds."""

    def __init__(self, delay=0.0):
        import http.server  # pylint: disable=import-outside-toplevel
        import threading  # pylint: disable=import-outside-toplevel
        self.events, self.connections, self.paths = [], 0, []
        host_api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keeps the connection open, as gunicorn does

            def setup(self):
                super().setup()
                host_api.connections += 1

            def do_POST(self):  # pylint: disable=invalid-name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                time.sleep(delay)
                host_api.paths.append(self.path)
                host_api.events.append((body["event"], body["payload"]))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/host-api/vm-1/token-1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _tell_host(url):
    def mutate(share, _tmp, _app):
        config = json.loads((share / ".sys-config.json").read_text())
        (share / ".sys-config.json").write_text(json.dumps(dict(config, host_api_url=url)))
    return mutate


def test_the_host_is_told_every_event_in_order_over_one_connection(tmp_path, module, world):
    host = HostApi()
    try:
        boot, _runner, ctx = _boot_without_containers(tmp_path, module, world, _tell_host(host.url))
        boot.run()
        boot.notifier.flush()
    finally:
        host.close()
    recorded = [(e["event"], e["payload"]) for e in json.loads(open(ctx.paths.boot_state, encoding="utf-8").read())["events"]]
    assert host.events == recorded and recorded[-1] == ("boot.progress", "running")
    assert [p.split(":")[0] for e, p in recorded if e == "boot.progress"] == [
        "read-config", "instance-id", "measure", "keys", "measure-system", "env", "gateway", "containers", "running"]
    assert set(host.paths) == {"/host-api/vm-1/token-1/Notify"} and host.connections == 1


def test_a_failed_boot_has_told_the_host_when_it_returns(tmp_path, module, world):
    """The sender is a thread: a failed boot (after which the agent exits) waits for it."""
    def tamper(share, tmp, app):
        _tell_host(host.url)(share, tmp, app)
        blob = bytearray((share / ".encrypted-env").read_bytes())
        blob[-1] ^= 1
        (share / ".encrypted-env").write_bytes(bytes(blob))

    host = HostApi(delay=0.2)
    try:
        boot, _runner, _ctx = _boot_without_containers(tmp_path, module, world, tamper)
        with pytest.raises(BootFailed):
            boot.run()
        assert host.events[-1][0] == "boot.error" and host.events[-1][1].startswith("env: ")
    finally:
        host.close()


def test_a_host_that_does_not_answer_does_not_stop_the_boot(tmp_path, module, world):
    gone = f"http://127.0.0.1:{free_port()}/host-api/vm-1/token-1"
    boot, runner, _ctx = _boot_without_containers(tmp_path, module, world, _tell_host(gone))
    assert boot.run().notifier.state["done"] and runner.started


def test_the_containers_start_once_the_socket_api_listens(tmp_path, module, world):
    """before_containers (run: the socket API's child listening) comes before the runner's up; when it
    fails, the boot fails at containers naming it, and what was started beside the gateway step is
    taken down."""
    calls = []

    class Runner(NoContainers):
        def up(self, *args):
            calls.append("up")
            super().up(*args)

    boot, _runner, _ctx = _boot_without_containers(tmp_path, module, world)
    boot.runner = Runner()
    boot.before_containers = lambda: calls.append("socket API listens")
    boot.run()
    assert calls == ["socket API listens", "up"] and boot.runner.downs == 0

    def dead():
        raise DstackError("serve", "the socket API exited (code 2) before listening")

    again = Boot(boot.ctx, kms_client=boot.kms_client, runner=Runner(), before_containers=dead)
    with pytest.raises(BootFailed) as err:
        again.run()
    assert err.value.field == "containers" and err.value.reason.startswith("serve: the socket API exited")
    assert not again.runner.started and again.runner.downs == 1


@needs_podman
def test_the_network_made_beside_the_boot_goes_with_a_failed_boot(tmp_path, module, world):
    """ComposeRunner.prepare makes the project's network in the background (up then finds it); down
    removes it, and so does a boot that fails after it was made."""
    def exists(name):
        return subprocess.run(["podman", "network", "exists", name], check=False).returncode == 0

    runner = ComposeRunner(f"dstack-prep-{os.getpid()}", str(tmp_path / "made"), engine="podman")
    os.makedirs(runner.work_dir)
    runner.prepare(COMPOSE)
    deadline = time.monotonic() + 30
    while not exists(f"{runner.project}_default"):
        assert time.monotonic() < deadline, "prepare made no network"
        time.sleep(0.1)
    runner.down()
    assert not exists(f"{runner.project}_default")

    def forbid(_share, tmp, _app):
        (tmp / "auth-config.json").write_text(json.dumps({"osImages": ["0x" + OS_IMAGE], "apps": {}}))

    boot, _runner, _ctx = _boot_without_containers(tmp_path, module, world, forbid)
    boot.runner = ComposeRunner(f"dstack-prep2-{os.getpid()}", str(tmp_path / "work"), engine="podman")
    try:
        with pytest.raises(BootFailed) as err:
            boot.run()
        assert err.value.field == "keys"
        assert not exists(f"{boot.runner.project}_default")
    finally:
        boot.runner.down()
