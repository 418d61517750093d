"""Seconds from `ansible-playbook deploy-app.yml` to the app's first answer, median of 5 runs.

    .venv/bin/python bench/bench_deploy.py [--runs 5]

Brings up the simulated default (site.yml) in a temporary root with its own ports, builds the
sample image, then deploys examples/hello N times (removing the CVM between runs) and prints,
as medians: the whole time to the first HTTP answer; the CVM's boot (VMM "started" event to the
guest's "running" report: measurement, attested key release, env, containers); and the rest
(Ansible, module round trips, quote verification). The reference, in the same run: the bare
`podman run` of the same image to its first answer, with no CVM, no KMS, no attestation.
"""

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from ansible_collections.dstack.tee.agents.guest.compose_runner import CONTAINERS_CONF

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def first_answer(url, deadline):
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return time.time()
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer")


def vmm(port, method, body=None):
    from ansible_collections.dstack.tee.plugins.module_utils.vmm_client import VmmClient  # pylint: disable=import-outside-toplevel
    return VmmClient(f"http://127.0.0.1:{port}").call(method, body or {})


def playbook(name, extra):
    env = {"ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "PATH": f"{BIN}:/usr/sbin:/usr/bin:/sbin:/bin"}
    proc = subprocess.run([str(BIN / "ansible-playbook"), str(ROOT / "playbooks" / name), *extra], cwd=ROOT,
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-3000:]}")


def bare_podman(port, conf):
    """The same image, run by podman with the same settings as a CVM's runner, to its first answer."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CONTAINERS_CONF": str(conf)}
    start = time.time()
    name = f"bench-bare-{port}"
    subprocess.run(["podman", "run", "-d", "--rm", "--name", name, "-p", f"127.0.0.1:{port}:80",
                    "localhost/dstack-hello:latest"], capture_output=True, check=True, env=env)
    try:
        return first_answer(f"http://127.0.0.1:{port}/", time.time() + 60) - start
    finally:
        subprocess.run(["podman", "rm", "-f", name], capture_output=True, check=False, env=env)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bd-", dir="/tmp"))
    ports = {"kms": free_port(), "vmm": free_port(), "app": free_port()}
    app = root / "hello"
    shutil.copytree(ROOT / "examples" / "hello", app)
    (app / "app.yml").write_text((app / "app.yml").read_text().replace("host_port: 8080", f"host_port: {ports['app']}"))
    extra = ["-e", f"dstack_root={root}", "-e", f"dstack_kms_listen=127.0.0.1:{ports['kms']}",
             "-e", f"dstack_kms_url=https://127.0.0.1:{ports['kms']}", "-e", f"dstack_vmm_listen=127.0.0.1:{ports['vmm']}",
             "-e", f"dstack_vmm_url=http://127.0.0.1:{ports['vmm']}", "-e", f"app_dir={app}"]
    conf = root / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    try:
        print("setting up the simulated default (site.yml, sample image)...", flush=True)
        playbook("demo.yml", extra)
        totals, boots, bares = [], [], []
        for run in range(1, args.runs + 1):
            for vm in vmm(ports["vmm"], "Status")["vms"]:
                vmm(ports["vmm"], "RemoveVm", {"id": vm["id"]})
            start = time.time()
            playbook("deploy-app.yml", extra)
            answered = first_answer(f"http://127.0.0.1:{ports['app']}/", time.time() + 300)
            vm = vmm(ports["vmm"], "Status")["vms"][0]
            events = vmm(ports["vmm"], "GetInfo", {"id": vm["id"]})["info"]["events"]
            started = next(e["timestamp_ms"] for e in events if e["event"] == "started") / 1000
            running = next(e["timestamp_ms"] for e in events if e["body"] == "running") / 1000
            totals.append(answered - start)
            boots.append(running - started)
            bares.append(bare_podman(free_port(), conf))
            print(f"  run {run}: deploy to first answer {totals[-1]:5.1f} s (boot {boots[-1]:4.1f} s); "
                  f"bare podman run {bares[-1]:4.2f} s", flush=True)
        total, boot, bare = statistics.median(totals), statistics.median(boots), statistics.median(bares)
        print(f"median of {args.runs}: deploy-app.yml to first answer {total:.1f} s = CVM boot {boot:.1f} s "
              f"+ Ansible and the rest {total - boot:.1f} s; bare podman run to first answer {bare:.2f} s; "
              f"ratio deploy/bare {total / bare:.0f}x")
    finally:
        try:
            for vm in vmm(ports["vmm"], "Status")["vms"]:
                vmm(ports["vmm"], "RemoveVm", {"id": vm["id"]})
        except OSError:
            pass
        for conf in (root / "run" / "supervisor" / "supervisord.conf", root / "services" / "supervisord.conf"):
            if conf.exists():
                subprocess.run([str(BIN / "supervisorctl"), "-c", str(conf), "shutdown"], capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
