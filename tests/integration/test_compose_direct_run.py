"""ComposeRunner's own start of a plain compose (compose_direct) against real podman: after prepare()
on a fresh project the containers are started by `podman run` (no podman-compose config hash on
them), with their environment, mounts, ports and depends_on order, and ps, logs and down (which is
podman-compose's) find them; a project that already has containers (the CVM booted again), and a
compose beyond the subset, go through podman-compose as before."""

import json
import os
import subprocess
import time
import urllib.request

from ansible_collections.dstack.tee.plugins.module_utils.compose_runner import ComposeRunner
from conftest import IMAGE, free_port, needs_podman

CONFIG_HASH = "io.podman.compose.config-hash"


def compose(port):
    return f"""
services:
  web:
    image: {IMAGE}
    restart: unless-stopped
    depends_on: [store]
    ports:
      - "127.0.0.1:{port}:8000"
    environment:
      GREETING: ${{GREETING}}
      PLAIN: "$$literal"
    volumes:
      - /var/run/dstack.sock:/var/run/dstack.sock
    command: ["/bin/sh", "-c", "mkdir -p /www && echo \\"$$GREETING\\" > /www/index.html && exec httpd -f -p 8000 -h /www"]
  store:
    image: {IMAGE}
    command: ["/bin/sh", "-c", "echo store up; sleep 600"]
"""


def inspect(runner, name):
    proc = subprocess.run(["podman", "container", "inspect", name], capture_output=True, text=True, check=True,
                          timeout=60, env=runner._env({}))  # pylint: disable=protected-access
    return json.loads(proc.stdout)[0]


def answer(port, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                return response.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def boot(runner, text, env, sock):
    runner.prepare(text)
    runner.up(text, env, {"dstack": str(sock)})


@needs_podman
def test_a_fresh_project_is_started_by_podman_run_and_a_second_boot_by_podman_compose(tmp_path, busybox_image):  # pylint: disable=unused-argument
    project = f"dstack-direct-{free_port()}"
    work = tmp_path / "work"
    work.mkdir()
    sock = tmp_path / "dstack.sock"
    sock.touch()
    port = free_port()
    text = compose(port)
    runner = ComposeRunner(project, str(work), engine="podman")
    try:
        boot(runner, text, {"GREETING": "hello from the env"}, sock)
        assert answer(port).strip() == "hello from the env"
        web, store = inspect(runner, f"{project}_web_1"), inspect(runner, f"{project}_store_1")
        for container in (web, store):
            labels = container["Config"]["Labels"]
            assert CONFIG_HASH not in labels, "podman-compose made it: the direct start was not taken"
            assert labels["io.podman.compose.project"] == project
            assert labels["com.docker.compose.project.working_dir"] == str(work)
        assert "GREETING=hello from the env" in web["Config"]["Env"] and "PLAIN=$literal" in web["Config"]["Env"]
        assert {(m["Source"], m["Destination"]) for m in web["Mounts"]} == {(str(sock), "/var/run/dstack.sock")}
        assert web["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
        assert list(web["NetworkSettings"]["Networks"]) == [f"{project}_default"]
        assert web["NetworkSettings"]["Networks"][f"{project}_default"]["Aliases"][:1] == ["web"] or \
            "web" in web["NetworkSettings"]["Networks"][f"{project}_default"]["Aliases"]
        # depends_on: the store was started first, and web requires it.
        assert store["State"]["StartedAt"] <= web["State"]["StartedAt"]
        assert sorted(name for name, _status in runner.ps()) == [f"{project}_store_1", f"{project}_web_1"]
        assert "store up" in runner.logs("store")

        # The CVM booted again with its containers still there: podman-compose decides (it recreates
        # them, having no config hash of its own on them).
        again = ComposeRunner(project, str(work), engine="podman")
        boot(again, text, {"GREETING": "second boot"}, sock)
        assert answer(port).strip() == "second boot"
        assert CONFIG_HASH in inspect(again, f"{project}_web_1")["Config"]["Labels"]
    finally:
        runner.down()
    left = subprocess.run(["podman", "ps", "-aq", "--filter", f"label=io.podman.compose.project={project}"],
                          capture_output=True, text=True, check=True, timeout=60, env=runner._env({}))  # pylint: disable=protected-access
    assert left.stdout.strip() == ""
    networks = subprocess.run(["podman", "network", "ls", "--format", "{{.Name}}"], capture_output=True, text=True,
                              check=True, timeout=60, env=runner._env({}))  # pylint: disable=protected-access
    assert f"{project}_default" not in networks.stdout.split()


@needs_podman
def test_a_compose_beyond_the_subset_is_started_by_podman_compose(tmp_path, busybox_image):  # pylint: disable=unused-argument
    project = f"dstack-direct-{free_port()}"
    work = tmp_path / "work"
    work.mkdir()
    text = f"""
services:
  job:
    image: {IMAGE}
    command: ["/bin/sh", "-c", "sleep 600"]
    stop_signal: SIGKILL
"""
    runner = ComposeRunner(project, str(work), engine="podman")
    try:
        boot(runner, text, {}, tmp_path / "none.sock")
        assert CONFIG_HASH in inspect(runner, f"{project}_job_1")["Config"]["Labels"]
    finally:
        runner.down()
    assert not os.path.exists(work / "podman-networks")
