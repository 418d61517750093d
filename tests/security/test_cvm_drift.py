"""Finding 10 of issue 11: dstack.tee.cvm saw no drift in vcpu, memory, disk_size or image.

As found: a CVM made by the module, then the same task with one of these changed. It reported ok
and changed nothing. Now, against a real `dstack-vmm serve` (tests/integration/test_vmm.py's
stack), each change is shown by check mode (changed, a diff naming the field), refused without
recreate (naming the field, the CVM untouched), and with recreate=true the CVM is made anew with
the new value; the same task again changes nothing.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))

# After the sys.path line above; the unused names imported are pytest fixtures.
# pylint: disable=wrong-import-position
from conftest import free_port, needs_podman
from test_vmm import _get, app_files, stack  # noqa: F401 pylint: disable=unused-import

FIELDS = ("name", "app_id", "compose_hash", "encrypted_env_sha256", "ports", "vcpu", "memory", "disk_size", "image")
CHANGES = (("vcpu", 2), ("memory", 1536), ("disk_size", 12), ("image", "dstack-0.5.11"))


@needs_podman
def test_finding_10_cvm_shows_refuses_or_recreates_a_change_of_vcpu_memory_disk_size_image(
        short_tmp, module, stack, busybox_image):
    kms, vmm = stack
    app_files(short_tmp, module, kms)
    port = free_port()
    args = {"vmm_url": f"http://127.0.0.1:{vmm.port}", "vmm_token": vmm.token, "name": "drift",
            "app_compose_file": str(short_tmp / "app-compose.json"), "encrypted_env_file": str(short_tmp / "encrypted-env"),
            "ports": [{"host_port": port, "vm_port": 8080}], "vcpu": 1, "memory": 1024, "disk_size": 10, "image": ""}
    client = vmm.client()

    def run(task, check=False):
        return module("cvm", task, check=check, diff=True)

    def info(vm_id):
        return client.call("GetInfo", {"id": vm_id})["info"]

    made = run(args)
    assert made["changed"] and not made.get("failed"), made.get("msg")
    assert run(args)["changed"] is False
    vm = info(made["id"])

    for field, value in CHANGES:
        old = vm["configuration"][field]
        task = dict(args, **{field: value})

        preview = run(task, check=True)
        assert preview["changed"] and not preview.get("failed"), preview.get("msg")
        before, after = preview["diff"]["before"], preview["diff"]["after"]
        assert [k for k in FIELDS if before[k] != after[k]] == [field], preview["diff"]
        assert (before[field], after[field]) == (old, value)
        assert any(w.startswith(f"{field}: cannot change") for w in preview["warnings"]), preview["warnings"]
        assert info(vm["id"])["configuration"][field] == old

        refused = run(task)
        assert refused.get("failed") and refused["field"] == field, refused
        assert refused["msg"].startswith(f"{field}: cannot change on the existing CVM 'drift' ({field} ")
        assert "recreate=true" in refused["msg"]
        kept = info(vm["id"])
        assert (kept["configuration"][field], kept["instance_id"], kept["status"]) == (old, vm["instance_id"], "running")

        planned = run(dict(task, recreate=True), check=True)
        assert planned["changed"] and planned["recreated"] and planned["diff"]["after"][field] == value
        assert info(vm["id"])["configuration"][field] == old

        recreated = run(dict(task, recreate=True))
        assert recreated["changed"] and recreated["recreated"] and not recreated.get("failed"), recreated.get("msg")
        assert client.call("GetInfo", {"id": vm["id"]})["found"] is False
        new = info(recreated["id"])
        assert new["configuration"][field] == value and new["status"] == "running"
        assert new["app_id"] == vm["app_id"] and new["instance_id"] and new["instance_id"] != vm["instance_id"]
        assert [v["id"] for v in client.call("Status")["vms"]] == [recreated["id"]]
        assert _get(f"http://127.0.0.1:{port}/").strip() == "hello-from-a-cvm"

        for again in (run(dict(task, recreate=True)), run(task)):
            assert again["changed"] is False and again["recreated"] is False, again.get("msg")
        args, vm = task, new
