# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The gateway's state in SQLite: the registered instances (app, compose hash, WireGuard key and
address, port policy, times), the Admin's port-policy overrides, and dstack's IP allocation.

One file under the state directory, WAL, one kept connection per thread and process (gunicorn
workers and the data plane read and write it at once; SQLite's write lock makes each
registration, allocation included, one atomic step). A restart keeps everything.

IP allocation (dstack-reference 3.2): the first host address of client_ip_range (network and
broadcast addresses excluded) that is not allocated, not the gateway's own address, not the
network or broadcast address of the gateway's own network, and not in reserved_net. A
re-registering instance keeps its address; its WireGuard key is updated.

The store's interface, which store_etcd.EtcdStore (a cluster's state in etcd) shares; open_store
picks one from gateway.toml:
    register, instance, instances_of, instances, by_public_key, count, port_policy, remove,
    set_port_policy_override, port_policy_overrides, record_handshakes, record_endpoints,
    endpoints, stale, get_blob / put_blob / delete_blob (opaque bytes: certificates, the ACME
    account), lock(name, ttl, wait) (a context manager held by one process of the node or
    cluster at a time: the ACME orders), close.
"""

import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import sqlite3
import threading
import time

from ansible_collections.dstack.tee.plugins.module_utils import sqlite_wal
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError

log = logging.getLogger("dstack.gateway")

STATE_FILE = "gateway.sqlite3"
SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 10_000
LOCK_POLL = 0.2               # how often a lock held by another is tried again

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    instance_id    TEXT PRIMARY KEY,
    app_id         TEXT NOT NULL,
    compose_hash   TEXT NOT NULL,
    client_ip      TEXT NOT NULL UNIQUE,
    public_key     TEXT NOT NULL UNIQUE,
    port_policy    TEXT,
    registered_at  REAL NOT NULL,
    last_seen      REAL NOT NULL,
    last_handshake REAL NOT NULL DEFAULT 0,
    endpoint       TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS instances_by_app ON instances (app_id);
CREATE TABLE IF NOT EXISTS port_policy_overrides (
    app_id  TEXT PRIMARY KEY,
    policy  TEXT NOT NULL,
    set_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS blobs (name TEXT PRIMARY KEY, value BLOB NOT NULL, set_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS locks (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires REAL NOT NULL);
"""


class Conflict(DstackError):
    """A registration that contradicts one already held (another app's instance id, a key in use)."""


class Exhausted(DstackError):
    """No free address is left in client_ip_range."""


class Unavailable(DstackError):
    """The gateway cannot do it now (HTTP 503): no free address, the WireGuard hub failed, no
    etcd member answered."""


