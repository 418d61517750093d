"""The guest agent's public Worker API (port 8090) and, with --netns, the CVM's ports.

The app over a real simulated CVM (dstack-guest-agent simulate's), through Flask's test client;
then `dstack-guest-agent run --netns` as a real process on a namespace made as the VMM's process
backend makes it (a veth `eth0` with a /30, the default route to the host): the Worker answers
inside the namespace only, its quotes verify under the simulated root, a `--port` mapping reaches a
server in the namespace, and SIGTERM leaves nothing behind. Namespaces need root and `ip netns`.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

# pylint: disable=wrong-import-position
from conftest import eventually, free_port, needs_podman  # noqa: E402
from test_gateway_serve import needs_ip_netns  # noqa: E402
from ansible_collections.dstack.tee.agents.guest import netns_ports  # noqa: E402
from ansible_collections.dstack.tee.agents.guest.api import create_app  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.compose_runner import ComposeRunner  # noqa: E402
from ansible_collections.dstack.tee.agents.guest.cli import SIM_VM_CONFIG, simulated_cvm  # noqa: E402
from ansible_collections.dstack.tee.agents.guest.worker import WORKER_PORT, create_worker_app  # noqa: E402
from ansible_collections.dstack.tee.agents.vmm.backends.base import VmRecord  # noqa: E402
from ansible_collections.dstack.tee.agents.vmm.backends.process import ProcessBackend  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils import app_compose as compose  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils import attestation, tdx_quote  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx  # noqa: E402

AGENT = [sys.executable, "-m", "ansible_collections.dstack.tee.agents.guest.cli"]


@pytest.fixture(scope="module")
def cvm(tmp_path_factory):
    """(context, summary) of a simulated CVM, booted (measured, keys written)."""
    return simulated_cvm(str(tmp_path_factory.mktemp("worker") / "cvm"))


@pytest.fixture
def worker(cvm):
    return create_worker_app(cvm[0]).test_client()


def _verified(ctx, answer, nonce):
    """The Attest answer's quote verified under the simulated root, with its event log."""
    result = attestation.verify_quote(bytes.fromhex(answer["quote"]), ctx.provider.collateral(), ctx.provider.root_ca_der,
                                      event_log=answer["event_log"])
    assert result.ok, [(c.name, c.detail) for c in result.checks if not c.ok]
    expected = attestation.worker_report_data(nonce)
    assert tdx_quote.parse_quote(bytes.fromhex(answer["quote"])).report.report_data == expected
    assert answer["report_data"] == expected.hex()
    return result


def test_attest_quotes_a_hash_of_the_callers_nonce_with_the_event_log(cvm, worker):
    ctx, summary = cvm
    nonce = os.urandom(32)
    answer = worker.post("/prpc/Worker.Attest", json={"nonce": nonce.hex()})
    assert answer.status_code == 200, answer.json
    assert sorted(answer.json) == ["event_log", "quote", "report_data", "vm_config"]
    result = _verified(ctx, answer.json, nonce)
    assert result.boot_info["app_id"] == summary["app_id"] and result.boot_info["compose_hash"] == summary["compose_hash"]
    # The event log is GetQuote's (a JSON string of the runtime events), and so is vm_config.
    assert json.loads(answer.json["event_log"]) == ctx.event_log() and answer.json["vm_config"] == ctx.vm_config()
    names = [entry["event"] for entry in json.loads(answer.json["event_log"])]
    assert names[:3] == ["system-preparing", "app-id", "compose-hash"] and names[-1] == "system-ready"
    # The report_data is never the nonce itself: the caller cannot pick another use's report_data.
    assert not answer.json["report_data"].startswith(nonce.hex())


@pytest.mark.parametrize("body, reason", [
    ({}, "must not be empty"),
    ({"nonce": "zz" * 16}, "is not hex"),
    ({"nonce": "00" * 15}, "must be 16 to 64 bytes"),
    ({"nonce": "00" * 65}, "must be 16 to 64 bytes"),
    ({"nonce": 1234567890}, "must be a hex string"),
])
def test_a_bad_nonce_is_a_400_naming_it(worker, body, reason):
    answer = worker.post("/prpc/Worker.Attest", json=body)
    assert answer.status_code == 400 and answer.json["error"].startswith("nonce: ") and reason in answer.json["error"]


