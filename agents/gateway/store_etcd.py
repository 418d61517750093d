# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The gateway's state in etcd, shared by the nodes of a gateway cluster ([core.sync]
etcd_endpoints): store.Store's interface (instances, dstack's IP allocation, port policies, the
handshakes and endpoints, blobs, locks), and what a cluster adds: each node's hub address
claimed, its signed record and its liveness lease.

Keys under the prefix (core.sync.etcd_prefix, "/dstack-gateway/"):

    inst/<instance_id>           the instance: JSON {app_id, compose_hash, client_ip, public_key,
                                 port_policy, registered_at, last_seen}
    app/<app_id>/<instance_id>   the app's index ("")
    ip/<address>                 who holds an address: "i:<instance_id>", or "n:<node_id>" for a
                                 node's own hub address (never handed out, never released)
    key/<public key, hex>        the instance holding a WireGuard key
    hs/<instance_id>/<node_id>   the latest handshake this node saw (unix seconds)
    ep/<instance_id>/<node_id>   where this node last heard the instance's WireGuard ("ip:port")
    ppo/<app_id>                 the Admin's port policy for the app: JSON {policy, set_at}
    blob/<name>                  opaque bytes (the ACME account, certificates), sealed (below)
    node/<node_id>               a node's record (cluster.py signs and checks it)
    alive/<node_id>              JSON {last_seen}, on the node's lease: gone when the node stops
                                 (it revokes the lease) or stops renewing it (the lease expires)
    lock/<name>                  a lock's holder, on the holder's lease

Every change is one etcd transaction whose compares are what was read before it (the revisions;
an address or key that must be free: create_revision 0). When another node changed any of it in
between, the transaction fails and is read and tried again: two nodes never give out one address
or one key, and a re-registering instance keeps its address whichever node it comes back to.
Handshakes and endpoints are kept per node (each node writes its own keys, so nodes never
contend for them); an instance's last_handshake is the freshest any node saw.

The members: several client URLs; a request goes to the member that answered last, and on a
connection failure, a timeout or a 5xx (a member down, cut off from the others, or between
leaders) to the next, for up to RETRY_FOR seconds in all. A transaction retried after a timeout
may have been applied already: its compares then fail and it is read again, so nothing is done
twice. The JSON API is etcd's grpc-gateway under /v3/ (etcd 3.4 and later; 3.5 dropped /v3beta/).

