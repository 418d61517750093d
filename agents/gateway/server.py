# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""`dstack-gateway serve`: the whole gateway from one gateway.toml.

Processes (each line says what came up where on stderr):

    supervisor    this process. It owns the WireGuard hub: the `[core.wg] interface` brought up
                  with wireguard-go (wireguard.WgInterface: address `ip`, `listen_port`, the
                  private key of `private_key` or, when the file sets none, of
                  <state_dir>/wireguard.key, made once at 0600); then the peers made exactly the
                  store's (sync_peers: a restart brings every registered CVM back), then every
                  min(`[core.recycle] interval`, 30 s) the handshakes and endpoints read back
                  into the store and every `interval` the stale instances recycled. It forks:
    control       a gunicorn master and its `rpc.workers` workers: the control API over mutual TLS
                  on rpc.listen and the Admin API on admin.listen (as `serve-control`); they
                  change peers through the same interface's UAPI socket.
    data plane    `[core.proxy] workers` processes (at least one), each an uvloop event loop
                  with GatewayProxy on `listen_addr:listen_port` (SO_REUSEPORT when more than
                  one), routing through StoreRouter over the same SQLite store; the wildcard
                  certificate `cert_chain` / `cert_key` terminates TLS (with [core.certbot], the
                  store's ACME certificate, and each custom domain an app declared its own:
                  custom_certs.py, whose watcher is a thread of the supervisor).

Why children rather than threads: gunicorn's arbiter owns the signals and the forks of its
process, and the event loop should not share a GIL with request handlers that verify quotes.
Why the supervisor keeps the interface: whichever child fails, the one process that made the
interface takes it down. A child that exits stops the gateway (exit status 2, naming it) so that
supervisord or systemd restarts it whole; SIGTERM or SIGINT stops it cleanly (exit 0): children
sent SIGTERM and reaped (SIGKILL after CHILD_STOP_TIMEOUT), the endpoints saved, the interface
down, and each child's process group killed (what a killed gunicorn master left). Each child has
its own process group and gets SIGTERM from the kernel if the supervisor dies (PR_SET_PDEATHSIG).

Endpoints: a new interface has no session and does not know where its peers are, and a CVM
whose session died only starts a new handshake minutes later. So the endpoints WireGuard learns
are kept in the store (on every refresh and at stop, with the handshakes) and set again at start,
and one empty datagram to each of those CVMs makes WireGuard start each handshake at once: a
restart keeps every route, and no idle CVM looks stale to the recycler.

