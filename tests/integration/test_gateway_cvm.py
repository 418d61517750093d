"""The guest boot's `gateway` step against a real `dstack-gateway serve`, on real namespaces.

The topology is test_gateway_serve's (its helpers, imported): the gateway in gw-<pid>, the CVM's
network namespace cvm-<pid>, veths between them and to the root namespace. Real parts: a KMS (in
process) whose allowlist names the gateway app as gatewayAppId; the gateway app booted as a CVM
against it, whose RA-TLS server certificate (GetTlsKey, the KMS signs) `serve` presents on its
control and Admin APIs; app A's CVMs booted by the real Boot with gateway_enabled and
.sys-config.json's gateway_urls, given cvm-<pid> as their namespace: the step registers (RA-TLS
both ways), brings its wireguard-go interface up in cvm-<pid> and starts its checker. The app is a
small HTTP server in cvm-<pid> on the tunnel address (the boot's containers are NoContainers).
Everything is removed, even on failure.
"""

import contextlib
import json
import os
import socket
import ssl
import sys
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

# pylint: disable=wrong-import-position
from conftest import IMAGE, eventually, free_port, needs_podman, run_module  # noqa: E402
from test_gateway_client import GATEWAY_COMPOSE, GuestTlsKey, _boot  # noqa: E402
from test_gateway_control import ADMIN_TOKEN  # noqa: E402
from test_gateway_serve import (  # noqa: E402
    ADMIN_PORT, APP_SERVERS, BASE, CVM_NS, RPC_PORT, GatewayProcess, _body, _build_network,
    _gateway_toml, _https_get, _remove_socket, _write_certs, needs_ip_netns, needs_wireguard_go)
from test_guest_boot import OS_IMAGE, NoContainers, make_share  # noqa: E402
from test_kms import make_kms  # noqa: E402
from ansible_collections.dstack.tee.agents.guest import gateway_link  # noqa: E402
from ansible_collections.dstack.tee.agents.guest.boot import Boot, BootFailed  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.compose_runner import ComposeRunner  # noqa: E402
from ansible_collections.dstack.tee.agents.guest.context import GuestContext  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils import root_keys  # noqa: E402
from ansible_collections.dstack.tee.agents.vmm.backends.base import VmRecord  # noqa: E402
from ansible_collections.dstack.tee.agents.vmm.backends.process import ProcessBackend  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils import wireguard  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.kms_client import KmsCertSigner  # noqa: E402
from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import SimTdx  # noqa: E402

SERVER_CERT = {"subject": "gateway.test", "usage_ra_tls": True, "usage_server_auth": True}


