# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Custom domains an app declares, terminated by the gateway with their own ACME certificates
(beyond dstack, whose custom domains are passthrough only: custom_domains.py).

The declaration. An app lists the names in its app-compose (`custom_domains: [{domain, port}]`,
app.yml's custom_domains; module_utils/app_compose.custom_domains). The gateway reads it from the
app-compose.json bytes that hash to the compose_hash attested in the CVM's RA-TLS certificate at
RegisterCvm, so the declaration is the app's attested identity's, whatever carried the bytes. They
come from the CVM's public Worker.Info (dstack's, on the agent port, 8090, through the tunnel:
tcb_info's app_compose), which every dstack guest serves unless the app sets public_tcbinfo false
(then it declares nothing the gateway can read). Read once per compose_hash, kept in the store.

Who owns the name. The app's declaration alone proves nothing about the domain: any app could list
a bank's name. So the gateway orders and serves a certificate for a declared name only while the
name's own TXT record, the one dstack's custom domains already use, published by whoever controls
the domain's DNS, says exactly this app and port:
    _dstack-app-address.<domain>  TXT  "<app_id>:<port>"
(or dstack's _tapp-address / -wildcard names, read by the data plane's rule, custom_domains.py).
Checked before every order and renewal, and again by the data plane on every connection (its TXT
cache: the record's TTL, a missing record 10 s): a record that moves to another app stops the
termination at once, and the name goes where the record says, passed through as dstack does.
Names under the gateway's own base domains are the wildcard's, never declared.

The certificate: AcmeManager.renew(name=domain, names=[domain]): a P-256 key made here, quoted
(zt-cert, listed in acme-info's quoted_hist_keys) before the order, DNS-01 through the gateway's
DNS provider (so the domain's zone must be one its credentials can change), the store lock
`acme-cert/<domain>`, renewed on the wildcard's schedule (RenewalSchedule's `also`).

Store: DECLARED_BLOB + compose_hash {"domains": [{domain, port}]} or {"unreadable": reason};
SERVED_BLOB {domain: {app_id, port}} (the names the data plane terminates; each certificate is
acme.CERT_BLOB + domain). The data plane polls them (ServedCustomCertificates) and selects the
certificate by SNI: one per declared name, the wildcard for the rest.

    watcher = DeclaredDomains(config, store, manager).start()   # serve's supervisor: a thread
    watcher.poll()                     # one round: new compose hashes read, claims checked, ordered
    watcher.renew_all()                # the schedule's round
    renew_declared(config, store, manager, "shop.example.com", force=True)   # Admin / renew-cert --name
    set_app_address(provider, prefix, "shop.example.com", app_id, 80, check=False)   # set-txt
"""

import asyncio
import hashlib
import http.client
import json
import logging
import threading
import time
from typing import NamedTuple

from ansible_collections.dstack.tee.agents.gateway import acme, custom_domains, sni
from ansible_collections.dstack.tee.plugins.module_utils import app_compose, json_limits, wireguard
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError, parse_hex

log = logging.getLogger("dstack.gateway.custom_certs")

DECLARED_BLOB = "custom-domains/compose/"   # + compose_hash
SERVED_BLOB = "custom-domains/served"
WATCH_INTERVAL = 2.0            # how often new registrations are looked at
RETRY_FIRST, RETRY_MAX = 2.0, 300.0   # a Worker not reached yet, a record not there yet: retried, doubling
WORKER_TIMEOUT = 5.0
WORKER_ANSWER_BYTES = 4 * 1024 * 1024
INFO_PATH = "/prpc/Worker.Info"


class Refused(DstackError):
    """A declared name the gateway does not order or serve (its record names another app, ...)."""


def enabled(config):
    """Whether this gateway terminates declared custom domains: [core.certbot] enabled with
    custom_domain_certs (default on), and custom domains on ([core.proxy] app_address_ns_prefix)."""
    certbot = config["core"].get("certbot", {})
    return bool(certbot.get("enabled") and certbot.get("custom_domain_certs", True)
                and config["core"]["proxy"].get("app_address_ns_prefix"))


# ---- the declaration -------------------------------------------------------------------------------

def declared_in(answer, compose_hash, field="Worker.Info"):
    """[{domain, port}] a CVM's Worker.Info answer declares, from app-compose bytes that must hash
    to `compose_hash` (the attested one). DstackError when they do not; Refused (kept: the bytes
    are the app's, attested) when the app-compose is not public or its custom_domains is wrong."""
    if not isinstance(answer, dict):
        raise DstackError(field, "is not a JSON object")
    tcb_info = answer.get("tcb_info")
    if not tcb_info:
        raise Refused(field, "shows no app-compose (the app's public_tcbinfo is false): nothing declared is read")
    tcb = json_limits.loads(tcb_info, f"{field}.tcb_info") if isinstance(tcb_info, str) else tcb_info
    text = tcb.get("app_compose") if isinstance(tcb, dict) else None
    if not isinstance(text, str):
        raise DstackError(f"{field}.tcb_info", "has no app_compose")
    data = text.encode("utf-8")
    if hashlib.sha256(data).hexdigest() != compose_hash:
        raise DstackError(f"{field}.tcb_info.app_compose", f"does not hash to the attested compose_hash {compose_hash}")
    try:
        return app_compose.custom_domains(app_compose.parse(data))
    except DstackError as exc:
        raise Refused(f"app-compose {exc.field}", exc.reason) from None


def worker_info(ip, port, netns="", timeout=WORKER_TIMEOUT):
    """Worker.Info of the CVM at tunnel address `ip` (its agent port), asked from [core.wg] netns
    (a short thread enters it: the rest of this process stays in serve's network)."""
    result = {}

    def fetch():
        try:
            if netns:
                wireguard.enter_netns(netns)
            conn = http.client.HTTPConnection(ip, port, timeout=timeout)
            try:
                conn.request("POST", INFO_PATH, body=b"{}", headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                result["answer"] = (response.status, response.read(WORKER_ANSWER_BYTES + 1))
            finally:
                conn.close()
        except (OSError, http.client.HTTPException) as exc:
            result["error"] = exc

    thread = threading.Thread(target=fetch, name="worker-info", daemon=True)
    thread.start()
    thread.join(timeout + 1)
    where = f"Worker.Info at {ip}:{port}"
    if "answer" not in result:
        raise DstackError(where, f"no answer: {result.get('error') or 'timeout'}")
    status, data = result["answer"]
    if status != 200:
        raise DstackError(where, f"answered HTTP {status}")
    if len(data) > WORKER_ANSWER_BYTES:
        raise DstackError(where, f"answered more than {WORKER_ANSWER_BYTES} bytes")
    return json_limits.loads(data, where)


# ---- the owner's record ------------------------------------------------------------------------------

class TxtChecker:
    """The data plane's TXT rule (custom_domains.AppAddressResolver, the same resolvers and
    timeout), usable from one ordinary thread: lookups run on this checker's own loop."""

    def __init__(self, config):
        proxy = config["core"]["proxy"]
        self.resolver = custom_domains.AppAddressResolver(
            proxy["app_address_ns_prefix"], proxy.get("app_address_ns_compat", True), proxy.get("dns_resolver", ()),
            proxy.get("timeouts", {}).get("dns_resolve", 5.0))
        self.loop = None

    def __enter__(self):
        self.resolver.start()
        self.loop = asyncio.new_event_loop()
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.resolver.close()
        if self.loop is not None:
            self.loop.close()
            self.loop = None

    def refused(self, domain, app_id, port):
        """Why the TXT record of `domain` does not give it to app_id:port ("" when it does)."""
        try:
            address = self.loop.run_until_complete(self.resolver.lookup(domain))
        except custom_domains.CustomDomainError as exc:
            return exc.reason
        if address.id != app_id:
            return f"TXT {address.record} names {address.id}:{address.port}, another app"
        if address.port != port:
            return f"TXT {address.record} names port {address.port}, not the declared {port}"
        return ""


# ---- the names served --------------------------------------------------------------------------------

def served_names(store):
    """{domain: {app_id, port}}: the declared names the data plane terminates."""
    data = store.get_blob(SERVED_BLOB)
    return json.loads(data) if data else {}


def _set_served(store, domain, entry):
    """Add (entry) or drop (None) one name of SERVED_BLOB, under its lock (nodes write it too)."""
    with store.lock("custom-domains", ttl=acme.LOCK_TTL, wait=acme.LOCK_TTL):
        served = served_names(store)
        if served.get(domain) == entry:
            return
        if entry is None:
            served.pop(domain, None)
        else:
            served[domain] = entry
        store.put_blob(SERVED_BLOB, json.dumps(served, sort_keys=True).encode())


def _base_domains(config):
    return frozenset({config["core"]["proxy"]["base_domain"].lower().strip("."),
                      config["core"]["certbot"]["domain"].lower().strip(".")} - {""})


def _claim(config, store, manager, checker, app_id, entry, force=False):
    """Order (when due, or `force`) and serve `entry` {domain, port} for app_id, if its record
    says so: (ordered, reason). Refused otherwise (and the name no longer served for app_id)."""
    domain, port = entry["domain"], entry["port"]
    if not sni.is_custom_domain(domain, _base_domains(config)):
        raise Refused(domain, "is under the gateway's base domain: the wildcard certificate serves it")
    reason = checker.refused(domain, app_id, port)
    if reason:
        if served_names(store).get(domain, {}).get("app_id") == app_id:
            _set_served(store, domain, None)
        raise Refused(domain, f"declared by app {app_id}, but {reason}")
    ordered, why = manager.renew(force=force, name=domain, names=[domain])
    if manager.certificate(domain) is None:
        raise DstackError(domain, f"no certificate: {why}")
    _set_served(store, domain, {"app_id": app_id, "port": port})
    return ordered, why


def _declarations(store, instances):
    """{app_id: {domain: entry}} the registered apps declare (as read so far)."""
    found = {}
    for chash, app_id in {(i.compose_hash, i.app_id) for i in instances}:
        data = store.get_blob(DECLARED_BLOB + chash)
        for entry in (json.loads(data).get("domains", []) if data else []):
            found.setdefault(app_id, {})[entry["domain"]] = entry
    return found


def renew_declared(config, store, manager, domain, force=True):
    """Admin.RenewCert {name} and `renew-cert --name`: the certificate of a name a registered app
    declares (as the gateway has read it), its record checked: {renewed, reason}."""
    domain = app_compose.check_domain(domain, "name")
    owners = [(app_id, entries[domain]) for app_id, entries in _declarations(store, store.instances()).items()
              if domain in entries]
    if not owners:
        raise Refused("name", f"{domain} is not declared by a registered app (app-compose custom_domains), "
                              "or its declaration was not read yet")
    reasons = []
    with TxtChecker(config) as checker:
        for app_id, entry in owners:
            try:
                ordered, why = _claim(config, store, manager, checker, app_id, entry, force=force)
                return {"renewed": ordered, "reason": why}
            except Refused as exc:
                reasons.append(str(exc))
    raise Refused("name", "; ".join(reasons))


class DeclaredDomains:
    """serve's watcher of the apps' declarations (a thread of the supervisor): every WATCH_INTERVAL
    the registered instances; a compose_hash not read yet is read from one of its CVMs; each
    declared name whose record gives it to the app is ordered (if due) and served. What fails
    (a Worker not reached yet, a record not there yet, another node ordering) is retried later,
    doubling from RETRY_FIRST to RETRY_MAX; each refusal is logged once per reason."""

    def __init__(self, config, store, manager):
        self.config, self.store, self.manager = config, store, manager
        self.netns = config["core"]["wg"].get("netns", "")
        self.agent_port = config["core"]["proxy"]["agent_port"]
        self.done = set()             # (app_id, domain, port) served, or refused for good
        self.retry = {}               # key -> (monotonic time of the next try, delay)
        self.said = {}                # key -> the last reason logged
        self.stop_event = threading.Event()
        self.thread = None
        self.checker = None

    def start(self):
        self.thread = threading.Thread(target=self._run, name="declared custom domains", daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(2)       # an order under way finishes alone; its lock expires

    def _run(self):
        with TxtChecker(self.config) as checker:
            self.checker = checker
            while not self.stop_event.is_set():
                try:
                    self.poll()
                except Exception as exc:  # pylint: disable=broad-exception-caught
                    log.warning("custom domains: a round failed, retried: %s", exc)
                self.stop_event.wait(WATCH_INTERVAL)

    def _later(self, key, reason, level=logging.INFO):
        delay = min(RETRY_MAX, self.retry.get(key, (0, RETRY_FIRST / 2))[1] * 2)
        self.retry[key] = (time.monotonic() + delay, delay)
        if self.said.get(key) != reason:
            self.said[key] = reason
            log.log(level, "%s; retried in %.0f s", reason, delay)

    def _due(self, key):
        return key not in self.done and self.retry.get(key, (0, 0))[0] <= time.monotonic()

    def poll(self):
        """One round (see the class)."""
        instances = self.store.instances()
        for chash in sorted({i.compose_hash for i in instances}):
            group = [i for i in instances if i.compose_hash == chash]
            declared = self._declared(chash, group)
            for entry in declared or ():
                app_id = group[0].app_id
                key = (app_id, entry["domain"], entry["port"])
                if self._due(key):
                    self._order(key, app_id, entry)

    def _declared(self, chash, group):
        data = self.store.get_blob(DECLARED_BLOB + chash)
        if data:
            return json.loads(data).get("domains", [])
        key = ("declaration", chash)
        if not self._due(key):
            return None
        failures = []
        for instance in sorted(group, key=lambda i: -i.last_handshake):
            try:
                domains = declared_in(worker_info(instance.client_ip, self.agent_port, self.netns), chash)
                doc = {"domains": domains}
            except Refused as exc:
                domains, doc = [], {"unreadable": str(exc)}
                log.info("custom domains of app %s (compose_hash %s): %s", instance.app_id, chash, exc)
            except DstackError as exc:
                failures.append(f"instance {instance.instance_id}: {exc}")
                continue
            self.store.put_blob(DECLARED_BLOB + chash, json.dumps(doc, sort_keys=True).encode())
            self.done.add(key)
            if domains:
                log.info("app %s (compose_hash %s) declares %s", instance.app_id, chash,
                         ", ".join(f"{e['domain']} (port {e['port']})" for e in domains))
            return domains
        self._later(key, f"custom domains of app {group[0].app_id} (compose_hash {chash}) not read yet: "
                         f"{'; '.join(failures)}")
        return None

    def _order(self, key, app_id, entry):
        try:
            ordered, why = _claim(self.config, self.store, self.manager, self.checker, app_id, entry)
        except Refused as exc:
            self._later(key, f"custom domain {entry['domain']}: no certificate, not terminated: {exc.reason}",
                        logging.WARNING)
            return
        except DstackError as exc:
            self._later(key, f"custom domain {entry['domain']} of app {app_id}: {exc}", logging.WARNING)
            return
        self.done.add(key)
        self.retry.pop(key, None)
        log.info("custom domain %s of app %s served with its own certificate (port %s): %s", entry["domain"], app_id,
                 entry["port"], why if ordered else f"kept ({why})")

    def renew_all(self):
        """The schedule's round: each served name renewed when due, while its app has a registered
        instance and its record still names it; otherwise no longer served."""
        served = served_names(self.store)
        if not served:
            return
        with TxtChecker(self.config) as checker:
            for domain, entry in sorted(served.items()):
                if not self.store.instances_of(entry["app_id"]):
                    _set_served(self.store, domain, None)
                    log.info("custom domain %s: app %s has no registered instance: no longer served", domain,
                             entry["app_id"])
                    continue
                try:
                    renewed, why = _claim(self.config, self.store, self.manager, checker, entry["app_id"],
                                          {"domain": domain, "port": entry["port"]})
                    log.log(logging.INFO if renewed else logging.DEBUG, "renewal check of %s: %s", domain, why)
                except DstackError as exc:
                    log.warning("custom domain %s: %s", domain, exc)
                    self.done.discard((entry["app_id"], domain, entry["port"]))


# ---- the data plane --------------------------------------------------------------------------------

class ServedDomain(NamedTuple):
    app_id: str
    port: int
    tls: object               # the http/1.1 termination context of its certificate


class ServedCustomCertificates:
    """The data plane's view of SERVED_BLOB and the certificates in it: load() gives the new
    {domain: ServedDomain} when anything changed since the last call, None when nothing did."""

    def __init__(self, store, scratch_dir):
        self.store, self.scratch_dir = store, scratch_dir
        self.certificates = {}    # domain -> acme.ServedCertificate
        self.contexts = {}        # domain -> its termination contexts
        self.index = {}

    def load(self):
        index = served_names(self.store)
        changed = index != self.index
        for domain in set(self.certificates) - set(index):
            del self.certificates[domain]
            self.contexts.pop(domain, None)
        for domain in index:
            served = self.certificates.setdefault(domain, acme.ServedCertificate(self.store, domain, self.scratch_dir))
            contexts = served.load()
            if contexts is not None:
                self.contexts[domain] = contexts
                changed = True
        self.index = index
        if not changed:
            return None
        return {domain: ServedDomain(entry["app_id"], entry["port"], self.contexts[domain][0])
                for domain, entry in index.items() if domain in self.contexts}


# ---- set-txt: the owner's record through the gateway's DNS provider ------------------------------------

def set_app_address(provider, prefix, domain, app_id, port, check=False):
    """TXT <prefix>.<domain> = "<app_id>:<port>" through the DNS provider, left alone when it is
    already exactly that; with check, nothing is changed. {changed, name, type, value, before}."""
    domain = app_compose.check_domain(domain, "domain")
    app_id = parse_hex(app_id, "app_id", length=20).hex()
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise DstackError("port", "must be a port number 1 to 65535")
    prefix = custom_domains.check_prefix(prefix)
    if not prefix:
        raise DstackError("core.proxy.app_address_ns_prefix", "is \"\": custom domains are off on this gateway")
    name, value = f"{prefix}.{domain}", f"{app_id}:{port}"
    before = provider.txt(name)
    changed = before != [value]
    if changed and not check:
        provider.set_txt(name, [value])
        log.info("TXT %s set to %s (was %s)", name, value, ", ".join(before) or "none")
    return {"changed": changed, "name": name, "type": "TXT", "value": value, "before": before}