@dataclasses.dataclass(frozen=True)
class Instance:
    instance_id: str
    app_id: str
    compose_hash: str
    client_ip: str
    public_key: str
    port_policy: object  # dict or None (None: the app declared none)
    registered_at: float
    last_seen: float
    last_handshake: float

    def to_dict(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Registration:
    instance: Instance
    created: bool                   # a new instance (a new address) rather than a re-registration
    previous_public_key: str = ""   # the key it replaced, when the instance came back with another


_COLUMNS = "instance_id, app_id, compose_hash, client_ip, public_key, port_policy, registered_at, last_seen, last_handshake"


def _instance(row):
    if row is None:
        return None
    values = list(row)
    values[5] = json.loads(values[5]) if values[5] else None
    return Instance(*values)


class Store:
    """SQLite state of one gateway. Thread- and process-safe; reopen the same file to restart."""

    def __init__(self, path, client_ip_range, gateway_ip, reserved_net=()):
        """path: the SQLite file (a name with a suffix: gateway.sqlite3), or a directory, made when
        missing (then STATE_FILE in it: core.state_dir). client_ip_range: CIDR; gateway_ip: the
        gateway's own address with its prefix ("10.0.0.1/24"); reserved_net: CIDRs."""
        if os.path.isdir(path) or not os.path.splitext(path)[1]:
            path = os.path.join(path, STATE_FILE)
        self.path = os.path.abspath(path)
        self.client_ip_range = ipaddress.ip_network(client_ip_range)
        gateway = ipaddress.ip_interface(gateway_ip)
        # Never handed out: the gateway's own address and its network's network and broadcast.
        self._excluded = {gateway.ip, gateway.network.network_address, gateway.network.broadcast_address}
        self.reserved_net = [ipaddress.ip_network(n) for n in reserved_net]
        self._local = threading.local()
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        db = self._db()
        db.executescript(_SCHEMA)  # idempotent, so processes starting together may all run it
        self._add_endpoint_column(db)
        db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        version = self._read("SELECT value FROM meta WHERE key = 'schema_version'")[0][0]
        if int(version) != SCHEMA_VERSION:
            raise DstackError("core.state_dir", f"{self.path} has state schema {version}; this gateway knows "
                                                f"{SCHEMA_VERSION}")

    @staticmethod
    def _add_endpoint_column(db):
        # A state file made before the endpoint column: add it (another process may just have).
        if "endpoint" not in {row[1] for row in db.execute("PRAGMA table_info(instances)")}:
            try:
                db.execute("ALTER TABLE instances ADD COLUMN endpoint TEXT NOT NULL DEFAULT ''")
            except sqlite3.OperationalError as exc:
                if "duplicate column" not in str(exc):
                    raise

    # ---- connections: one per thread and process ----------------------------------------------

    def _db(self):
        local = self._local
        if getattr(local, "db", None) is None or local.pid != os.getpid():
            # After a fork the parent's connection is not ours to use: open our own.
            db = sqlite_wal.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000)
            db.execute("PRAGMA foreign_keys = ON")
            local.db, local.pid = db, os.getpid()
            try:
                os.chmod(self.path, 0o600)
            except OSError:
                pass
        return local.db

    def close(self):
        """Close this thread's connection (others close when their thread ends)."""
        db = getattr(self._local, "db", None)
        if db is not None and self._local.pid == os.getpid():
            db.close()
        self._local.db = None

    class _Transaction:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on any error): one writer at a time, whole or nothing."""

        def __init__(self, db):
            self.db = db

        def __enter__(self):
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, exc_type, exc, tb):
            self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
            return False

    def _write(self):
        return self._Transaction(self._db())

    def _read(self, sql, args=()):
        return self._db().execute(sql, args).fetchall()

    # ---- registration and allocation ----------------------------------------------------------

    def register(self, instance_id, app_id, compose_hash, public_key, port_policy=None, now=None):
        """Register (or re-register) an instance; returns a Registration.

        Conflict: instance_id is registered to another app, or public_key is another instance's.
        Exhausted: a new instance and no free address in client_ip_range.
        """
        now = time.time() if now is None else now
        policy = json.dumps(port_policy, sort_keys=True, separators=(",", ":")) if port_policy is not None else None
        with self._write() as db:
            current = _instance(db.execute(f"SELECT {_COLUMNS} FROM instances WHERE instance_id = ?",
                                           (instance_id,)).fetchone())
            if current is not None and current.app_id != app_id:
                raise Conflict("instance_id", "is registered to another app")
            holder = db.execute("SELECT instance_id FROM instances WHERE public_key = ? AND instance_id != ?",
                                (public_key, instance_id)).fetchone()
            if holder is not None:
                raise Conflict("client_public_key", "is the WireGuard key of another instance")
            replaced_key = current.public_key if current is not None and current.public_key != public_key else ""
            if current is not None and not self._valid(ipaddress.ip_address(current.client_ip)):
                # Its address became the gateway's or reserved (a changed configuration): a new one.
                db.execute("DELETE FROM instances WHERE instance_id = ?", (instance_id,))
                current = None
            if current is not None:
                changed_key = current.public_key != public_key
                db.execute("UPDATE instances SET compose_hash = ?, public_key = ?, port_policy = ?, last_seen = ?, "
                           "last_handshake = ? WHERE instance_id = ?",
                           (compose_hash, public_key, policy, now, 0 if changed_key else current.last_handshake,
                            instance_id))
                created = False
            else:
                address = self._free_address(db)
                db.execute(f"INSERT INTO instances ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0)",
                           (instance_id, app_id, compose_hash, address, public_key, policy, now, now))
                created = True
            row = db.execute(f"SELECT {_COLUMNS} FROM instances WHERE instance_id = ?", (instance_id,)).fetchone()
        return Registration(_instance(row), created, replaced_key)

    def _free_address(self, db):
        used = {row[0] for row in db.execute("SELECT client_ip FROM instances")}
        for host in self.client_ip_range.hosts():
            if str(host) not in used and self._valid(host):
                return str(host)
        raise Exhausted("core.wg.client_ip_range", f"no free address left in {self.client_ip_range} "
                                                   f"({len(used)} instances hold one)")

    def _valid(self, address):
        return address not in self._excluded and not any(address in net for net in self.reserved_net)

    # ---- lookups (the data plane's routing reads these) -----------------------------------------

    def instance(self, instance_id):
        """The Instance, or None."""
        return _instance(next(iter(self._read(f"SELECT {_COLUMNS} FROM instances WHERE instance_id = ?",
                                              (instance_id,))), None))

    def instances_of(self, app_id):
        """An app's instances, the freshest WireGuard handshake first (then the latest registration)."""
        return [_instance(r) for r in self._read(
            f"SELECT {_COLUMNS} FROM instances WHERE app_id = ? "
            "ORDER BY last_handshake DESC, last_seen DESC, instance_id", (app_id,))]

    def instances(self):
        return [_instance(r) for r in self._read(f"SELECT {_COLUMNS} FROM instances ORDER BY client_ip")]

    def by_public_key(self, public_key):
        return _instance(next(iter(self._read(f"SELECT {_COLUMNS} FROM instances WHERE public_key = ?",
                                              (public_key,))), None))

    def count(self):
        return self._read("SELECT COUNT(*) FROM instances")[0][0]

    def port_policy(self, instance_id):
        """The policy that applies to an instance: the Admin's override for its app, else its own
        (None: no policy, every port open as dstack's default)."""
        rows = self._read("SELECT o.policy, i.port_policy FROM instances i LEFT JOIN port_policy_overrides o "
                          "ON o.app_id = i.app_id WHERE i.instance_id = ?", (instance_id,))
        if not rows:
            return None
        override, own = rows[0]
        chosen = override if override is not None else own
        return json.loads(chosen) if chosen else None

    # ---- changes ------------------------------------------------------------------------------

    def remove(self, instance_id):
        """Remove an instance (its address becomes free); returns the removed Instance or None."""
        with self._write() as db:
            row = _instance(db.execute(f"SELECT {_COLUMNS} FROM instances WHERE instance_id = ?",
                                       (instance_id,)).fetchone())
            if row is not None:
                db.execute("DELETE FROM instances WHERE instance_id = ?", (instance_id,))
        return row

    def set_port_policy_override(self, app_id, policy, now=None):
        """The Admin's port policy for every instance of an app; None removes the override."""
        with self._write() as db:
            if policy is None:
                db.execute("DELETE FROM port_policy_overrides WHERE app_id = ?", (app_id,))
            else:
                db.execute("INSERT OR REPLACE INTO port_policy_overrides (app_id, policy, set_at) VALUES (?, ?, ?)",
                           (app_id, json.dumps(policy, sort_keys=True, separators=(",", ":")),
                            time.time() if now is None else now))

    def port_policy_overrides(self):
        return {app: json.loads(policy) for app, policy in
                self._read("SELECT app_id, policy FROM port_policy_overrides ORDER BY app_id")}

    def record_handshakes(self, handshakes):
        """{public_key: unix seconds of the latest handshake} from the WireGuard interface."""
        with self._write() as db:
            db.executemany("UPDATE instances SET last_handshake = ? WHERE public_key = ? AND last_handshake < ?",
                           [(float(t), k, float(t)) for k, t in handshakes.items() if t])

    def record_endpoints(self, endpoints):
        """{public_key: "ip:port"}: where the WireGuard interface last heard each peer. A restarted
        gateway's interface has no session and no endpoint: with these it starts the handshake
        itself instead of waiting minutes for each CVM to start one."""
        with self._write() as db:
            db.executemany("UPDATE instances SET endpoint = ? WHERE public_key = ?",
                           [(str(e), k) for k, e in endpoints.items() if e])

    def endpoints(self):
        """{public_key: "ip:port"} of the instances whose endpoint is known."""
        return dict(self._read("SELECT public_key, endpoint FROM instances WHERE endpoint != ''"))

    def stale(self, before):
        """Instances with no handshake (nor registration) since `before` (unix seconds)."""
        return [_instance(r) for r in self._read(
            f"SELECT {_COLUMNS} FROM instances WHERE MAX(last_handshake, last_seen) < ? ORDER BY instance_id",
            (before,))]

    # ---- blobs: certificates and the ACME account, opaque bytes ---------------------------------

    def get_blob(self, name):
        """The bytes stored under `name`, or None."""
        rows = self._read("SELECT value FROM blobs WHERE name = ?", (name,))
        return bytes(rows[0][0]) if rows else None

    def put_blob(self, name, data):
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO blobs (name, value, set_at) VALUES (?, ?, ?)",
                       (name, sqlite3.Binary(bytes(data)), time.time()))

    def delete_blob(self, name):
        with self._write() as db:
            db.execute("DELETE FROM blobs WHERE name = ?", (name,))

    # ---- locks: the same contract as store_etcd.EtcdStore.lock -----------------------------------

    @contextlib.contextmanager
    def lock(self, name, ttl=60, wait=None):
        """Hold `name` across the processes on this state file while the block runs (so two
        renewers never order the same certificate at once): a row that expires `ttl` seconds on,
        pushed on every ttl/3 while held (a long job keeps it; a killed holder frees it within ttl).
        Waits up to `wait` seconds (default ttl) for another holder, then Unavailable naming it."""
        holder = f"pid {os.getpid()} {os.urandom(4).hex()}"
        deadline = time.monotonic() + (ttl if wait is None else wait)
        while True:
            with self._write() as db:
                now = time.time()
                row = db.execute("SELECT holder FROM locks WHERE name = ? AND expires > ?", (name, now)).fetchone()
                if row is None:
                    db.execute("INSERT OR REPLACE INTO locks (name, holder, expires) VALUES (?, ?, ?)",
                               (name, holder, now + ttl))
                    break
            if time.monotonic() > deadline:
                raise Unavailable("lock", f"{name} is held by {row[0]} (another gateway process); retry later")
            time.sleep(LOCK_POLL)
        stop = threading.Event()

        def renew():
            while not stop.wait(max(0.2, ttl / 3)):
                try:
                    with self._write() as db:
                        db.execute("UPDATE locks SET expires = ? WHERE name = ? AND holder = ?",
                                   (time.time() + ttl, name, holder))
                except sqlite3.Error as exc:  # busy past the timeout: the next round tries again
                    log.warning("lock %s: could not push its expiry: %s", name, exc)
            self.close()

        renewer = threading.Thread(target=renew, name=f"lock {name}", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join(5)
            with self._write() as db:
                db.execute("DELETE FROM locks WHERE name = ? AND holder = ?", (name, holder))


def open_store(config):
    """The store gateway.toml asks for: SQLite under core.state_dir (one node, the default), or
    etcd when [core.sync] etcd_endpoints names members (a cluster; store_etcd.EtcdStore)."""
    core, wg = config["core"], config["core"]["wg"]
    sync = core.get("sync") or {}
    if not sync.get("etcd_endpoints"):
        return Store(core["state_dir"], wg["client_ip_range"], wg["ip"], wg["reserved_net"])
    from ansible_collections.dstack.tee.agents.gateway import store_etcd  # pylint: disable=import-outside-toplevel
    client = store_etcd.EtcdClient(sync["etcd_endpoints"], timeout=sync["timeout"], ca_cert=sync["etcd_ca_cert"],
                                   cert=sync["etcd_cert"], key=sync["etcd_key"])
    return store_etcd.EtcdStore(client, wg["client_ip_range"], wg["ip"], wg["reserved_net"], node_id=sync["node_id"],
                                prefix=sync["etcd_prefix"], blob_key=cluster_blob_key(config))


CLUSTER_BLOB_KEY_PATH = "dstack-gateway/cluster-blobs"


def cluster_blob_key(config):
    """The key a cluster's blobs are sealed with in etcd: GetKey from the guest agent of this
    node's CVM (rpc.guest_agent), the same for every instance of the gateway app and for no other
    app; None without a guest agent (then blobs are refused, never stored in clear)."""
    socket_path = config["rpc"]["guest_agent"]
    if not socket_path:
        return None
    from ansible_collections.dstack.tee.plugins.module_utils import guest_client  # pylint: disable=import-outside-toplevel
    answer = guest_client.call(socket_path, "GetKey", {"path": CLUSTER_BLOB_KEY_PATH, "purpose": "seal"},
                               field="rpc.guest_agent")
    try:
        key = bytes.fromhex(answer["key"])
    except (KeyError, TypeError, ValueError):
        raise DstackError("rpc.guest_agent", "GetKey answered without a key") from None
    if len(key) != 32:
        raise DstackError("rpc.guest_agent", "GetKey's key is not 32 bytes")
    return key
