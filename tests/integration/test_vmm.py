"""The VMM with the process backend, end to end: a module-made app deployed through the real
dstack-vmm and dstack-kms processes boots under supervisord and podman, answers, attests, survives
a VMM restart, updates in place, and is removed without a trace. Bad input is refused first.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.prpc import Unauthorized
from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx
from ansible_collections.dstack.tee.plugins.module_utils.vmm_client import VmmClient
from conftest import IMAGE, free_port, needs_podman
from test_kms_server import KmsProcess

BIN = Path(sys.executable).parent
OS_IMAGE = "11" * 32
COMPOSE = f"""services:
  web:
    image: {IMAGE}
    command: ["/bin/sh", "-c", "mkdir -p /www && echo \\"$$GREETING\\" > /www/index.html && env > /www/env.txt && exec httpd -f -p 80 -h /www"]
    ports:
      - "8080:80"
    environment:
      GREETING: ${{GREETING}}
"""


class VmmProcess:
    """A real `dstack-vmm serve` on 127.0.0.1 (kms None: a VMM that knows no KMS; extra_args: more flags)."""

    def __init__(self, run_path, kms, port, token=None, extra_args=()):
        self.run_path, self.kms, self.port, self.token, self.extra_args = run_path, kms, port, token, tuple(extra_args)
        self.proc = None

    def start(self):
        argv = [str(BIN / "dstack-vmm"), "serve", "--run-path", str(self.run_path), "--listen", f"127.0.0.1:{self.port}",
                "--os-image-hash", OS_IMAGE, *self.extra_args]
        if self.kms is not None:
            argv += ["--kms-url", f"https://127.0.0.1:{self.kms.port}", "--kms-ca-cert",
                     str(self.kms.state_dir / "root-ca.crt"), "--sim-state", str(self.kms.state_dir / "tdx-sim")]
        if self.token:
            argv += ["--token", self.token]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,  # pylint: disable=consider-using-with
                                     start_new_session=True)
        client = self.client()
        for _attempt in range(150):
            try:
                client.call("Version")
                return self
            except Unauthorized:
                return self
            except DstackError:
                if self.proc.poll() is not None:
                    raise AssertionError("dstack-vmm exited:\n" + self.proc.stdout.read()) from None
                time.sleep(0.1)
        raise AssertionError("dstack-vmm did not answer")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)

    def client(self, token=None):
        return VmmClient(f"http://127.0.0.1:{self.port}", token=token or self.token)


@pytest.fixture
def stack(short_tmp, module):
    tmp_path = short_tmp
    kms = KmsProcess(tmp_path / "kms", free_port()).start()
    vmm = VmmProcess(tmp_path / "run", kms, free_port(), token="s3cret-token").start()
    yield kms, vmm
    client = vmm.client()
    try:
        for vm in client.call("Status").get("vms", []):
            client.call("RemoveVm", {"id": vm["id"]})
    finally:
        vmm.stop()
        kms.stop()
        subprocess.run([str(BIN / "supervisorctl"), "-c", str(tmp_path / "run" / "supervisor" / "supervisord.conf"),
                        "shutdown"], capture_output=True, check=False)


def app_files(tmp_path, module, kms, compose=COMPOSE, greeting="hello-from-a-cvm", app_id=None):
    (tmp_path / "compose.yaml").write_text(compose)
    app = module("app_compose", {"compose_file": str(tmp_path / "compose.yaml"), "name": "vmm-test", "app_id": app_id,
                                 "allowed_envs": ["GREETING"], "dest": str(tmp_path / "app-compose.json")})
    client = kms.client()
    meta, pub = client.get_meta(), client.get_app_env_encrypt_pubkey(app["app_id"])
    module("env_encrypt", {"env": {"GREETING": greeting}, "public_key": pub["public_key"],
                           "signature_v1": pub["signature_v1"], "timestamp": pub["timestamp"], "app_id": app["app_id"],
                           "kms_k256_pubkey": meta["k256_pubkey"], "dest": str(tmp_path / "encrypted-env"),
                           "fingerprint_key_file": str(tmp_path / "fp.key")})
    allow = json.loads((kms.state_dir / "auth-config.json").read_text())
    allow["osImages"] = ["0x" + OS_IMAGE]
    allow.setdefault("apps", {}).setdefault("0x" + app["app_id"], {"composeHashes": [], "allowAnyDevice": True})
    allow["apps"]["0x" + app["app_id"]]["composeHashes"].append("0x" + app["compose_hash"])
    (kms.state_dir / "auth-config.json").write_text(json.dumps(allow))
    return app


def _get(url):
    for _attempt in range(100):
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.read().decode()
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer")


def _create(tmp_path, vmm, host_port, name="vmm-test"):
    return vmm.client().call("CreateVm", {
        "name": name, "compose_file": (tmp_path / "app-compose.json").read_text(),
        "encrypted_env": (tmp_path / "encrypted-env").read_bytes().hex(),
        "ports": [{"host_port": host_port, "vm_port": 8080}]})["id"]


@needs_podman
def test_deploy_attest_restart_update_remove(short_tmp, module, stack, busybox_image):
    tmp_path = short_tmp
    kms, vmm = stack
    app = app_files(tmp_path, module, kms)
    port = free_port()
    vm_id = _create(tmp_path, vmm, port)
    client = vmm.client()
    info = client.wait_running(vm_id, timeout=120)
    assert _get(f"http://127.0.0.1:{port}/").strip() == "hello-from-a-cvm"
    assert info["app_id"] == app["app_id"] and info["instance_id"] and info["compose_hash"] == app["compose_hash"]

    # The quote from the CVM's socket verifies, and its event log names the compose we hold.
    sock = tmp_path / "run" / vm_id / "dstack.sock"
    quote = subprocess.run(["curl", "-s", "--unix-socket", str(sock), "-X", "POST", "http://cvm/GetQuote",
                            "-d", '{"report_data": "00"}'], capture_output=True, text=True, check=True).stdout
    (tmp_path / "quote.json").write_text(quote)
    (tmp_path / "collateral.json").write_text(SimTdx(str(kms.state_dir / "tdx-sim")).collateral_json())
    verified = subprocess.run([str(BIN / "dstack-verify"), str(tmp_path / "quote.json"), "--collateral",
                               str(tmp_path / "collateral.json"), "--sim-state", str(kms.state_dir / "tdx-sim")],
                              capture_output=True, text=True, check=False)
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["boot_info"]["compose_hash"] == app["compose_hash"]

    # A VMM restart keeps the VM and its state; the app never stopped.
    vmm.stop()
    vmm.start()
    again = client.call("GetInfo", {"id": vm_id})["info"]
    assert again["status"] == "running" and again["instance_id"] == info["instance_id"]
    assert _get(f"http://127.0.0.1:{port}/").strip() == "hello-from-a-cvm"

    # UpdateVm with a new compose: a new compose_hash, the same instance (its data kept).
    marker = tmp_path / "run" / vm_id / "work" / "data-marker"
    marker.write_text("kept")
    # The same app (its id pinned) with a new compose: the allowlist gets the new hash.
    app2 = app_files(tmp_path, module, kms, compose=COMPOSE.replace("index.html", "index.htm && cp /www/index.htm /www/index.html"),
                     app_id=app["app_id"])
    client.call("UpdateVm", {"id": vm_id, "compose_file": (tmp_path / "app-compose.json").read_text()})
    updated = client.wait_running(vm_id, timeout=120)
    assert updated["compose_hash"] == app2["compose_hash"] != app["compose_hash"]
    assert marker.read_text() == "kept" and _get(f"http://127.0.0.1:{port}/").strip() == "hello-from-a-cvm"

    # RemoveVm leaves no process and no run directory.
    pid = _guest_pids(vm_id)
    assert pid
    client.call("RemoveVm", {"id": vm_id})
    assert not (tmp_path / "run" / vm_id).exists()
    assert not _guest_pids(vm_id)
    assert client.call("Status")["vms"] == []


def _guest_pids(vm_id):
    proc = subprocess.run(["pgrep", "-f", f"run/{vm_id}/shared"], capture_output=True, text=True, check=False)
    return proc.stdout.split()


@pytest.mark.parametrize("change, field", [
    ({"compose_file": "{not json"}, "compose_file"),
    ({"name": "bad/name"}, "name"),
    ({"ports": [{"host_port": 0, "vm_port": 80}]}, "ports[0].host_port"),
    ({"encrypted_env": "zz"}, "encrypted_env"),
])
def test_bad_input_is_refused_before_anything_is_made(short_tmp, module, stack, change, field):
    tmp_path = short_tmp
    kms, vmm = stack
    app_files(tmp_path, module, kms)
    config = {"name": "ok", "compose_file": (tmp_path / "app-compose.json").read_text(), "ports": []}
    config.update(change)
    with pytest.raises(DstackError) as err:
        vmm.client().call("CreateVm", config)
    assert f"{field}:" in str(err.value)
    assert [p.name for p in (tmp_path / "run").iterdir() if p.name != "supervisor"] == []


def test_a_taken_port_and_a_wrong_token_are_refused(short_tmp, module, stack):
    tmp_path = short_tmp
    kms, vmm = stack
    app_files(tmp_path, module, kms)
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(DstackError, match="is in use"):
            _create(tmp_path, vmm, busy.getsockname()[1])
    with pytest.raises(Unauthorized):
        vmm.client(token="wrong").call("Status")
    with pytest.raises(Unauthorized):
        VmmClient(f"http://127.0.0.1:{vmm.port}").call("Status")
    assert [p.name for p in (tmp_path / "run").iterdir() if p.name != "supervisor"] == []


@needs_podman
def test_cvm_module_states(short_tmp, module, stack, busybox_image):
    """dstack.tee.cvm through every state, as Ansible runs it: check mode, change, no change."""
    tmp_path = short_tmp
    kms, vmm = stack
    app_files(tmp_path, module, kms)
    port = free_port()
    base = {"vmm_url": f"http://127.0.0.1:{vmm.port}", "vmm_token": vmm.token, "name": "mod-test",
            "app_compose_file": str(tmp_path / "app-compose.json"),
            "encrypted_env_file": str(tmp_path / "encrypted-env"), "ports": [{"host_port": port, "vm_port": 8080}]}

    def run(state, check=False):
        result = module("cvm", dict(base, state=state), check=check, diff=True)
        assert not result.get("failed"), result.get("msg")
        assert vmm.token not in result.raw  # the token is no_log
        return result

    assert run("present", check=True)["changed"] and vmm.client().call("Status")["vms"] == []
    present = run("present")
    assert present["changed"] and present["status"] in ("stopped", "exited") and present["app_id"]
    assert run("present")["changed"] is False
    running = run("running")
    assert running["changed"] and running["status"] == "running" and running["instance_id"]
    assert _get(f"http://127.0.0.1:{port}/").strip() == "hello-from-a-cvm"
    assert run("running")["changed"] is False and run("running", check=True)["changed"] is False
    assert run("stopped", check=True)["changed"] and vmm.client().call("Status")["vms"][0]["status"] == "running"
    stopped = run("stopped")
    assert stopped["changed"] and stopped["status"] != "running"
    assert run("stopped")["changed"] is False
    absent = run("absent")
    assert absent["changed"] and absent["diff"]["before"]["name"] == "mod-test" and absent["diff"]["after"] == {}
    assert run("absent")["changed"] is False and vmm.client().call("Status")["vms"] == []
