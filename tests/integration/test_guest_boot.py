"""The CVM boot: a config share made by the foundation modules boots to a running compose app.

Real parts: the simulated TDX, the KMS (in process, over its HTTP app), the dstack.tee modules,
and podman running a locally imported busybox image.
"""

import json
import os
import time
import urllib.request

import pytest

from ansible_collections.dstack.tee.agents.guest.boot import Boot, BootFailed
from ansible_collections.dstack.tee.agents.guest.compose_runner import ComposeRunner
from ansible_collections.dstack.tee.agents.guest.context import GuestContext
from ansible_collections.dstack.tee.plugins.module_utils import attestation
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

    def up(self, *args):
        self.started = True


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
