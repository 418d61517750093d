# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Custom domains (dstack's): the app a server name outside the gateway's base domains goes to,
read from a DNS TXT record that the owner of the name publishes.

For `app.example.com`, the owner of example.com publishes
    _dstack-app-address.app.example.com.            TXT "<app_id>:<port>"
or dstack's older name `_tapp-address.app.example.com` (both are looked up at the same time), or,
for every name directly under one parent,
    _dstack-app-address-wildcard.example.com.       TXT "<app_id>:<port>"
and points app.example.com at the gateway (CNAME or A). The gateway passes the client's TLS
through to that app's instances on that port (the app must be registered here; its port policy
applies): the app holds the certificate for the name.

    resolver = AppAddressResolver(prefix="_dstack-app-address", compat=True,
                                  nameservers=["127.0.0.1:5353"], timeout=5.0)
    resolver.start()                               # before the data plane enters [core.wg] netns
    address = await resolver.lookup("app.example.com")   # AppAddress(id, port, record), or
                                                         # CustomDomainError naming the reason
    resolver.close()

Order: the prefix's record, then the compat record, then the wildcard; the first name that has
TXT records decides (a malformed or ambiguous value there is refused, not skipped); a lookup that
fails (timeout, SERVFAIL) where a record could decide refuses the connection (fail closed).

Cache: each TXT name's answer for its TTL (at most max_ttl); a name with no TXT record (NXDOMAIN
or no data) for the zone's negative TTL, at most negative_ttl (10 s, as dstack): a record just
added is routed within 10 s. Failures are not cached; concurrent lookups of one name share one
query, and at most max_pending names are looked up at once (more are refused, not queued).

