"""The VMM's /logs and `dstack-vmm logs`, against a real `dstack-vmm serve` (process backend, no
KMS): a CVM's stdout holds its containers' lines as the guest agent writes them (`web-1  | ...`,
module_utils/service_log.py) beside other lines; `service` picks one service's, for the last
lines and while following; a rotated log is followed into its new file; the command finds the VM
by name or id and prints, follows, and refuses what it should.
"""

import http.client
import json
import os
import signal
import subprocess
import time

import pytest

from ansible_collections.dstack.tee.agents.vmm.app import _last_lines
from ansible_collections.dstack.tee.plugins.module_utils import app_compose as compose
from conftest import free_port
from test_vmm import BIN, VmmProcess

DOCKER_COMPOSE = "services:\n  web: {image: busybox}\n  db: {image: busybox}\n"
COMPOSE_TEXT = compose.render(compose.build(DOCKER_COMPOSE, "logs-test")).decode()
TOKEN = "logs-token"
STDOUT = (b"web-1  | web line 1\n"
          b"db-1   | db line 1\n"
          b"a line of the agent's own\n"
          b"web-1  | web line 2\n"
          b"web-2  | web line 3 (a second container of web)\n"
          b"db-1   | db line 2 | with a bar\n"
          b"webx-1 | another service\n")


class Vmm(VmmProcess):
    def post(self, path, body, token=TOKEN, timeout=10):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json",
                                                          "Authorization": f"Bearer {token}"})
            answer = conn.getresponse()
            data = answer.read()
        finally:
            conn.close()
        return answer.status, (json.loads(data) if answer.getheader("Content-Type", "").startswith("application/json")
                               else data)


@pytest.fixture
def vmm(short_tmp):
    server = Vmm(short_tmp / "run", None, free_port(), token=TOKEN).start()
    client = server.client()
    vm_id = client.call("CreateVm", {"name": "logs test", "compose_file": COMPOSE_TEXT, "stopped": True})["id"]
    server.vm_id = vm_id
    server.stdout = short_tmp / "run" / vm_id / "stdout.log"
    server.stdout.write_bytes(STDOUT)
    yield server
    try:
        client.call("RemoveVm", {"id": vm_id})
    finally:
        server.stop()
        subprocess.run([str(BIN / "supervisorctl"), "-c", str(short_tmp / "run" / "supervisor" / "supervisord.conf"),
                        "shutdown"], capture_output=True, check=False)


def test_the_last_lines_of_one_service(vmm):
    status, text = vmm.post("/logs", {"id": vmm.vm_id, "service": "web"})
    assert status == 200 and text == (b"web-1  | web line 1\nweb-1  | web line 2\n"
                                      b"web-2  | web line 3 (a second container of web)\n")
    status, text = vmm.post("/logs", {"id": vmm.vm_id, "service": "web", "lines": 1})
    assert text == b"web-2  | web line 3 (a second container of web)\n"
    status, text = vmm.post("/logs", {"id": vmm.vm_id, "service": "db", "lines": 5})
    assert text == b"db-1   | db line 1\ndb-1   | db line 2 | with a bar\n"
    # Without it, every line, as before; a service with no lines, none.
    assert vmm.post("/logs", {"id": vmm.vm_id, "lines": 3})[1] == STDOUT.split(b"\n", 4)[4]
    assert vmm.post("/logs", {"id": vmm.vm_id, "service": "cache"}) == (200, b"")
    # The compose's services are in GetInfo and Status (not in dstack's VmInfo), for the UI's choice.
    info = vmm.client().call("GetInfo", {"id": vmm.vm_id})["info"]
    assert info["services"] == ["db", "web"]
    assert vmm.client().call("Status")["vms"][0]["services"] == ["db", "web"]


@pytest.mark.parametrize("service", ["web 1", "../x", "w" * 65, 7, ["web"]])
def test_a_bad_service_is_a_400_naming_it(vmm, service):
    status, answer = vmm.post("/logs", {"id": vmm.vm_id, "service": service})
    assert status == 400 and answer["error"].startswith("service: must be a compose service name"), answer


