"""`dstack-guest-agent run --own-network` (a VM's agent, whose network is the CVM's own) serves the
public Worker API on 0.0.0.0:--worker-port, as dstack's guest serves its agent port: the gateway
reaches it through the WireGuard tunnel as https://<app-id>-8090.<base_domain> (test_guest_vm_boot
does that through a real gateway into a real VM). Here the agent runs as a real process inside a
network namespace of its own, standing in for the VM's network: its Worker answers there, with a
quote that verifies, and SIGTERM stops it.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# pylint: disable=wrong-import-position
from conftest import free_port  # noqa: E402
from test_gateway_serve import needs_ip_netns  # noqa: E402
from test_guest_worker import AGENT, _call_in, _share, _wait_booted, attest_verified  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils import wireguard  # noqa: E402


@needs_ip_netns
def test_run_own_network_serves_the_worker_on_the_vms_network(tmp_path):
    netns = f"own-{os.getpid()}"
    port = free_port()
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(wireguard.netns_remove, netns)
        wireguard.netns_add(netns)
        wireguard.configure_link("lo", netns)
        share = _share(tmp_path)
        agent = subprocess.Popen(  # pylint: disable=consider-using-with
            wireguard.netns_exec_argv(netns, [
                *AGENT, "run", "--config-dir", str(share), "--work-dir", str(tmp_path / "work"), "--tee", "sim",
                "--sim-state", str(tmp_path / "sim"), "--socket", str(tmp_path / "dstack.sock"), "--tappd-socket", "",
                "--engine", "none", "--own-network", "--worker-port", str(port)]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        cleanup.callback(lambda: agent.poll() is None and os.killpg(agent.pid, signal.SIGKILL))
        _wait_booted(tmp_path, agent)
        instance = json.loads((tmp_path / "work" / "instance.json").read_text())
        status, info = _call_in(netns, "prpc/Worker.Info", {}, port=port)
        assert status == 200 and info["instance_id"] == instance["instance_id"], info
        attest_verified(netns, tmp_path / "sim", port=port)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0, agent.stderr.read()[-3000:]
        assert "Worker API serving on the VM network" in agent.stderr.read() + (agent.stdout.read() or "")
