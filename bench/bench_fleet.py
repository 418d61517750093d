"""Seconds to deploy many small apps on a simulated fleet, against one deploy alone in the same run.

    .venv/bin/python bench/bench_fleet.py [--hosts 10] [--apps 100] [--parallel 4] [--keep]     (as root)

Brings up a fleet of its own (scripts/sim-fleet.sh up HOSTS --private-podman, in a temporary folder
with a free fleet id: a developer's .fleet is not touched): host1 runs the KMS and the gateway,
host2..HOSTS a VMM each, every host its own podman store. Runs site.yml once, makes a busybox-static
image in the controller's podman store (no registry), and writes APPS app folders, each a busybox
httpd whose page names its app and container, with app.yml `hosts: [hostK]` so that the apps go
round-robin over the VMM hosts (100 apps on 9 VMM hosts: 11 or 12 each) and `images:` naming the
image (deploy-app.yml ships it to each VMM host that lacks it).

Then, with the playbooks (ansible-playbook deploy-app.yml over SSH from the fleet's inventory):
- alone, each timed from the start of deploy-app.yml to the app's answer at
  https://<app-id>.dstack.localhost:8443/ through the gateway: the first app, on host2 (its deploy
  also ships the image to host2 and the fleet's trust roots to the controller), then the
  reference, the next app on host2 (as most apps of the batch, it finds the image there);
- the batch: the other apps, PARALLEL ansible-playbook runs at a time, timed from the batch's start
  until every app answered through the gateway (each app's URL is polled once its run is done;
  the run itself already waited for its instance and checked its quote with verify_app).
It prints a line as each app answers, then the seconds until all answered, the seconds per app,
their ratio to the reference, and the median single deploy within the batch against the
reference (how much the load slows each run). At the end every app's URL is asked once more and
the KMS allowlist on host1 must list every app_id. The fleet is always taken down at the end (and
the image removed) unless --keep.

Concurrent runs edit the KMS's one allowlist: the allowlist module holds a lock file beside it for
each edit, and the bench checks at the end that no entry was lost.
"""

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import yaml

from ansible_collections.dstack.tee.plugins.module_utils.compose_runner import CONTAINERS_CONF
from ansible_collections.dstack.tee.plugins.module_utils import gateway_http
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SIM_FLEET = ROOT / "scripts" / "sim-fleet.sh"
IMAGE = "localhost/dstack-bench-busybox:latest"
# The page names the app and its container (the container's hostname is its short ID).
COMMAND = '["sh", "-c", "mkdir -p /www && echo \\"{name} from $$(cat /etc/hostname)\\" > /www/index.html && exec httpd -f -p 80 -h /www"]'
ANSWER_TIMEOUT = 120   # seconds for an app to answer at its URL once its deploy-app.yml is done


def log(line):
    print(line, flush=True)


