"""Seconds from `ansible-playbook deploy-app.yml` to the app's first answer, median of 5 runs.

    .venv/bin/python bench/bench_deploy.py [--runs 5] [--slowest 12] [--against REV]     (as root: the gateway)

Brings up the simulated default (demo.yml: the KMS, Pebble and BIND9, the gateway and the VMM) in a
temporary root with its own ports, gateway interface and namespace (a running `make demo` keeps its own), builds
the sample image, then deploys examples/hello N times (removing the CVM between runs) and prints,
as medians:
- deploy-app.yml to the app's first answer through the gateway
  (https://<app-id>.dstack.localhost:<port>/ under the gateway's tls/ca.crt, the root of the stack's
  Pebble, polled every 0.1 s once the VMM reports the CVM's boot done), and to its first answer on
  its host port (polled from the start);
- deploy-app.yml's whole run (it returns once the app answered through the gateway and passed
  dstack.tee.verify_app);
- the CVM's boot (VMM "started" event to the guest's "running" report: measurement, attested key
  release, env, gateway registration, containers), and the rest (Ansible, module round trips,
  quote verification);
- the time per Ansible task (bench/callback_plugins/task_times.py; each task from its start to the
  next one's, so they add up to the run), the slowest first, and ansible-playbook's start-up
  before its first task.
The reference, in the same run: the bare `podman run` of the same image to its first answer, with
no CVM, no KMS, no attestation. With --against REV, each run also deploys with the playbooks, roles
and plugins of git revision REV (exported under the temporary root), right after this checkout's,
so that both see the same load; the services (KMS, gateway, VMM, guest agent) are this checkout's.
"""

import argparse
import hashlib
import json
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

from ansible_collections.dstack.tee.plugins.module_utils.compose_runner import CONTAINERS_CONF
from ansible_collections.dstack.tee.plugins.module_utils import gateway_http, wireguard
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BASE = "dstack.localhost"
POLL = 0.1


def free_port(kind=socket.SOCK_STREAM):
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1" if kind == socket.SOCK_STREAM else "0.0.0.0", 0))
        return sock.getsockname()[1]


def free_tcp_udp_port():
    """A loopback port free for both TCP and UDP (BIND9 answers on both)."""
    while True:
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def http_answers(url):
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def gateway_answers(url, context):
    try:
        return gateway_http.fetch(url, context=context, timeout=1, max_bytes=None).status == 200
    except DstackError:
        return False


def booted(port):
    """Whether the app's CVM reported its boot done (registered with the gateway by then). The
    gateway is asked only from then on: it remembers an unknown name for its router's ttl (2 s), so
    asking before the registration would delay the answer being timed."""
    try:
        return any(vm["boot_progress"] == "running" for vm in vmm(port, "Status", {"brief": True})["vms"])
    except (OSError, DstackError):
        return False


def first_answer(answers, deadline):
    while time.time() < deadline:
        if answers():
            return time.time()
        time.sleep(POLL)
    return None


class Watch(threading.Thread):
    """Polls a URL from now on, every POLL s, and keeps the time of its first answer."""

    def __init__(self, answers, timeout):
        super().__init__(daemon=True)
        self.answers, self.deadline, self.answered = answers, time.time() + timeout, None
        self.start()

    def run(self):
        self.answered = first_answer(self.answers, self.deadline)


def vmm(port, method, body=None):
    from ansible_collections.dstack.tee.plugins.module_utils.vmm_client import VmmClient  # pylint: disable=import-outside-toplevel
    return VmmClient(f"http://127.0.0.1:{port}").call(method, body or {})