Why a thread: the data plane's event loop connects to the CVMs from inside [core.wg] netns, a
network with no resolver in it, and a socket lives in the namespace of the thread that makes it.
The queries run on their own asyncio loop in a thread started before the data plane enters that
namespace (serve's network, where the resolver is), with dnspython's asyncio resolver; the data
plane's loop only awaits their futures, so it never blocks on DNS.
"""

import asyncio
import ipaddress
import logging
import re
import threading
import time
from typing import NamedTuple

from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError

log = logging.getLogger("dstack.gateway.custom_domains")

COMPAT_PREFIX = "_tapp-address"
WILDCARD_SUFFIX = "-wildcard"
NEGATIVE_TTL = 10.0          # dstack's bound on caching "no record"
MAX_TTL = 86400.0            # a positive answer is kept at most a day, whatever its TTL
MAX_ENTRIES = 10000          # the cache is emptied when it reaches this many names
MAX_PENDING = 1024           # names looked up at once; beyond, connections are refused
MAX_TXT_VALUE = 255          # "<app_id>:<port>" is far shorter; a longer value is not one

_ID_RE = re.compile(r"\A[a-z0-9]{1,63}\Z")
_PREFIX_RE = re.compile(r"\A_?[a-z0-9](?:[a-z0-9_-]{0,61}[a-z0-9])?\Z")


class CustomDomainError(DstackError):
    """A custom domain that routes nowhere: no record, a malformed one, or a failed lookup."""


class AppAddress(NamedTuple):
    id: str                   # the app_id (or instance_id) the record names, lower case
    port: int
    record: str               # the TXT name that said so (for the log)


def parse_nameserver(text, field="core.proxy.dns_resolver"):
    """(ip, port) of "IP", "IP:PORT", "[IPv6]:PORT" or "IPv6" (port 53 by default). A name is
    refused: the resolver's own address cannot need a resolver."""
    text = text.strip() if isinstance(text, str) else ""
    host, port = text, 53
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise DstackError(field, f"{text[:80]!r} is not IP, IP:PORT or [IPv6]:PORT")
        port = rest[1:] if rest else 53
    elif text.count(":") == 1:
        host, port = text.split(":", maxsplit=1)
    try:
        address = ipaddress.ip_address(host)
        port = int(port)
    except ValueError:
        raise DstackError(field, f"{text[:80]!r} is not IP, IP:PORT or [IPv6]:PORT (an address, not a name)") from None
    if not 0 < port < 65536:
        raise DstackError(field, f"{text[:80]!r} has a port outside 1-65535")
    return str(address), port


def check_prefix(text, field="core.proxy.app_address_ns_prefix"):
    """A TXT label prefix ("_dstack-app-address"); "" turns custom domains off."""
    text = text.strip().lower() if isinstance(text, str) else None
    if text is None or (text and not _PREFIX_RE.match(text)):
        raise DstackError(field, "must be one DNS label (letters, digits, - and _), or \"\" for no custom domains")
    return text


def parse_app_address(values, record):
    """AppAddress from the TXT strings of one name (one value per record), or CustomDomainError."""
    parsed = set()
    for value in values:
        ident, sep, port = value.strip().partition(":")
        ident = ident.lower()
        if not sep or not _ID_RE.match(ident) or not port.isdigit() or not 0 < int(port) < 65536:
            raise CustomDomainError("server_name", f"TXT {record} is {value[:80]!r}, not <app_id>:<port>")
        parsed.add((ident, int(port)))
    if len(parsed) != 1:
        raise CustomDomainError("server_name", f"TXT {record} has {len(parsed)} different values: it must name one "
                                               "<app_id>:<port>")
    ident, port = parsed.pop()
    return AppAddress(ident, port, record)


class _LookupFailed(Exception):
    """A query got no usable answer (timeout, SERVFAIL, refused); never cached."""


def _txt_strings(rdata):
    # A TXT record's character-strings are one value, split at 255 bytes (RFC 7208 3.3's reading).
    data = b"".join(rdata.strings)
    if len(data) > MAX_TXT_VALUE:
        return data[:80].decode("ascii", "replace") + "..."
    return data.decode("ascii", "replace")


def _negative_ttl(response):
    """The zone's negative TTL (RFC 2308 5: its SOA's TTL, at most its MINIMUM); None when the
    answer carries no SOA."""
    import dns.rdatatype  # pylint: disable=import-outside-toplevel
    for rrset in getattr(response, "authority", None) or ():
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return min(rrset.ttl, rrset[0].minimum)
    return None


class AppAddressResolver:
    """The TXT lookups and their cache for one data-plane process (see the module's documentation).

    lookup() is called on the data plane's loop and keeps its cache there (one thread: no lock);
    only the queries cross to the DNS thread.
    """

    def __init__(self, prefix="_dstack-app-address", compat=True, nameservers=(), timeout=5.0,
                 negative_ttl=NEGATIVE_TTL, max_ttl=MAX_TTL, max_entries=MAX_ENTRIES, max_pending=MAX_PENDING,
                 clock=time.monotonic):
        self.prefix = check_prefix(prefix)
        self.compat = bool(compat) and self.prefix != COMPAT_PREFIX
        self.nameservers = [parse_nameserver(n) for n in nameservers]
        self.timeout = float(timeout)
        self.negative_ttl, self.max_ttl = float(negative_ttl), float(max_ttl)
        self.max_entries, self.max_pending = max_entries, max_pending
        self.clock = clock
        self.cache = {}           # TXT name -> (expires, values: tuple of str, () = no record)
        self.pending = {}         # TXT name -> future of (values, ttl), on the caller's loop
        self.queries = 0          # queries sent (tests read it)
        self._resolver = None
        self._loop = None
        self._thread = None

    def start(self):
        """Make the resolver (the system's, /etc/resolv.conf, unless nameservers are given) and
        start the DNS thread. Call it in the network namespace the queries must leave from."""
        import dns.asyncresolver  # pylint: disable=import-outside-toplevel
        import dns.nameserver  # pylint: disable=import-outside-toplevel
        import dns.resolver  # pylint: disable=import-outside-toplevel
        try:
            resolver = dns.asyncresolver.Resolver(configure=not self.nameservers)
        except (dns.resolver.NoResolverConfiguration, OSError) as exc:
            raise DstackError("core.proxy.dns_resolver", f"no system resolver ({exc}): set the resolver's "
                                                         "address") from None
        if self.nameservers:
            resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in self.nameservers]
        resolver.cache = None         # ours, with dstack's bound on negative answers
        resolver.timeout = resolver.lifetime = self.timeout
        self._resolver = resolver
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), name="gateway-dns", daemon=True)
        self._thread.start()
        started.wait(10)
        return self

    def _run(self, started):
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(started.set)
        self._loop.run_forever()
        self._loop.close()

    def close(self):
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        for future in self.pending.values():
            if not future.done():
                future.cancel()
        self.pending.clear()

    @property
    def servers(self):
        """The resolvers asked, for the log."""
        if self.nameservers:
            return ", ".join(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip, port in self.nameservers)
        return "the system resolver"

    # ---- the lookup ------------------------------------------------------------------------------

    def names(self, server_name):
        """The TXT names for a server name, in their order: [(the prefix's, the compat one)], wildcard."""
        first = [f"{self.prefix}.{server_name}"] + ([f"{COMPAT_PREFIX}.{server_name}"] if self.compat else [])
        _label, dot, parent = server_name.partition(".")
        # A parent that is a top-level domain has no owner to publish a wildcard for all its names.
        wildcard = f"{self.prefix}{WILDCARD_SUFFIX}.{parent}" if dot and "." in parent else None
        return first, wildcard

    async def lookup(self, server_name):
        """AppAddress for a server name, or CustomDomainError (its reason says why, for the log)."""
        if not self.prefix:
            raise CustomDomainError("server_name", "is not under a base domain of this gateway (custom domains off)")
        try:
            async with asyncio.timeout(self.timeout):
                return await self._lookup(server_name.lower().rstrip("."))
        except TimeoutError:
            raise CustomDomainError("server_name", f"no DNS answer within {self.timeout:g} s from "
                                                   f"{self.servers}") from None

    async def _lookup(self, server_name):
        first, wildcard = self.names(server_name)
        answers = await asyncio.gather(*(self._txt(name) for name in first), return_exceptions=True)
        for name, answer in zip(first, answers):
            if isinstance(answer, _LookupFailed):
                raise CustomDomainError("server_name", f"TXT {name}: {answer}")
            if isinstance(answer, BaseException):
                raise answer
            if answer:
                return parse_app_address(answer, name)
        if wildcard is not None:
            try:
                answer = await self._txt(wildcard)
            except _LookupFailed as exc:
                raise CustomDomainError("server_name", f"TXT {wildcard}: {exc}") from None
            if answer:
                return parse_app_address(answer, wildcard)
        tried = first + ([wildcard] if wildcard else [])
        raise CustomDomainError("server_name", f"is not under a base domain of this gateway and has no TXT record "
                                               f"{' or '.join(tried)}")

    async def _txt(self, name):
        """The TXT values of one name (() for none), from the cache or one shared query."""
        hit = self.cache.get(name)
        if hit is not None and self.clock() < hit[0]:
            return hit[1]
        future = self.pending.get(name)
        if future is None:
            if len(self.pending) >= self.max_pending:
                raise _LookupFailed(f"{self.max_pending} lookups already in flight")
            future = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._query(name), self._loop))
            self.pending[name] = future
            future.add_done_callback(lambda done: self._store(name, done))
        # shield: one caller giving up (its timeout) must not cancel the query the others wait for.
        values, _ttl = await asyncio.shield(future)
        return values

    def _store(self, name, done):
        self.pending.pop(name, None)
        if done.cancelled() or done.exception() is not None:
            return
        values, ttl = done.result()
        if len(self.cache) >= self.max_entries:
            self.cache.clear()
        self.cache[name] = (self.clock() + ttl, values)

    async def _query(self, name):
        """On the DNS thread: (values, seconds to keep them) for one TXT name."""
        import dns.exception  # pylint: disable=import-outside-toplevel
        import dns.name  # pylint: disable=import-outside-toplevel
        import dns.resolver  # pylint: disable=import-outside-toplevel
        self.queries += 1
        try:
            qname = dns.name.from_text(name)
            answer = await self._resolver.resolve(qname, "TXT", search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as exc:
            return (), self._negative(next(iter(exc.responses().values()), None))
        except dns.resolver.LifetimeTimeout:
            raise _LookupFailed(f"no answer within {self.timeout:g} s from {self.servers}") from None
        except dns.resolver.NoNameservers as exc:
            said = "; ".join(dict.fromkeys(str(error[3]) for error in exc.kwargs.get("errors") or ()))
            raise _LookupFailed(f"{self.servers} answered {said or 'no usable answer'}") from None
        except dns.exception.DNSException as exc:
            raise _LookupFailed(f"lookup failed: {exc}") from None
        if answer.rrset is None:
            return (), self._negative(answer.response)
        values = tuple(sorted({_txt_strings(rdata) for rdata in answer.rrset}))
        return values, min(float(answer.rrset.ttl), self.max_ttl)

    def _negative(self, response):
        ttl = _negative_ttl(response)
        return min(self.negative_ttl, float(ttl)) if ttl is not None else self.negative_ttl
