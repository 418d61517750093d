"""Issue 11, the VMM's findings, each replayed as it was found against a real `dstack-vmm serve`
(process backend, loopback, no token: the default) and now refused:

3. a web page drives or reads the VMM (GET with query parameters, a text/plain POST, a DNS
   rebinding Host, a cross-site Origin / Sec-Fetch-Site);
5. /logs followers stall the VMM (Status and the guests' host API stop answering);
8. bad field types are 500s (host_address as int or list, Status page "abc", /logs lines "abc");
9. unchecked inputs (host_address 0.0.0.0 on a loopback VMM, a UDP port in use, a 10,000
   character name, vcpu 10^9, memory 10^12) are accepted though GetMeta advertises limits.
"""

import http.client
import json
import socket
import subprocess
import sys
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))  # VmmProcess

# pylint: disable=wrong-import-position
from ansible_collections.dstack.tee.plugins.module_utils import app_compose as compose  # noqa: E402
from conftest import free_port  # noqa: E402
from test_vmm import BIN, VmmProcess  # noqa: E402

COMPOSE_TEXT = compose.render(compose.build("services: {web: {image: busybox}}\n", "sec-test")).decode()


class Vmm(VmmProcess):
    """A VMM with no KMS and no token, and raw HTTP to it: the requests a browser would make."""

    def request(self, method, path, body=None, headers=None, timeout=10):
        """(status, parsed JSON or raw bytes) of one request; Host is the VMM's own unless given."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers={"Host": f"127.0.0.1:{self.port}", **(headers or {})})
            answer = conn.getresponse()
            data = answer.read()
        finally:
            conn.close()
        try:
            return answer.status, json.loads(data)
        except ValueError:
            return answer.status, data

    def call(self, method, params=None, headers=None, timeout=10):
        """A JSON POST as the VMM's own page sends it (same origin)."""
        return self.request("POST", f"/prpc/Vmm.{method}", json.dumps(params or {}),
                            {"Content-Type": "application/json", "Origin": f"http://127.0.0.1:{self.port}",
                             "Sec-Fetch-Site": "same-origin", **(headers or {})}, timeout)

    def vm_dirs(self):
        return sorted(p.name for p in self.run_path.iterdir() if p.name not in ("supervisor", "tdx-sim"))

    def create(self, **fields):
        status, answer = self.call("CreateVm", {"name": "sec", "compose_file": COMPOSE_TEXT, "stopped": True, **fields})
        assert status == 200, answer
        return answer["id"]


def _start(short_tmp, *flags):
    vmm = Vmm(short_tmp / "run", None, free_port(), extra_args=flags).start()
    return vmm


def _stop(vmm, short_tmp):
    try:
        for vm in vmm.call("Status")[1].get("vms", []):
            vmm.call("RemoveVm", {"id": vm["id"]})
    finally:
        vmm.stop()
        subprocess.run([str(BIN / "supervisorctl"), "-c", str(short_tmp / "run" / "supervisor" / "supervisord.conf"),
                        "shutdown"], capture_output=True, check=False)


@pytest.fixture
def vmm(short_tmp):
    server = _start(short_tmp)
    yield server
    _stop(server, short_tmp)


# ---- 3: the VMM obeys a web page ------------------------------------------------------------------