def playbook(name, extra, times=None, collection=None):
    """ansible-playbook playbooks/<name> of this checkout, or of `collection` (an exported
    ansible_collections/dstack/tee, found first on the collections path)."""
    # The caller's ANSIBLE_* settings apply (ANSIBLE_PIPELINING=1, say), to every run alike.
    env = {key: value for key, value in os.environ.items() if key.startswith("ANSIBLE_")}
    env.update({"ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "PATH": f"{BIN}:/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME": os.environ.get("HOME", "/root")})
    source = ROOT
    if collection:
        source = collection
        env["ANSIBLE_COLLECTIONS_PATH"] = str(collection.parents[2])
    if times:
        env.update(ANSIBLE_CALLBACK_PLUGINS=str(ROOT / "bench" / "callback_plugins"),
                   ANSIBLE_CALLBACKS_ENABLED="task_times", DSTACK_BENCH_TASK_TIMES=str(times))
    proc = subprocess.run([str(BIN / "ansible-playbook"), str(source / "playbooks" / name), *extra], cwd=ROOT,
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}")
    return proc.stdout


def export(rev, root):
    """The collection's deploy side (playbooks, roles, plugins) at git revision rev, under root."""
    target = root / "against" / "ansible_collections" / "dstack" / "tee"
    target.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "galaxy.yml", "meta", "playbooks", "roles",
                              "plugins"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def bare_podman(port, conf):
    """The same image, run by podman with the same settings as a CVM's runner, to its first answer."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CONTAINERS_CONF": str(conf)}
    start = time.time()
    name = f"bench-bare-{port}"
    subprocess.run(["podman", "run", "-d", "--rm", "--name", name, "-p", f"127.0.0.1:{port}:80",
                    "localhost/dstack-hello:latest"], capture_output=True, check=True, env=env)
    try:
        answered = first_answer(lambda: http_answers(f"http://127.0.0.1:{port}/"), time.time() + 60)
        if answered is None:
            raise RuntimeError(f"the bare podman run on port {port} did not answer in 60 s")
        return answered - start
    finally:
        subprocess.run(["podman", "rm", "-f", name], capture_output=True, check=False, env=env)


def remove_vms(port):
    for vm in vmm(port, "Status")["vms"]:
        vmm(port, "RemoveVm", {"id": vm["id"]})


def gateway_admin(root, port, method, body=None):
    """The gateway's Admin API (its token; its RA-TLS certificate under the KMS root)."""
    context = ssl.create_default_context(cafile=str(root / "gateway" / "kms-root-ca.crt"))
    context.check_hostname = False  # an RA-TLS certificate names the app, not 127.0.0.1
    token = (root / "gateway" / "admin-token").read_text().strip()
    request = urllib.request.Request(f"https://127.0.0.1:{port}/prpc/Admin.{method}", data=json.dumps(body or {}).encode(),
                                     method="POST", headers={"Content-Type": "application/json",
                                                             "Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, context=context, timeout=10) as response:
        return json.loads(response.read())


def unregister(root, port, app_id):
    """Remove the app's instances from the gateway. The VMM's RemoveVm does not tell the gateway, and
    a removed CVM stays registered until the recycler drops it; the data plane tries the freshest
    handshakes first, and a new CVM has none until traffic flows, so stale instances would shadow
    the next run's CVM and the bench would time the recycler instead of the deploy."""
    hosts = gateway_admin(root, port, "Status")["hosts"]
    for host in hosts:
        if host["app_id"] == app_id:
            gateway_admin(root, port, "RemoveInstance", {"id": host["instance_id"]})


def stack(root):
    """Ports, names and the extra vars of a stack of our own beside anything already running."""
    ports = {"kms": free_port(), "vmm": free_port(), "app": free_port(), "rpc": free_port(), "admin": free_port(),
             "proxy": free_port(), "wg": free_port(socket.SOCK_DGRAM), "acme": free_port(),
             "acme_management": free_port(), "dns": free_tcp_udp_port()}
    names = {"interface": f"bdg{os.getpid() % 100000}", "netns": f"dstack-bench-gw-{os.getpid()}"}
    app = root / "hello"
    shutil.copytree(ROOT / "examples" / "hello", app)
    (app / "app.yml").write_text((app / "app.yml").read_text().replace("host_port: 8080", f"host_port: {ports['app']}"))
    extra = ["-e", json.dumps({
        "dstack_root": str(root), "app_dir": str(app),
        "dstack_kms_listen": f"127.0.0.1:{ports['kms']}", "dstack_kms_url": f"https://127.0.0.1:{ports['kms']}",
        "dstack_vmm_listen": f"127.0.0.1:{ports['vmm']}", "dstack_vmm_url": f"http://127.0.0.1:{ports['vmm']}",
        "dstack_gateway_rpc_listen": f"127.0.0.1:{ports['rpc']}", "dstack_gateway_admin_listen": f"127.0.0.1:{ports['admin']}",
        "dstack_gateway_proxy_listen_addr": "127.0.0.1", "dstack_gateway_proxy_listen_port": ports["proxy"],
        "dstack_gateway_wg_listen_port": ports["wg"], "dstack_gateway_wg_interface": names["interface"],
        "dstack_gateway_wg_netns": names["netns"],
        # The gateway's certificate from the stack's own Pebble and BIND9 (dstack.tee.acme_lab).
        "dstack_acme_lab_pebble_listen": f"127.0.0.1:{ports['acme']}",
        "dstack_acme_lab_pebble_management_listen": f"127.0.0.1:{ports['acme_management']}",
        "dstack_acme_lab_dns_listen": f"127.0.0.1:{ports['dns']}"})]
    return ports, names, extra


def task_report(runs, slowest):
    """The median seconds of each task over the runs, slowest first (tasks keyed by order and name)."""
    per_task = defaultdict(list)
    for tasks in runs:
        for pos, task in enumerate(tasks):
            per_task[(pos, task["name"], task["action"])].append(task["seconds"])
    rows = sorted(((statistics.median(s), pos, name, action) for (pos, name, action), s in per_task.items()),
                  reverse=True)
    total = sum(row[0] for row in rows)
    lines = [f"time per task (median of {len(runs)}; {len(rows)} tasks, {total:.1f} s in all), the slowest {slowest}:"]
    lines += [f"  {seconds:6.2f} s  {name}  [{action}]" for seconds, _pos, name, action in rows[:slowest]]
    return "\n".join(lines)


class Deploy:
    """One stack's deploy-app.yml runs, timed."""

    def __init__(self, root, ports, extra):
        self.root, self.ports, self.extra = root, ports, extra
        self.context = gateway_http.ssl_context(str(root / "gateway" / "tls" / "ca.crt"))
        self.host_url = f"http://127.0.0.1:{ports['app']}/"
        # The same compose each run, so the same app_id: the one demo.yml deployed.
        self.app_id = hashlib.sha256((root / "build" / "hello" / "app-compose.json").read_bytes()).hexdigest()[:40]
        self.gateway_url = f"https://{self.app_id}.{BASE}:{ports['proxy']}/"
        self.count = 0

    def run(self, collection=None):
        """A fresh CVM deployed: the figures of this run, and its tasks."""
        self.count += 1
        remove_vms(self.ports["vmm"])
        unregister(self.root, self.ports["admin"], self.app_id)
        times = self.root / f"task-times-{self.count}.json"
        start = time.time()
        host_watch = Watch(lambda: http_answers(self.host_url), 300)
        gateway_watch = Watch(lambda: booted(self.ports["vmm"]) and gateway_answers(self.gateway_url, self.context), 300)
        output = playbook("deploy-app.yml", self.extra, times, collection)
        done = time.time()
        host_watch.join()
        gateway_watch.join()
        if gateway_watch.answered is None or host_watch.answered is None:
            raise RuntimeError(f"the app did not answer (gateway {gateway_watch.answered}, host port {host_watch.answered})")
        if f"url:            {self.gateway_url}" not in output:
            raise RuntimeError(f"deploy-app.yml did not print {self.gateway_url}:\n{output[-3000:]}")
        vm = vmm(self.ports["vmm"], "Status")["vms"][0]
        events = vmm(self.ports["vmm"], "GetInfo", {"id": vm["id"]})["info"]["events"]
        started = next(e["timestamp_ms"] for e in events if e["event"] == "started") / 1000
        running = next(e["timestamp_ms"] for e in events if e["body"] == "running") / 1000
        recorded = json.loads(times.read_text())
        # Each boot stage from the event before it (the process start, then each progress report).
        stages, last = {}, started
        for event in events:
            if event["event"] == "boot.progress" and event["timestamp_ms"] / 1000 >= started:
                stage = event["body"].split(" ", 1)[0].rstrip(":")
                stages[f"boot stage {stage}"] = event["timestamp_ms"] / 1000 - last
                last = event["timestamp_ms"] / 1000
        figures = {**stages, "gateway": gateway_watch.answered - start, "host": host_watch.answered - start,
                   "playbook": done - start, "boot": running - started, "startup": recorded["tasks"][0]["start"] - start}
        return figures, recorded["tasks"]


def summary(label, results, tasks, bare, slowest):
    med = {key: statistics.median(values) for key, values in results.items()}
    runs = len(results["playbook"])
    return (f"{label}: median of {runs}:\n"
            f"  deploy-app.yml to the first answer through the gateway {med['gateway']:.2f} s"
            f" (on the host port {med['host']:.2f} s)\n"
            f"  deploy-app.yml done (answered through the gateway, checked with verify_app) {med['playbook']:.2f} s"
            f" = CVM boot {med['boot']:.2f} s + Ansible and the rest {med['playbook'] - med['boot']:.2f} s"
            f" (ansible-playbook start-up before its first task {med['startup']:.2f} s)\n"
            f"  ratio first answer through the gateway / bare podman run {med['gateway'] / bare:.1f}x\n"
            f"  the CVM boot's stages (each from the report before it; the first from the VMM's start):\n    "
            + ", ".join(f"{key.split()[-1]} {value:.2f} s" for key, value in med.items() if key.startswith("boot stage "))
            + "\n" + task_report(tasks, slowest))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--slowest", type=int, default=12, help="how many of the slowest tasks to print")
    parser.add_argument("--against", metavar="REV", help="also run deploy-app.yml and the collection of this git "
                        "revision, alternating with this checkout's, and print both")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bd-", dir="/tmp"))
    ports, names, extra = stack(root)
    conf = root / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    variants = [("this checkout", None)]
    try:
        if args.against:
            rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.against], capture_output=True,
                                 text=True, check=True).stdout.strip()
            variants.append((f"revision {rev}", export(args.against, root)))
        print(f"setting up the simulated default in {root} (demo.yml: KMS, Pebble and BIND9, gateway, VMM, the sample image)...",
              flush=True)
        playbook("demo.yml", extra)
        deploy = Deploy(root, ports, extra)
        results = {label: defaultdict(list) for label, _source in variants}
        tasks = {label: [] for label, _source in variants}
        bares = []
        for run in range(1, args.runs + 1):
            for label, collection in variants:
                figures, run_tasks = deploy.run(collection)
                for key, value in figures.items():
                    results[label][key].append(value)
                tasks[label].append(run_tasks)
                print(f"  run {run}, {label}: first answer through the gateway {figures['gateway']:5.2f} s, on the host "
                      f"port {figures['host']:5.2f} s; deploy-app.yml done {figures['playbook']:5.2f} s (CVM boot "
                      f"{figures['boot']:4.2f} s, ansible-playbook start-up {figures['startup']:4.2f} s); load average "
                      f"{os.getloadavg()[0]:.1f}", flush=True)
            bares.append(bare_podman(free_port(), conf))
            print(f"  run {run}: bare podman run {bares[-1]:4.2f} s", flush=True)
        bare = statistics.median(bares)
        print(f"app {deploy.app_id}; bare podman run to first answer: median {bare:.2f} s")
        for label, _source in variants:
            print(summary(label, results[label], tasks[label], bare, args.slowest))
        print(f"(on {os.cpu_count()} cores, load average over the last 5 minutes {os.getloadavg()[1]:.1f}: other work "
              "on the machine shows in every figure)")
    finally:
        try:
            remove_vms(ports["vmm"])
        except (OSError, DstackError):
            pass
        for supervisord in (root / "run" / "supervisor" / "supervisord.conf", root / "services" / "supervisord.conf"):
            if supervisord.exists():
                subprocess.run([str(BIN / "supervisorctl"), "-c", str(supervisord), "shutdown"], capture_output=True,
                               check=False)
        try:
            wireguard.netns_remove(names["netns"])
        except (OSError, DstackError) as exc:
            print(f"could not remove the namespace {names['netns']}: {exc}", file=sys.stderr)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