def free_fleet_id():
    """A fleet id (200..254, away from the tests' 100..199 and the default 0) with no bridge or
    namespaces on this machine."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    for fleet_id in range(200, 255):
        if not os.path.exists(f"/sys/class/net/dstack-fleet{fleet_id}") and f"dstack-fleet{fleet_id}-" not in netns:
            return fleet_id
    raise RuntimeError("no free fleet id in 200..254")


def make_image(folder):
    """IMAGE in the controller's podman store: busybox-static as the root file system (as the tests'
    busybox_image fixture makes theirs; no registry here)."""
    rootfs = folder / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", rootfs / "bin" / "busybox")
    for applet in ("sh", "httpd", "mkdir", "cat"):
        os.symlink("busybox", rootfs / "bin" / applet)
    tar = folder / "rootfs.tar"
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tar), "."], check=True)
    conf = folder / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    subprocess.run(["podman", "import", "-q", str(tar), IMAGE], check=True, capture_output=True,
                   env=dict(os.environ, CONTAINERS_CONF=str(conf)))
    shutil.rmtree(rootfs)
    tar.unlink()


class Fleet:
    """scripts/sim-fleet.sh on a folder and id of its own."""

    def __init__(self, folder, fleet_id):
        self.dir, self.id = folder, fleet_id
        self.inventory = folder / "inventory.yml"

    def sim(self, *args, timeout=900):
        proc = subprocess.run([str(SIM_FLEET), "--dir", str(self.dir), "--id", str(self.id), *args],
                              capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"sim-fleet.sh {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc.stdout

    def groups(self):
        """{group: [host]} and {host: address} from the inventory sim-fleet.sh wrote."""
        doc = yaml.safe_load(self.inventory.read_text())["all"]
        addresses = {host: values["ansible_host"] for host, values in doc["hosts"].items()}
        return {group: list((values.get("hosts") or {}).keys()) for group, values in doc["children"].items()}, addresses


class Runs:
    """ansible-playbook runs on the fleet, several at once; all can be stopped (Ctrl-C)."""

    def __init__(self, fleet, root):
        self.fleet, self.logs = fleet, root / "logs"
        self.logs.mkdir()
        self.procs, self.guard, self.stopping = set(), threading.Lock(), False

    def env(self):
        env = {key: value for key, value in os.environ.items() if key.startswith("ANSIBLE_")}
        env.update({"ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
                    "PATH": f"{BIN}:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": os.environ.get("HOME", "/root"),
                    "ANSIBLE_CALLBACK_PLUGINS": str(ROOT / "bench" / "callback_plugins"),
                    "ANSIBLE_CALLBACKS_ENABLED": "task_times"})
        return env

    def playbook(self, label, name, *extra):
        """Runs playbooks/<name>; its output is kept in logs/<label>.log. Returns (rc, output)."""
        with self.guard:
            if self.stopping:
                return -1, "not started: the bench is stopping"
            proc = subprocess.Popen([str(BIN / "ansible-playbook"), "-i", str(self.fleet.inventory),  # pylint: disable=consider-using-with
                                     str(ROOT / "playbooks" / name), *extra], cwd=ROOT, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=dict(self.env(), DSTACK_BENCH_TASK_TIMES=str(self.logs / f"{label}-tasks.json")))
            self.procs.add(proc)
        try:
            output, _err = proc.communicate(timeout=1800)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _err = proc.communicate()
            output += "\n(bench: stopped after 1800 s)"
        finally:
            with self.guard:
                self.procs.discard(proc)
        (self.logs / f"{label}.log").write_text(output)
        return proc.returncode, output

    def stop(self):
        with self.guard:
            self.stopping = True
            for proc in self.procs:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def tasks(self, label):
        """The run's tasks as bench/callback_plugins/task_times.py recorded them ([] if it wrote none)."""
        path = self.logs / f"{label}-tasks.json"
        return json.loads(path.read_text())["tasks"] if path.exists() else []


class App:
    def __init__(self, apps_dir, index, host):
        self.name, self.host = f"app{index:03d}", host
        self.dir = apps_dir / self.name
        self.url = self.app_id = ""
        self.started = self.done = self.answered = None
        self.dir.mkdir(parents=True)
        (self.dir / "docker-compose.yaml").write_text(
            f"services:\n  web:\n    image: {IMAGE}\n    command: {COMMAND.format(name=self.name)}\n"
            "    ports:\n      - \"80:80\"\n")
        (self.dir / "app.yml").write_text(
            f"name: {self.name}\ngateway_enabled: true\nhosts: [{host}]\nimages:\n  - name: {IMAGE}\n")


class Gateway:
    """The apps' URLs through the gateway on its host (the names under dstack.localhost are in no
    DNS: the connection goes to the gateway host's address; SNI and Host stay the name)."""

    def __init__(self, ca_cert, address):
        self.ca_cert, self.address = ca_cert, address

    def answers(self, app):
        try:
            answer = gateway_http.fetch(app.url, ca_cert=self.ca_cert, connect_to=self.address, timeout=5)
        except DstackError:
            return False
        return answer.status == 200 and answer.body.decode(errors="replace").startswith(f"{app.name} from ")

    def wait(self, app, timeout=ANSWER_TIMEOUT):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.answers(app):
                return time.time()
            time.sleep(0.2)
        return None


