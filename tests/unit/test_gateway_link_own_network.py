"""The gateway link in a VM (dstack-guest-agent run --own-network): no network namespace, the WireGuard
interface and its routes in the agent's own namespace, which in a VM is the CVM's; without a
namespace and without --own-network it is still refused (test_gateway_cvm)."""

import subprocess
import sys

import pytest

from ansible_collections.dstack.tee.agents.guest import gateway_link
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError


def test_in_a_vm_the_link_and_its_interface_are_in_the_agents_namespace():
    link = gateway_link.GatewayLink(object(), ["https://gw.test"], None, "dwgtest", own_network=True)
    assert link.netns is None and link.interface.netns is None and link.interface.link_netns is None
    with pytest.raises(DstackError) as err:
        gateway_link.GatewayLink(object(), ["https://gw.test"], None, "dwgtest")
    assert err.value.field == "netns" and "--own-network" in err.value.reason


def test_ip_commands_go_to_the_namespace_or_stay_here():
    assert gateway_link._ip("cvm-1", "route", "replace", "10.4.0.1/32", "dev", "dwg1") == \
        ["ip", "-n", "cvm-1", "route", "replace", "10.4.0.1/32", "dev", "dwg1"]
    assert gateway_link._ip(None, "-4", "route", "show", "default") == ["ip", "-4", "route", "show", "default"]


def test_own_network_does_not_go_with_a_namespace(tmp_path):
    (tmp_path / "share").mkdir()
    proc = subprocess.run([sys.executable, "-m", "ansible_collections.dstack.tee.agents.guest.cli", "run",
                           "--config-dir", str(tmp_path / "share"), "--work-dir", str(tmp_path / "work"),
                           "--tee", "sim", "--netns", "cvm-x", "--own-network"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0 and "--own-network" in proc.stderr and "--netns" in proc.stderr, proc.stderr