Blobs hold private keys (the ACME account's, the certificates'), and etcd is outside the TEE: each
is sealed with AES-256-GCM (its name as associated data) under `blob_key`, a key only the gateway
app's CVMs can derive (open_store asks the guest agent of this node's CVM, GetKey, the same for
every instance of the app). Without it a blob is refused, not stored in clear; one that does
not open (another app's, or altered) is an error naming it.

Each process and thread has its own HTTP sessions (gunicorn's workers and the data plane are
forked from serve, and a session's sockets must not be shared).
"""

import base64
import contextlib
import ipaddress
import json
import logging
import os
import threading
import time

from ansible_collections.dstack.tee.agents.gateway.store import (Conflict, Exhausted, Instance, Registration,
                                                                 Unavailable)
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError

log = logging.getLogger("dstack.gateway")

API_PATH = "/v3/"
RETRY_FOR = 6.0           # seconds a request keeps trying the members (an election takes ~1-2 s)
TXN_ATTEMPTS = 50         # optimistic transactions retried at most this often
MAX_TXN_OPS = 100         # etcd's default --max-txn-ops is 128
LOCK_POLL = 0.2
_FIELD = "core.sync.etcd_endpoints"
SEALED = b"dstack-gateway-sealed-v1:"


# ---- the wire: base64 keys and values, ranges, compares -------------------------------------------

def _b64(data):
    return base64.b64encode(data.encode() if isinstance(data, str) else bytes(data)).decode()


def _unb64(text):
    return base64.b64decode(text or "")


def _prefix_end(key):
    """The range end that makes `key` a prefix: its last byte incremented."""
    raw = bytearray(key.encode())
    while raw and raw[-1] == 0xFF:
        raw.pop()
    raw[-1] += 1
    return bytes(raw)


def _kv(item):
    return {"key": _unb64(item["key"]).decode(), "value": _unb64(item.get("value", "")),
            "create_revision": int(item.get("create_revision", 0)), "mod_revision": int(item.get("mod_revision", 0)),
            "lease": int(item.get("lease", 0))}


def _range_op(key, prefix=False, keys_only=False):
    body = {"key": _b64(key)}
    if prefix:
        body["range_end"] = _b64(_prefix_end(key))
    if keys_only:
        body["keys_only"] = True
    return {"request_range": body}


def _put_op(key, value, lease=0):
    body = {"key": _b64(key), "value": _b64(value)}
    if lease:
        body["lease"] = str(lease)
    return {"request_put": body}


def _delete_op(key, prefix=False):
    body = {"key": _b64(key)}
    if prefix:
        body["range_end"] = _b64(_prefix_end(key))
    return {"request_delete_range": body}


def _absent(key):
    return {"key": _b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}


def _unchanged(key, mod_revision):
    """The key is as read (mod_revision 0: it was absent and still is)."""
    if not mod_revision:
        return _absent(key)
    return {"key": _b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(mod_revision)}


def _value_is(key, value):
    return {"key": _b64(key), "target": "VALUE", "result": "EQUAL", "value": _b64(value)}


def _unique_ops(ops):
    """etcd refuses a transaction that touches one key twice: the later op on a key wins."""
    seen, out = set(), []
    for op in reversed(ops):
        body = next(iter(op.values()))
        if body["key"] in seen:
            continue
        seen.add(body["key"])
        out.append(op)
    return out[::-1]


def _dumps(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _key_hex(public_key):
    return base64.b64decode(public_key).hex()


class EtcdClient:
    """etcd's JSON API on several members, with failover (the module docstring)."""

    def __init__(self, endpoints, timeout=2.0, ca_cert="", cert="", key="", retry_for=RETRY_FOR):
        if not endpoints:
            raise DstackError(_FIELD, "is empty")
        self.endpoints = list(endpoints)
        self.timeout, self.ca_cert, self.cert, self.key, self.retry_for = timeout, ca_cert, cert, key, retry_for
        self._local = threading.local()
        self._preferred = 0

    def _clients(self):
        import etcd3gw  # pylint: disable=import-outside-toplevel
        local = self._local
        if getattr(local, "clients", None) is None or local.pid != os.getpid():
            clients = []
            for url in self.endpoints:
                scheme, _sep, rest = url.partition("://")
                host, _sep, port = rest.rpartition(":")
                clients.append(etcd3gw.Etcd3Client(
                    host=host.strip("[]"), port=int(port), protocol=scheme, timeout=self.timeout, api_path=API_PATH,
                    ca_cert=self.ca_cert or None, cert_cert=self.cert or None, cert_key=self.key or None))
            local.clients, local.pid = clients, os.getpid()
        return local.clients

    def close(self):
        clients = getattr(self._local, "clients", None)
        if clients is not None and self._local.pid == os.getpid():
            for client in clients:
                client.session.close()
        self._local.clients = None

    def post(self, path, payload):
        """One request to the first member that answers; Unavailable when none does in retry_for."""
        from etcd3gw import exceptions  # pylint: disable=import-outside-toplevel
        clients = self._clients()
        deadline = time.monotonic() + self.retry_for
        failures = {}
        while True:
            start = self._preferred
            for offset in range(len(clients)):
                index = (start + offset) % len(clients)
                client = clients[index]
                try:
                    answer = client.post(client.get_url(path), json=payload)
                except (exceptions.ConnectionFailedError, exceptions.ConnectionTimeoutError,
                        exceptions.InternalServerError) as exc:
                    failures[self.endpoints[index]] = f"{type(exc).__name__}: {_detail(exc)}"
                    continue
                except exceptions.Etcd3Exception as exc:
                    raise DstackError(_FIELD, f"etcd at {self.endpoints[index]} refused {path}: {_detail(exc)}") from None
                if index != self._preferred:
                    log.info("etcd: now using %s (%s)", self.endpoints[index],
                             "; ".join(f"{url}: {why}" for url, why in failures.items()) or "first answer")
                    self._preferred = index
                return answer
            if time.monotonic() > deadline:
                raise Unavailable(_FIELD, "no etcd member answered: " +
                                  "; ".join(f"{url}: {why}" for url, why in failures.items()))
            time.sleep(0.2)

    # ---- the requests the store makes ---------------------------------------------------------------

    def txn(self, compare=(), success=(), failure=()):
        """(succeeded, [response per op]) of one transaction."""
        answer = self.post("kv/txn", {"compare": list(compare), "success": list(success), "failure": list(failure)})
        return bool(answer.get("succeeded", False)), answer.get("responses", [])

    def read(self, *ops):
        """Several ranges read at one revision (one transaction without compares): a list of kv lists."""
        _ok, responses = self.txn(success=ops)
        return [[_kv(item) for item in r.get("response_range", {}).get("kvs", [])] for r in responses]

    def get(self, key, prefix=False, keys_only=False):
        return self.read(_range_op(key, prefix, keys_only))[0]

    def put(self, key, value, lease=0):
        self.post("kv/put", _put_op(key, value, lease)["request_put"])

    def delete(self, key, prefix=False):
        self.post("kv/deleterange", _delete_op(key, prefix)["request_delete_range"])

    def grant(self, ttl):
        """A new lease of ttl seconds (whole, at least 1): its id."""
        return int(self.post("lease/grant", {"TTL": str(max(1, int(round(ttl)))), "ID": "0"})["ID"])

    def keepalive(self, lease):
        """Renew a lease: its new TTL, or -1 when it has expired (or was revoked)."""
        answer = self.post("lease/keepalive", {"ID": str(lease)})
        return int(answer.get("result", answer).get("TTL", -1))

    def revoke(self, lease):
        """Revoke a lease (its keys go with it); one that already expired is no error."""
        from etcd3gw import exceptions  # pylint: disable=import-outside-toplevel
        try:
            self.post("kv/lease/revoke", {"ID": str(lease)})
        except DstackError as exc:
            if "lease not found" not in exc.reason:
                raise
        except exceptions.Etcd3Exception:
            pass

    def status(self):
        return self.post("maintenance/status", {})


def _detail(exc):
    text = getattr(exc, "detail_text", None) or str(exc) or type(exc).__name__
    try:
        text = json.loads(text).get("error") or text
    except (ValueError, AttributeError):
        pass
    return str(text).strip()[:300]


# ---- the store ---------------------------------------------------------------------------------------

class EtcdStore:
    """store.Store's interface over etcd, for node `node_id` of a cluster (module docstring).

    client: an EtcdClient; prefix: the keys' prefix; client_ip_range, gateway_ip, reserved_net:
    as store.Store (gateway_ip is this node's hub address: never given to an instance here, and
    claimed in the store at claim_node_address so that no other node gives it out either)."""

    def __init__(self, client, client_ip_range, gateway_ip, reserved_net=(), node_id=1, prefix="/dstack-gateway/",
                 blob_key=None):
        self.client = client
        self.blob_key = blob_key
        self.prefix = prefix
        self.node_id = int(node_id)
        self.client_ip_range = ipaddress.ip_network(client_ip_range)
        gateway = ipaddress.ip_interface(gateway_ip)
        self.gateway_ip = gateway
        self._excluded = {gateway.ip, gateway.network.network_address, gateway.network.broadcast_address}
        self.reserved_net = [ipaddress.ip_network(n) for n in reserved_net]
        self._written = {}        # (kind, instance_id) -> the value this process last wrote for this node
        self._lease = 0           # this node's liveness lease

    def for_data_plane(self):
        """This store for a data-plane process: each request tries every member once and gives up
        (a router lookup runs on the event loop; it must not sleep through an election)."""
        copy = EtcdStore.__new__(EtcdStore)
        copy.__dict__.update(self.__dict__, _written={}, _lease=0)
        source = self.client
        copy.client = EtcdClient(source.endpoints, timeout=source.timeout, ca_cert=source.ca_cert, cert=source.cert,
                                 key=source.key, retry_for=0)
        return copy

    def _k(self, *parts):
        return self.prefix + "/".join(str(p) for p in parts)

    def close(self):
        self.client.close()

    # ---- instances from their keys -------------------------------------------------------------

    def _instance(self, instance_id, record, handshakes):
        data = json.loads(record)
        return Instance(instance_id, data["app_id"], data["compose_hash"], data["client_ip"], data["public_key"],
                        data.get("port_policy"), float(data["registered_at"]), float(data["last_seen"]),
                        max([0.0] + [float(h["value"] or 0) for h in handshakes]))

    def _handshakes_by_instance(self, kvs):
        out = {}
        base = len(self._k("hs", ""))
        for kv in kvs:
            instance_id = kv["key"][base:].split("/", 1)[0]
            out.setdefault(instance_id, []).append(kv)
        return out

    def _read_instances(self, instance_ids):
        """{instance_id: (Instance, mod_revision)} of those that exist."""
        found = {}
        ids = list(instance_ids)
        for start in range(0, len(ids), MAX_TXN_OPS // 2):
            batch = ids[start:start + MAX_TXN_OPS // 2]
            ops = []
            for instance_id in batch:
                ops += [_range_op(self._k("inst", instance_id)), _range_op(self._k("hs", instance_id, ""), prefix=True)]
            results = self.client.read(*ops)
            for i, instance_id in enumerate(batch):
                record, handshakes = results[2 * i], results[2 * i + 1]
                if record:
                    found[instance_id] = (self._instance(instance_id, record[0]["value"], handshakes),
                                          record[0]["mod_revision"])
        return found

    # ---- registration and allocation ----------------------------------------------------------

    def register(self, instance_id, app_id, compose_hash, public_key, port_policy=None, now=None):
        """As store.Store.register, one etcd transaction (retried when another node changed what it read)."""
        now = time.time() if now is None else now
        key_hex = _key_hex(public_key)
        for _attempt in range(TXN_ATTEMPTS):
            record_kvs, holder_kvs, handshakes = self.client.read(
                _range_op(self._k("inst", instance_id)), _range_op(self._k("key", key_hex)),
                _range_op(self._k("hs", instance_id, ""), prefix=True))
            current = self._instance(instance_id, record_kvs[0]["value"], handshakes) if record_kvs else None
            revision = record_kvs[0]["mod_revision"] if record_kvs else 0
            if current is not None and current.app_id != app_id:
                raise Conflict("instance_id", "is registered to another app")
            if holder_kvs and holder_kvs[0]["value"].decode() != instance_id:
                raise Conflict("client_public_key", "is the WireGuard key of another instance")
            replaced_key = current.public_key if current is not None and current.public_key != public_key else ""
            record = {"app_id": app_id, "compose_hash": compose_hash, "public_key": public_key,
                      "port_policy": port_policy, "last_seen": now}
            compare = [_unchanged(self._k("inst", instance_id), revision)]
            success = [_put_op(self._k("app", app_id, instance_id), "")]
            if replaced_key:
                compare.append(_absent(self._k("key", key_hex)))
                success += [_put_op(self._k("key", key_hex), instance_id), _delete_op(self._k("key", _key_hex(replaced_key))),
                            _delete_op(self._k("hs", instance_id, ""), prefix=True)]   # a new key: no handshake yet
            elif current is None:
                compare.append(_absent(self._k("key", key_hex)))
                success.append(_put_op(self._k("key", key_hex), instance_id))
            if current is not None and self._valid(ipaddress.ip_address(current.client_ip)):
                record.update(client_ip=current.client_ip, registered_at=current.registered_at)
                created = False
                last_handshake = 0.0 if replaced_key else current.last_handshake
            else:
                # A new instance, or its address became this node's or reserved (a changed
                # configuration): a new address, registered anew (as store.Store does).
                address = self._free_address()
                record.update(client_ip=address, registered_at=now)
                compare.append(_absent(self._k("ip", address)))
                success.append(_put_op(self._k("ip", address), f"i:{instance_id}"))
                if current is not None:
                    success += [_delete_op(self._k("ip", current.client_ip)),
                                _delete_op(self._k("hs", instance_id, ""), prefix=True)]
                created, last_handshake = True, 0.0
            success.append(_put_op(self._k("inst", instance_id), _dumps(record)))
            ok, _responses = self.client.txn(compare, _unique_ops(success))
            if ok:
                instance = Instance(instance_id, app_id, compose_hash, record["client_ip"], public_key, port_policy,
                                    float(record["registered_at"]), float(now), last_handshake)
                return Registration(instance, created, replaced_key)
        raise Unavailable("store", f"the registration of {instance_id} kept meeting other nodes' changes; retry")

    def _free_address(self):
        used = {kv["key"].rsplit("/", 1)[1] for kv in self.client.get(self._k("ip", ""), prefix=True, keys_only=True)}
        for host in self.client_ip_range.hosts():
            if str(host) not in used and self._valid(host):
                return str(host)
        instances = sum(1 for kv in self.client.get(self._k("inst", ""), prefix=True, keys_only=True))
        raise Exhausted("core.wg.client_ip_range", f"no free address left in {self.client_ip_range} "
                                                   f"({instances} instances hold one)")

    def _valid(self, address):
        return address not in self._excluded and not any(address in net for net in self.reserved_net)

    # ---- lookups -----------------------------------------------------------------------------

    def instance(self, instance_id):
        found = self._read_instances([instance_id]).get(instance_id)
        return found[0] if found else None

    def instances_of(self, app_id):
        base = len(self._k("app", app_id, ""))
        ids = [kv["key"][base:] for kv in self.client.get(self._k("app", app_id, ""), prefix=True, keys_only=True)]
        found = [i for i, _rev in self._read_instances(ids).values()]
        return sorted(found, key=lambda i: (-i.last_handshake, -i.last_seen, i.instance_id))

    def instances(self):
        records, handshakes = self.client.read(_range_op(self._k("inst", ""), prefix=True),
                                               _range_op(self._k("hs", ""), prefix=True))
        by_instance = self._handshakes_by_instance(handshakes)
        base = len(self._k("inst", ""))
        found = [self._instance(kv["key"][base:], kv["value"], by_instance.get(kv["key"][base:], []))
                 for kv in records]
        return sorted(found, key=lambda i: i.client_ip)

    def by_public_key(self, public_key):
        holder = self.client.get(self._k("key", _key_hex(public_key)))
        return self.instance(holder[0]["value"].decode()) if holder else None

    def count(self):
        return len(self.client.get(self._k("inst", ""), prefix=True, keys_only=True))

    def port_policy(self, instance_id):
        instance = self.instance(instance_id)
        if instance is None:
            return None
        override = self.client.get(self._k("ppo", instance.app_id))
        if override:
            return json.loads(override[0]["value"])["policy"]
        return instance.port_policy

    # ---- changes ------------------------------------------------------------------------------

    def remove(self, instance_id):
        for _attempt in range(TXN_ATTEMPTS):
            found = self._read_instances([instance_id]).get(instance_id)
            if found is None:
                return None
            instance, revision = found
            ok, _responses = self.client.txn(
                [_unchanged(self._k("inst", instance_id), revision)],
                [_delete_op(self._k("inst", instance_id)), _delete_op(self._k("app", instance.app_id, instance_id)),
                 _delete_op(self._k("ip", instance.client_ip)), _delete_op(self._k("key", _key_hex(instance.public_key))),
                 _delete_op(self._k("hs", instance_id, ""), prefix=True),
                 _delete_op(self._k("ep", instance_id, ""), prefix=True)])
            if ok:
                return instance
        raise Unavailable("store", f"the removal of {instance_id} kept meeting other nodes' changes; retry")

    def set_port_policy_override(self, app_id, policy, now=None):
        if policy is None:
            self.client.delete(self._k("ppo", app_id))
        else:
            self.client.put(self._k("ppo", app_id), _dumps({"policy": policy, "set_at": time.time() if now is None else now}))

    def port_policy_overrides(self):
        base = len(self._k("ppo", ""))
        return {kv["key"][base:]: json.loads(kv["value"])["policy"]
                for kv in self.client.get(self._k("ppo", ""), prefix=True)}

    def _holders(self):
        """{public key (base64): instance_id} of every registered key."""
        base = len(self._k("key", ""))
        return {base64.b64encode(bytes.fromhex(kv["key"][base:])).decode(): kv["value"].decode()
                for kv in self.client.get(self._k("key", ""), prefix=True)}

    def _record_per_node(self, kind, values):
        """This node's hs/ or ep/ key of each instance, written when it changed; an instance
        removed meanwhile gets none (the write is conditional on its record)."""
        holders = self._holders()
        if kind == "hs":   # a handshake never moves back (store.Store keeps the latest too)
            base, mine = len(self._k("hs", "")), f"/{self.node_id}"
            for kv in self.client.get(self._k("hs", ""), prefix=True):
                if kv["key"].endswith(mine):
                    self._written[("hs", kv["key"][base:].split("/", 1)[0])] = float(kv["value"] or 0)
        for public_key, value in values.items():
            instance_id = holders.get(public_key)
            written = self._written.get((kind, instance_id))
            if instance_id is None or not value or written == value or (kind == "hs" and written and written > value):
                continue
            key = self._k(kind, instance_id, self.node_id)
            ok, _responses = self.client.txn([{"key": _b64(self._k("inst", instance_id)), "target": "CREATE",
                                               "result": "GREATER", "create_revision": "0"}],
                                             [_put_op(key, str(value))])
            if ok:
                self._written[(kind, instance_id)] = value

    def record_handshakes(self, handshakes):
        """{public_key: unix seconds}: the latest handshakes this node's interface saw."""
        self._record_per_node("hs", {k: float(t) for k, t in handshakes.items() if t})

    def record_endpoints(self, endpoints):
        """{public_key: "ip:port"}: where this node's interface last heard each instance."""
        self._record_per_node("ep", {k: str(e) for k, e in endpoints.items() if e})

    def endpoints(self):
        """{public_key: "ip:port"}: this node's view of each instance, else another node's (a CVM
        that registered elsewhere: its endpoint lets this node start the handshake itself)."""
        records, kvs = self.client.read(_range_op(self._k("inst", ""), prefix=True),
                                        _range_op(self._k("ep", ""), prefix=True))
        base = len(self._k("inst", ""))
        keys = {kv["key"][base:]: json.loads(kv["value"])["public_key"] for kv in records}
        chosen = {}
        base = len(self._k("ep", ""))
        for kv in kvs:
            instance_id, _sep, node = kv["key"][base:].partition("/")
            if instance_id in keys and (instance_id not in chosen or node == str(self.node_id)):
                chosen[instance_id] = kv["value"].decode()
        return {keys[i]: endpoint for i, endpoint in chosen.items()}

    def stale(self, before):
        return sorted((i for i in self.instances() if max(i.last_handshake, i.last_seen) < before),
                      key=lambda i: i.instance_id)

    # ---- blobs: certificates and the ACME account, opaque bytes ---------------------------------

    def _aead(self, name):
        if not self.blob_key:
            raise DstackError("rpc.guest_agent", f"the cluster keeps {name} in etcd only sealed to the gateway app: "
                                                 "rpc.guest_agent must name the gateway CVM's guest agent (its key seals it)")
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # pylint: disable=import-outside-toplevel
        return AESGCM(self.blob_key)

    def get_blob(self, name):
        found = self.client.get(self._k("blob", name))
        if not found:
            return None
        from cryptography.exceptions import InvalidTag  # pylint: disable=import-outside-toplevel
        sealed = found[0]["value"]
        try:
            if not sealed.startswith(SEALED):
                raise InvalidTag()
            body = sealed[len(SEALED):]
            return self._aead(name).decrypt(body[:12], body[12:], self._k("blob", name).encode())
        except InvalidTag:
            raise DstackError("store", f"{name} in etcd does not open with this gateway app's key (another app "
                                       "sealed it, or it was altered)") from None

    def put_blob(self, name, data):
        nonce = os.urandom(12)
        sealed = SEALED + nonce + self._aead(name).encrypt(nonce, bytes(data), self._k("blob", name).encode())
        self.client.put(self._k("blob", name), sealed)

    def delete_blob(self, name):
        self.client.delete(self._k("blob", name))

    # ---- locks -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, name, ttl=60, wait=None):
        """Hold `name` cluster-wide while the block runs: a key on a lease of `ttl` seconds, renewed
        every ttl/3 while held (so a long job keeps it, and a node that dies frees it within ttl).
        Waits up to `wait` seconds (default ttl) for another holder, then Unavailable naming it."""
        key = self._k("lock", name)
        holder = f"node {self.node_id} pid {os.getpid()} {os.urandom(4).hex()}"
        lease = self.client.grant(ttl)
        deadline = time.monotonic() + (ttl if wait is None else wait)
        try:
            while True:
                ok, responses = self.client.txn([_absent(key)], [_put_op(key, holder, lease)], [_range_op(key)])
                if ok:
                    break
                if time.monotonic() > deadline:
                    kvs = responses[0].get("response_range", {}).get("kvs", []) if responses else []
                    other = _kv(kvs[0])["value"].decode() if kvs else "another holder"
                    raise Unavailable("lock", f"{name} is held by {other} (another gateway node); retry later")
                time.sleep(LOCK_POLL)
        except BaseException:
            self.client.revoke(lease)
            raise
        stop = threading.Event()

        def renew():
            while not stop.wait(max(0.2, ttl / 3)):
                try:
                    if self.client.keepalive(lease) <= 0:
                        log.error("lock %s: its lease expired while held", name)
                        return
                except DstackError as exc:
                    log.warning("lock %s: could not renew its lease: %s", name, exc)

        renewer = threading.Thread(target=renew, name=f"lock {name}", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join(5)
            self.client.txn([_value_is(key, holder)], [_delete_op(key)])
            self.client.revoke(lease)

    # ---- the cluster's nodes ---------------------------------------------------------------------

    def claim_node_address(self):
        """Claim this node's hub address in the store: no instance gets it, no other node may use it."""
        address = str(self.gateway_ip.ip)
        mine = f"n:{self.node_id}"
        ok, responses = self.client.txn([_absent(self._k("ip", address))], [_put_op(self._k("ip", address), mine)],
                                        [_range_op(self._k("ip", address))])
        if ok:
            return
        kvs = responses[0].get("response_range", {}).get("kvs", []) if responses else []
        holder = _kv(kvs[0])["value"].decode() if kvs else ""
        if holder == mine:
            return
        who = f"node {holder[2:]}'s hub address" if holder.startswith("n:") else f"instance {holder[2:]}'s address"
        raise DstackError("core.wg.ip", f"{address} is {who} in the cluster's store: give each node its own "
                                        "(outside client_ip_range, or in every node's reserved_net)")

    def put_node(self, record):
        """This node's record (bytes: cluster.py's signed JSON)."""
        self.client.put(self._k("node", self.node_id), record)

    def nodes(self):
        """[(node_id, record bytes, alive: {last_seen} or None)], by node id."""
        records, alive = self.client.read(_range_op(self._k("node", ""), prefix=True),
                                          _range_op(self._k("alive", ""), prefix=True))
        base_node, base_alive = len(self._k("node", "")), len(self._k("alive", ""))
        up = {kv["key"][base_alive:]: json.loads(kv["value"]) for kv in alive}
        return sorted(((int(kv["key"][base_node:]), kv["value"], up.get(kv["key"][base_node:])) for kv in records),
                      key=lambda n: n[0])

    def heartbeat(self, ttl, now=None):
        """Mark this node alive for ttl seconds (its lease renewed, made again once it expired)."""
        now = time.time() if now is None else now
        if self._lease and self.client.keepalive(self._lease) <= 0:
            log.warning("cluster: this node's lease had expired (etcd unreachable for longer than %.0f s): renewed", ttl)
            self._lease = 0
        if not self._lease:
            self._lease = self.client.grant(ttl)
        self.client.put(self._k("alive", self.node_id), _dumps({"last_seen": now}), lease=self._lease)

    def leave(self):
        """Mark this node down now (its lease revoked)."""
        if self._lease:
            self.client.revoke(self._lease)
            self._lease = 0
