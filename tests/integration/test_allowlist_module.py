"""dstack.tee.allowlist run as Ansible runs it (a process per task): edits made at the same time
all keep their entries (each holds the lock file beside the allowlist), and check mode writes
nothing, not even the lock file."""

import json
from concurrent.futures import ThreadPoolExecutor

from conftest import run_module

EDITS = 16


def test_edits_at_the_same_time_all_keep_their_entries(tmp_path):
    path = tmp_path / "auth-config.json"
    app_ids = [f"{n:040x}" for n in range(1, EDITS + 1)]

    def allow(app_id):
        return run_module("allowlist", {"path": str(path), "app_id": app_id, "compose_hashes": [app_id + "00" * 12]})

    with ThreadPoolExecutor(EDITS) as pool:
        results = list(pool.map(allow, app_ids))
    assert all(r.get("changed") and not r.get("failed") for r in results), [r.raw for r in results if r.get("failed")]
    apps = json.loads(path.read_text())["apps"]
    assert sorted(k.lower().removeprefix("0x") for k in apps) == app_ids


def test_check_mode_writes_nothing(tmp_path):
    path = tmp_path / "auth-config.json"
    result = run_module("allowlist", {"path": str(path), "app_id": "ab" * 20, "compose_hashes": ["cd" * 32]}, check=True)
    assert result["changed"] and not list(tmp_path.iterdir()), result.raw