def test_finding_3_a_web_page_can_neither_create_a_vm_nor_read_the_list(vmm):
    config = {"name": "from-a-page", "compose_file": COMPOSE_TEXT, "stopped": "true"}

    # <img src="http://127.0.0.1:9080/prpc/Vmm.CreateVm?name=...&compose_file=...">
    status, answer = vmm.request("GET", "/prpc/Vmm.CreateVm?" + urllib.parse.urlencode(config))
    assert status == 405 and "only POST" in answer["error"]
    # The same from a current browser, which says where it comes from.
    status, _answer = vmm.request("GET", "/prpc/Vmm.CreateVm?" + urllib.parse.urlencode(config),
                                  headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Dest": "image"})
    assert status in (403, 405)
    # A text/plain POST (a <form enctype="text/plain"> or fetch with mode no-cors: no preflight).
    status, answer = vmm.request("POST", "/prpc/Vmm.CreateVm", json.dumps(config), {"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in answer["error"]
    status, _answer = vmm.request("POST", "/prpc/Vmm.CreateVm", urllib.parse.urlencode(config),
                                  {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 415
    assert vmm.vm_dirs() == []

    # A DNS-rebinding name (evil.example resolving to 127.0.0.1) reads nothing.
    vm_id = vmm.create()
    status, answer = vmm.call("Status", headers={"Host": f"rebind.example:{vmm.port}",
                                                 "Origin": f"http://rebind.example:{vmm.port}"})
    assert status == 403 and "rebind.example" in answer["error"] and vm_id not in json.dumps(answer)
    status, answer = vmm.request("POST", "/prpc/Vmm.Status", "{}",
                                 {"Host": f"rebind.example:{vmm.port}", "Content-Type": "application/json"})
    assert status == 403 and vm_id not in json.dumps(answer)
    # A cross-site page's JSON POST (the browser sends its Origin; the preflight is refused too).
    status, answer = vmm.call("Status", headers={"Origin": "http://evil.example"})
    assert status == 403 and "evil.example" in answer["error"]
    status, _answer = vmm.request("OPTIONS", "/prpc/Vmm.CreateVm", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert status == 403
    status, _answer = vmm.call("Status", headers={"Sec-Fetch-Site": "cross-site", "Origin": "null"})
    assert status == 403
    status, answer = vmm.request("POST", "/prpc/Vmm.Status", "{}",
                                 {"Content-Type": "application/json", "Sec-Fetch-Site": "cross-site"})
    assert status == 403 and "cross-site" in answer["error"]
    # Another port on the same host is another origin (a CVM's app on 127.0.0.1:8080, say).
    status, _answer = vmm.call("Status", headers={"Origin": "http://127.0.0.1:8080", "Sec-Fetch-Site": "same-site"})
    assert status == 403
    # /logs is a reading call like the others.
    status, _answer = vmm.request("GET", f"/logs?id={vm_id}&ch=stdout")
    assert status == 405
    status, _answer = vmm.request("POST", "/logs", json.dumps({"id": vm_id}), {"Content-Type": "text/plain"})
    assert status == 415

    # The VMM's own page (same origin, JSON) and a client with no browser headers still work.
    status, answer = vmm.call("Status")
    assert status == 200 and [vm["id"] for vm in answer["vms"]] == [vm_id]
    status, answer = vmm.request("POST", "/prpc/Vmm.Status", "{}", {"Content-Type": "application/json"})
    assert status == 200 and answer["total"] == 1
    status, answer = vmm.request("POST", "/prpc/Vmm.Status", "{}",
                                 {"Host": f"localhost:{vmm.port}", "Content-Type": "application/json"})
    assert status == 200
    assert vmm.vm_dirs() == [vm_id]
    # The page itself loads from a link on another site (it holds no secret).
    status, page = vmm.request("GET", "/", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"})
    assert status == 200 and b"<html" in page


def test_finding_3_server_names_add_the_names_the_vmm_is_reached_by(short_tmp):
    vmm = _start(short_tmp, "--server-name", "vmm.example.org")
    try:
        for host, origin in ((f"vmm.example.org:{vmm.port}", f"http://vmm.example.org:{vmm.port}"),
                             ("vmm.example.org", "https://vmm.example.org")):  # behind a reverse proxy
            status, answer = vmm.call("Status", headers={"Host": host, "Origin": origin})
            assert status == 200, answer
        status, _answer = vmm.call("Status", headers={"Host": f"other.example.org:{vmm.port}"})
        assert status == 403
    finally:
        _stop(vmm, short_tmp)


# ---- 5: log followers stall the VMM --------------------------------------------------------------

class Follower:
    """One `/logs` follow stream, held open."""

    def __init__(self, vmm, vm_id):
        self.conn = http.client.HTTPConnection("127.0.0.1", vmm.port, timeout=10)
        self.conn.request("POST", "/logs", json.dumps({"id": vm_id, "follow": True, "lines": 10}),
                          {"Content-Type": "application/json", "Host": f"127.0.0.1:{vmm.port}"})
        self.answer = self.conn.getresponse()
        self.status = self.answer.status

    def close(self):
        self.answer.close()
        self.conn.close()


def _timed(call):
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def test_finding_5_log_followers_do_not_stall_the_api_or_the_host_api(vmm):
    vm_id = vmm.create()
    log = vmm.run_path / vm_id / "stdout.log"
    log.write_text("first line\n")
    token = (vmm.run_path / vm_id / "host-api.token").read_text().strip()

    def notify():
        return vmm.request("POST", f"/host-api/{vm_id}/{token}/Notify",
                           json.dumps({"event": "boot.progress", "payload": "still here"}),
                           {"Content-Type": "application/json"}, timeout=5)

    # As found: 16 followers (the VMM's thread count). The first 8 (the default cap) follow, the
    # others are told so at once.
    with ThreadPoolExecutor(16) as pool:
        followers = list(pool.map(lambda _i: Follower(vmm, vm_id), range(16)))
    try:
        statuses = sorted(f.status for f in followers)
        assert statuses == [200] * 8 + [429] * 8, statuses
        refused = next(f for f in followers if f.status == 429)
        assert "max_log_followers" in json.loads(refused.answer.read())["error"]
        following = [f for f in followers if f.status == 200]
        assert following[0].answer.readline() == b"first line\n"

        # While they follow, Status and the guests' host API answer (within the request timeout).
        (status, _answer), _took = _timed(lambda: vmm.call("Status", timeout=5))
        assert status == 200
        (status, answer), _took = _timed(notify)
        assert status == 200, answer
        # ... and the followers get what the log gets.
        with log.open("a") as handle:
            handle.write("second line\n")
        assert following[0].answer.readline() == b"second line\n"
    finally:
        for follower in followers:
            follower.close()

    # The closed clients are noticed at once: their slots are free again within a few seconds
    # (not after a heartbeat a minute later).
    deadline = time.monotonic() + 5
    while True:
        again = [Follower(vmm, vm_id) for _i in range(8)]
        ok = all(f.status == 200 for f in again)
        for follower in again:
            follower.close()
        if ok:
            break
        assert time.monotonic() < deadline, "the closed followers still hold their slots"
        time.sleep(0.2)
    status, _answer = vmm.call("Status", timeout=5)
    assert status == 200


# ---- 8: bad field types were 500s -----------------------------------------------------------------

@pytest.mark.parametrize("host_address", [2130706433, ["127.0.0.1"], {"ip": "127.0.0.1"}])
def test_finding_8_host_address_of_a_wrong_type_is_a_400_naming_it(vmm, host_address):
    status, answer = vmm.call("CreateVm", {"name": "sec", "compose_file": COMPOSE_TEXT, "stopped": True, "ports": [
        {"host_port": free_port(), "vm_port": 80, "host_address": host_address}]})
    assert status == 400 and answer["error"].startswith("ports[0].host_address: must be an IP address string")
    assert vmm.vm_dirs() == []


def test_finding_8_status_page_and_logs_lines_of_a_wrong_type_are_400s(vmm):
    vm_id = vmm.create()
    (vmm.run_path / vm_id / "stdout.log").write_text("a\nb\nc\n")
    status, answer = vmm.call("Status", {"page": "abc", "page_size": 10})
    assert status == 400 and answer["error"].startswith("page: must be an integer")
    status, answer = vmm.call("Status", {"page": 1, "page_size": -1})
    assert status == 400 and answer["error"].startswith("page_size: must be 0 to")
    status, answer = vmm.call("Status", {"ids": "not-a-list"})
    assert status == 400 and answer["error"].startswith("ids:")
    headers = {"Content-Type": "application/json"}
    status, answer = vmm.request("POST", "/logs", json.dumps({"id": vm_id, "lines": "abc"}), headers)
    assert status == 400 and answer["error"].startswith("lines: must be an integer")
    status, answer = vmm.request("POST", "/logs", json.dumps({"id": vm_id, "follow": "yes"}), headers)
    assert status == 400 and answer["error"].startswith("follow: must be true or false")
    status, answer = vmm.request("POST", "/logs", json.dumps({"id": vm_id, "ch": ["stdout"]}), headers)
    assert status == 400 and answer["error"].startswith("ch:")
    status, text = vmm.request("POST", "/logs", json.dumps({"id": vm_id, "lines": 2}), headers)
    assert status == 200 and text == b"b\nc\n"
    status, _answer = vmm.request("GET", f"/logs?id={vm_id}&lines=abc")
    assert status == 405


def test_finding_8_deep_json_inside_a_string_field_is_a_400_too(vmm):
    """The request's own nesting is bounded by the parser (test_agents_json.py); JSON the VMM
    parses out of a field is bounded the same way."""
    status, answer = vmm.call("CreateVm", {"name": "sec", "compose_file": "[" * 100000, "stopped": True})
    assert status == 400 and answer["error"] == "compose_file: nests deeper than 64 levels of arrays and objects"
    assert vmm.vm_dirs() == []
    vm_id = vmm.create()
    token = (vmm.run_path / vm_id / "host-api.token").read_text().strip()
    status, answer = vmm.request("POST", f"/host-api/{vm_id}/{token}/Notify",
                                 json.dumps({"event": "instance.info", "payload": "[" * 4000}),
                                 {"Content-Type": "application/json"})
    assert status == 400 and answer["error"].startswith("payload: nests deeper than 64")


# ---- 9: unchecked VMM inputs ----------------------------------------------------------------------

@pytest.mark.parametrize("field, value, reason", [
    ("name", "n" * 10000, "name: is 10000 characters long; at most 64"),
    ("vcpu", 10 ** 9, "vcpu: must be 1 to 20 (this VMM's limit)"),
    ("memory", 10 ** 12, "memory: must be 1 to 100000 (this VMM's limit)"),
    ("disk_size", 10 ** 9, "disk_size: must be 1 to 1000"),
    ("ports", [{"host_port": 18000, "vm_port": 80, "host_address": "0.0.0.0"}],
     "ports[0].host_address: 0.0.0.0 is not an allowed host address"),
    ("ports", [{"host_port": 18000, "vm_port": 80, "host_address": "::"}],
     "ports[0].host_address: :: is not an allowed host address"),
    ("ports", [{"host_port": 18000, "vm_port": 80, "host_address": "localhost"}],
     "ports[0].host_address: 'localhost' is not an IP address"),
])
def test_finding_9_out_of_range_inputs_are_refused_naming_the_field(vmm, field, value, reason):
    status, answer = vmm.call("CreateVm", {"name": "sec", "compose_file": COMPOSE_TEXT, "stopped": True, field: value})
    assert status == 400 and answer["error"].startswith(reason), answer
    assert vmm.vm_dirs() == []


def test_finding_9_a_udp_port_in_use_is_refused(vmm):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        status, answer = vmm.call("CreateVm", {"name": "sec", "compose_file": COMPOSE_TEXT, "stopped": True,
                                               "ports": [{"protocol": "udp", "host_port": port, "vm_port": 53}]})
        assert status == 400 and answer["error"] == f"ports: host port {port}/udp on 127.0.0.1 is in use"
    assert vmm.vm_dirs() == []
    # Free, it is taken; then another CVM cannot have it, while TCP on the same number is another port.
    first = vmm.create(ports=[{"protocol": "udp", "host_port": port, "vm_port": 53}])
    status, answer = vmm.call("CreateVm", {"name": "sec2", "compose_file": COMPOSE_TEXT, "stopped": True,
                                           "ports": [{"protocol": "udp", "host_port": port, "vm_port": 53}]})
    assert status == 400 and answer["error"] == f"ports: host port {port}/udp is already taken by VM 'sec'"
    second = vmm.create(name="sec2", ports=[{"protocol": "tcp", "host_port": port, "vm_port": 80}])
    assert vmm.vm_dirs() == sorted([first, second])


def test_finding_9_the_limits_come_from_the_config_and_getmeta_names_them(short_tmp):
    vmm = _start(short_tmp, "--max-vcpu", "4", "--max-memory-mb", "2048", "--max-name-length", "8",
                 "--max-cvm-number", "2", "--allowed-host-address", "0.0.0.0")
    try:
        status, meta = vmm.call("GetMeta")
        assert status == 200
        assert meta["resources"] == {"max_cvm_number": 2, "max_allocable_vcpu": 4, "max_allocable_memory_in_mb": 2048,
                                     "max_disk_size_gb": 1000, "max_name_length": 8,
                                     "allowed_host_addresses": ["0.0.0.0"]}
        for field, value in (("vcpu", 5), ("memory", 2049), ("name", "ninechars")):
            status, answer = vmm.call("CreateVm", {"name": "sec", "compose_file": COMPOSE_TEXT, "stopped": True,
                                                   field: value})
            assert status == 400 and answer["error"].startswith(f"{field}:"), answer
        assert vmm.vm_dirs() == []
        # 0.0.0.0 allows IPv4 only: :: (every IPv6 address) stays refused.
        status, answer = vmm.call("CreateVm", {"name": "sec", "compose_file": COMPOSE_TEXT, "stopped": True, "ports": [
            {"host_port": free_port(), "vm_port": 80, "host_address": "::"}]})
        assert status == 400 and answer["error"].startswith("ports[0].host_address: :: is not an allowed host address")
        vmm.create(vcpu=4, memory=2048, name="eightchr",
                   ports=[{"host_port": free_port(), "vm_port": 80, "host_address": "0.0.0.0"}])
        vmm.create(name="second")
        status, answer = vmm.call("CreateVm", {"name": "third", "compose_file": COMPOSE_TEXT, "stopped": True})
        assert status == 400 and answer["error"].startswith("max_cvm_number:")
        assert len(vmm.vm_dirs()) == 2
    finally:
        _stop(vmm, short_tmp)


def test_the_limits_and_names_can_come_from_vmm_toml(short_tmp):
    config = short_tmp / "vmm.toml"
    config.write_text('max_allocable_vcpu = 2\nmax_log_followers = 1\nserver_names = ["vmm.example.org:443"]\n'
                      'allowed_host_addresses = ["127.0.0.1", "0.0.0.0"]\n')
    vmm = _start(short_tmp, "--config", str(config))
    try:
        # A browser at https://vmm.example.org/ (through a TLS proxy) leaves the default port out.
        meta = vmm.call("GetMeta", headers={"Host": "vmm.example.org", "Origin": "https://vmm.example.org"})[1]
        assert meta["resources"]["max_allocable_vcpu"] == 2
        assert meta["resources"]["allowed_host_addresses"] == ["127.0.0.1", "0.0.0.0"]
        status, answer = vmm.call("CreateVm", {"name": "sec", "compose_file": COMPOSE_TEXT, "stopped": True, "vcpu": 3})
        assert status == 400 and answer["error"].startswith("vcpu: must be 1 to 2")
        vm_id = vmm.create()
        (vmm.run_path / vm_id / "stdout.log").write_text("x\n")
        first, second = Follower(vmm, vm_id), Follower(vmm, vm_id)
        assert (first.status, second.status) == (200, 429)
        first.close()
        second.close()
    finally:
        _stop(vmm, short_tmp)


def test_bad_limits_in_the_config_stop_the_vmm_from_starting(short_tmp):
    proc = subprocess.run([str(BIN / "dstack-vmm"), "serve", "--run-path", str(short_tmp / "run"), "--listen",
                           f"127.0.0.1:{free_port()}", "--allowed-host-address", "not-an-ip"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and "allowed_host_addresses[0]: 'not-an-ip' is not an IP address" in proc.stderr
