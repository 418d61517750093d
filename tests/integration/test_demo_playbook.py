"""`make demo`'s playbook end to end: runs, reports the app's identity, and is idempotent."""

import hashlib
import re

from conftest import ROOT, run_playbook


def _recap(output):
    match = re.search(r"localhost\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", output)
    assert match, output[-2000:]
    return dict(zip(("ok", "changed", "unreachable", "failed"), map(int, match.groups())))


def test_demo_runs_then_changes_nothing(tmp_path):
    work = tmp_path / "demo"
    extra = ("-e", f"demo_work_dir={work}")
    first = run_playbook(ROOT / "playbooks" / "demo.yml", *extra)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr
    assert _recap(first.stdout)["changed"] > 0
    written = (work / "hello" / "app-compose.json").read_bytes()
    assert f"compose_hash:    {hashlib.sha256(written).hexdigest()}" in first.stdout
    assert "round trip:      2 values decrypted, all equal to the originals" in first.stdout
    assert "dropped:         NOT_DECLARED" in first.stdout
    # No secret value from examples/hello/secrets.env is printed.
    for value in ("Hello from a confidential VM", "demo-token-0123456789", "dropped-by-the-guest"):
        assert value not in first.stdout + first.stderr

    second = run_playbook(ROOT / "playbooks" / "demo.yml", *extra)
    assert second.returncode == 0 and _recap(second.stdout)["changed"] == 0, second.stdout[-3000:]

    check = run_playbook(ROOT / "playbooks" / "demo.yml", "--check", *extra)
    assert check.returncode == 0 and _recap(check.stdout)["changed"] == 0, check.stdout[-3000:]