A cluster ([core.sync] etcd_endpoints; cluster.py): at start the supervisor claims this node's hub
address, writes its signed record and takes its lease; every [core.sync] interval it renews the
lease and makes the hub's peers the store's (every node's hub has every CVM: a CVM registered
through another node is added at the endpoint that node heard it at, and poked as above), so
every node routes every app; at stop it revokes the lease first (the others stop giving this
node to CVMs at once; a node that dies is down once its lease expires).
"""

import asyncio
import contextlib
import ctypes
import ipaddress
import logging
import multiprocessing
import os
import signal
import socket
import ssl
import sys
import threading
import time
from multiprocessing import connection as mp_connection

from ansible_collections.dstack.tee.agents.gateway import acme, custom_certs
from ansible_collections.dstack.tee.agents.gateway import config as gateway_config
from ansible_collections.dstack.tee.agents.gateway.proxy import GatewayProxy, ProxySettings, StoreRouter, server_contexts
from ansible_collections.dstack.tee.plugins.module_utils import guest_client, wireguard
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.fileio import atomic_write, read_text

log = logging.getLogger("dstack.gateway")

KEY_FILE = "wireguard.key"
RA_TLS_CERT_FILE, RA_TLS_KEY_FILE = "rpc-ra-tls.crt", "rpc-ra-tls.key"
GUEST_AGENT_WAIT = 120.0      # how long serve waits for its CVM's guest agent to have booted (keys from the KMS)
HANDSHAKE_REFRESH = 30.0      # at most this long between reads of the handshakes (the data plane orders by them)
SUPERVISE_TICK = 1.0          # how often wireguard-go (not a forked child) is checked
START_TIMEOUT = 60.0
CHILD_STOP_TIMEOUT = 10.0
GUNICORN_GRACEFUL = 5         # seconds gunicorn gives a worker's requests at stop
PR_SET_PDEATHSIG = 1
_FORK = multiprocessing.get_context("fork")


# ---- configuration -------------------------------------------------------------------------------

def gateway_private_key(state_dir):
    """The gateway's WireGuard private key from <state_dir>/wireguard.key, made there (0600) on the
    first start. A file others may read, or one that is no key, is refused naming the file."""
    path = os.path.join(state_dir, KEY_FILE)
    if not os.path.exists(path):
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        atomic_write(path, (wireguard.generate_private_key() + "\n").encode(), mode=0o600)
        log.info("WireGuard: made the gateway's private key %s (0600)", path)
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        raise DstackError("core.wg.private_key", f"{path} may be read by others (mode {mode:04o}): chmod 600 it")
    text = read_text(path, "core.wg.private_key", encoding="ascii").strip()
    wireguard.parse_key(text, f"core.wg.private_key ({path})")
    return text


def load_config(path, overrides=None):
    """gateway.toml for `serve`: as config.load_config, and with no core.wg.private_key set the
    key of <state_dir>/wireguard.key (the state directory is read from the same configuration)."""
    overrides = dict(overrides or {})
    try:
        config = gateway_config.load_config(path, overrides=overrides)
    except DstackError as exc:
        if exc.field != "core.wg.private_key" or not exc.reason.startswith("is required"):
            raise
        # No key at all: a stand-in public key lets the rest be read (the state directory first).
        stand_in = wireguard.public_key(wireguard.generate_private_key())
        config = gateway_config.load_config(path, overrides=dict(overrides, **{"core.wg.public_key": stand_in}))
        config["core"]["wg"]["public_key"] = ""
    if config["core"]["wg"]["private_key"]:
        return config
    key_file = os.path.join(config["core"]["state_dir"], KEY_FILE)
    key = gateway_private_key(config["core"]["state_dir"])
    given_public = config["core"]["wg"]["public_key"]
    if given_public and given_public != wireguard.public_key(key):
        raise DstackError("core.wg.public_key", f"is not the public half of {key_file}, the key serve uses when "
                                                "core.wg.private_key is not set")
    return gateway_config.load_config(path, overrides=dict(overrides, **{"core.wg.private_key": key}))


def attested_rpc_certificate(config, wait=GUEST_AGENT_WAIT):
    """With rpc.guest_agent: the control and Admin APIs' certificate from the guest agent of the
    gateway's own CVM (GetTlsKey with usage_ra_tls: the KMS signs it, the quote of the gateway's
    boot is in it), written to the state directory (0600) and set as rpc.cert and rpc.key. This is
    the gateway's attested identity: a CVM registers only with a gateway whose certificate names
    the KMS's gateway_app_id. Asked again at every start; the guest agent may still be booting, so
    it is retried for `wait` seconds."""
    rpc, state_dir = config["rpc"], config["core"]["state_dir"]
    if not rpc["guest_agent"]:
        return
    params = {"subject": config["core"]["rpc_domain"] or "dstack-gateway", "alt_names": rpc["cert_names"], "usage_ra_tls": True,
              "usage_server_auth": True, "usage_client_auth": False}
    deadline, said = time.monotonic() + wait, ""
    while True:
        try:
            answer = guest_client.call(rpc["guest_agent"], "GetTlsKey", params, field="rpc.guest_agent")
            chain, key = answer["certificate_chain"], answer["key"]
            break
        except DstackError as exc:
            if time.monotonic() > deadline:
                raise DstackError("rpc.guest_agent", f"no RA-TLS certificate within {wait:.0f} s: {exc.reason}") from None
            if exc.reason != said:
                log.info("waiting for the gateway CVM's guest agent (%s)", exc.reason)
                said = exc.reason
            time.sleep(1.0)
        except (KeyError, TypeError):
            raise DstackError("rpc.guest_agent", "GetTlsKey answered without certificate_chain and key") from None
    root = read_text(rpc["kms_root_ca"], "rpc.kms_root_ca").strip()
    served = [pem for pem in chain if pem.strip() != root]  # the CVMs have the root; serve leaf and app CA
    cert_path, key_path = os.path.join(state_dir, RA_TLS_CERT_FILE), os.path.join(state_dir, RA_TLS_KEY_FILE)
    os.makedirs(state_dir, mode=0o700, exist_ok=True)   # a first start: nothing made it yet
    atomic_write(key_path, key.encode(), mode=0o600)
    atomic_write(cert_path, "".join(pem if pem.endswith("\n") else pem + "\n" for pem in served).encode(), mode=0o600)
    rpc["cert"], rpc["key"] = cert_path, key_path
    log.info("control API certificate: RA-TLS from the gateway CVM's guest agent %s (%s)", rpc["guest_agent"], cert_path)


def check_serving(config):
    """What `serve` needs beyond what config.load_config checks; the two termination contexts."""
    rpc, proxy, wg = config["rpc"], config["core"]["proxy"], config["core"]["wg"]
    if not rpc["listen"]:
        raise DstackError("rpc.listen", "is required for serve")
    if not rpc["cert"]:
        raise DstackError("rpc.cert", "is required for serve: the control API is served over TLS only "
                                      "(RegisterCvm authenticates CVMs by their client certificate)")
    acme_on = config["core"].get("certbot", {}).get("enabled", False)
    for key in ("cert_chain", "cert_key"):
        # With [core.certbot] the certificate comes from the ACME server; the files stay optional.
        if not proxy[key] and not acme_on:
            raise DstackError(f"core.proxy.{key}", "is required for serve: the wildcard certificate (and its key) "
                                                   f"for *.{proxy['base_domain']} that terminates TLS (or "
                                                   "[core.certbot] enabled)")
    try:
        contexts = server_contexts(proxy["cert_chain"], proxy["cert_key"]) if proxy["cert_chain"] else None
    except (OSError, ssl.SSLError) as exc:
        raise DstackError("core.proxy.cert_chain", f"cannot load {proxy['cert_chain']} with core.proxy.cert_key "
                                                   f"{proxy['cert_key']}: {getattr(exc, 'strerror', None) or exc}") from None
    network = ipaddress.ip_interface(wg["ip"]).network
    if not ipaddress.ip_network(wg["client_ip_range"]).subnet_of(network):
        raise DstackError("core.wg.client_ip_range", f"must lie within {network}, core.wg.ip's network (the "
                                                     "interface's only route to the CVMs)")
    return contexts


# ---- the children ------------------------------------------------------------------------------

def _child_setup():
    """In a forked child: its own process group (the supervisor alone takes a terminal's ^C and
    stops the children in order; what a child forks goes with its group), the default signal
    dispositions back, and SIGTERM when the supervisor dies."""
    os.setpgid(0, 0)
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the supervisor's stop still reaps us
        pass
    if os.getppid() == 1:  # the supervisor died before prctl
        os._exit(1)


def run_control(config, service=None, when_ready=None):
    """The control API (mutual TLS, client certificates under the KMS root) and, with admin.listen,
    the Admin API, under one gunicorn until it stops (serve's control child; serve-control)."""
    from ansible_collections.dstack.tee.agents.gateway.app import create_admin_app, create_app, serve_both  # pylint: disable=import-outside-toplevel
    from ansible_collections.dstack.tee.agents.wsgi import run_gunicorn  # pylint: disable=import-outside-toplevel

    rpc, admin = config["rpc"], config["admin"]
    control = create_app(config, service=service)  # fails here, before listening, on a bad configuration
    admin_app = create_admin_app(config, control.extensions["dstack_gateway"]) if admin["listen"] else None
    binds = [rpc["listen"]] + ([admin["listen"]] if admin["listen"] else [])
    admin_port = int(admin["listen"].rpartition(":")[2]) if admin["listen"] else None
    run_gunicorn(serve_both(control, admin_app, admin_port), bind=binds, certfile=rpc["cert"], keyfile=rpc["key"],
                 ca_certs=rpc["kms_root_ca"], cert_reqs=ssl.CERT_OPTIONAL, workers=rpc["workers"],
                 worker_class="gthread", threads=4, timeout=60, graceful_timeout=GUNICORN_GRACEFUL,
                 accesslog="-", errorlog="-", loglevel="info", **({"when_ready": when_ready} if when_ready else {}))


def _control_main(config, service, ready):
    """The control and Admin APIs under gunicorn (a child)."""
    _child_setup()
    run_control(config, service, when_ready=lambda _arbiter: ready.send(("control", os.getpid())))


APP_INFO_TTL = 10.0  # seconds /.dstack/app-info is served from memory (a public page: one ask of the agent per 10 s)


def _app_info_source(config):
    """/.dstack/app-info's source: the Info of the gateway's own CVM (rpc.guest_agent), cached
    APP_INFO_TTL seconds; None without a guest agent (the page is then 404)."""
    socket_path = config["rpc"]["guest_agent"]
    if not socket_path:
        return None
    cache = {"at": -APP_INFO_TTL, "info": None}

    def app_info():
        now = time.monotonic()
        if now - cache["at"] >= APP_INFO_TTL:
            cache["info"], cache["at"] = guest_client.info(socket_path, timeout=10, field="rpc.guest_agent"), now
        return cache["info"]
    return app_info


def _proxy_main(config, store, ready):
    """One data-plane process: GatewayProxy on uvloop until SIGTERM (a child)."""
    _child_setup()
    # The router reads the store on the event loop: a cluster's store asks each etcd member once,
    # without waiting out an election, so that etcd down refuses new routes at once, not stalls the loop.
    store = store.for_data_plane() if hasattr(store, "for_data_plane") else store
    import uvloop  # pylint: disable=import-outside-toplevel

    proxy_config = config["core"]["proxy"]
    settings = ProxySettings.from_config(proxy_config)
    tls = tls_h2 = served = None
    if proxy_config["cert_chain"]:
        tls, tls_h2 = server_contexts(proxy_config["cert_chain"], proxy_config["cert_key"])
    if config["core"].get("certbot", {}).get("enabled"):
        # The ACME certificate from the store (serve ordered it before forking us), then watched.
        served = acme.ServedCertificate(store, acme.certificate_names(config)[0], config["core"]["state_dir"])
        tls, tls_h2 = served.load() or (tls, tls_h2)
    if tls is None:
        raise DstackError("core.certbot", "no certificate to serve: none in the store and no core.proxy.cert_chain")
    # The custom domains apps declared, each with its own certificate (custom_certs.py).
    custom = custom_certs.ServedCustomCertificates(store, config["core"]["state_dir"]) \
        if custom_certs.enabled(config) else None

    async def watch_certificate(proxy):
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(acme.CERT_CHECK_INTERVAL)
            try:
                contexts = await loop.run_in_executor(None, served.load) if served else None
            except Exception as exc:  # pylint: disable=broad-exception-caught
                log.warning("the renewed certificate could not be loaded (still serving the last one): %s", exc)
                contexts = None
            if contexts is not None:
                proxy.set_contexts(*contexts)
                log.info("data plane (pid %s): serving the renewed certificate for new connections", os.getpid())
            try:
                names = await loop.run_in_executor(None, custom.load) if custom else None
            except Exception as exc:  # pylint: disable=broad-exception-caught
                log.warning("the custom domains' certificates could not be loaded (still serving the last ones): %s", exc)
                names = None
            if names is not None:
                proxy.set_custom_contexts(names)
                log.info("data plane (pid %s): custom domains with their own certificates: %s", os.getpid(),
                         ", ".join(sorted(names)) or "none")

    async def serve():
        proxy = GatewayProxy(settings, StoreRouter(store), tls, tls_h2, app_info=_app_info_source(config),
                             acme_info=lambda: acme.acme_info(store))
        if custom is not None:
            proxy.set_custom_contexts(custom.load() or {})
        await proxy.start()
        watcher = asyncio.get_running_loop().create_task(watch_certificate(proxy)) if served or custom else None
        if config["core"]["wg"]["netns"]:
            # Listening where serve runs, connecting from where the tunnels are: this loop's thread
            # (the only one that connects) enters the WireGuard namespace.
            wireguard.enter_netns(config["core"]["wg"]["netns"])
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        ready.send(("data plane", os.getpid(), tuple(proxy.sockname[:2])))
        try:
            await stop.wait()
        finally:
            if watcher is not None:
                watcher.cancel()
            await proxy.close()

    uvloop.run(serve())


# ---- the supervisor ----------------------------------------------------------------------------

class Supervisor:
    """One gateway: `Supervisor(config).run()` serves until SIGTERM/SIGINT (see the module's docstring)."""

    def __init__(self, config, wireguard_go="wireguard-go"):
        self.config = config
        self.wireguard_go = wireguard_go
        self.interface = None
        self.hub = None
        self.service = None
        self.children = []          # [(what, multiprocessing process)]
        self.renewals = None        # acme.RenewalSchedule with [core.certbot]
        self.declared = None        # custom_certs.DeclaredDomains with [core.certbot] custom_domain_certs
        self.stopping = None        # the signal's name once one arrived
        self.failure = None
        self._wakeup = None

    # ---- signals: a flag and a byte on a pipe the loop waits on ------------------------------------

    def _on_signal(self, signum, _frame):
        if signum != signal.SIGCHLD and self.stopping is None:
            self.stopping = signal.Signals(signum).name

    def _install_signals(self):
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        os.set_blocking(write_end, False)
        self._wakeup = (read_end, write_end)
        signal.set_wakeup_fd(write_end)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signum, self._on_signal)

    def _restore_signals(self):
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        if self._wakeup:
            for fd in self._wakeup:
                os.close(fd)
            self._wakeup = None

    def _drain_wakeup(self):
        try:
            while os.read(self._wakeup[0], 512):
                pass
        except BlockingIOError:
            pass

    def _wait(self, extra, timeout):
        """Wait for a signal, a child's exit or one of `extra` (multiprocessing connections)."""
        waitables = [self._wakeup[0], *extra, *(process.sentinel for _what, process in self.children)]
        ready = mp_connection.wait(waitables, timeout=max(0.0, timeout))
        if self._wakeup[0] in ready:
            self._drain_wakeup()
        return ready

    # ---- start, supervise, stop ------------------------------------------------------------------

    def run(self):
        """Serve until a signal (returns) or a failure (DstackError naming what failed)."""
        check_serving(self.config)  # fails here, before anything is up
        from ansible_collections.dstack.tee.agents.gateway.service import GatewayService  # pylint: disable=import-outside-toplevel

        self._install_signals()
        try:
            self._bring_up_wireguard()
            self.service = GatewayService(self.config, hub=self.hub)
            if self.service.cluster is not None:
                self.service.cluster.join()   # its hub address claimed, its record and lease in the store
            self._restore_peers()
            if self.service.acme is not None and self.stopping is None:
                # Before the data plane: it serves the certificate the store holds.
                self.service.acme.ensure_current()
            if self.stopping is None:
                self._start_children()
            if self.service.acme is not None and self.stopping is None and self.failure is None:
                if custom_certs.enabled(self.config):
                    self.declared = custom_certs.DeclaredDomains(self.config, self.service.store,
                                                                 self.service.acme).start()
                self.renewals = acme.RenewalSchedule(
                    self.service.acme, also=[self.declared.renew_all] if self.declared else []).start()
            if self.stopping is None and self.failure is None:
                self._supervise()
        finally:
            self._stop()
            self._restore_signals()
        if self.failure:
            raise DstackError("serve", self.failure)
        log.info("stopped (%s)", self.stopping)

    def _bring_up_wireguard(self):
        wg = self.config["core"]["wg"]
        if wg["netns"] and not wireguard.netns_exists(wg["netns"]):
            wireguard.netns_add(wg["netns"])
            wireguard.configure_link("lo", wg["netns"])
            log.info("WireGuard: made the network namespace %s (the CVMs' tunnel addresses live there only)", wg["netns"])
        self.interface = wireguard.WgInterface(wg["interface"], wireguard_go=self.wireguard_go,
                                               link_netns=wg["netns"] or None)
        self.hub = self.interface.up(address=wg["ip"], private_key=wg["private_key"], listen_port=wg["listen_port"])
        log.info("WireGuard: %s up at %s%s, UDP port %s, public key %s (wireguard-go pid %s)", wg["interface"], wg["ip"],
                 f" in netns {wg['netns']}" if wg["netns"] else "", wg["listen_port"], wg["public_key"],
                 self.interface.process.pid)

    def _restore_peers(self):
        """The interface's peers: exactly the store's, each at its last known endpoint."""
        count = self.service.sync_peers()
        store = self.service.store
        endpoints = store.endpoints()
        restored = 0
        for instance in store.instances():
            endpoint = endpoints.get(instance.public_key)
            if endpoint:
                try:
                    self.hub.set_peer(instance.public_key, [f"{instance.client_ip}/32"], endpoint=endpoint)
                    restored += 1
                except DstackError as exc:  # a bad stored endpoint: the CVM's next handshake finds it
                    log.warning("WireGuard: the endpoint of instance %s not restored: %s", instance.instance_id, exc)
        log.info("WireGuard: %d peer(s) from the store (%d at their last endpoint)", count, restored)
        if restored:
            self._poke([i.client_ip for i in store.instances() if endpoints.get(i.public_key)])

    def _poke(self, addresses):
        """One UDP datagram to each restored CVM's tunnel address (its discard port), sent from the
        interface's namespace: WireGuard sends nothing before it has something to send, so without
        this the gateway would start no handshake until the first request for that CVM, and a CVM
        idle since the restart would look stale to the recycler."""
        netns = self.config["core"]["wg"]["netns"]

        def send():
            if netns:
                wireguard.enter_netns(netns)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                for address in addresses:
                    try:
                        sock.sendto(b"", (address, 9))
                    except OSError as exc:
                        log.warning("WireGuard: no handshake started with %s: %s", address, exc)

        thread = threading.Thread(target=send, name="wireguard-poke")  # its namespace goes with it
        thread.start()
        thread.join(10)
        log.info("WireGuard: a handshake started with %d CVM(s) at their last endpoint", len(addresses))

    def _start_children(self):
        reader, writer = _FORK.Pipe(duplex=False)
        proxy_workers = max(1, self.config["core"]["proxy"]["workers"])
        try:
            self._fork("control API", _control_main, (self.config, self.service, writer))
            for _index in range(proxy_workers):
                self._fork("data plane", _proxy_main, (self.config, self.service.store, writer))
            waiting = 1 + proxy_workers
            deadline = time.monotonic() + START_TIMEOUT
            while waiting and self.stopping is None and self._children_alive():
                if time.monotonic() > deadline:
                    self.failure = f"the gateway's processes did not start in {START_TIMEOUT:.0f} s"
                    return
                if reader in self._wait([reader], deadline - time.monotonic()):
                    self._announce(reader.recv())
                    waiting -= 1
            if not waiting:
                self._announce_ready()
        finally:
            reader.close()
            writer.close()

    def _fork(self, what, target, args):
        process = _FORK.Process(target=target, args=(*args,), name=f"dstack-gateway {what}")
        process.start()
        self.children.append((what, process))

    def _announce(self, message):
        rpc, admin = self.config["rpc"], self.config["admin"]
        if message[0] == "control":
            log.info("control API on https://%s/prpc/Gateway.* (mutual TLS, client certificates under %s)%s "
                     "(gunicorn pid %s)", rpc["listen"], rpc["kms_root_ca"],
                     f", Admin API on https://{admin['listen']}/prpc/Admin.*" if admin["listen"] else "", message[1])
        else:
            host, port = message[2]
            log.info("data plane on %s:%s for *.%s (uvloop, pid %s)", host, port,
                     self.config["core"]["proxy"]["base_domain"], message[1])

    def _announce_ready(self):
        recycle = self.config["core"]["recycle"]
        log.info("ready: handshakes read every %.0f s; stale instances recycled every %.0f s after %.0f s "
                 "without a handshake%s", self._refresh_every(), recycle["interval"], recycle["timeout"],
                 "" if recycle["enabled"] else " (recycling disabled)")

    def _refresh_every(self):
        return max(0.1, min(self.config["core"]["recycle"]["interval"], HANDSHAKE_REFRESH))

    def _children_alive(self):
        for what, process in self.children:
            if not process.is_alive():
                self.failure = f"the {what} process {process.pid} exited with status {process.exitcode}"
                log.error("%s", self.failure)
                return False
        return True

    def _supervise(self):
        interval = max(0.1, self.config["core"]["recycle"]["interval"])
        next_refresh = time.monotonic() + self._refresh_every()
        next_recycle = time.monotonic() + interval
        next_sync = time.monotonic() + self.config["core"]["sync"]["interval"]
        while self.stopping is None:
            now = time.monotonic()
            self._wait([], min(next_refresh - now, next_recycle - now, SUPERVISE_TICK))
            if self.stopping is not None or not self._children_alive():
                return
            if not self.interface.running:
                self.failure = f"wireguard-go for {self.interface.name} exited"
                log.error("%s", self.failure)
                return
            now = time.monotonic()
            if now >= next_refresh:
                next_refresh = now + self._refresh_every()
                self._guarded("reading the handshakes", self._refresh)
            if now >= next_recycle:
                next_recycle = now + interval
                self._guarded("recycling", self.service.recycle)
            if now >= next_sync and self.service.cluster is not None:
                next_sync = now + self.config["core"]["sync"]["interval"]
                self._guarded("renewing this node's lease", self.service.cluster.heartbeat)
                self._guarded("taking the cluster's registrations into the hub", self._sync_cluster_peers)

    @staticmethod
    def _guarded(what, step):
        # One failed round (the UAPI socket busy, the store locked) must not stop the gateway.
        try:
            step()
        except Exception as exc:  # pylint: disable=broad-exception-caught
            log.warning("%s failed, retried next round: %s", what, exc)

    def _refresh(self):
        self.service.refresh_handshakes()
        self._save_endpoints()

    def _sync_cluster_peers(self):
        """The hub's peers made the store's, which the other nodes' registrations and removals
        change too (each node's hub has every instance, so every node routes every app). A peer
        new here is set at the endpoint a node last heard it at, and sent one datagram, so this
        node starts the handshake itself (the CVM's own tries may have stopped). Nothing is
        applied when the peer set is already the store's: the sessions stay."""
        store = self.service.store
        instances = store.instances()
        hub_peers = {p.public_key: p for p in self.hub.get()["peers"]}
        current = {k: sorted(p.allowed_ips) for k, p in hub_peers.items()}
        wanted = {i.public_key: [f"{i.client_ip}/32"] for i in instances}
        # Peers this hub never heard from: their endpoint, once another node knows it, starts the handshake.
        unheard = [i for i in instances if i.public_key in hub_peers and not hub_peers[i.public_key].endpoint]
        if current == wanted and not unheard:
            return
        endpoints = store.endpoints()
        added = [i for i in instances if i.public_key not in current]
        reached = [i for i in unheard if endpoints.get(i.public_key)]
        if current != wanted:
            self.hub.sync_peers([wireguard.Peer(i.public_key, wanted[i.public_key],
                                                endpoint=None if i.public_key in current else endpoints.get(i.public_key))
                                 for i in instances])
            log.info("cluster: WireGuard peers from the store: %d added, %d removed, %d changed", len(added),
                     len(set(current) - set(wanted)), sum(1 for k in wanted if k in current and current[k] != wanted[k]))
        for instance in reached:
            self.hub.set_peer(instance.public_key, wanted[instance.public_key], endpoint=endpoints[instance.public_key])
        known = [i.client_ip for i in added + reached if endpoints.get(i.public_key)]
        if known:
            self._poke(known)

    def _save_endpoints(self):
        peers = self.hub.get()["peers"]
        self.service.store.record_endpoints({p.public_key: p.endpoint for p in peers if p.endpoint})

    def _stop(self):
        """Children stopped and reaped, handshakes and endpoints saved, the interface down; whatever was started."""
        if self.service is not None and self.service.cluster is not None:
            # Marked down first: from now on the other nodes stop giving this one to CVMs.
            self._guarded("leaving the cluster", self.service.cluster.leave)
        if self.renewals is not None:
            self.renewals.stop()
            self.renewals = None
        if self.declared is not None:
            self.declared.stop()
            self.declared = None
        alive = [(what, process) for what, process in self.children if process.is_alive()]
        if alive:
            log.info("stopping %s", ", ".join(f"the {what} (pid {process.pid})" for what, process in alive))
        for _what, process in alive:
            process.terminate()
        deadline = time.monotonic() + CHILD_STOP_TIMEOUT
        for what, process in self.children:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("the %s (pid %s) did not stop in %.0f s: killed", what, process.pid, CHILD_STOP_TIMEOUT)
                process.kill()
                process.join()
            # What the child forked and left behind (gunicorn's workers, when their master was killed).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.close()
        self.children = []
        if self.hub is not None:
            if self.service is not None and self.interface.running:
                self._guarded("saving the handshakes and endpoints", self._refresh)
            self.interface.down()
            log.info("WireGuard: %s down", self.interface.name)
            self.interface = self.hub = None


def serve(config_path, overrides=None):
    """`dstack-gateway serve`: load, check, and run until stopped."""
    config = load_config(config_path, overrides)
    attested_rpc_certificate(config)
    Supervisor(config).run()


if __name__ == "__main__":  # pragma: no cover - the command is agents/gateway/cli.py
    sys.exit("use: dstack-gateway serve --config gateway.toml")
