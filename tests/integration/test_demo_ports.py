"""The demo's port check (dstack.tee.ports_free, playbooks/demo.yml's first play) and make stop's bound.

Real processes and sockets: a python http.server or a bound UDP socket as another program, a real
supervisord (module_utils.supervisor) as the demo's own, a program that takes its time to stop.
The whole demo with non-default ports, and make stop after it, run in test_demo_playbook.py.
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT, free_port, run_module, stop_process_group
from ansible_collections.dstack.tee.plugins.module_utils.host_ports import port_free
from ansible_collections.dstack.tee.plugins.module_utils.supervisor import Supervisor, program_conf


@pytest.fixture
def root():
    folder = Path(tempfile.mkdtemp(prefix="dp-", dir="/tmp"))
    yield folder
    for sup in ("services", "run/supervisor"):
        Supervisor(folder / sup).shutdown()
    shutil.rmtree(folder, ignore_errors=True)


def _http_server(port):
    """python -m http.server on 127.0.0.1:port, in a session of its own, once it listens."""
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],  # pylint: disable=consider-using-with
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    for _attempt in range(100):
        if not port_free("tcp", "127.0.0.1", port):
            return server
        time.sleep(0.1)
    stop_process_group(server)
    raise AssertionError("http.server did not listen")


def test_a_port_another_process_holds_fails_naming_it_and_a_free_port_passes():
    port, free = free_port(), free_port()
    server = _http_server(port)
    try:
        result = run_module("ports_free", {"ports": [{"name": "FREE_PORT", "port": free, "address": "127.0.0.1"},
                                                     {"name": "VMM_PORT", "port": str(port), "address": "127.0.0.1"}]})
        assert result.get("failed") and result["field"] == "VMM_PORT", result
        assert result["msg"].startswith(f"VMM_PORT: port {port}/tcp on 127.0.0.1 is held by pid {server.pid} "
                                        f"({sys.executable} -m http.server {port} --bind 127.0.0.1)"), result["msg"]
        # Held on 127.0.0.1, it is in the way of a bind to every address too.
        wildcard = run_module("ports_free", {"ports": [{"name": "GATEWAY_RPC_PORT", "port": port}]})
        assert wildcard.get("failed") and f"pid {server.pid}" in wildcard["msg"], wildcard
        passed = run_module("ports_free", {"ports": [{"name": "FREE_PORT", "port": free, "address": "127.0.0.1"}]})
        assert not passed.get("failed") and passed["ports"][0]["free"] and not passed["changed"], passed
    finally:
        stop_process_group(server)


def test_a_udp_port_another_process_holds_is_named():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("0.0.0.0", 0))
        port = sock.getsockname()[1]
        result = run_module("ports_free", {"ports": [{"name": "GATEWAY_WG_PORT", "port": port, "protocol": "udp"}]})
        assert result.get("failed"), result
        # This test's own process holds it.
        assert f"port {port}/udp on 0.0.0.0 is held by pid {os.getpid()} (" in result["msg"], result["msg"]
    freed = run_module("ports_free", {"ports": [{"name": "GATEWAY_WG_PORT", "port": port, "protocol": "udp"}]})
    assert not freed.get("failed") and freed["ports"][0]["free"], freed


def test_a_port_held_under_the_given_supervisord_passes_and_names_it(root):
    port = free_port()
    services = Supervisor(root / "services")
    services.define("web", program_conf("web", f"{sys.executable} -m http.server {port} --bind 127.0.0.1", str(root),
                                        str(root / "web.out"), str(root / "web.err")))
    services.start("web", wait=True)
    for _attempt in range(100):
        if not port_free("tcp", "127.0.0.1", port):
            break
        time.sleep(0.1)
    ports = [{"name": "VMM_PORT", "port": port, "address": "127.0.0.1"}]
    ours = run_module("ports_free", {"ports": ports, "supervisors": [str(root / "services"), str(root / "run" / "supervisor")]})
    assert not ours.get("failed"), ours
    held = ours["ports"][0]
    assert not held["free"] and [h["supervisor"] for h in held["holders"]] == [str(root / "services")]
    # Another folder's supervisord is not this one: the same process is then another program.
    other = run_module("ports_free", {"ports": ports, "supervisors": [str(root / "elsewhere")]})
    assert other.get("failed") and f"-m http.server {port}" in other["msg"], other


@pytest.mark.parametrize("value", ["abc", "0", "65536", "-1"])
def test_a_port_that_is_not_a_port_number_is_named(value):
    result = run_module("ports_free", {"ports": [{"name": "VMM_PORT (dstack_vmm_listen)", "port": value}]})
    assert result.get("failed") and result["msg"] == \
        f"VMM_PORT (dstack_vmm_listen): {value!r} is not a port number (1 to 65535)", result


# A program that takes SLOW seconds to stop after SIGTERM (supervisord waits up to 30 s for it);
# its last argument names the root, as the demo's programs do.
SLOW = 4


def _slow_program(root):
    return (f"{sys.executable} -c \"import signal, time; got = []; "
            f"signal.signal(signal.SIGTERM, lambda *a: got.append(time.time())); "
            f"[time.sleep(0.1) for _ in iter(lambda: bool(got) and time.time() - got[0] > {SLOW}, True)]\" {root}")


def _processes_naming(text):
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def test_make_stop_says_what_still_stops_after_its_bound_and_make_demo_waits_for_it(root):
    services = Supervisor(root / "services")
    services.define("slow", program_conf("slow", _slow_program(root), str(root), str(root / "slow.out"), str(root / "slow.err"),
                                         stop_wait=30))
    services.start("slow", wait=True)
    slow = services.info("slow")["pid"]
    started = time.monotonic()
    stop = subprocess.run(["make", "--no-print-directory", "stop", f"DEMO_ROOT={root}", "STOP_TIMEOUT=1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert stop.returncode != 0 and time.monotonic() - started < SLOW, stop.stdout + stop.stderr
    assert "make stop: still stopping after 1 s:" in stop.stdout and f"pid {slow} (" in stop.stdout, stop.stdout
    assert Path(f"/proc/{slow}").exists()
    # make demo's first step: it returns once the stop that went on in the background is done.
    wait = subprocess.run([str(ROOT / "scripts" / "stop-demo.sh"), "--wait", str(root)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert wait.returncode == 0 and "waiting for the previous make stop" in wait.stdout, wait.stdout + wait.stderr
    assert not Path(f"/proc/{slow}").exists() and not _processes_naming(str(root))
    assert "finished in the background: everything under" in (root / "stop.log").read_text()
    # Nothing is left: a second stop says so at once.
    again = subprocess.run(["make", "--no-print-directory", "stop", f"DEMO_ROOT={root}"], cwd=ROOT, capture_output=True,
                           text=True, timeout=60, check=False)
    assert again.returncode == 0 and f"nothing of {root} was running" in again.stdout, again.stdout


def test_make_stop_returns_when_everything_is_down(root):
    services, cvms = Supervisor(root / "services"), Supervisor(root / "run" / "supervisor")
    for sup, name in ((cvms, "cvm-a"), (services, "vmm")):
        sup.define(name, program_conf(name, _slow_program(root), str(root), str(root / f"{name}.out"), str(root / f"{name}.err"),
                                      stop_wait=30))
        sup.start(name, wait=True)
    assert len(_processes_naming(str(root))) >= 4  # two supervisords and their programs
    stop = subprocess.run(["make", "--no-print-directory", "stop", f"DEMO_ROOT={root}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
    assert stop.returncode == 0 and f"everything under {root} is down (4 processes stopped)" in stop.stdout, stop.stdout
    assert not _processes_naming(str(root))
