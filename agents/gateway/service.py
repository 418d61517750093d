# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The gateway's control decisions, apart from HTTP: RegisterCvm, Info, GetPeers and the Admin
methods, on the store, with the WireGuard peers applied through a hub.

RegisterCvm takes the CVM's identity ONLY from its client certificate, never from the body:

1. the RA-TLS client certificate, verified by plugins/module_utils/ra_tls.py (the one RA-TLS
   verifier, also the CVM's check of the gateway): leaf <- app CA <- the KMS root CA this
   gateway pins (rpc.kms_root_ca), each signature, validity period and CA flag checked; the leaf
   for client authentication; its attestation extension (OID 1.3.6.1.4.1.62397.1.8) verified
   under [attestation] with report_data = SHA-512("ratls-cert:" || leaf SPKI), the event log
   replayed; the attested app_id the certificate's, a compose hash, this KMS measured as the key
   provider, and a non-empty instance_id (apps with no_instance_id cannot use the gateway);
2. the optional authorization webhook ([core.auth]: POST of the boot info, 2xx allows; an
   error, a timeout or anything else refuses);
3. the store: an instance_id bound to another app, or a WireGuard key already another
   instance's, is refused.

Every refusal is a Refused (HTTP 403) naming the check. The peer is then applied through the
hub (an object with set_peer / remove_peer / sync_peers, the shape of wireguard.Uapi); the store
is the state wanted, so a hub failure (503) loses nothing: the CVM retries, and sync_peers at
start makes the interface match the store.
"""

import base64
import json
import logging
import time
import urllib.error
import urllib.request

from ansible_collections.dstack.tee.agents.gateway import acme, custom_certs
from ansible_collections.dstack.tee.agents.gateway import cluster as gateway_cluster
from ansible_collections.dstack.tee.agents.gateway.store import Conflict, Exhausted, Unavailable, open_store
from ansible_collections.dstack.tee.plugins.module_utils import attestation, ra_tls, wireguard
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError, parse_hex

log = logging.getLogger("dstack.gateway")

ONLINE_SECONDS = 300           # a peer with a handshake this recent counts as online (Admin.GetMeta)
MAX_PORT_POLICY_PORTS = 1024
AUTH_ANSWER_BYTES = 64 * 1024


# The caller is not allowed (HTTP 403): the field names the check that failed. The one class with
# the RA-TLS verifier's refusals, so a refused certificate and a refused registration are both 403s.
Refused = ra_tls.Refused


# Unavailable, the gateway cannot do it now (HTTP 503), is store.Unavailable (no free address, the
# WireGuard hub failed, no etcd member answered): one class whichever part raised it.


def version():
    try:
        from importlib.metadata import version as package_version  # pylint: disable=import-outside-toplevel
        return package_version("dstack-tee")
    except Exception:  # pylint: disable=broad-exception-caught
        return "0"


# ---- request fields ---------------------------------------------------------------------------

def wg_public_key(value, field="client_public_key"):
    """A WireGuard public key: base64 of 32 bytes, kept as wg prints it."""
    if value is None or value == "":
        raise DstackError(field, "is required: the CVM's WireGuard public key (base64, as `wg pubkey` prints it)")
    return base64.b64encode(wireguard.parse_key(value, field)).decode()


def port_policy(value, field="port_policy"):
    """dstack's port_policy {ports: [{port, pp}], restrict_mode} (app-compose), normalized; None stays None."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise DstackError(field, "must be an object {ports: [{port, pp}], restrict_mode}")
    unknown = sorted(set(value) - {"ports", "restrict_mode"})
    if unknown:
        raise DstackError(f"{field}.{unknown[0]}", "is not a port_policy field (ports, restrict_mode)")
    ports = value.get("ports", [])
    if not isinstance(ports, list) or len(ports) > MAX_PORT_POLICY_PORTS:
        raise DstackError(f"{field}.ports", f"must be a list of at most {MAX_PORT_POLICY_PORTS} {{port, pp}}")
    restrict = value.get("restrict_mode", False)
    if not isinstance(restrict, bool):
        raise DstackError(f"{field}.restrict_mode", "must be true or false")
    seen, out = set(), []
    for i, entry in enumerate(ports):
        where = f"{field}.ports[{i}]"
        if not isinstance(entry, dict) or set(entry) - {"port", "pp"}:
            raise DstackError(where, "must be an object {port, pp}")
        port, pp = entry.get("port"), entry.get("pp", False)
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise DstackError(f"{where}.port", "must be a port number from 1 to 65535")
        if not isinstance(pp, bool):
            raise DstackError(f"{where}.pp", "must be true or false")
        if port in seen:
            raise DstackError(f"{where}.port", f"{port} is listed twice")
        seen.add(port)
        out.append({"port": port, "pp": pp})
    return {"ports": sorted(out, key=lambda p: p["port"]), "restrict_mode": restrict}


def app_id_param(value, field="app_id"):
    return parse_hex(value, field, length=20).hex()


# ---- trust: the KMS root for certificates, the quote's root and collateral --------------------

class QuoteTrust(attestation.QuoteTrust):
    """The gateway's trust in quotes ([attestation], the KMS's keys): attestation.QuoteTrust, a
    collateral source that fails being the gateway's Unavailable (503), not a refusal."""

    def __init__(self, config, state_dir):
        super().__init__(config, state_dir, field="attestation.")

    def verify(self, raw_quote, event_log, expected_report_data, collateral=None):
        try:
            collateral = self.collateral(raw_quote) if collateral is None else collateral
        except DstackError as exc:
            raise Unavailable("collateral", str(exc)) from None
        return super().verify(raw_quote, event_log, expected_report_data, collateral)


class AuthWebhook:
    """[core.auth]: POST the attested app info as JSON; only a 2xx answer allows (dstack's auth client)."""

    def __init__(self, url, timeout):
        self.url, self.timeout = url, timeout

    def check(self, boot):
        body = json.dumps({k: boot.get(k, "") for k in (
            "app_id", "instance_id", "compose_hash", "device_id", "mr_aggregated", "mr_system", "os_image_hash",
            "key_provider_info", "attestation_mode")}).encode()
        request = urllib.request.Request(self.url, data=body, method="POST", headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # nosec: the configured URL
                response.read(AUTH_ANSWER_BYTES)
        except urllib.error.HTTPError as exc:
            raise Refused("auth", f"the authorization webhook denied it (HTTP {exc.code})") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise Refused("auth", f"the authorization webhook failed, so refused: {getattr(exc, 'reason', exc)}") from None


class GatewayService:
    """The control plane of one gateway node. `hub`: None (no WireGuard yet) or an object with
    set_peer(public_key, allowed_ips), remove_peer(public_key), sync_peers([wireguard.Peer]) and,
    optionally, get() -> {"peers": [objects with public_key and last_handshake]}."""

    def __init__(self, config, hub=None, store=None, verifier=None, cluster=None):
        self.config = config
        core = config["core"]
        self.store = store or open_store(config)
        self.hub = hub
        self.verifier = verifier or ra_tls.Verifier(
            ra_tls.load_kms_root(config["rpc"]["kms_root_ca"]), QuoteTrust(config["attestation"], core["state_dir"]),
            usage=ra_tls.CLIENT_AUTH, require_instance_id=True)
        # [core.sync]: a cluster's nodes (cluster.py), made on first use (serve joins at start; the
        # ACME commands, which need only the store, never need this node's identity); None for one node.
        self._cluster = cluster
        auth = core["auth"]
        self.auth = AuthWebhook(auth["url"], auth["timeout"]) if auth["enabled"] else None
        # [core.certbot]: the ACME certificates (made here: a bad credentials file stops the start).
        self.acme = acme.AcmeManager(config, self.store) if core.get("certbot", {}).get("enabled") else None

    # ---- Gateway ------------------------------------------------------------------------------

    def register_cvm(self, cert_chain, params):
        """RegisterCvm {client_public_key, port_policy?}: the body checked first (400), then the
        identity from the certificate (403), then the store and the hub."""
        public_key = wg_public_key(params.get("client_public_key"))
        policy = port_policy(params.get("port_policy"))
        boot = self.verifier.verify(cert_chain)
        if self.auth is not None:
            self.auth.check(boot)
        try:
            registration = self.store.register(boot["instance_id"], boot["app_id"], boot["compose_hash"],
                                               public_key, policy)
        except Conflict as exc:
            raise Refused(exc.field, exc.reason) from None
        except Exhausted as exc:
            raise Unavailable(exc.field, exc.reason) from None
        instance = registration.instance
        log.info("registered instance %s of app %s at %s (%s)", instance.instance_id, instance.app_id,
                 instance.client_ip, "new" if registration.created else "again")

        def apply(hub):
            if registration.previous_public_key:  # the instance came back with a new key
                hub.remove_peer(registration.previous_public_key)
            hub.set_peer(instance.public_key, [f"{instance.client_ip}/32"])
        self._apply(apply)
        return self._register_answer(instance)

    def _register_answer(self, instance):
        proxy = self.config["core"]["proxy"]
        nodes = self._gateways()
        return {
            "wg": {"client_ip": instance.client_ip,
                   "servers": [{"pk": n["wg_public_key"], "ip": n["wg_ip"], "endpoint": n["wg_endpoint"]} for n in nodes]},
            "agent": {"external_port": proxy["external_port"], "internal_port": proxy["agent_port"],
                      "domain": proxy["base_domain"], "app_address_ns_prefix": proxy["app_address_ns_prefix"]},
            "gateways": nodes,
        }

    def _node(self):
        wg = self.config["core"]["wg"]
        return {"id": self._node_id(), "uuid": "", "url": self._url(), "last_seen": int(time.time()),
                "wg_public_key": wg["public_key"], "wg_ip": wg["ip"], "wg_endpoint": wg["endpoint"]}

    @property
    def cluster(self):
        if self._cluster is None and self.config["core"]["sync"]["etcd_endpoints"]:
            self._cluster = gateway_cluster.Cluster(self.config, self.store, self.verifier)
        return self._cluster

    def _node_id(self):
        return self.cluster.node_id if self.cluster is not None else 0

    def _gateways(self):
        """The gateways a CVM gets (dstack's GatewayNodeInfo): this node, and in a cluster every
        other node that is up and attested as this gateway app (cluster.py)."""
        if self.cluster is None:
            return [self._node()]
        return [{"id": n["id"], "uuid": "", "url": n["url"], "last_seen": n["last_seen"],
                 "wg_public_key": n["wg_public_key"], "wg_ip": n["wg_ip"], "wg_endpoint": n["wg_endpoint"]}
                for n in self.cluster.live_nodes()]

    def _url(self):
        return gateway_cluster.node_url(self.config)

    def info(self):
        proxy = self.config["core"]["proxy"]
        return {"base_domain": proxy["base_domain"], "external_port": proxy["external_port"],
                "app_address_ns_prefix": proxy["app_address_ns_prefix"], "version": version()}

    def acme_info(self):
        """AcmeInfo (dstack: anyone may ask): the ACME account and every quoted certificate key."""
        return acme.acme_info(self.store)

    def get_peers(self, cert_chain):
        """GetPeers (dstack: gateway mTLS only): the live nodes (this one alone without a cluster),
        to an attested caller."""
        self.verifier.verify(cert_chain)
        return {"my_id": self._node_id(), "my_url": self._url(),
                "peers": [{"id": n["id"], "url": n["url"]} for n in self._gateways()]}

    # ---- the WireGuard hub ---------------------------------------------------------------------

    def _apply(self, change):
        if self.hub is None:
            return
        try:
            change(self.hub)
        except Exception as exc:  # pylint: disable=broad-exception-caught
            # The store holds the registration; the next sync (or the CVM's retry) applies it.
            log.warning("WireGuard hub: could not apply the peer change: %s", exc)
            raise Unavailable("wireguard", f"the gateway could not apply the peer ({type(exc).__name__}); "
                                           "retry: the registration is kept") from None

    def peers(self):
        return [wireguard.Peer(i.public_key, [f"{i.client_ip}/32"]) for i in self.store.instances()]

    def sync_peers(self):
        """Make the hub's peer set exactly the store's (at start, and after a lost change)."""
        peers = self.peers()
        self._apply(lambda hub: hub.sync_peers(peers))
        return len(peers)

    def refresh_handshakes(self):
        """Copy the hub's latest handshakes into the store (the data plane orders by them)."""
        if self.hub is None or not hasattr(self.hub, "get"):
            return 0
        peers = self.hub.get().get("peers", [])
        self.store.record_handshakes({p.public_key: p.last_handshake for p in peers})
        return len(peers)

    def recycle(self, now=None):
        """Remove instances with no handshake (nor registration) for core.recycle.timeout; their ids."""
        recycle = self.config["core"]["recycle"]
        if not recycle["enabled"]:
            return []
        now = time.time() if now is None else now
        removed = []
        for instance in self.store.stale(now - recycle["timeout"]):
            if self.store.remove(instance.instance_id) is not None:
                removed.append(instance.instance_id)
                log.info("recycled instance %s of app %s (no handshake for %.0f s)", instance.instance_id,
                         instance.app_id, now - max(instance.last_handshake, instance.last_seen))
                self._apply(lambda hub, key=instance.public_key: hub.remove_peer(key))
        return removed

    # ---- Admin ---------------------------------------------------------------------------------

    def _host_info(self, instance):
        proxy = self.config["core"]["proxy"]
        return {"instance_id": instance.instance_id, "ip": instance.client_ip, "app_id": instance.app_id,
                "base_domain": proxy["base_domain"], "port": proxy["external_port"],
                "latest_handshake": int(instance.last_handshake), "num_connections": 0}

    def status(self):
        # In a cluster, nodes lists every node with up (its lease lives) and accepted (attested as
        # this gateway app); a single node lists itself.
        nodes = [self._node()] if self.cluster is None else self.cluster.nodes()
        return {"id": self._node_id(), "url": self._url(), "bootnode_url": "", "num_connections": 0,
                "hosts": [self._host_info(i) for i in self.store.instances()], "nodes": nodes, "uuid": ""}

    def get_info(self, params):
        instance_id = params.get("id")
        if not isinstance(instance_id, str) or not instance_id:
            raise DstackError("id", "is required: an instance id")
        instance = self.store.instance(instance_id.lower().removeprefix("0x"))
        return {"found": True, "info": self._host_info(instance)} if instance else {"found": False}

    def get_meta(self, now=None):
        now = time.time() if now is None else now
        instances = self.store.instances()
        return {"registered": len(instances),
                "online": sum(1 for i in instances if i.last_handshake and now - i.last_handshake < ONLINE_SECONDS)}

    def remove_instance(self, params):
        instance_id = params.get("id")
        if not isinstance(instance_id, str) or not instance_id:
            raise DstackError("id", "is required: an instance id")
        removed = self.store.remove(instance_id.lower().removeprefix("0x"))
        if removed is not None:
            log.info("removed instance %s of app %s (Admin)", removed.instance_id, removed.app_id)
            self._apply(lambda hub: hub.remove_peer(removed.public_key))
        return {"removed": removed is not None}

    def set_port_policy(self, params):
        """Admin.SetPortPolicy {app_id, policy}: the policy for every instance of the app (null: the apps' own)."""
        app_id = app_id_param(params.get("app_id"))
        policy = port_policy(params.get("policy"), "policy")
        self.store.set_port_policy_override(app_id, policy)
        log.info("port policy of app %s %s (Admin)", app_id, "set" if policy is not None else "override removed")
        return {"app_id": app_id, "policy": policy}

    def _acme(self):
        if self.acme is None:
            raise DstackError("core.certbot.enabled", "is false: this gateway does not get its certificate by ACME")
        return self.acme

    def renew_cert(self, params):
        """Admin.RenewCert: a new certificate now (dstack's forced renewal); {renewed}. False when
        another node holds the order's lock (it is renewing the same certificate). {name}: the
        certificate of a custom domain a registered app declared (custom_certs.py: its TXT record
        checked first; a name no app declares, or whose record names another app, is a 400)."""
        manager = self._acme()
        force = params.get("force", True) is not False
        name = params.get("name") or ""
        if not isinstance(name, str):
            raise DstackError("name", "must be a DNS name (a custom domain) or absent (the wildcard)")
        try:
            if name and name.lower().rstrip(".") != manager.name:
                done = custom_certs.renew_declared(self.config, self.store, manager, name, force=force)
                renewed, reason = done["renewed"], done["reason"]
            else:
                renewed, reason = manager.renew(force=force)
        except custom_certs.Refused:
            raise
        except DstackError as exc:  # the ACME server or the DNS provider failed: not the caller's input
            if exc.field == "name":
                raise
            raise Unavailable(exc.field, exc.reason) from None
        log.info("certificate renewal (Admin): %s", reason)
        return {"renewed": renewed}

    def set_caa(self, params):  # pylint: disable=unused-argument
        """Admin.SetCaa: the CAA records of the certificate's domain pinned to [core.certbot] ca_name,
        DNS-01 and the attested account (dstack's guarded order); {} as dstack answers."""
        manager = self._acme()
        try:
            manager.set_caa()
        except DstackError as exc:
            raise Unavailable(exc.field, exc.reason) from None
        return {}
