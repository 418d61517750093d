# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The CVM's link to its gateway: registration, the WireGuard interface, and the checker.

GatewayLink(client, urls, netns, interface).connect() registers with the first gateway URL that
answers (gateway_client.GatewayClient: RA-TLS both ways, the gateway's attested app id checked),
then brings this CVM's WireGuard interface up in the CVM's network namespace (in a VM, whose
network is the CVM's own, `own_network=True` and no netns: in the VM's namespace) with the answer:
the returned client_ip (/32), the gateway peers (each accepting its gateway's tunnel address
alone, keepalive 25 s), a route to each gateway address through the interface, and the CVM's
WireGuard port open to the gateways' endpoint addresses only (iptables chain DSTACK_WG, as dstack). The interface
is a wireguard-go one (wireguard.WgInterface); its UAPI socket directory is shared by every
namespace of the host, so the name is per CVM (`interface_name`).

The checker (start_checker) re-registers, as dstack's guest does, when the newest handshake with
a gateway is older than STALE_AFTER seconds (WireGuard renews a live session's handshake every
120 s, so 180 s means the gateway no longer answers: it lost the instance, or restarted without
its state) or when the interface is gone (wireguard-go died). A failed attempt is retried after
a delay that doubles from RETRY_FIRST up to RETRY_MAX; a success resets it.

Errors are DstackError naming the field; no key is logged.
"""

import ipaddress
import logging
import socket
import subprocess
import threading
import time

from ansible_collections.dstack.tee.agents.guest import netns_ports
from ansible_collections.dstack.tee.plugins.module_utils import ra_tls, wireguard
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.prpc import Refused as GatewayRefused

log = logging.getLogger("dstack.guest.gateway")

STALE_AFTER = 180.0      # dstack's rule: no handshake for 3 minutes -> register again
CHECK_INTERVAL = 10.0
RETRY_FIRST = 5.0
RETRY_MAX = 300.0


def interface_name(instance_id, app_id):
    """The CVM's WireGuard interface: dstack calls it dstack-wg0, but wireguard-go's sockets share
    one folder for every namespace of this host, so the name carries the instance (15 bytes)."""
    return "dwg" + (instance_id or app_id)[:12]


def needs_registration(now, registered_at, peers, link_up, stale_after=STALE_AFTER):
    """Why the checker should register again (a short reason), or "" when the tunnel is fine.
    A handshake is counted from the registration when none happened since (a new tunnel)."""
    if not link_up:
        return "the WireGuard interface is gone"
    newest = max([registered_at] + [p.last_handshake for p in peers])
    age = now - newest
    if age > stale_after:
        return f"no handshake with the gateway for {int(age)} s"
    return ""


def next_retry(previous):
    """The delay before the next attempt after a failure (previous: the last delay, 0 at first)."""
    return RETRY_FIRST if previous <= 0 else min(previous * 2, RETRY_MAX)


class GatewayLink:
    """One CVM's registration and tunnel (see the module docstring)."""

    def __init__(self, client, urls, netns, interface, port_policy=None, stale_after=STALE_AFTER,
                 interval=CHECK_INTERVAL, clock=time.time, own_network=False):
        if not netns and not own_network:
            raise DstackError("netns", "the gateway needs the CVM's own network namespace (dstack-guest-agent run "
                                       "--netns NAME; the VMM's cvm_netns = true), or a VM's (run --own-network): "
                                       "the app must be reachable only through the WireGuard tunnel, not on the "
                                       "host's network")
        if not urls:
            raise DstackError("gateway_urls", "are empty")
        self.client = client
        self.urls = list(urls)
        self.netns = wireguard.check_netns_name(netns) if netns else None
        self.interface = wireguard.WgInterface(wireguard.check_interface_name(interface), netns=self.netns)
        self.port_policy = port_policy
        self.stale_after = stale_after
        self.interval = interval
        self.clock = clock
        self.registration = None
        self.url = ""
        self.registered_at = 0.0
        self.registrations = 0
        self.address = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    # ---- registration and the interface -----------------------------------------------------------

    def connect(self):
        """Register with the first gateway that can be reached, and apply its answer. Unreachable
        gateways are skipped; a refusal (either side's) stops here: it is not a network problem."""
        with self._lock:
            failures = []
            for url in self.urls:
                try:
                    registration = self.client.register(url, port_policy=self.port_policy)
                except (ra_tls.Refused, GatewayRefused):
                    raise
                except DstackError as exc:
                    if exc.field != "gateway_url":
                        raise
                    failures.append(exc.reason)
                    log.warning("gateway %s: %s", url, exc.reason)
                    continue
                self._apply(registration)
                self.registration, self.url = registration, url
                self.registered_at = self.clock()
                self.registrations += 1
                return registration
            raise DstackError("gateway_urls", "no gateway could be reached: " + "; ".join(failures))

    def _apply(self, registration):
        servers = registration.answer["wg"].get("servers") or []
        peers, routes = [], []
        for i, server in enumerate(servers):
            # render_wg_quick checked every field of the answer already (Registration.wg_quick).
            gateway_ip = str(server["ip"]).split("/", 1)[0]
            prefix = f"{gateway_ip}/{32 if ':' not in gateway_ip else 128}"
            endpoint = _resolved(server["endpoint"], f"answer.wg.servers[{i}].endpoint")
            peers.append(wireguard.Peer(public_key=server["pk"], allowed_ips=[prefix],
                                        endpoint=_host_loopback(endpoint, self.netns),
                                        persistent_keepalive=wireguard.CVM_KEEPALIVE))
            routes.append(prefix)
        address = f"{registration.client_ip}/{32 if ':' not in registration.client_ip else 128}"
        if self.interface.running and self.address != address:
            self.interface.down()   # the gateway gave another address (it lost its state): start over
        if not self.interface.running:
            self.interface.down()   # what a dead wireguard-go left (its link, its socket)
            self.interface.up(address, private_key=self.client.credentials().wg_private_key,
                              listen_port=wireguard.CVM_LISTEN_PORT)
            self.address = address
        else:
            # Registering again means the gateway lost the session: drop ours too, so that the
            # peers come back new and handshake at once (the gateway knows no endpoint to start
            # one, and ours would otherwise be kept until its rekey, minutes away).
            self.interface.uapi.sync_peers([])
        # Only the gateways may reach this CVM's WireGuard port (dstack's DSTACK_WG chain): opened to
        # them before the peers are set, or a new gateway's first handshake answer is dropped (one
        # lost WireGuard retry, 5 s).
        netns_ports.guard_wireguard_port(self.netns, wireguard.CVM_LISTEN_PORT,
                                         sorted({p.endpoint.rpartition(":")[0].strip("[]") for p in peers}))
        self.interface.uapi.sync_peers(peers)
        for prefix in routes:
            _ip_route(self.netns, prefix, self.interface.name)

    def link_up(self):
        return self.interface.running and wireguard.link_exists(self.interface.name, self.netns)

    # ---- the checker ------------------------------------------------------------------------------

    def check(self):
        """One look; registers again when needs_registration says so. Returns the reason ("" when fine)."""
        up = self.link_up()
        peers = []
        if up:
            try:
                peers = self.interface.uapi.get()["peers"]
            except DstackError:
                up = False
        reason = needs_registration(self.clock(), self.registered_at, peers, up, self.stale_after)
        if reason:
            log.warning("gateway: %s: registering again", reason)
            registration = self.connect()
            log.info("gateway: registered again with %s: %s", self.url, registration.client_ip)
        return reason

    def start_checker(self):
        self._thread = threading.Thread(target=self._run, name="gateway-checker", daemon=True)
        self._thread.start()

    def _run(self):
        delay = self.interval
        failed = 0.0
        while not self._stop.wait(delay):
            try:
                self.check()
            except (DstackError, OSError) as exc:
                failed = next_retry(failed)
                delay = failed
                log.warning("gateway: registering again failed (next try in %d s): %s", delay, exc)
            else:
                failed, delay = 0.0, self.interval

    def close(self):
        """Stop the checker and take the interface down."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        with self._lock:
            self.interface.down()


def _resolved(endpoint, field_name):
    """host:port with the host resolved to an IP: the UAPI takes no names (wg-quick would resolve)."""
    host, _sep, port = endpoint.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        return endpoint
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_DGRAM)
    except (OSError, ValueError) as exc:
        raise DstackError(field_name, f"cannot resolve {host}: {exc}") from None
    family, _type, _proto, _name, sockaddr = infos[0]
    return f"[{sockaddr[0]}]:{port}" if family == socket.AF_INET6 else f"{sockaddr[0]}:{port}"


def _host_loopback(endpoint, netns):
    """A loopback endpoint (a gateway on this host, e.g. the simulated default's 127.0.0.1:51830)
    as seen from the CVM's namespace: the host's side of its veth, the namespace's default route,
    as a VM on QEMU's user network reaches the host's loopback at its gateway (10.0.2.2; netns None:
    the VM's own default route)."""
    host, _sep, port = endpoint.rpartition(":")
    if not ipaddress.ip_address(host.strip("[]")).is_loopback:
        return endpoint
    done = subprocess.run(_ip(netns, "-4", "route", "show", "default"), capture_output=True, text=True,
                          timeout=10, check=False)
    words = done.stdout.split()
    if done.returncode != 0 or "via" not in words:
        raise DstackError("endpoint", f"the gateway is at {endpoint}, on this host's loopback, and "
                                      f"{_where(netns)} has no default route to the host")
    return f"{words[words.index('via') + 1]}:{port}"


def _ip(netns, *args):
    """`ip` argv in the CVM's namespace, or in this one (a VM's) when netns is None."""
    return ["ip", *(["-n", netns] if netns else []), *args]


def _where(netns):
    return f"the namespace {netns}" if netns else "this VM's network"


def _ip_route(netns, prefix, interface):
    done = subprocess.run(_ip(netns, "route", "replace", prefix, "dev", interface), capture_output=True,
                          text=True, timeout=10, check=False)
    if done.returncode != 0:
        raise DstackError("route", f"cannot route {prefix} through {interface} in {_where(netns)}: "
                                   f"{done.stderr.strip()[:200]}")