def test_info_is_the_socket_apis_with_the_tcb_info_only_when_public(tmp_path):
    ctx, summary = simulated_cvm(str(tmp_path / "cvm"))
    public = create_worker_app(ctx).test_client().post("/prpc/Worker.Info").json
    socket_info = create_app(ctx).test_client().post("/Info").json
    assert sorted(public) == sorted(socket_info)
    for name in ("app_id", "instance_id", "app_name", "compose_hash", "device_id", "mr_aggregated", "os_image_hash",
                 "key_provider_info"):
        assert public[name] == socket_info[name], name
    assert public["app_id"] == summary["app_id"] and public["app_name"] == "dstack-sim-app"
    assert public["app_cert"].startswith("-----BEGIN CERTIFICATE-----")
    assert ctx.app_compose()["public_tcbinfo"] is True
    assert json.loads(public["tcb_info"])["compose_hash"] == summary["compose_hash"] and public["vm_config"]

    # public_tcbinfo false (or missing): tcb_info and vm_config are empty, as dstack's Worker.Info.
    app = json.loads(ctx.app_compose_bytes())
    for value in (False, None):
        if value is None:
            del app["public_tcbinfo"]
        else:
            app["public_tcbinfo"] = value
        Path(ctx.paths.app_compose).write_bytes(compose.render(app))
        hidden = create_worker_app(ctx).test_client().get("/prpc/Worker.Info").json
        assert hidden["tcb_info"] == "" and hidden["vm_config"] == "", value
        assert hidden["app_id"] == summary["app_id"] and hidden["compose_hash"] == summary["compose_hash"]


def test_metrics_only_when_public_sysinfo(tmp_path):
    """dstack's /metrics: the system info in Prometheus text, only with app-compose's public_sysinfo."""
    ctx, _summary = simulated_cvm(str(tmp_path / "cvm"))
    app = json.loads(ctx.app_compose_bytes())
    for value in (None, False):
        app.pop("public_sysinfo", None)
        if value is not None:
            app["public_sysinfo"] = value
        Path(ctx.paths.app_compose).write_bytes(compose.render(app))
        hidden = create_worker_app(ctx).test_client().get("/metrics")
        assert hidden.status_code == 404 and "public_sysinfo" in hidden.json["error"], value
    app["public_sysinfo"] = True
    Path(ctx.paths.app_compose).write_bytes(compose.render(app))
    shown = create_worker_app(ctx).test_client().get("/metrics")
    assert shown.status_code == 200 and shown.mimetype == "text/plain"
    samples = dict(line.rsplit(" ", 1) for line in shown.get_data(as_text=True).splitlines()
                   if line and not line.startswith("#"))
    assert int(samples["system_num_cpus"]) == os.cpu_count()
    mem_total = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemTotal:"))
    assert int(samples["system_memory_total"]) == mem_total
    assert float(samples["system_uptime"]) > 0
    assert any(name.startswith('disk_total_size{name="/", mount_point="/"}') for name in samples)
    assert any(name.startswith("system_kernel_version{") for name in samples)


def test_version_the_index_and_nothing_else(cvm, worker):
    ctx, summary = cvm
    assert worker.get("/prpc/Worker.Version").json == worker.post("/prpc/Worker.Version").json == \
        create_app(ctx).test_client().post("/Version").json
    index = worker.get("/").json
    assert index["app_id"] == summary["app_id"] and "/prpc/Worker.Attest" in index["routes"]
    # The socket API's methods (keys, certificates, raw quotes, events) are not here.
    for path in ("/GetKey", "/GetQuote", "/GetTlsKey", "/Sign", "/EmitEvent", "/Info", "/prpc/Tappd.DeriveKey",
                 "/prpc/Tappd.RawQuote", "/prpc/Worker.GetAttestationForAppKey"):
        answer = worker.post(path, json={"path": "x", "report_data": "00"})
        assert answer.status_code == 404 and "error" in answer.json, path
    assert worker.get("/prpc/Worker.Attest").status_code == 405
    # Logs only when app-compose's public_logs is true (this app's is not set).
    assert worker.get("/logs/app").status_code == 404 and "public_logs" in worker.get("/logs/app").json["error"]
    assert worker.post("/prpc/Worker.Info", data="[1]").status_code == 400
    assert worker.post("/prpc/Worker.Attest", data="0" * 100_000).status_code == 413


