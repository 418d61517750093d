# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The gateway's data plane: one TLS listener that routes every connection by its SNI to a CVM.

    proxy = GatewayProxy(ProxySettings(base_domain="dstack.localhost", listen_port=8443),
                         router, *server_contexts("wildcard.crt", "wildcard.key"))
    await proxy.start()          # on a running (uvloop) event loop; proxy.sockname is the bound address
    ...
    await proxy.close()
or, blocking, `run(settings, router, tls, tls_h2)`.

The path of one connection:
1. accept; with inbound_pp, consume the balancer's PROXY header (its source is then the client);
   peek (MSG_PEEK, nothing consumed) until the TLS ClientHello is whole (sni.py), within the
   handshake timeout; SO_RCVLOWAT makes the kernel wake us only when the bytes announced by the
   record headers are there.
2. route: the server name's `<id>[-<port>][s|g].<base>` (sni.parse_route); `gateway.<base>` is the
   gateway's own pages (/health, /.dstack/index, /.dstack/app-info, /.dstack/acme-info); otherwise router.resolve(id) gives the candidates (instance_id, ip),
   freshest first, each kept only when its port policy allows the port. A name that is neither a
   base domain nor under one is a custom domain: its DNS TXT record `_dstack-app-address.<name>`
   (custom_domains.py, looked up off the loop) names `<app_id>:<port>`, passed through as TLS to
   that app (registered here, its port policy applied); a name the app declared (custom_certs.py,
   set_custom_contexts) is terminated instead, with that name's own certificate, when the record
   names exactly that app and port. A refusal here is a TLS alert to the client
   (nothing was consumed, so it reads as the server's answer to its hello).
3. connect to the first connect_top_n candidates, starting with the next in turn (so an app's
   connections go round its instances) and starting the next candidate when one fails or has not
   answered within CONNECT_STAGGER (Happy Eyeballs, RFC 8305); the first that answers wins, the
   others are closed. dstack starts them all at once, so the nearest instance takes nearly every
   connection; in turn, each takes its share and a dead one costs at most the stagger. A PROXY
   v2 header goes first when the winner's policy says pp for the port.
4. hand the socket to the event loop: as it is for passthrough (the peeked ClientHello is still
   in the socket, so the app sees the client's own handshake), or with TLS (the caller's wildcard
   context; the h2-only one for `g`) for termination. Then asyncio Protocols relay bytes both
   ways with flow control (a full write buffer on one side pauses reading on the other).

Limits: connect, handshake (hello + TLS), idle (no byte either way) and total timeouts, and
max_connections_per_app (counted per routed id, as dstack does). The proxy connects to nothing
but the IP literals the router returns.

The router is called on the event loop and must answer from memory, not block on I/O
(StoreRouter answers from a ttl cache over the control plane's Store):
    resolve(id) -> [(instance_id, ip), ...]   an instance_id gives that one CVM, an app_id its
                                              instances, freshest handshake first; [] = unknown
    port_policy(instance_id) -> None | {"ports": [{"port": int, "pp": bool}], "restrict_mode": bool}
"""

import asyncio
import errno
import ipaddress
import json
import logging
import socket
import ssl
import time
from dataclasses import dataclass, field

from ansible_collections.dstack.tee.agents.gateway import custom_domains, proxy_protocol, sni

log = logging.getLogger("dstack.gateway.proxy")

RESERVED_GATEWAY_ID = "gateway"
MAX_PEEK = 2 * sni.MAX_CLIENT_HELLO   # record headers around a ClientHello split in many records
ACCEPT_BATCH = 64
CONNECT_STAGGER = 0.25     # s before the next candidate is tried too (RFC 8305's Connection Attempt Delay)
HEALTH_REQUEST_LIMIT = 8192

# TLS alert descriptions (RFC 8446 6): the client's TLS stack names them in its error.
ALERT_HANDSHAKE_FAILURE = 40
ALERT_ACCESS_DENIED = 49
ALERT_DECODE_ERROR = 50
ALERT_INTERNAL_ERROR = 80
ALERT_UNRECOGNIZED_NAME = 112


def _alert_record(description):
    # A fatal alert in a plaintext record: what a server sends when it refuses a ClientHello.
    return bytes((21, 3, 3, 0, 2, 2, description))


@dataclass(frozen=True)
class Timeouts:
    """[core.proxy.timeouts], in seconds (dstack's defaults)."""
    connect: float = 5.0
    handshake: float = 5.0
    idle: float = 600.0
    total: float = 5 * 3600.0
    dns_resolve: float = 5.0      # a custom domain's TXT lookups, all of them


@dataclass(frozen=True)
class ProxySettings:
    """[core.proxy]: the listener, the base domain(s) served, the candidates and the caps."""
    base_domain: str | tuple
    listen_addr: str = "0.0.0.0"
    listen_port: int = 443
    connect_top_n: int = 3
    max_connections_per_app: int = 2000   # 0: no cap
    timeouts: Timeouts = field(default_factory=Timeouts)
    reuse_port: bool = False      # one process per core on the same port (SO_REUSEPORT)
    # dstack's inbound_pp_enabled: a load balancer in front sends a PROXY header (v1 or v2) first,
    # and every connection must then start with one.
    inbound_pp: bool = False
    backlog: int = 1024
    # Custom domains (custom_domains.py): the TXT label ("" = none), dstack's _tapp-address too,
    # and the resolvers asked ("IP:PORT"; none = the system's).
    app_address_ns_prefix: str = "_dstack-app-address"
    app_address_ns_compat: bool = True
    dns_resolver: tuple = ()

    @classmethod
    def from_config(cls, proxy):
        """From the checked [core.proxy] table of gateway.toml (config.load_config()["core"]["proxy"])."""
        timeouts = proxy.get("timeouts", {})
        return cls(base_domain=proxy["base_domain"], listen_addr=proxy["listen_addr"],
                   listen_port=proxy["listen_port"], connect_top_n=proxy["connect_top_n"],
                   max_connections_per_app=proxy["max_connections_per_app"],
                   inbound_pp=proxy.get("inbound_pp_enabled", False), reuse_port=proxy.get("workers", 0) > 1,
                   app_address_ns_prefix=proxy.get("app_address_ns_prefix", "_dstack-app-address"),
                   app_address_ns_compat=proxy.get("app_address_ns_compat", True),
                   dns_resolver=tuple(proxy.get("dns_resolver", ())),
                   timeouts=Timeouts(**{key: timeouts[key] for key in ("connect", "handshake", "idle", "total",
                                                                       "dns_resolve") if key in timeouts}))

    @property
    def base_domains(self):
        names = (self.base_domain,) if isinstance(self.base_domain, str) else tuple(self.base_domain)
        return frozenset(name.lower().strip(".") for name in names)


def server_contexts(certfile, keyfile):
    """The two termination contexts from the wildcard certificate: (http/1.1, h2 only for `g`)."""
    contexts = []
    for protocols in (["http/1.1"], ["h2"]):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(certfile, keyfile)
        context.set_alpn_protocols(protocols)
        contexts.append(context)
    return tuple(contexts)


def port_decision(policy, port):
    """(allowed, send PROXY header) for `port` under an instance's port policy.

    No policy: allowed, no header. A policy that is not of dstack's shape refuses (fail closed).
    """
    if policy is None:
        return True, False
    flags = _port_flags(policy)
    if flags is None:
        return False, False
    restrict = policy.get("restrict_mode", False)
    if port in flags:
        return True, flags[port]
    return not restrict, False


def _port_flags(policy):
    """{port: pp} of a policy of dstack's shape, or None (not a dict, a port not 1-65535, a flag
    that is not a JSON boolean: "false" must not read as true)."""
    if not isinstance(policy, dict) or not isinstance(policy.get("restrict_mode", False), bool):
        return None
    entries = policy.get("ports", [])
    if not isinstance(entries, list):
        return None
    flags = {}
    for entry in entries:
        if not isinstance(entry, dict):
            return None
        port, send_pp = entry.get("port"), entry.get("pp", False)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536 \
                or not isinstance(send_pp, bool):
            return None
        flags[port] = send_pp
    return flags


class _Side(asyncio.Protocol):
    """One end of a relayed connection: what it receives is written to its peer's transport."""

    __slots__ = ("conn", "transport", "peer", "clock")

    def __init__(self, conn, clock):
        self.conn = conn          # None while this is an upstream still racing the other candidates
        self.transport = None
        self.peer = None
        self.clock = clock

    def connection_made(self, transport):
        self.transport = transport
        if self.peer is None:
            # An upstream that connects before the client side exists (a server that speaks first
            # must wait for the relay): reading resumes when the two are linked.
            transport.pause_reading()

    def data_received(self, data):
        self.peer.write(data)
        self.conn.last = self.clock()

    def eof_received(self):
        conn, peer = self.conn, self.peer
        if conn is None:
            return False
        if peer is not None and not peer.is_closing() and peer.can_write_eof():
            peer.write_eof()
            conn.eofs += 1
            if conn.eofs < 2 and self.transport.can_write_eof():
                return True       # the other direction may still carry data (half close; not over TLS)
        conn.close()
        return False

    def pause_writing(self):
        if self.peer is not None and not self.peer.is_closing():
            self.peer.pause_reading()

    def resume_writing(self):
        if self.peer is not None and not self.peer.is_closing():
            self.peer.resume_reading()

    def connection_lost(self, exc):
        if self.conn is not None:
            self.conn.close()


class _Connection:
    """A routed connection: its two transports, its timers and its place in the per-app count."""

    __slots__ = ("proxy", "app_key", "client", "upstream", "last", "deadline", "timer", "eofs", "closed")

    def __init__(self, proxy, app_key, started):
        self.proxy = proxy
        self.app_key = app_key
        self.client = self.upstream = self.timer = None
        self.last = started
        self.deadline = started + proxy.settings.timeouts.total
        self.eofs = 0
        self.closed = False

    def link(self, client, upstream):
        self.client, self.upstream = client, upstream
        loop = self.proxy.loop
        self.last = loop.time()
        self._schedule(loop)
        upstream.resume_reading()

    def _schedule(self, loop):
        self.timer = loop.call_at(min(self.last + self.proxy.settings.timeouts.idle, self.deadline),
                                  self._tick)

    def _tick(self):
        loop = self.proxy.loop
        now = loop.time()
        if now >= self.deadline or now >= self.last + self.proxy.settings.timeouts.idle:
            log.debug("closing %s connection: %s", self.app_key,
                      "total timeout" if now >= self.deadline else "idle")
            self.close(abort=True)
        else:
            self._schedule(loop)

    def close(self, abort=False):
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        for transport in (self.client, self.upstream):
            if transport is not None and not transport.is_closing():
                if abort:
                    transport.abort()
                else:
                    transport.close()     # what is buffered is still written, then closed
        self.proxy.release(self)


class _HealthProtocol(asyncio.Protocol):
    """gateway.<base>: the gateway's own pages, one request, over the terminated TLS (dstack's):
    /health, /.dstack/index ({type, paths}), /.dstack/app-info (the Info of the gateway's own
    CVM, from its guest agent: app_id, compose_hash, tcb_info, ...; 404 without one) and
    /.dstack/acme-info (the ACME account and the quoted certificate keys, acme.acme_info)."""

    def __init__(self, app_info=None, acme_info=None):
        self.transport = None
        self.buffer = bytearray()
        self.app_info = app_info
        self.acme_info = acme_info
        self.answered = False

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        if self.answered:
            return
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            if len(self.buffer) > HEALTH_REQUEST_LIMIT:
                self._answer(431, b"request header too large\n")
            return
        self.answered = True
        request_line = bytes(self.buffer.split(b"\r\n", 1)[0]).split(b" ")
        if len(request_line) != 3 or not request_line[2].startswith(b"HTTP/1."):
            self._answer(400, b"bad request\n")
            return
        head = request_line[0] == b"HEAD"
        path = request_line[1].split(b"?", 1)[0]
        if request_line[0] not in (b"GET", b"HEAD"):
            self._answer(405, b"method not allowed\n")
        elif path == b"/health":
            self._answer(200, b"OK\n", head=head)
        elif path == b"/.dstack/index":
            body = {"type": "dstack gateway", "paths": ["/index"] + (["/app-info"] if self.app_info else [])
                    + (["/acme-info"] if self.acme_info else [])}
            self._answer(200, json.dumps(body).encode(), head=head, json_body=True)
        elif path == b"/.dstack/app-info" and self.app_info is not None:
            task = asyncio.get_running_loop().run_in_executor(None, self.app_info)
            task.add_done_callback(lambda done: self._app_info_done(done, head))
        elif path == b"/.dstack/acme-info" and self.acme_info is not None:
            task = asyncio.get_running_loop().run_in_executor(None, self.acme_info)
            task.add_done_callback(lambda done: self._app_info_done(done, head, "the gateway's store"))
        else:
            self._answer(404, b"not found\n")

    def _app_info_done(self, done, head, source="the gateway's guest agent"):
        try:
            body = json.dumps(done.result()).encode()
        except Exception as exc:  # pylint: disable=broad-except
            log.warning("a /.dstack page: %s did not answer: %s", source, exc)
            self._answer(502, f"{source} did not answer\n".encode())
            return
        self._answer(200, body, head=head, json_body=True)

    def _answer(self, status, body, head=False, json_body=False):
        if self.transport.is_closing():
            return
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  431: "Request Header Fields Too Large", 502: "Bad Gateway"}[status]
        header = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {'application/json' if json_body else 'text/plain'}\r\n"
                  f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        self.transport.write(header if head else header + body)
        self.transport.close()


class _Hello:
    """A new connection until its ClientHello is whole: peeked, never consumed."""

    __slots__ = ("proxy", "sock", "peer", "local", "started", "timer", "lowat", "header_pending", "reading")

    def __init__(self, proxy, sock, peer):
        self.proxy, self.sock, self.peer = proxy, sock, peer
        self.local = None             # the address the client connected to, when a PROXY header says it
        loop = proxy.loop
        self.started = loop.time()
        self.lowat = 1
        self.header_pending = proxy.settings.inbound_pp
        self.reading = False
        self.timer = loop.call_later(proxy.settings.timeouts.handshake, self.drop)
        proxy.hellos.add(self)
        # The ClientHello has often arrived by the time the connection is accepted: read it now,
        # and watch the socket only when it has not.
        self._readable()
        if self in proxy.hellos:
            loop.add_reader(sock.fileno(), self._readable)
            self.reading = True

    def _stop_waiting(self):
        if self.reading:
            self.proxy.loop.remove_reader(self.sock.fileno())
        self.timer.cancel()
        self.proxy.hellos.discard(self)

    def drop(self):
        """No ClientHello in time, or the proxy closes."""
        self._stop_waiting()
        self.sock.close()

    def _readable(self):
        try:
            data = self.sock.recv(MAX_PEEK, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.drop()
            return
        if self.header_pending:
            data = self._inbound_header(data)
            if not data:
                return
        try:
            hello = sni.read_client_hello(data)
        except sni.SniError as exc:
            self._stop_waiting()
            alert = ALERT_UNRECOGNIZED_NAME if exc.field.startswith("server_name") else ALERT_DECODE_ERROR
            self.proxy.refuse(self.sock, self.peer, str(exc), alert)
            return
        if isinstance(hello, sni.Incomplete):
            if hello.needed > MAX_PEEK:
                self._stop_waiting()
                self.proxy.refuse(self.sock, self.peer, "ClientHello too large", ALERT_DECODE_ERROR)
            else:
                self._wait_for(hello.needed)
            return
        self._stop_waiting()
        self._wait_for(1)
        self.proxy.route(self.sock, self.peer, hello, self.started, self.local)

    def _wait_for(self, needed):
        # Wake only when the announced bytes are all there (no busy loop on a slow client).
        if needed != self.lowat:
            self.lowat = needed
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, needed)

    def _inbound_header(self, data):
        """Consume the balancer's PROXY header; the rest of `data` (b"" while waiting or refused)."""
        try:
            header = proxy_protocol.read_header(data)
        except proxy_protocol.ProxyHeaderError as exc:
            self._stop_waiting()
            self.proxy.refuse(self.sock, self.peer, f"inbound PROXY header: {exc}")
            return b""
        if isinstance(header, int):
            self._wait_for(header)
            return b""
        length, source, destination = header
        self.sock.recv(length)        # exactly the header; it was peeked, so it is all there
        self.header_pending = False
        if source is not None:
            self.peer, self.local = source, destination
        self._wait_for(1)
        return data[length:]


class GatewayProxy:
    """The listener and its connections; see the module's documentation for the path of one."""

    def __init__(self, settings, router, tls, tls_h2=None, app_info=None, acme_info=None):
        self.settings = settings
        self.app_info = app_info          # () -> the gateway CVM's Info (blocking; run in a thread), or None
        self.acme_info = acme_info        # () -> acme.acme_info (blocking), or None
        self.router = router
        self.tls = tls
        self.tls_h2 = tls_h2
        self.base_domains = settings.base_domains
        self.loop = None
        self.listener = None
        self.hellos = set()               # accepted connections whose ClientHello is not whole yet
        self.connections = set()          # the routed connections, relaying or still connecting
        self.per_app = {}                 # routed id -> live connections
        self.turn = 0                     # which candidate an app's next connection tries first
        self.refused = 0                  # connections refused (tests and status pages read it)
        self.custom_domains = None        # custom_domains.AppAddressResolver, made at start
        self.custom_tls = {}              # declared custom domain -> custom_certs.ServedDomain
        self.lookups = {}                 # custom-domain lookup task -> its client socket

    @property
    def sockname(self):
        return self.listener.getsockname()

    def set_contexts(self, tls, tls_h2=None):
        """Terminate new connections with these contexts (a renewed certificate). Connections
        already open keep the TLS session of the context they began with: nothing is dropped."""
        self.tls, self.tls_h2 = tls, tls_h2

    def set_custom_contexts(self, served):
        """The declared custom domains this proxy terminates: {domain: (app_id, port, tls)}
        (custom_certs.ServedCustomCertificates). A name is terminated with its certificate only
        while its TXT record names that app and port; new connections only, as set_contexts."""
        self.custom_tls = dict(served)

    async def start(self):
        self.loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.settings.listen_addr else socket.AF_INET
        self.listener = socket.create_server((self.settings.listen_addr, self.settings.listen_port),
                                             family=family, backlog=self.settings.backlog,
                                             reuse_port=self.settings.reuse_port)
        self.listener.setblocking(False)
        if self.settings.app_address_ns_prefix:
            # Here, before serve's data plane enters [core.wg] netns: the DNS thread stays in this network.
            self.custom_domains = custom_domains.AppAddressResolver(
                self.settings.app_address_ns_prefix, self.settings.app_address_ns_compat, self.settings.dns_resolver,
                self.settings.timeouts.dns_resolve).start()
            log.info("custom domains: TXT %s.<name>%s asked of %s", self.settings.app_address_ns_prefix,
                     f" and {custom_domains.COMPAT_PREFIX}.<name>" if self.custom_domains.compat else "",
                     self.custom_domains.servers)
        self.loop.add_reader(self.listener.fileno(), self._accept)
        log.info("gateway proxy listening on %s:%s for %s", *self.sockname[:2],
                 ", ".join(sorted(self.base_domains)))
        return self

    async def close(self):
        """Stop accepting and abort every connection."""
        if self.listener is not None:
            self.loop.remove_reader(self.listener.fileno())
            self.listener.close()
        for hello in list(self.hellos):
            hello.drop()
        for task, sock in list(self.lookups.items()):
            task.cancel()
            sock.close()
        for conn in list(self.connections):
            conn.close(abort=True)
        if self.custom_domains is not None:
            self.custom_domains.close()
        await asyncio.sleep(0)

    def _accept(self):
        for _round in range(ACCEPT_BATCH):
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: stop accepting a moment instead of spinning on a
                    # listener that stays readable.
                    log.warning("accept: %s; pausing accepts for 100 ms", exc)
                    self.loop.remove_reader(self.listener.fileno())
                    self.loop.call_later(0.1, self.loop.add_reader, self.listener.fileno(), self._accept)
                return
            sock.setblocking(False)        # TCP_NODELAY: the transport sets it at the handover
            _Hello(self, sock, peer)

    def refuse(self, sock, peer, reason, alert=None):
        """Close a connection before anything was relayed, with a TLS alert when it is TLS."""
        self.refused += 1
        log.info("refused %s: %s", peer[0], reason)
        try:
            if alert is not None:
                # Consume what was peeked first: closing with unread bytes would send a reset that
                # can overtake the alert.
                while sock.recv(MAX_PEEK):
                    pass
        except OSError:
            pass
        try:
            if alert is not None:
                sock.send(_alert_record(alert))
        except OSError:
            pass
        sock.close()

    def release(self, conn):
        self.connections.discard(conn)
        count = self.per_app.get(conn.app_key, 0) - 1
        if count > 0:
            self.per_app[conn.app_key] = count
        else:
            self.per_app.pop(conn.app_key, None)

    def route(self, sock, peer, hello, started, local=None):
        """Decide where the connection goes (synchronously), then connect in a task."""
        if self.custom_domains is not None and sni.is_custom_domain(hello.server_name, self.base_domains):
            task = self.loop.create_task(self._route_custom_domain(sock, peer, hello.server_name, started, local))
            self.lookups[task] = sock
            task.add_done_callback(lambda done: self.lookups.pop(done, None))
            return
        try:
            route = sni.parse_route(hello.server_name, self.base_domains)
        except sni.SniError as exc:
            self.refuse(sock, peer, str(exc), ALERT_UNRECOGNIZED_NAME)
            return
        if route.id == RESERVED_GATEWAY_ID:
            if route.mode != sni.MODE_TERMINATE or route.port != 80:
                self.refuse(sock, peer, "gateway serves port 80 only", ALERT_UNRECOGNIZED_NAME)
                return
            self.loop.create_task(self._serve_health(sock, peer, started))
            return
        if route.mode == sni.MODE_H2 and self.tls_h2 is None:
            self.refuse(sock, peer, "no h2 context for g routes", ALERT_UNRECOGNIZED_NAME)
            return
        self._dispatch(sock, peer, route, started, local)

    async def _route_custom_domain(self, sock, peer, server_name, started, local):
        """A custom domain: its TXT record's app and port, passed through (the app's own TLS)."""
        try:
            address = await self.custom_domains.lookup(server_name)
        except custom_domains.CustomDomainError as exc:
            self.refuse(sock, peer, f"custom domain {server_name}: {exc.reason}", ALERT_UNRECOGNIZED_NAME)
            return
        served = self.custom_tls.get(server_name.lower().rstrip("."))
        if served is not None and (served.app_id, served.port) == (address.id, address.port):
            # Declared by the app its record names: terminated here with the name's own certificate.
            route = sni.Route(address.id, address.port, sni.MODE_TERMINATE, None)
            self._dispatch(sock, peer, route, started, local, origin=f" (custom domain {server_name}, its own "
                           f"certificate, TXT {address.record})", context=served.tls)
            return
        route = sni.Route(address.id, address.port, sni.MODE_PASSTHROUGH, None)
        self._dispatch(sock, peer, route, started, local,
                       origin=f" (custom domain {server_name}, TXT {address.record})")

    def _dispatch(self, sock, peer, route, started, local, origin="", context=None):
        """Connect a routed connection to its candidates (a task), or refuse it; `origin` says in
        the log where a route that did not come from the name itself came from; `context`: the
        termination context when it is not the wildcard's (a declared custom domain's)."""
        try:
            candidates = self._candidates(route)
        except Exception as exc:  # pylint: disable=broad-exception-caught
            # A router failure refuses this connection (fail closed) and leaves the proxy up.
            log.error("router failed for %s: %s", route.id, exc)
            self.refuse(sock, peer, "router error", ALERT_INTERNAL_ERROR)
            return
        if candidates is None:
            self.refuse(sock, peer, f"unknown id {route.id}{origin}: no such app or instance registered here"
                        if origin else f"unknown id {route.id}", ALERT_UNRECOGNIZED_NAME)
            return
        if not candidates:
            self.refuse(sock, peer, f"port {route.port} not allowed for {route.id}{origin}", ALERT_ACCESS_DENIED)
            return
        cap = self.settings.max_connections_per_app
        if cap and self.per_app.get(route.id, 0) >= cap:
            self.refuse(sock, peer, f"connection cap reached for {route.id}", ALERT_HANDSHAKE_FAILURE)
            return
        conn = _Connection(self, route.id, started)
        self.connections.add(conn)
        self.per_app[route.id] = self.per_app.get(route.id, 0) + 1
        self.loop.create_task(self._open(conn, sock, (peer, local), route, candidates, context))

    def _candidates(self, route):
        """The first connect_top_n (instance_id, ip, send_pp) whose policy allows the port.

        None when the router knows no such id; [] when it does but no instance takes the port.
        Only IP literals are kept: a name would be resolved, i.e. an address the router did not give.
        """
        resolved = self.router.resolve(route.id)
        if not resolved:
            return None
        allowed = []
        for instance_id, ip in resolved:
            try:
                address = ipaddress.ip_address(ip)
            except ValueError:
                log.error("router gave %r for %s, not an IP address: skipped", ip, instance_id)
                continue
            ok, send_pp = port_decision(self.router.port_policy(instance_id), route.port)
            if ok:
                allowed.append((instance_id, address, send_pp))
                if len(allowed) == self.settings.connect_top_n:
                    break
        return allowed

    async def _connect_one(self, address, port):
        # `address` is an IP literal (checked in _candidates): the loop resolves nothing. The
        # transport sets TCP_NODELAY itself.
        side = _Side(None, self.loop.time)
        await self.loop.create_connection(lambda: side, str(address), port)
        return side

    async def _connect_first(self, candidates, port):
        """Connect to the candidates from the next in turn, one more each CONNECT_STAGGER or failure;
        the first success wins, the rest are closed."""
        if len(candidates) == 1:
            instance_id, address, send_pp = candidates[0]
            return await self._connect_one(address, port), instance_id, send_pp
        self.turn += 1
        first = self.turn % len(candidates)
        waiting = list(candidates[first:] + candidates[:first])
        tasks, pending, failures = {}, set(), []
        try:
            while pending or waiting:
                if waiting:
                    instance_id, address, send_pp = waiting.pop(0)
                    task = self.loop.create_task(self._connect_one(address, port))
                    tasks[task] = (instance_id, send_pp)
                    pending.add(task)
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED,
                                                   timeout=CONNECT_STAGGER if waiting else None)
                winner = None
                for task in done:
                    if task.exception() is not None:
                        failures.append(task.exception())
                    elif winner is None:
                        winner = task
                    else:
                        task.result().transport.close()
                if winner is not None:
                    return (winner.result(),) + tasks[winner]
            raise failures[0]
        finally:
            for task in pending:
                task.cancel()
                # One that connects while being cancelled must not be left open.
                task.add_done_callback(_close_if_connected)

    async def _open(self, conn, sock, addresses, route, candidates, own_context=None):
        peer, local = addresses
        try:
            try:
                async with asyncio.timeout(self.settings.timeouts.connect):
                    upstream, instance_id, send_pp = await self._connect_first(candidates, route.port)
            except (OSError, TimeoutError) as exc:
                self.refuse(sock, peer, f"no candidate of {route.id} answered on port {route.port}: "
                            f"{exc or 'timeout'}", ALERT_INTERNAL_ERROR)
                conn.close()
                return
            if conn.closed:           # the proxy closed while connecting
                upstream.transport.close()
                sock.close()
                return
            upstream.conn = conn
            conn.upstream = upstream.transport
            if send_pp:
                upstream.transport.write(proxy_protocol.header_v2(peer, local or sock.getsockname()))
            context = None
            if route.mode == sni.MODE_TERMINATE:
                context = own_context or self.tls
            elif route.mode == sni.MODE_H2:
                context = self.tls_h2
            client = _Side(conn, self.loop.time)
            client.peer = upstream.transport
            left = conn.last + self.settings.timeouts.handshake - self.loop.time()
            try:
                if context is None:
                    transport, _protocol = await self.loop.connect_accepted_socket(lambda: client, sock)
                else:
                    transport, _protocol = await self.loop.connect_accepted_socket(
                        lambda: client, sock, ssl=context, ssl_handshake_timeout=max(left, 0.1))
            except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
                log.info("TLS handshake with %s for %s failed: %s", peer[0], route.id, exc)
                sock.close()
                conn.close(abort=True)
                return
            upstream.peer = transport
            if conn.closed:
                transport.abort()
                return
            log.debug("%s -> %s (%s) port %s %s", peer[0], route.id, instance_id, route.port, route.mode)
            conn.link(transport, upstream.transport)
        except asyncio.CancelledError:
            sock.close()
            conn.close(abort=True)
            raise

    async def _serve_health(self, sock, peer, started):
        left = started + self.settings.timeouts.handshake - self.loop.time()
        try:
            transport, _protocol = await self.loop.connect_accepted_socket(
                lambda: _HealthProtocol(self.app_info, self.acme_info), sock, ssl=self.tls, ssl_handshake_timeout=max(left, 0.1))
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            log.info("TLS handshake with %s for gateway failed: %s", peer[0], exc)
            sock.close()
            return
        # A client that never sends its request must not hold the connection forever.
        self.loop.call_later(self.settings.timeouts.handshake, transport.abort)


class StoreRouter:
    """The Router over the control plane's Store (agents/gateway/store.py), answered from memory.

    Each answer of the store (instance, instances_of, port_policy: the ordering and the Admin's
    overrides stay there) is kept for `ttl` seconds, so the event loop reads SQLite once per id
    and ttl, not once per connection; a registration, a removal or an override is routed within
    ttl. Unknown ids are cached too (a flood of random names costs one indexed read each); the
    cache is emptied when it reaches max_entries.
    """

    def __init__(self, store, ttl=2.0, max_entries=10000, clock=time.monotonic):
        self.store, self.ttl, self.max_entries, self.clock = store, ttl, max_entries, clock
        self.cache = {}

    def _cached(self, key, compute):
        now = self.clock()
        hit = self.cache.get(key)
        if hit is not None and now < hit[0]:
            return hit[1]
        value = compute()
        if len(self.cache) >= self.max_entries:
            self.cache.clear()
        self.cache[key] = (now + self.ttl, value)
        return value

    def resolve(self, ident):
        def lookup():
            instance = self.store.instance(ident)
            if instance is not None:
                return ((instance.instance_id, instance.client_ip),)
            return tuple((i.instance_id, i.client_ip) for i in self.store.instances_of(ident))
        return self._cached(("resolve", ident), lookup)

    def port_policy(self, instance_id):
        return self._cached(("policy", instance_id), lambda: self.store.port_policy(instance_id))


def _close_if_connected(task):
    if not task.cancelled() and task.exception() is None:
        task.result().transport.close()


def run(settings, router, tls, tls_h2=None):
    """Serve until interrupted, on uvloop (one process; start one per core with reuse_port)."""
    import uvloop  # pylint: disable=import-outside-toplevel

    async def serve():
        proxy = GatewayProxy(settings, router, tls, tls_h2)
        await proxy.start()
        try:
            await asyncio.Event().wait()
        finally:
            await proxy.close()

    uvloop.run(serve())