def _follow(vmm, body):
    conn = http.client.HTTPConnection("127.0.0.1", vmm.port, timeout=10)
    conn.request("POST", "/logs", json.dumps({"id": vmm.vm_id, "follow": True, **body}),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    answer = conn.getresponse()
    assert answer.status == 200
    return conn, answer


def _append(path, data):
    with open(path, "ab") as handle:
        handle.write(data)


def test_following_one_service_gets_its_whole_new_lines_only(vmm):
    conn, answer = _follow(vmm, {"service": "db", "lines": 1})
    try:
        assert answer.readline() == b"db-1   | db line 2 | with a bar\n"
        _append(vmm.stdout, b"web-1  | not this\nagent: nor this\ndb-1   | db li")
        time.sleep(1)  # the partial line waits for its end
        _append(vmm.stdout, b"ne 3\nweb-1  | nor this\ndb-2   | db line 4\n")
        assert answer.readline() == b"db-1   | db line 3\n"
        assert answer.readline() == b"db-2   | db line 4\n"
    finally:
        conn.close()


def test_a_rotated_log_is_followed_into_its_new_file(vmm):
    conn, answer = _follow(vmm, {"lines": 1})
    try:
        assert answer.readline() == b"webx-1 | another service\n"
        # As supervisord rotates: the last lines into the old file, renamed, then a new file.
        _append(vmm.stdout, b"web-1  | last of the old file\n")
        os.rename(vmm.stdout, str(vmm.stdout) + ".1")
        vmm.stdout.write_bytes(b"web-1  | first of the new file\n")
        assert answer.readline() == b"web-1  | last of the old file\n"
        assert answer.readline() == b"web-1  | first of the new file\n"
        _append(vmm.stdout, b"web-1  | and on\n")
        assert answer.readline() == b"web-1  | and on\n"
    finally:
        conn.close()


def test_the_last_lines_of_a_big_log_across_blocks(tmp_path):
    """_last_lines reads the log from its end in blocks: the same lines as reading it whole."""
    lines = [(b"web-1  | " if n % 3 == 0 else b"db-1   | ") + str(n).encode() * (n % 50) + b"\n" for n in range(30000)]
    path = tmp_path / "stdout.log"
    path.write_bytes(b"".join(lines) + b"db-1   | no newline at the end")
    web = [line for line in lines if line.startswith(b"web-")]
    with open(path, "rb") as handle:
        for count in (1, 7, 500, 10000):
            assert _last_lines(handle, count, lambda line: line.startswith(b"web-"), block=4096) == b"".join(web[-count:])
            assert _last_lines(handle, count, block=4096) == b"".join(lines[len(lines) - (count - 1):]) + b"db-1   | no newline at the end"
        # At most `most` bytes are read back: a service whose lines are all further back has none.
        assert _last_lines(handle, 5, lambda line: line.startswith(b"nothing"), block=4096, most=64 * 1024) == b""


# ---- dstack-vmm logs ----------------------------------------------------------------------------

def _cli(vmm, *args, env=None, **kwargs):
    return subprocess.run([str(BIN / "dstack-vmm"), "logs", *args], capture_output=True, timeout=60, check=False,
                          env={"PATH": os.environ["PATH"], "DSTACK_VMM_URL": f"http://127.0.0.1:{vmm.port}",
                               "DSTACK_VMM_TOKEN": TOKEN, **(env or {})}, **kwargs)


def test_the_command_prints_a_vms_log_by_name_or_id(vmm):
    done = _cli(vmm, "logs test")
    assert done.returncode == 0 and done.stdout == STDOUT, done.stderr
    done = _cli(vmm, vmm.vm_id, "--service", "web", "-n", "2")
    assert done.stdout == b"web-1  | web line 2\nweb-2  | web line 3 (a second container of web)\n", done.stderr
    # The flags instead of the environment; the token from serve's DSTACK_VMM_TOKENS.
    done = _cli(vmm, "logs test", "--url", f"http://127.0.0.1:{vmm.port}", "--lines", "1",
                env={"DSTACK_VMM_URL": "http://127.0.0.1:1", "DSTACK_VMM_TOKEN": "", "DSTACK_VMM_TOKENS": f"{TOKEN},other"})
    assert done.returncode == 0 and done.stdout == b"webx-1 | another service\n", done.stderr


def test_the_command_follows_until_ctrl_c(vmm):
    proc = subprocess.Popen([str(BIN / "dstack-vmm"), "logs", "logs test", "-f", "--service", "db", "-n", "1"],  # pylint: disable=consider-using-with
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={"PATH": os.environ["PATH"], "DSTACK_VMM_URL": f"http://127.0.0.1:{vmm.port}",
                                 "DSTACK_VMM_TOKEN": TOKEN})
    try:
        assert proc.stdout.readline() == b"db-1   | db line 2 | with a bar\n"
        _append(vmm.stdout, b"web-1  | not this\ndb-1   | db line 3\n")
        assert proc.stdout.readline() == b"db-1   | db line 3\n"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 130
        proc.stdout.close()
        assert b"Traceback" not in proc.stderr.read()
        proc.stderr.close()


@pytest.mark.parametrize("args, env, exit_code, message", [
    (["no such vm"], {}, 2, "NAME: no VM named 'no such vm' (nor with that id) on the VMM at http://127.0.0.1:{port}; "
                            "its VMs: 'logs test'"),
    (["logs test"], {"DSTACK_VMM_TOKEN": "wrong"}, 2,
     "--token: the VMM at http://127.0.0.1:{port} wants a valid token (--token, or DSTACK_VMM_TOKEN)"),
    (["logs test", "--service", "web/1"], {}, 2, "--service: must be a compose service name"),
    (["logs test", "--lines", "0"], {}, 2, "is not a number of lines from 1 to 10000"),
    (["logs test", "--url", "http://127.0.0.1:1"], {}, 2, "--url: cannot reach the Vmm at http://127.0.0.1:1"),
])
def test_the_command_refuses_naming_the_reason(vmm, args, env, exit_code, message):
    done = _cli(vmm, *args, env=env)
    assert done.returncode == exit_code and message.format(port=vmm.port) in done.stderr.decode(), done.stderr
    assert done.stdout == b"" and b"Traceback" not in done.stderr