def test_no_key_material_in_any_answer(cvm, worker):
    ctx, _summary = cvm
    keys = ctx.app_keys()
    secrets = [keys[name] for name in ("k256_key", "disk_crypt_key", "env_crypt_key") if keys.get(name)]
    assert secrets
    texts = [worker.post("/prpc/Worker.Info").get_data(as_text=True), worker.get("/").get_data(as_text=True),
             worker.post("/prpc/Worker.Attest", json={"nonce": "ab" * 32}).get_data(as_text=True)]
    for text in texts:
        assert "PRIVATE KEY" not in text
        assert not any(secret in text for secret in secrets)


# ---- dstack-guest-agent run --netns: the Worker in the namespace, the port map into it ----------

def _share(folder, public_tcbinfo=True):
    """A config share for a CVM without a KMS (key provider none) whose workload is started by no
    engine (--engine none): the boot measures it, the test runs the server in the namespace."""
    share = folder / "share"
    share.mkdir(parents=True)
    app = compose.build("services:\n  app:\n    image: busybox\n", "worker-test", key_provider="none",
                        public_tcbinfo=public_tcbinfo)
    (share / "app-compose.json").write_bytes(compose.render(app))
    (share / ".sys-config.json").write_text(json.dumps({"vm_config": json.dumps(SIM_VM_CONFIG)}))
    return share


@contextlib.contextmanager
def _cvm_namespace(tmp_path):
    """A namespace as the VMM's process backend makes it (eth0 with a /30, routed to the host)."""
    backend = ProcessBackend(str(tmp_path / "vmm"), str(tmp_path / "sim"), cvm_netns=True)
    vm = VmRecord(str(uuid.uuid4()), str(tmp_path / "vm"), {"port_map": []})
    try:
        backend._ensure_netns(vm)  # pylint: disable=protected-access
        yield backend.netns(vm)
    finally:
        backend._remove_netns(vm)  # pylint: disable=protected-access


def _run_agent(tmp_path, netns, *extra, engine="none"):
    share = tmp_path / "share" if (tmp_path / "share").exists() else _share(tmp_path)
    argv = [*AGENT, "run", "--config-dir", str(share), "--work-dir", str(tmp_path / "work"), "--tee", "sim",
            "--sim-state", str(tmp_path / "sim"), "--socket", str(tmp_path / "dstack.sock"), "--tappd-socket", "",
            "--engine", engine, "--netns", netns, *extra]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,  # pylint: disable=consider-using-with
                            start_new_session=True)


def _wait_booted(tmp_path, proc, timeout=90):
    deadline = time.monotonic() + timeout
    state = tmp_path / "work" / "boot.json"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the agent exited ({proc.returncode}):\n{proc.stderr.read()}")
        if state.exists() and json.loads(state.read_text()).get("done"):
            return
        time.sleep(0.2)
    raise AssertionError("the CVM did not boot")


# A pRPC call made from inside the namespace: prints [status, body].
CALL = r"""
import json, sys, urllib.error, urllib.request
url, body = sys.argv[1], sys.argv[2]
request = urllib.request.Request(url, data=body.encode() if body else None, method="POST" if body else "GET",
                                 headers={"Content-Type": "application/json"})
for attempt in range(50):
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            print(json.dumps([response.status, json.loads(response.read())]))
    except urllib.error.HTTPError as exc:
        print(json.dumps([exc.code, json.loads(exc.read())]))
    except OSError:
        import time; time.sleep(0.2); continue
    break
"""

# A server in the namespace: reads to EOF (the client's half-close), answers, closes.
UPPER = r"""
import socket, sys
server = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    conn, peer = server.accept()
    with conn:
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        conn.sendall(data.upper() + f" from {peer[0]}".encode())
"""


def attest_verified(netns, sim_state_dir, **where):
    """Worker.Attest with a fresh nonce in the namespace (_call_in's address/port), its quote
    verified under the simulated platform in sim_state_dir and carrying the nonce's report_data:
    (the verification result, the answer)."""
    nonce = os.urandom(24)
    status, answer = _call_in(netns, "prpc/Worker.Attest", {"nonce": nonce.hex()}, **where)
    assert status == 200, answer
    sim = SimTdx(str(sim_state_dir))
    result = attestation.verify_quote(bytes.fromhex(answer["quote"]), sim.collateral(), sim.root_ca_der,
                                      event_log=answer["event_log"])
    assert result.ok, [(c.name, c.detail) for c in result.checks if not c.ok]
    assert result.quote.report.report_data == attestation.worker_report_data(nonce)
    return result, answer