def deploy(runs, gateway, app):
    """deploy-app.yml for one app, then its URL polled through the gateway. Returns app; app.answered
    stays None when it failed (the reason in its log)."""
    app.started = time.time()
    rc, output = runs.playbook(app.name, "deploy-app.yml", "-e", f"app_dir={app.dir}")
    app.done = time.time()
    url = re.search(r"^\s*\"?url:\s+(https://\S+/)", output, re.M)
    app_id = re.search(r"app_id:\s+([0-9a-f]{40})", output)
    if rc != 0 or not url or not app_id:
        return app
    app.url, app.app_id = url.group(1), app_id.group(1)
    app.answered = gateway.wait(app)
    return app


def alone(runs, gateway, app, what):
    """One app deployed with nothing else deploying, timed; RuntimeError when it failed."""
    log(f"{what}: {app.name} alone on {app.host}...")
    deploy(runs, gateway, app)
    if app.answered is None:
        raise RuntimeError(f"{app.name} did not deploy or answer (log {runs.logs / (app.name + '.log')}):\n"
                           + failure_tail(runs, app, 60))
    log(f"  {app.name} answered through the gateway {app.answered - app.started:.1f} s after deploy-app.yml started "
        f"(deploy-app.yml {app.done - app.started:.1f} s); load {os.getloadavg()[0]:.1f}")
    return app


def task_sums(tasks):
    """{(name, action): seconds} of one run, a task's seconds summed within it (a task of the first
    play runs once for all hosts; an included one once per instance)."""
    sums = defaultdict(float)
    for task in tasks:
        # Task names name the host and the hashes: the same task of every run under one name.
        name = re.sub(r"\b[0-9a-f]{16,}\b", "<hash>", re.sub(r"\bhost\d+\b", "<host>", task["name"]))
        sums[(name, task["action"])] += task["seconds"] or 0.0
    return sums


def task_report(runs, apps, reference, slowest):
    """Where the apps' runs spent their time: each task's median over the runs that ran it, slowest
    first, beside its seconds in the reference run alone; and ansible-playbook's start-up before
    its first task (bench/callback_plugins/task_times.py records them)."""
    per_task, startup = defaultdict(list), []
    for app in apps:
        tasks = runs.tasks(app.name)
        for key, seconds in task_sums(tasks).items():
            per_task[key].append(seconds)
        if tasks:
            startup.append(tasks[0]["start"] - app.started)
    if not startup:
        return "  (no task times recorded)"
    alone_tasks = runs.tasks(reference.name)
    alone_sums = task_sums(alone_tasks)
    alone_startup = f"{alone_tasks[0]['start'] - reference.started:.1f} s" if alone_tasks else "-"
    rows = sorted(((statistics.median(s), len(s), name, action) for (name, action), s in per_task.items()), reverse=True)
    lines = [f"  time per task in the batch's runs (median over the runs that ran it; alone: in the reference's run), "
             f"the slowest {slowest}; ansible-playbook's start-up before its first task: median "
             f"{statistics.median(startup):.1f} s (alone {alone_startup})"]
    lines += [f"    {seconds:6.2f} s (alone {alone_sums[(name, action)]:5.2f} s)  {name}  [{action}]"
              f"{'' if count == len(startup) else f' ({count} runs)'}" for seconds, count, name, action in rows[:slowest]]
    return "\n".join(lines)


def failure_tail(runs, app, lines=25):
    text = (runs.logs / f"{app.name}.log").read_text() if (runs.logs / f"{app.name}.log").exists() else ""
    return "\n".join("      " + line for line in text.splitlines()[-lines:])