def _admin(net, kms_root, method, **params):
    """The Admin API, which serves the gateway's RA-TLS certificate: checked against the KMS root
    (it names no address, so no host name check)."""
    context = ssl.create_default_context(cafile=str(kms_root))
    context.check_hostname = False
    request = urllib.request.Request(f"https://{net.gw_ip}:{ADMIN_PORT}/prpc/Admin.{method}",
                                     data=json.dumps(params).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {ADMIN_TOKEN}"})
    with urllib.request.urlopen(request, context=context, timeout=10) as response:
        return json.loads(response.read())


def _registered(net, kms_root):
    return {h["instance_id"]: h["ip"] for h in _admin(net, kms_root, "Status")["hosts"]}


def _use_server_cert(folder, answer):
    (folder / "rpc.crt").write_text("".join(answer["certificate_chain"][:2]))
    (folder / "rpc.key").write_text(answer["key"])
    (folder / "rpc.key").chmod(0o600)


class World:
    """The KMS, the gateway app's CVM, app A's share (gateway_enabled, gateway_urls set)."""

    def __init__(self, base, net):
        self.base = base
        self.sim = SimTdx(str(base / "sim"))
        _kms_app, self.kms = make_kms(base, self.sim)
        (base / "a").mkdir()
        (base / "g").mkdir()
        self.share, self.app = make_share(base / "a", run_module, self.kms)
        share_g, self.app_g = make_share(base / "g", run_module, self.kms, compose=GATEWAY_COMPOSE)
        (base / "auth-config.json").write_text(json.dumps({
            "gatewayAppId": self.app_g["app_id"], "osImages": ["0x" + OS_IMAGE],
            "apps": {"0x" + a["app_id"]: {"composeHashes": ["0x" + a["compose_hash"]], "allowAnyDevice": True}
                     for a in (self.app, self.app_g)}}))
        # The gateway app's certificate, and app A's own (genuine and attested, but another app's).
        self.gateway_cert = GuestTlsKey(_boot(base, "g1", share_g, self.sim, self.kms))(SERVER_CERT)
        self.other_app_cert = GuestTlsKey(_boot(base, "a0", self.share, self.sim, self.kms))(SERVER_CERT)
        # From now on app A's CVMs use the gateway: an unreachable URL first, then the gateway's.
        sys_config = json.loads((self.share / ".sys-config.json").read_text())
        sys_config["gateway_urls"] = [f"https://127.0.0.1:{free_port()}", f"https://{net.gw_ip}:{RPC_PORT}"]
        (self.share / ".sys-config.json").write_text(json.dumps(sys_config))
        self.kms_root = base / "kms" / root_keys.ROOT_CA_CERT

    def boot(self, cleanup, name, netns=CVM_NS, **settings):
        ctx = GuestContext.open(str(self.share), str(self.base / name), tee="sim", sim_state_dir=self.sim.state_dir)
        ctx.cert_signer = KmsCertSigner(self.kms, ctx)
        boot = Boot(ctx, kms_client=self.kms, runner=NoContainers(), netns=netns, gateway_settings=settings)
        self.last = boot
        cleanup.callback(boot.close)
        try:
            return boot.run()
        finally:
            if boot.instance_id:
                cleanup.callback(_remove_socket, gateway_link.interface_name(boot.instance_id, boot.app_id))


def _boot_events(boot):
    return [e["payload"] for e in json.loads(Path(boot.ctx.paths.boot_state).read_text())["events"]]


@needs_wireguard_go
@needs_ip_netns
def test_the_boot_registers_tunnels_and_the_checker_registers_again(tmp_path):
    with contextlib.ExitStack() as cleanup:
        net = _build_network(cleanup)
        world = World(tmp_path, net)
        server_ca = _write_certs(tmp_path, [net.gw_ip, net.gw_cvm_ip])
        gateway = GatewayProcess(_gateway_toml(tmp_path, world.sim, tmp_path / "kms", net), tmp_path / "serve.log")
        cleanup.callback(gateway.kill)

        # 1. A gateway presenting another app's certificate (KMS-issued, attested): the boot fails at
        # step gateway naming the check, and the gateway saw no RegisterCvm.
        _use_server_cert(tmp_path, world.other_app_cert)
        gateway.start()
        with pytest.raises(BootFailed) as err:
            world.boot(cleanup, "refused")
        assert err.value.field == "gateway" and "app_id" in err.value.reason, str(err.value)
        # The containers, started beside the gateway step, were taken down with the failed boot.
        assert world.last.runner.started and world.last.runner.downs == 1
        assert _registered(net, world.kms_root) == {}
        refused = gateway_link.interface_name(world.last.instance_id, world.last.app_id)
        assert not wireguard.link_exists(refused, CVM_NS) and not os.path.exists(wireguard.Uapi(refused).path)
        assert gateway.stop() == 0

        # 2. The gateway app's own certificate: the boot registers and the tunnel comes up.
        _use_server_cert(tmp_path, world.gateway_cert)
        gateway.start()
        clock_offset = [0.0]
        boot = world.boot(cleanup, "cvm", interval=0.2, clock=lambda: time.time() + clock_offset[0])
        link = boot.gateway_link
        client_ip = link.registration.client_ip
        assert client_ip == "10.77.0.2" and link.url == f"https://{net.gw_ip}:{RPC_PORT}"
        assert link.registration.gateway["app_id"] == world.app_g["app_id"]
        assert any(p.startswith(f"gateway: registered with {link.url}") and f"{client_ip} on {link.interface.name} "
                   f"in netns {CVM_NS}" in p for p in _boot_events(boot)), _boot_events(boot)
        assert _registered(net, world.kms_root) == {boot.instance_id: client_ip}
        assert wireguard.link_exists(link.interface.name, CVM_NS)
        assert not wireguard.link_exists(link.interface.name)      # in the CVM's namespace only
        # Only the gateway's endpoint address may reach the CVM's WireGuard port (dstack's DSTACK_WG chain).
        chain = subprocess.run(wireguard.netns_exec_argv(CVM_NS, ["iptables", "-S", "DSTACK_WG"]), capture_output=True,
                               text=True, check=True).stdout.split("\n")
        assert [line for line in chain if line.startswith("-A")] == [
            f"-A DSTACK_WG -s {net.gw_cvm_ip}/32 -j ACCEPT", "-A DSTACK_WG -j DROP"], chain
        jump = subprocess.run(wireguard.netns_exec_argv(CVM_NS, ["iptables", "-S", "INPUT"]), capture_output=True,
                              text=True, check=True).stdout
        assert f"-A INPUT -p udp -m udp --dport {wireguard.CVM_LISTEN_PORT} -j DSTACK_WG" in jump, jump
        cache = tmp_path / "cvm" / "gateway-cache.json"
        assert cache.stat().st_mode & 0o777 == 0o600

        # The app, in the CVM's namespace on its tunnel address: https://<app_id>.<base> through the gateway.
        app = subprocess.Popen(  # pylint: disable=consider-using-with
            wireguard.netns_exec_argv(CVM_NS, [sys.executable, "-c", APP_SERVERS, client_ip, boot.app_id, "8443",
                                               str(tmp_path / "wildcard.crt"), str(tmp_path / "wildcard.key")]),
            stdout=subprocess.PIPE, text=True)
        cleanup.callback(app.wait)
        cleanup.callback(app.kill)
        assert app.stdout.readline().strip() == "ready"

        def through_gateway():
            return _body(_https_get(net.gw_ip, f"{boot.app_id}.{BASE}", server_ca, timeout=3)[0])

        assert eventually(through_gateway, errors=(OSError, AssertionError)) == \
            f"http app {boot.app_id} answers 10.77.0.1"

        # The checker leaves a fresh tunnel alone.
        time.sleep(1.5)
        assert link.registrations == 1

        # The gateway loses the instance; once the handshake is older than 180 s (the clock moved on:
        # WireGuard renews a live one every 120 s), the checker registers again and the route is back.
        assert _admin(net, world.kms_root, "RemoveInstance", id=boot.instance_id) == {"removed": True}
        assert _registered(net, world.kms_root) == {}
        clock_offset[0] = gateway_link.STALE_AFTER + 20
        deadline = time.monotonic() + 15
        # The gateway records the registration before the CVM has applied the answer and counted it.
        while _registered(net, world.kms_root) != {boot.instance_id: client_ip} or link.registrations < 2:
            assert time.monotonic() < deadline, gateway.log[-3000:]
            time.sleep(0.2)
        assert link.registrations == 2
        assert eventually(through_gateway, errors=(OSError, AssertionError)) == \
            f"http app {boot.app_id} answers 10.77.0.1"

        # wireguard-go dies: the checker brings the interface up again and registers.
        link.interface.process.kill()
        deadline = time.monotonic() + 15
        while link.registrations < 3 or not link.link_up():
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert eventually(through_gateway, errors=(OSError, AssertionError)) == \
            f"http app {boot.app_id} answers 10.77.0.1"

        # The agent stops: the checker ends and the interface goes.
        boot.close()
        assert not wireguard.link_exists(link.interface.name, CVM_NS)
        assert not os.path.exists(link.interface.uapi.path)
        assert gateway.stop() == 0


@needs_wireguard_go
@needs_ip_netns
def test_without_a_namespace_the_gateway_step_refuses(tmp_path):
    """gateway_enabled and gateway_urls but no namespace: the app would be on the host's network."""
    with contextlib.ExitStack() as cleanup:
        net = _build_network(cleanup)
        world = World(tmp_path, net)
        with pytest.raises(BootFailed) as err:
            world.boot(cleanup, "cvm", netns=None)
        assert err.value.field == "gateway" and err.value.reason.startswith("netns: "), str(err.value)
        assert world.last.runner.downs == 1   # the containers started beside it went down with it
        assert not os.path.exists(tmp_path / "cvm" / "gateway-cache.json")   # nothing asked of the KMS for it


def test_the_checker_rule_and_its_backoff():
    fresh = wireguard.Peer("k", last_handshake=1000.0)
    assert gateway_link.needs_registration(1100.0, 900.0, [fresh], True) == ""
    assert gateway_link.needs_registration(1000.0 + 181, 900.0, [fresh], True) == "no handshake with the gateway for 181 s"
    # No handshake yet: counted from the registration.
    assert gateway_link.needs_registration(1100.0, 1000.0, [wireguard.Peer("k")], True) == ""
    assert gateway_link.needs_registration(1181.0, 1000.0, [wireguard.Peer("k")], True) != ""
    assert gateway_link.needs_registration(1001.0, 1000.0, [fresh], False) == "the WireGuard interface is gone"
    delays = [0.0]
    while len(delays) < 11:
        delays.append(gateway_link.next_retry(delays[-1]))
    assert delays[1:5] == [5.0, 10.0, 20.0, 40.0] and delays[-1] == gateway_link.RETRY_MAX


def test_gateway_link_needs_a_namespace():
    with pytest.raises(DstackError) as err:
        gateway_link.GatewayLink(object(), ["https://gw.test"], None, "dwgtest")
    assert err.value.field == "netns"


@needs_podman
@needs_ip_netns
def test_with_a_namespace_the_containers_run_in_it(tmp_path, busybox_image):  # pylint: disable=unused-argument
    """The compose runner runs podman-compose inside the CVM's namespace: the app's CVM port is
    published there (on every address of the namespace, the WireGuard one included), not on the
    host, and the VM's port map does not apply."""
    netns = f"cvc-{os.getpid()}"
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(wireguard.netns_remove, netns)
        wireguard.netns_add(netns)
        wireguard.configure_link("lo", netns)
        runner = ComposeRunner(f"dstack-ns-{os.getpid()}", str(tmp_path), netns=netns)
        cleanup.callback(runner.down)
        host_port = free_port()
        runner.up(f"""services:
  web:
    image: {IMAGE}
    command: ["/bin/sh", "-c", "mkdir -p /w && echo in-the-cvm > /w/i && exec httpd -f -p 80 -h /w"]
    ports:
      - "8080:80"
""", {}, {}, {8080: f"127.0.0.1:{host_port}"})
        # The project's network is the CVM's own: defined in its work folder, not among the host's.
        network = f"{runner.project}_default"
        assert subprocess.run(["podman", "--network-config-dir", str(tmp_path / "podman-networks"), "network",
                               "exists", network], check=False).returncode == 0
        assert subprocess.run(["podman", "network", "exists", network], check=False).returncode == 1

        def fetch():
            done = subprocess.run(wireguard.netns_exec_argv(netns, ["wget", "-qO-", "-T", "2", "http://127.0.0.1:8080/i"]),
                                  capture_output=True, text=True, timeout=10, check=False)
            assert done.stdout == "in-the-cvm\n", done
            return done.stdout

        eventually(fetch, errors=(AssertionError,))
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", host_port), timeout=1).close()
        runner.down()
        assert os.listdir(tmp_path / "podman-networks") in ([], ["cni.lock"])   # and down removed it
    with pytest.raises(DstackError) as err:
        ComposeRunner("x", str(tmp_path), engine="docker", netns=netns)
    assert err.value.field == "netns"


@needs_ip_netns
def test_the_process_backend_makes_a_namespace_per_cvm_only_when_asked(tmp_path):
    """cvm_netns: a namespace per CVM with a veth to the host (the CVM reaches the host's address;
    `--netns` given to the guest agent); removed with what still runs in it. Off by default."""
    vm = VmRecord(str(uuid.uuid4()), str(tmp_path / "vm"), {"port_map": []})
    assert "--netns" not in ProcessBackend(str(tmp_path), str(tmp_path / "sim"))._command(vm)  # pylint: disable=protected-access
    backend = ProcessBackend(str(tmp_path), str(tmp_path / "sim"), cvm_netns=True)
    name = backend.netns(vm)
    assert f"--netns {name}" in backend._command(vm)  # pylint: disable=protected-access
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(wireguard.netns_remove, name)
        cleanup.callback(wireguard.delete_link, backend.host_veth(vm))
        backend._ensure_netns(vm)  # pylint: disable=protected-access
        backend._ensure_netns(vm)  # pylint: disable=protected-access  # made once: kept as it is
        routes = subprocess.run(["ip", "-n", name, "-4", "route", "show", "default"], capture_output=True, text=True,
                                check=True).stdout
        host_ip = routes.split()[2]
        with socket.create_server((host_ip, 0)) as listener:   # the host, reached from the CVM's namespace
            connect = f"import socket; socket.create_connection(('{host_ip}', {listener.getsockname()[1]}), timeout=3)"
            probe = subprocess.run(wireguard.netns_exec_argv(name, [sys.executable, "-c", connect]),
                                   capture_output=True, text=True, timeout=20, check=False)
        assert probe.returncode == 0, probe.stderr
        sleeper = subprocess.Popen(wireguard.netns_exec_argv(name, ["sleep", "300"]))  # pylint: disable=consider-using-with
        cleanup.callback(sleeper.wait)
        cleanup.callback(sleeper.kill)

        def entered():
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=True).stdout
            assert str(sleeper.pid) in pids.split()

        eventually(entered, errors=(AssertionError,))
        backend._remove_netns(vm)  # pylint: disable=protected-access
        assert sleeper.wait(10) == -9
        assert not wireguard.netns_exists(name) and not wireguard.link_exists(backend.host_veth(vm))