def _call_in(netns, method, body=None, address="127.0.0.1", port=WORKER_PORT):
    done = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", CALL,
                           f"http://{address}:{port}/{method}", json.dumps(body) if body is not None else ""],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout, done.stderr
    return json.loads(done.stdout)


GET_TEXT = r"""
import json, sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=30) as response:
        print(json.dumps([response.status, response.read().decode()]))
except urllib.error.HTTPError as exc:
    print(json.dumps([exc.code, exc.read().decode()]))
"""


def _get_in(netns, path, port=WORKER_PORT):
    """GET http://127.0.0.1:<port>/<path> from inside the namespace: (status, text)."""
    done = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", GET_TEXT, f"http://127.0.0.1:{port}/{path}"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout, done.stderr
    return tuple(json.loads(done.stdout))


def _refused(address, port):
    with pytest.raises(OSError):
        socket.create_connection((address, port), timeout=3).close()


def _descendants(pid):
    """Every process under pid (from /proc), so that none may outlive the agent."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@needs_ip_netns
def test_run_serves_the_worker_in_the_namespace_and_forwards_the_port_map(tmp_path):
    with contextlib.ExitStack() as cleanup:
        netns = cleanup.enter_context(_cvm_namespace(tmp_path))
        cvm_ip = netns_ports.cvm_address(netns)
        server = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", UPPER, "8080"],  # pylint: disable=consider-using-with
                                  stdout=subprocess.PIPE, text=True)
        cleanup.callback(server.wait)
        cleanup.callback(server.kill)
        assert server.stdout.readline().strip() == "ready"
        host_port = free_port()
        agent = _run_agent(tmp_path, netns, "--port", f"8080=127.0.0.1:{host_port}")
        cleanup.callback(lambda: agent.poll() is None and os.killpg(agent.pid, signal.SIGKILL))
        _wait_booted(tmp_path, agent)
        instance = json.loads((tmp_path / "work" / "instance.json").read_text())

        # Inside the namespace: Info, Version, Attest on 8090.
        status, info = _call_in(netns, "prpc/Worker.Info", {})
        assert status == 200 and info["app_id"] == instance["app_id"] and info["instance_id"] == instance["instance_id"]
        assert info["app_name"] == "worker-test" and json.loads(info["tcb_info"])["mrtd"]
        status, version = _call_in(netns, "prpc/Worker.Version")
        assert status == 200 and version["rev"] == "dstack.tee"
        result, answer = attest_verified(netns, tmp_path / "sim", address=cvm_ip)
        assert result.boot_info["instance_id"] == instance["instance_id"]
        assert json.loads(answer["event_log"])[-1]["event"] == "system-ready"
        status, error = _call_in(netns, "prpc/Worker.Attest", {"nonce": "xyz"})
        assert status == 400 and error["error"].startswith("nonce: ")
        assert _call_in(netns, "GetKey", {"path": "x"})[0] == 404

        # Not from the host: nothing on the host's 8090 is ours, and the CVM's eth0 (which the host
        # routes to) refuses it; the same socket answers inside the namespace on that very address.
        assert not any(p in _descendants(agent.pid) for p in _listeners_on(WORKER_PORT))
        _refused(cvm_ip, WORKER_PORT)

        # The port map: the host port reaches the server in the namespace; the half-close travels.
        with socket.create_connection(("127.0.0.1", host_port), timeout=10) as conn:
            conn.sendall(b"through the forwarder " * 1000)
            conn.shutdown(socket.SHUT_WR)
            received = b""
            while chunk := conn.recv(65536):
                received += chunk
        assert received == b"THROUGH THE FORWARDER " * 1000 + f" from {_host_side(netns)}".encode()

        # SIGTERM: the agent, its two gunicorns and their workers go; the ports close.
        processes = _descendants(agent.pid)
        assert len(processes) >= 4, processes   # serve and serve-worker, each a master and a worker
        os.killpg(agent.pid, signal.SIGTERM)
        assert agent.wait(timeout=60) == 0, agent.stderr.read()
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in processes):
            assert time.monotonic() < deadline, [p for p in processes if _alive(p)]
            time.sleep(0.1)
        _refused("127.0.0.1", host_port)
        inside = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c",
                                 f"import socket; socket.create_connection(('127.0.0.1', {WORKER_PORT}), timeout=3)"],
                                capture_output=True, text=True, timeout=30, check=False)
        assert inside.returncode != 0 and "ConnectionRefused" in inside.stderr


def _listeners_on(port):
    """pids of the processes listening on TCP `port` in this (the host's) namespace."""
    done = subprocess.run(["ss", "-Htlnp", f"sport = :{port}"], capture_output=True, text=True, check=False)
    return [int(word.split("pid=")[1].split(",")[0]) for word in done.stdout.split("users:")[1:]
            if "pid=" in word]


def _host_side(netns):
    """The host's address on the CVM's veth (the default route of the namespace)."""
    routes = subprocess.run(["ip", "-n", netns, "-4", "route", "show", "default"], capture_output=True, text=True,
                            check=True).stdout
    return routes.split()[2]


@needs_ip_netns
def test_a_host_port_in_use_fails_the_run_naming_port_before_anything_starts(tmp_path):
    with contextlib.ExitStack() as cleanup:
        netns = cleanup.enter_context(_cvm_namespace(tmp_path))
        taken = cleanup.enter_context(socket.create_server(("127.0.0.1", 0)))
        agent = _run_agent(tmp_path, netns, "--port", f"8080=127.0.0.1:{taken.getsockname()[1]}")
        cleanup.callback(lambda: agent.poll() is None and os.killpg(agent.pid, signal.SIGKILL))
        _out, err = agent.communicate(timeout=60)
        assert agent.returncode == 2 and "--port: cannot listen on 127.0.0.1:" in err and "in use" in err, err
        assert not (tmp_path / "work" / "boot.json").exists()      # no boot began
        inside = subprocess.run(["ip", "netns", "exec", netns, "ss", "-Htln"], capture_output=True, text=True,
                                check=True).stdout
        assert f":{WORKER_PORT} " not in inside                     # and the Worker's socket was let go
        for bad in (["--port", "70000=127.0.0.1:8080"], ["--port", "8080=127.0.0.1:x"], ["--worker-port", "0"]):
            refused = _run_agent(tmp_path, netns, *bad)
            _out, err = refused.communicate(timeout=60)
            assert refused.returncode == 2 and f"{bad[0]}" in err and "Traceback" not in err, err
        for bad in ("8080=localhost:80", "8080=127.0.0.1:0", "8080=127.0.0.1:x"):
            with pytest.raises(DstackError) as exc:
                netns_ports.parse_host_port(bad.split("=")[1])
            assert exc.value.field == "--port"


def test_a_socket_api_that_cannot_listen_fails_the_boot_naming_it(tmp_path):
    """run forks the socket API and boots beside its start: a socket API that dies before it listens
    fails the boot at the containers (which mount its socket), naming it; the path is left alone."""
    share = _share(tmp_path)
    taken = tmp_path / "dstack.sock"
    taken.write_text("not a socket")
    done = subprocess.run([*AGENT, "run", "--config-dir", str(share), "--work-dir", str(tmp_path / "work"), "--tee", "sim",
                           "--sim-state", str(tmp_path / "sim"), "--socket", str(taken), "--tappd-socket", "",
                           "--engine", "none"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    assert "exists and is not a socket" in done.stderr                    # the child's own error
    assert "containers: serve: the socket API exited (code 2) before listening" in done.stderr, done.stderr
    assert taken.read_text() == "not a socket"
    assert json.loads((tmp_path / "work" / "boot.json").read_text())["stage"] == "containers"


@needs_podman
@needs_ip_netns
def test_the_port_map_reaches_a_container_published_in_the_namespace(tmp_path, busybox_image):
    """The real case: the app's container (podman, in the CVM's namespace) publishes CVM port 8080;
    the VM's port map brings a host port to it, as dstack's port forward brings one to a VM."""
    share = tmp_path / "share"
    share.mkdir()
    app = compose.build(f"""services:
  web:
    image: {busybox_image}
    command: ["/bin/sh", "-c", "echo started-in-the-cvm && mkdir -p /w && echo in-the-cvm > /w/i && exec httpd -f -p 80 -h /w"]
    ports:
      - "8080:80"
""", "worker-podman", key_provider="none", public_logs=True)
    (share / "app-compose.json").write_bytes(compose.render(app))
    (share / ".sys-config.json").write_text(json.dumps({"vm_config": json.dumps(SIM_VM_CONFIG)}))
    with contextlib.ExitStack() as cleanup:
        netns = cleanup.enter_context(_cvm_namespace(tmp_path))
        host_port = free_port()
        project = f"dstack-wk{os.getpid()}"
        cleanup.callback(ComposeRunner(project, str(tmp_path / "work"), engine="podman", netns=netns).down)  # after a failure
        agent = _run_agent(tmp_path, netns, "--port", f"8080=127.0.0.1:{host_port}", "--project", project, engine="podman")
        cleanup.callback(lambda: agent.poll() is None and os.killpg(agent.pid, signal.SIGKILL))
        _wait_booted(tmp_path, agent, timeout=300)

        def fetch():
            with urllib.request.urlopen(f"http://127.0.0.1:{host_port}/i", timeout=5) as response:
                return response.read()

        assert eventually(fetch, 30, interval=0.3) == b"in-the-cvm\n"
        # public_logs: the Worker serves the container's log, by service name, and nothing of another's.
        status, text = _get_in(netns, "logs/web?tail=5")
        assert status == 200 and "started-in-the-cvm" in text, (status, text)
        assert _get_in(netns, "logs/not-ours")[0] == 404
        assert _get_in(netns, "logs/web?tail=0")[0] == 400
        os.killpg(agent.pid, signal.SIGTERM)
        assert agent.wait(timeout=120) == 0, agent.stderr.read()
        _refused("127.0.0.1", host_port)
        # The container's own output on the agent's console (what the VMM's /logs shows), prefixed
        # with its compose name as docker compose prints it.
        assert "web-1  | started-in-the-cvm" in agent.stdout.read()


def test_a_process_forked_from_run_cannot_stop_its_apis():
    """pyroute2 forks helpers from `run` (into network namespaces) and stops them with SIGTERM: such a
    copy holds the APIs' pidfds and run's SIGTERM handler, and must not stop the APIs with them."""
    from ansible_collections.dstack.tee.agents.guest.cli import _Child  # pylint: disable=import-outside-toplevel
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)  # pylint: disable=protected-access
    child = _Child("serve", pid)
    try:
        copy = os.fork()
        if copy == 0:
            child.terminate()
            os._exit(0)  # pylint: disable=protected-access
        os.waitpid(copy, 0)
        assert child.wait(0.5) is None                  # still serving
        child.terminate()
        assert child.wait(10) == -signal.SIGTERM        # run itself stops it
    finally:
        child.kill()


def _child_ignoring_sigterm(times):
    """A _Child (as run forks its APIs) that ignores its first `times` SIGTERMs (None: every one)."""
    from ansible_collections.dstack.tee.agents.guest.cli import _Child  # pylint: disable=import-outside-toplevel
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        seen = []

        def ignore(signum, frame):  # pylint: disable=unused-argument
            seen.append(signum)
            if times is not None and len(seen) > times:
                os._exit(0)  # pylint: disable=protected-access

        signal.signal(signal.SIGTERM, ignore)
        os.write(ready_w, b".")
        while True:
            time.sleep(60)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"."
    os.close(ready_r)
    return _Child("serve", pid)


def test_run_stops_an_api_that_misses_a_sigterm_and_kills_one_that_ignores_them():
    """A stop is bounded: a gunicorn arbiter was seen leaving run's one SIGTERM unhandled (the CVM's
    stop hung until supervisord's kill); run repeats it each second, and SIGKILLs after STOP_GRACE."""
    from ansible_collections.dstack.tee.agents.guest.cli import _stop  # pylint: disable=import-outside-toplevel
    misses_one, ignores_all = _child_ignoring_sigterm(1), _child_ignoring_sigterm(None)
    try:
        _stop({"serve": misses_one, "worker": ignores_all}, grace=3)
        assert misses_one.returncode == 0                   # it stopped by itself, on the second SIGTERM
        assert ignores_all.returncode == -signal.SIGKILL    # killed once the grace was over
    finally:
        misses_one.kill()
        ignores_all.kill()
