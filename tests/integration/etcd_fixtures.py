"""A real etcd cluster for the tests: Debian's etcd (etcd-server), several members on loopback.

EtcdCluster(folder, members=3, client_host="127.0.0.1").start() runs each member as its own
`etcd` process (its data directory under `folder`, its log in <name>.log), peers on 127.0.0.1,
clients on `client_host` (an address another network namespace can reach, when the gateways
run in one), and waits until the cluster has a leader. kill(i) SIGKILLs a member (what a crash
does), start_member(i) starts it again on its data directory (it rejoins), stop() ends them all.

The fixture `etcd_cluster` gives a started three-member cluster per test module.
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

ETCD = shutil.which("etcd")
needs_etcd = pytest.mark.skipif(ETCD is None, reason="etcd is not installed (scripts/setup.sh installs etcd-server)")
START_TIMEOUT = 30.0


def _free_port(host):
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class EtcdCluster:
    """Several etcd members on this machine (see the module docstring)."""

    def __init__(self, folder, members=3, client_host="127.0.0.1", token=None):
        self.folder = folder
        self.client_host = client_host
        self.names = [f"m{i}" for i in range(members)]
        self.client_ports = [_free_port(client_host) for _name in self.names]
        self.peer_ports = [_free_port("127.0.0.1") for _name in self.names]
        self.token = token or f"dstack-test-{os.getpid()}-{time.time_ns()}"
        self.processes = [None] * members

    @property
    def endpoints(self):
        return [f"http://{self.client_host}:{port}" for port in self.client_ports]

    def _argv(self, i, state):
        cluster = ",".join(f"{n}=http://127.0.0.1:{p}" for n, p in zip(self.names, self.peer_ports))
        client = f"http://{self.client_host}:{self.client_ports[i]}"
        peer = f"http://127.0.0.1:{self.peer_ports[i]}"
        return [ETCD, "--name", self.names[i], "--data-dir", str(self.folder / self.names[i]),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", cluster, "--initial-cluster-state", state,
                "--initial-cluster-token", self.token,
                # Quick elections on a loaded machine without flapping: 100 ms beats, 1 s election.
                "--heartbeat-interval", "100", "--election-timeout", "1000"]

    def start_member(self, i, state="new"):
        if (self.folder / self.names[i]).exists():
            state = "existing"
        log = open(self.folder / f"{self.names[i]}.log", "ab")  # pylint: disable=consider-using-with
        with log:
            self.processes[i] = subprocess.Popen(self._argv(i, state), stdout=log, stderr=subprocess.STDOUT,  # pylint: disable=consider-using-with
                                                 start_new_session=True)

    def start(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        for i in range(len(self.names)):
            self.start_member(i)
        self.wait_healthy()
        return self

    def health(self, i):
        """Member i's /health: True when it answers with a leader."""
        try:
            with urllib.request.urlopen(f"{self.endpoints[i]}/health", timeout=2) as answer:
                return json.loads(answer.read()).get("health") == "true"
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def wait_healthy(self, members=None, timeout=START_TIMEOUT):
        members = range(len(self.names)) if members is None else members
        deadline = time.monotonic() + timeout
        for i in members:
            while not self.health(i):
                process = self.processes[i]
                if process is not None and process.poll() is not None:
                    raise AssertionError(f"etcd {self.names[i]} exited with {process.returncode}:\n{self.log(i)[-3000:]}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"etcd {self.names[i]} not healthy in {timeout:.0f} s:\n{self.log(i)[-3000:]}")
                time.sleep(0.1)

    def log(self, i):
        path = self.folder / f"{self.names[i]}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def leader(self):
        """The index of the member that leads now (its /v3/maintenance/status says so), or None."""
        for i, endpoint in enumerate(self.endpoints):
            if self.processes[i] is None or self.processes[i].poll() is not None:
                continue
            request = urllib.request.Request(f"{endpoint}/v3/maintenance/status", data=b"{}", method="POST")
            try:
                with urllib.request.urlopen(request, timeout=2) as answer:
                    status = json.loads(answer.read())
            except (OSError, ValueError):
                continue
            if status.get("leader") and status.get("leader") == status.get("header", {}).get("member_id"):
                return i
        return None

    def kill(self, i):
        """SIGKILL member i (a crash: no goodbye to the others)."""
        process = self.processes[i]
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def stop(self):
        for i, process in enumerate(self.processes):
            if process is not None and process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    self.kill(i)


@pytest.fixture(scope="module")
def etcd_cluster(tmp_path_factory):
    if ETCD is None:
        pytest.skip("etcd is not installed (scripts/setup.sh installs etcd-server)")
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()
