"""dstack.tee.supervisor_program's autorestart, with a real supervisord: a service that stops whole
with an error (dstack-gateway serve exits 2 when a part of it dies) is started again."""

import time

from ansible_collections.dstack.tee.plugins.module_utils import supervisor as sv


def test_autorestart_unexpected_starts_a_failed_program_again(module, short_tmp):
    folder = short_tmp / "sv"
    marker = short_tmp / "runs"
    # Runs once per start: appends a line, lives a second, then fails.
    command = ["/bin/sh", "-c", f"echo run >> {marker}; sleep 1.5; exit 2"]
    args = {"name": "flaky", "command": command, "supervisor_dir": str(folder), "autorestart": "unexpected"}
    try:
        first = module("supervisor_program", args)
        assert first["changed"], first
        assert "autorestart = unexpected" in sv.Supervisor(str(folder)).read_conf("flaky")
        deadline = time.time() + 20
        while time.time() < deadline and (not marker.exists() or len(marker.read_text().splitlines()) < 2):
            time.sleep(0.2)
        assert len(marker.read_text().splitlines()) >= 2  # it failed, and supervisord ran it again
        # The default leaves a failed program stopped: the same program without autorestart.
        again = module("supervisor_program", dict(args, autorestart="false"))
        assert again["changed"] and "autorestart = false" in sv.Supervisor(str(folder)).read_conf("flaky")
    finally:
        sv.Supervisor(str(folder)).shutdown()