def bench(args, root, fleet, runs):
    started = time.time()
    log(f"the fleet: sim-fleet.sh up {args.hosts} --private-podman (--dir {fleet.dir} --id {fleet.id})...")
    fleet.sim("up", str(args.hosts), "--private-podman")
    groups, addresses = fleet.groups()
    vmm_hosts = groups["dstack_vmm"]
    gateway_host = groups["dstack_gateway"][0]
    log(f"  up in {time.time() - started:.1f} s: KMS on {groups['dstack_kms'][0]}, gateway on {gateway_host} "
        f"({addresses[gateway_host]}), VMMs on {', '.join(vmm_hosts)}")

    step = time.time()
    log("site.yml on the fleet's inventory...")
    rc, output = runs.playbook("site", "site.yml")
    if rc != 0:
        raise RuntimeError(f"site.yml failed (log {runs.logs / 'site.log'}):\n{output[-4000:]}")
    log(f"  done in {time.time() - step:.1f} s")

    log(f"the image {IMAGE} (busybox-static) in the controller's podman store; {args.apps} app folders")
    make_image(root)
    apps = [App(root / "apps", index, vmm_hosts[(index - 1) % len(vmm_hosts)]) for index in range(1, args.apps + 1)]
    gateway = Gateway(str(fleet.dir / "build" / "gateway-ca.crt"), addresses[gateway_host])

    # The first deploy on a host ships the image there, and the fleet's first copies the trust roots
    # to the controller; most of the batch's apps find both done. So the reference is the second
    # app on host2, alone (the app a round-robin gives host2 next), and the first is shown apart.
    first = alone(runs, gateway, apps[0], "the first deploy (the image shipped to its host)")
    reference = apps[len(vmm_hosts)] if len(apps) > len(vmm_hosts) else None
    if reference:
        alone(runs, gateway, reference, "the reference, a second app on the same host")
    else:
        log("  (too few apps for a second one on that host: the first deploy is the reference)")
        reference = first
    single = reference.answered - reference.started

    batch = [app for app in apps if app not in (first, reference)]
    failed = []
    if batch:
        log(f"the batch: {len(batch)} apps, {args.parallel} deploy-app.yml at a time, round-robin on "
            f"{len(vmm_hosts)} VMM hosts...")
        batch_start = time.time()
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            futures = [pool.submit(deploy, runs, gateway, app) for app in batch]
            try:
                for count, future in enumerate(as_completed(futures), 1):
                    app = future.result()
                    if app.answered is None:
                        failed.append(app)
                        log(f"  [{count:3d}/{len(batch)}] {app.name} on {app.host}: FAILED after "
                            f"{app.done - app.started:.1f} s (log {runs.logs / (app.name + '.log')}):\n"
                            + failure_tail(runs, app))
                    else:
                        log(f"  [{count:3d}/{len(batch)}] {app.name} on {app.host}: answered "
                            f"{app.answered - app.started:5.1f} s after its start; {time.time() - batch_start:6.1f} s "
                            f"into the batch; load {os.getloadavg()[0]:.1f}")
            except KeyboardInterrupt:
                # Leaving the pool waits for its threads: their runs are stopped first.
                runs.stop()
                raise
        batch_seconds = max(app.answered or app.done for app in batch) - batch_start
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(batch)} deploys failed: {', '.join(app.name for app in failed)} "
                           f"(logs in {runs.logs}; --keep leaves the fleet up to look)")

    log("checking every app's URL once more, and the KMS allowlist on host1...")
    silent = [app.name for app in apps if not gateway.answers(app)]
    allowlist = json.loads(fleet.sim("ssh", groups["dstack_kms"][0], "cat /var/lib/dstack/kms/auth-config.json"))
    listed = {key.lower().removeprefix("0x") for key in allowlist.get("apps", {})}
    missing = [app.name for app in apps if app.app_id not in listed]
    if silent or missing:
        raise RuntimeError(f"after the batch: not answering {silent or 'none'}; not in the allowlist {missing or 'none'}")

    per_host = {host: sum(1 for app in apps if app.host == host) for host in vmm_hosts}
    log(f"\n{args.apps} apps on {len(vmm_hosts)} VMM hosts ({', '.join(f'{h} {n}' for h, n in per_host.items())}), "
        f"{args.hosts} hosts in all; every app answers through the gateway and is in the allowlist")
    log(f"  one deploy alone to its answer through the gateway: {first.name}, the first on {first.host}, "
        f"{first.answered - first.started:.1f} s; the reference {reference.name}, the next on {reference.host}, {single:.1f} s")
    if batch:
        per_app = batch_seconds / len(batch)
        each = [app.answered - app.started for app in batch]
        log(f"  the other {len(batch)}, {args.parallel} at a time: all answered {batch_seconds:.1f} s after the batch "
            f"started = {per_app:.2f} s per app, {per_app / single:.2f}x the reference")
        log(f"  each deploy in the batch to its answer: median {statistics.median(each):.1f} s "
            f"({statistics.median(each) / single:.1f}x the reference), longest {max(each):.1f} s")
        log(task_report(runs, batch, reference, args.slowest))
    alone_seconds = sum(app.answered - app.started for app in ((first,) if first is reference else (first, reference)))
    total = alone_seconds + (batch_seconds if batch else 0.0)
    log(f"  all {args.apps} (the deploys alone, then the batch): {total:.1f} s = {total / args.apps:.2f} s per app")
    log(f"(on {os.cpu_count()} cores, load average over the last 5 minutes {os.getloadavg()[1]:.1f}: other work on "
        f"the machine shows in every figure; the whole bench took {time.time() - started:.0f} s)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--hosts", type=int, default=10, help="hosts in the fleet: host1 the KMS and the gateway, "
                        "the others a VMM each (default 10)")
    parser.add_argument("--apps", type=int, default=100, help="apps to deploy, round-robin on the VMM hosts (default 100)")
    parser.add_argument("--parallel", type=int, default=4, help="deploy-app.yml runs at a time in the batch (default 4)")
    parser.add_argument("--slowest", type=int, default=10, help="how many of the slowest tasks to print (default 10)")
    parser.add_argument("--keep", action="store_true", help="leave the fleet, its folder and the image (the end "
                        "prints how to remove them)")
    args = parser.parse_args()
    if args.hosts < 2 or args.apps < 1 or args.parallel < 1:
        parser.error("--hosts needs 2 or more (host1 runs no VMM), --apps and --parallel 1 or more")
    if os.geteuid() != 0:
        parser.error("needs root (scripts/sim-fleet.sh makes namespaces, links and mounts)")
    root = Path(tempfile.mkdtemp(prefix="bf-", dir="/tmp"))
    fleet = Fleet(root / "f", free_fleet_id())
    runs = Runs(fleet, root)
    status = 1
    try:
        bench(args, root, fleet, runs)
        status = 0
    except (RuntimeError, KeyboardInterrupt) as exc:
        runs.stop()
        log(f"bench_fleet: {'interrupted' if isinstance(exc, KeyboardInterrupt) else exc}")
    finally:
        runs.stop()
        if args.keep:
            log(f"kept: the fleet ({SIM_FLEET.relative_to(ROOT)} --dir {fleet.dir} --id {fleet.id} down), the logs "
                f"in {runs.logs}, the image (podman rmi {IMAGE}); then rm -r {root}")
        else:
            log("taking the fleet down...")
            try:
                fleet.sim("down")
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                status = 1
                log(f"bench_fleet: the fleet's down failed, run: {SIM_FLEET} --dir {fleet.dir} --id {fleet.id} down\n{exc}")
            else:
                shutil.rmtree(root, ignore_errors=True)
            subprocess.run(["podman", "rmi", "-f", IMAGE], capture_output=True, check=False)
    return status


if __name__ == "__main__":
    sys.exit(main())
