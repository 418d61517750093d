"""The guest agent's container-output follower (agents/guest/container_logs.py) against real podman
containers started by the real ComposeRunner: every line of every service's container on the
console, once, with docker compose's prefix, from before the follower started, as it comes, and
across a container's restart; stop() leaves no engine process behind.
"""

import os
import subprocess
import threading
import time

import pytest

from ansible_collections.dstack.tee.agents.guest import container_logs
from ansible_collections.dstack.tee.plugins.module_utils.compose_runner import ComposeRunner
from ansible_collections.dstack.tee.plugins.module_utils import service_log
from conftest import IMAGE, needs_podman

COMPOSE = f"""services:
  web:
    image: {IMAGE}
    command: ["/bin/sh", "-c", "echo web says hello; echo web complains >&2; while [ ! -e /go ]; do sleep 0.1; done; echo web got the go; sleep 600"]
  worker-two:
    image: {IMAGE}
    command: ["/bin/sh", "-c", "echo worker-two run; echo worker-two done"]
"""


class Console:
    """A binary stream the follower writes to, as the agent's stdout; written from several threads."""

    def __init__(self):
        self.data = b""
        self.lock = threading.Lock()

    def write(self, data):
        with self.lock:
            self.data += data

    def flush(self):
        pass

    def lines(self):
        with self.lock:
            return self.data.decode().splitlines()

    def wait_for(self, line, count=1, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.lines().count(line) >= count:
                return
            time.sleep(0.1)
        raise AssertionError(f"no {line!r} (x{count}) on the console; it has: {self.lines()}")


@pytest.fixture
def app(tmp_path, busybox_image):  # pylint: disable=unused-argument
    runner = ComposeRunner(f"dstack-clog-{os.getpid()}", str(tmp_path / "work"), engine="podman")
    os.makedirs(runner.work_dir, exist_ok=True)
    runner.up(COMPOSE, {}, {})
    yield runner
    runner.down()


def _podman(runner, *args):
    return subprocess.run(["podman", *args], capture_output=True, text=True, check=True, timeout=120,
                          env=runner._env({}))  # pylint: disable=protected-access


def _logs_processes(following):
    return [f.proc for f in following._followers.values() if f.proc.poll() is None]  # pylint: disable=protected-access


@needs_podman
def test_every_containers_output_on_the_console_once_with_its_service(app):
    console = Console()
    # The prefix column as wide as the compose's longest service (read from the runner's compose file).
    following = container_logs.start_following(app, console, rescan_max=1.0)
    try:
        # What the containers printed before the follower started, stdout and stderr, prefixed as
        # docker compose prints it (padded to the longest service's name).
        console.wait_for("web-1         | web says hello")
        console.wait_for("web-1         | web complains")
        console.wait_for("worker-two-1  | worker-two done")
        assert "web-1         | web got the go" not in console.lines()
        # What comes later arrives as it comes.
        _podman(app, "exec", f"{app.project}_web_1", "sh", "-c", "echo > /go")
        console.wait_for("web-1         | web got the go")
        # A container that exited and runs again: its new run's lines, and not its first run's again.
        _podman(app, "start", f"{app.project}_worker-two_1")
        console.wait_for("worker-two-1  | worker-two done", count=2)
        time.sleep(2)  # a re-follow from the start would print the first run's lines again
        lines = console.lines()
        assert lines.count("worker-two-1  | worker-two run") == 2
        assert lines.count("web-1         | web says hello") == 1
        assert {service_log.service_of(line.encode()) for line in lines} == {"web", "worker-two"}
        assert not any(line.startswith("20") or "Z web" in line for line in lines)  # the timestamps are off
        # worker-two exited again: its follower ends (`podman logs -f` sees the exit; on a loaded
        # machine some seconds later), web's runs on.
        deadline = time.monotonic() + 30
        while following.following() != [f"{app.project}_web_1"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert following.following() == [f"{app.project}_web_1"]
    finally:
        following.stop()
    assert _logs_processes(following) == []
    assert not following._watcher.is_alive()  # pylint: disable=protected-access


@needs_podman
def test_stop_ends_the_followers_of_running_containers(app):
    console = Console()
    following = container_logs.start_following(app, console, services=["web"])
    console.wait_for("web-1  | web says hello")
    assert _logs_processes(following)
    started = time.monotonic()
    following.stop()
    assert time.monotonic() - started < 10
    assert _logs_processes(following) == []
    # Nothing is written once stopped.
    before = console.lines()
    _podman(app, "exec", f"{app.project}_web_1", "sh", "-c", "echo > /go")
    time.sleep(1)
    assert console.lines() == before


def test_the_engine_none_follows_nothing():
    class NoEngine:
        engine, project = "none", "p"

        def ps(self):
            raise AssertionError("a runner with no engine is not asked")

    following = container_logs.start_following(NoEngine(), Console())
    following.stop()
    assert following.following() == []


@pytest.mark.parametrize("container, label", [
    ("proj_web_1", "web-1"),           # podman-compose
    ("proj-web-2", "web-2"),           # docker compose
    ("proj_my-db_10", "my-db-10"),
    ("other_web_1", "other_web_1"),    # not this project's: its own name
    ("proj_web", "proj_web"),
])
def test_a_containers_console_name(container, label):
    class Runner:
        engine, project = "podman", "proj"
    assert container_logs.ContainerLogs(Runner(), Console()).label_of(container) == label


@pytest.mark.parametrize("line, key, text", [
    (b"2026-11-30T07:19:10.100976747Z hello\n", (1796023150, 100976747), b"hello\n"),
    (b"2026-11-30T07:19:10.1Z hello\n", (1796023150, 100000000), b"hello\n"),
    (b"2026-11-30T07:19:10Z hello\n", (1796023150, 0), b"hello\n"),
    (b"2026-11-30T08:19:10.5+01:00 hello\n", (1796023150, 500000000), b"hello\n"),
    (b"no stamp here\n", None, b"no stamp here\n"),
    (b"2026-13-30T07:19:10Z bad month\n", None, b"2026-13-30T07:19:10Z bad month\n"),
])
def test_timestamps_are_read_and_taken_off(line, key, text):
    assert container_logs._split_stamp(line) == (key, text)  # pylint: disable=protected-access


def test_lines_of_one_timestamp_are_not_lost_when_a_follower_ends_between_them():
    """conmon stamps what it read at once with one timestamp (`echo run; echo done` gives two lines
    of one nanosecond), and an engine's follow may end as its container exits, between the two.
    The follow again asks for what came from that nanosecond on and skips only the line printed:
    "done" is printed, once; nothing is printed twice. (A scripted engine: the real one's ending
    between the two lines cannot be made to happen on demand.)"""
    stamp = "2026-11-30T20:19:27.921335553Z"
    outputs = [f"{stamp} run\n",                                          # ended after the first
               f"{stamp} run\n{stamp} done\n",                           # both, from --since on
               f"{stamp} run\n{stamp} done\n2026-11-30T20:19:28Z again\n"]  # and a later run's line
    calls = []

    class ScriptedEngine:
        engine, project = "podman", "proj"

        def ps(self):
            return [("proj_worker_1", "Exited (0) 1 second ago")]

        def logs_command(self, container, timestamps=False, since=None, follow=False):
            assert (container, timestamps, follow) == ("proj_worker_1", True, True)
            calls.append(since)
            return ["printf", "%s", outputs[min(len(calls), len(outputs)) - 1]], dict(os.environ)

    console = Console()
    following = container_logs.start_following(ScriptedEngine(), console, services=["worker"],
                                               rescan=0.05, rescan_max=0.1)
    try:
        console.wait_for("worker-1  | again")
        time.sleep(0.5)  # more follows again, each given the same lines: none printed twice
    finally:
        following.stop()
    assert console.lines() == ["worker-1  | run", "worker-1  | done", "worker-1  | again"]
    assert calls[:3] == [None, "2026-11-30T20:19:27.921335552Z", "2026-11-30T20:19:27.921335552Z"]
    assert calls[3] == "2026-11-30T20:19:27.999999999Z"  # one nanosecond before 20:19:28


def test_since_is_one_nanosecond_before_across_a_second():
    assert container_logs._Printed((1796023150, 0), 1).before() == "2026-11-30T07:19:09.999999999Z"  # pylint: disable=protected-access
