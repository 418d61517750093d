"""dstack.tee.cvm's app_compose_dest and wait_app, as Ansible runs the module, against a real
`dstack-vmm serve` and `dstack-kms serve` (test_vmm.py's stack) and a CVM that boots under podman.

app_compose_dest keeps the exact bytes the VMM was given (nothing in check mode, 0644, unchanged
the second time, written again when removed, a missing folder named); wait_app returns the app's
first answer once its containers serve, and fails naming wait_app when the app never answers.
"""

import hashlib
import os
import stat

from conftest import IMAGE, free_port, needs_podman
from test_vmm import app_files, stack  # noqa: F401 pylint: disable=unused-import

SILENT = f"""services:
  web:
    image: {IMAGE}
    # Serves nothing, and stops at once on SIGTERM (a PID 1 without a handler would ignore it).
    command: ["/bin/sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"]
"""


@needs_podman
def test_app_compose_dest_and_wait_app(short_tmp, module, stack, busybox_image):
    kms, vmm = stack
    app_files(short_tmp, module, kms)
    port = free_port()
    kept = short_tmp / "build" / "app-compose.json"
    kept.parent.mkdir()
    task = {"vmm_url": f"http://127.0.0.1:{vmm.port}", "vmm_token": vmm.token, "name": "answer",
            "app_compose_file": str(short_tmp / "app-compose.json"), "encrypted_env_file": str(short_tmp / "encrypted-env"),
            "ports": [{"host_port": port, "vm_port": 8080}], "app_compose_dest": str(kept), "wait_app": True}
    sent = (short_tmp / "app-compose.json").read_bytes()

    preview = module("cvm", task, check=True)
    assert preview["changed"] and not preview.get("failed") and "app_answer" not in preview, preview.get("msg")
    assert not kept.exists() and vmm.client().call("Status")["vms"] == []

    made = module("cvm", task)
    assert made["changed"] and not made.get("failed"), made.get("msg")
    # The first answer, once the container serves: the greeting the env carried.
    assert made["app_answer"]["status"] == 200 and made["app_answer"]["content"].strip() == "hello-from-a-cvm"
    assert kept.read_bytes() == sent and stat.S_IMODE(os.stat(kept).st_mode) == 0o644
    assert made["compose_hash"] == hashlib.sha256(sent).hexdigest()

    again = module("cvm", task)
    assert again["changed"] is False and again["app_answer"]["status"] == 200, again.get("msg")
    kept.unlink()
    assert module("cvm", task, check=True)["changed"] and not kept.exists()
    rewritten = module("cvm", task)
    assert rewritten["changed"] and kept.read_bytes() == sent
    assert vmm.client().call("GetInfo", {"id": made["id"]})["info"]["instance_id"] == made["instance_id"]

    missing = module("cvm", dict(task, app_compose_dest=str(short_tmp / "nowhere" / "app-compose.json")))
    assert missing["failed"] and missing["field"] == "app_compose_dest", missing
    assert "nowhere does not exist" in missing["msg"]

    # An app that never answers on its port: the boot finishes, the wait for its answer does not.
    (short_tmp / "silent").mkdir()
    app_files(short_tmp / "silent", module, kms, compose=SILENT)
    quiet_port = free_port()
    silent = {"vmm_url": f"http://127.0.0.1:{vmm.port}", "vmm_token": vmm.token, "name": "silent",
              "app_compose_file": str(short_tmp / "silent" / "app-compose.json"),
              "encrypted_env_file": str(short_tmp / "silent" / "encrypted-env"),
              "ports": [{"host_port": quiet_port, "vm_port": 8080}]}
    booted = module("cvm", silent)
    assert booted["changed"] and booted["status"] == "running" and "app_answer" not in booted, booted.get("msg")
    refused = module("cvm", dict(silent, wait_app=True, wait_timeout=5))
    assert refused["failed"] and refused["field"] == "wait_app", refused
    assert refused["msg"].startswith(f"wait_app: http://127.0.0.1:{quiet_port} did not answer in 5 s"), refused["msg"]
