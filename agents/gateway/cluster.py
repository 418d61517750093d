# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A gateway cluster's nodes: who they are, which are up, and which this node accepts.

Each node of a cluster ([core.sync] etcd_endpoints) writes a record into the shared store
(store_etcd: node/<id>) and keeps a lease on alive/<id> while it runs:

    record      {id, url, wg_public_key, wg_ip, wg_endpoint, certificate_chain}: its WireGuard
                hub (key, address, endpoint), its control API's URL, and its attested identity,
                the RA-TLS certificate its control API serves (rpc.cert: leaf and app CA, from
                the guest agent of its own CVM)
    signature   ECDSA/SHA-256 of "dstack-gateway-node:" || the record's canonical JSON, by that
                certificate's key: the record is the attested node's own, not one copied next
                to another WireGuard key by whoever can write to etcd

A node accepts another (lists it to its CVMs as a WireGuard server and as one of the gateways[])
only when the record verifies with the project's one RA-TLS verifier (ra_tls.Verifier: the
chain under the pinned KMS root, the quote and event log, for server authentication) AND its
attested app_id is this node's own (every node of a cluster is an instance of the same gateway
app), AND the signature holds. A record that does not is logged once and left out. A node is
up while its lease lives (renewed every [core.sync] interval, node_ttl seconds long): a node
that stops revokes it, one that dies stops renewing it, and either way the others stop listing
it. Verifications are kept per record (a node's record changes only when it restarts).

A single node (SQLite, no [core.sync]) has no Cluster: service.py answers with itself.
"""

import base64
import hashlib
import json
import logging
import threading
import time

from ansible_collections.dstack.tee.plugins.module_utils import ra_tls
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.fileio import read_bytes

try:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
except ImportError:  # the gateway's dependencies have it; module_utils report it the same way
    x509 = None

log = logging.getLogger("dstack.gateway")

SIGNATURE_CONTEXT = b"dstack-gateway-node:"
MAX_RECORD_BYTES = 64 * 1024


def _canonical(record):
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()


def _pem_chain(text):
    """The PEM certificates of a chain file, in order."""
    marker = "-----END CERTIFICATE-----"
    return [part.strip() + "\n" + marker + "\n" for part in text.split(marker) if "-----BEGIN" in part]


def node_url(config):
    """The control API's URL the other nodes and the CVMs use: [core.sync] my_url, else from
    rpc_domain or rpc.listen (as the single node's gateways[] entry)."""
    sync = config["core"].get("sync") or {}
    if sync.get("my_url"):
        return sync["my_url"]
    domain = config["core"]["rpc_domain"]
    return f"https://{domain}" if domain else f"https://{config['rpc']['listen']}"


class Cluster:
    """This node's view of its cluster (module docstring). `store`: a store_etcd.EtcdStore;
    `verifier`: the gateway's ra_tls.Verifier of CVMs (its KMS root and quote trust are reused,
    for server certificates)."""

    def __init__(self, config, store, verifier):
        self.config = config
        self.store = store
        sync, wg, rpc = config["core"]["sync"], config["core"]["wg"], config["rpc"]
        self.node_id = int(sync["node_id"])
        self.ttl = sync["node_ttl"]
        if not rpc["cert"] or not rpc["key"]:
            raise DstackError("rpc.cert", "a cluster node needs its attested identity: rpc.guest_agent (or an RA-TLS "
                                          "rpc.cert and rpc.key) - its record is signed with it")
        chain = _pem_chain(read_bytes(rpc["cert"], "rpc.cert").decode("ascii", "replace"))
        self._key = serialization.load_pem_private_key(read_bytes(rpc["key"], "rpc.key"), None)
        if not isinstance(self._key, ec.EllipticCurvePrivateKey):
            raise DstackError("rpc.key", "a cluster node signs its record with its RA-TLS key, an EC key")
        # Our own certificate through the same verifier: the app_id every other node must have.
        own = ra_tls.Verifier(verifier.kms_root, verifier.trust, usage=ra_tls.SERVER_AUTH)
        try:
            boot = own.verify([x509.load_pem_x509_certificate(p.encode()).public_bytes(serialization.Encoding.DER)
                               for p in chain])
        except (DstackError, ValueError) as exc:
            reason = exc.reason if isinstance(exc, DstackError) else str(exc)
            raise DstackError("rpc.cert", "a cluster node needs an attested identity (rpc.guest_agent, or an RA-TLS "
                                          f"rpc.cert the KMS issued): its certificate does not verify: {reason}") from None
        self.app_id = boot["app_id"]
        self.peer_verifier = ra_tls.Verifier(verifier.kms_root, verifier.trust, usage=ra_tls.SERVER_AUTH,
                                             app_id=self.app_id)
        self.record = {"id": self.node_id, "url": node_url(config), "wg_public_key": wg["public_key"],
                       "wg_ip": wg["ip"], "wg_endpoint": wg["endpoint"], "certificate_chain": chain}
        self._accepted = {}      # sha256 of a record's bytes -> its record, or the reason it was refused
        self._lock = threading.Lock()

    # ---- this node ------------------------------------------------------------------------------

    def signed_record(self):
        body = _canonical(self.record)
        signature = self._key.sign(SIGNATURE_CONTEXT + body, ec.ECDSA(hashes.SHA256()))
        return _canonical({"record": self.record, "signature": base64.b64encode(signature).decode()})

    def join(self):
        """At start: this node's hub address claimed, its record written, its lease made."""
        self.store.claim_node_address()
        self.store.put_node(self.signed_record())
        self.store.heartbeat(self.ttl)
        log.info("cluster: node %d (app %s) joined at %s; %d node(s) up", self.node_id, self.app_id,
                 self.record["url"], len(self.live_nodes()))

    def heartbeat(self):
        self.store.heartbeat(self.ttl)

    def leave(self):
        self.store.leave()
        log.info("cluster: node %d left (marked down)", self.node_id)

    # ---- the others -----------------------------------------------------------------------------

    def check_record(self, data):
        """The record of a node's signed bytes, verified (module docstring); ra_tls.Refused otherwise."""
        if len(data) > MAX_RECORD_BYTES:
            raise ra_tls.Refused("node", "its record is too large")
        try:
            signed = json.loads(data)
            record, signature = signed["record"], base64.b64decode(signed["signature"], validate=True)
            chain = [x509.load_pem_x509_certificate(p.encode()) for p in record["certificate_chain"]]
            for name in ("id", "url", "wg_public_key", "wg_ip", "wg_endpoint"):
                if name not in record:
                    raise KeyError(name)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ra_tls.Refused("node", "its record is not {record, signature} with a certificate chain") from None
        self.peer_verifier.verify([c.public_bytes(serialization.Encoding.DER) for c in chain])
        try:
            chain[0].public_key().verify(signature, SIGNATURE_CONTEXT + _canonical(record), ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, TypeError, AttributeError):
            raise ra_tls.Refused("node.signature", "is not by the key of the node's attested certificate") from None
        return record

    def _accepted_record(self, node_id, data):
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            known = self._accepted.get(digest)
        if known is None:
            try:
                known = self.check_record(data)
                if known["id"] != node_id:
                    raise ra_tls.Refused("node.id", f"the record says node {known['id']}, stored as node {node_id}")
            except DstackError as exc:
                known = f"{exc.field}: {exc.reason}"
                log.warning("cluster: node %d refused (not listed to CVMs): %s", node_id, known)
            with self._lock:
                if len(self._accepted) > 1024:
                    self._accepted.clear()
                self._accepted[digest] = known
        return known if isinstance(known, dict) else None

    def nodes(self):
        """Every node in the store: [{id, url, wg_public_key, wg_ip, wg_endpoint, last_seen, up,
        accepted}] (accepted: its record verified; a refused one has only id, up and the reason)."""
        out = []
        for node_id, data, alive in self.store.nodes():
            record = self.record if node_id == self.node_id else self._accepted_record(node_id, data)
            last_seen = int(alive["last_seen"]) if alive else 0
            if record is None:
                out.append({"id": node_id, "up": alive is not None, "accepted": False, "last_seen": last_seen,
                            "reason": self._accepted.get(hashlib.sha256(data).hexdigest(), "")})
                continue
            out.append({"id": node_id, "url": record["url"], "wg_public_key": record["wg_public_key"],
                        "wg_ip": record["wg_ip"], "wg_endpoint": record["wg_endpoint"], "last_seen": last_seen,
                        "up": alive is not None or node_id == self.node_id, "accepted": True})
        return out

    def live_nodes(self):
        """The nodes a CVM gets as its gateways: this one first, then every other that is up and
        accepted, by id."""
        others = [n for n in self.nodes() if n["id"] != self.node_id and n["up"] and n["accepted"]]
        me = dict(self.record, last_seen=int(time.time()), up=True, accepted=True)
        me.pop("certificate_chain")
        return [me] + others
