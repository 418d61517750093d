# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Key-release nonces that need no shared table to issue (MAC nonces).

A nonce is 32 bytes: expiry (u64 big-endian, Unix seconds) || 8 random bytes || the first 16
bytes of HMAC-SHA256(key, "dstack-kms-nonce-v1" || expiry || random). The MAC key is derived
from the KMS root CA key, so every worker and every replica that holds the root keys issues and
checks the same nonces, and issuing stores nothing: no client can exhaust it.

Only consumed nonces are remembered (SQLite in the state directory, shared by the workers of one
KMS), until they expire. Consuming is one INSERT on a primary key, so two requests racing with
one nonce cannot both succeed. A nonce is consumed only once its request has passed every check
(the KMS answers nothing before), so a malformed or refused request uses no nonce up.

What a crash or power loss can replay: commits are not fsynced one by one (WAL, synchronous
NORMAL), so the last consumptions before a power loss may be forgotten, and such a nonce could
be used again until it expires (60 s by default); likewise on another replica, which keeps its
own consumed set. Either way the quote is the same one, bound to the same requester's ephemeral
key (or CSR), and the answer is sealed to that key: a replay gives nothing to anyone but the CVM
that asked, and it gets only what it was already given.
"""

import hashlib
import hmac
import os
import sqlite3
import struct
import threading
import time

from ansible_collections.dstack.tee.plugins.module_utils import kdf, sqlite_wal
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.key_release import NONCE_SIZE

DEFAULT_TTL = 60
MAC_CONTEXT = b"dstack-kms-nonce-v1"
_RANDOM_SIZE = 8
_MAC_SIZE = NONCE_SIZE - 8 - _RANDOM_SIZE
PURGE_EVERY = 1000  # consumptions between deletions of expired rows


def mac_key(ca_key):
    """The nonce MAC key of a KMS: derived from its root CA key (the same on every replica)."""
    return kdf.derive_key(kdf.p256_scalar(ca_key), [MAC_CONTEXT, b":mac-key"])


class NonceStore:
    def __init__(self, path, key, ttl=DEFAULT_TTL, clock=time.time):
        self.path = path
        self._key = bytes(key)
        self.ttl = int(ttl)
        self.clock = clock
        self._local = threading.local()
        self._consumed = 0
        self._db().execute("CREATE TABLE IF NOT EXISTS consumed (nonce BLOB PRIMARY KEY, expires INTEGER NOT NULL)")

    def _db(self):
        """One connection per thread and process, kept (opening one per operation cost milliseconds;
        a connection must not cross a fork, as gunicorn's workers are forked)."""
        held = getattr(self._local, "db", None)
        if held is None or held[0] != os.getpid():
            # synchronous=NORMAL: see the module docstring for what a power loss can replay.
            db = sqlite_wal.connect(self.path, timeout=10, check_same_thread=False)
            held = self._local.db = (os.getpid(), db)
        return held[1]

    def _mac(self, expires, rand):
        return hmac.new(self._key, MAC_CONTEXT + struct.pack(">Q", expires) + rand, hashlib.sha256).digest()[:_MAC_SIZE]

    def issue(self):
        """A fresh nonce and its expiry time (Unix seconds). Stores nothing."""
        expires = int(self.clock()) + self.ttl
        rand = os.urandom(_RANDOM_SIZE)
        return struct.pack(">Q", expires) + rand + self._mac(expires, rand), expires

    def check(self, nonce):
        """Raise DstackError unless this KMS (or a replica with its keys) issued the nonce and it has not
        expired. Does not use it up (consume does)."""
        nonce = bytes(nonce)
        if len(nonce) != NONCE_SIZE:
            raise DstackError("nonce", f"must be {NONCE_SIZE} bytes")
        (expires,) = struct.unpack(">Q", nonce[:8])
        rand, mac = nonce[8:8 + _RANDOM_SIZE], nonce[8 + _RANDOM_SIZE:]
        if not hmac.compare_digest(mac, self._mac(expires, rand)):
            raise DstackError("nonce", "was not issued by this KMS (ask KMS.GetNonce for one)")
        now = self.clock()
        if expires <= now:
            raise DstackError("nonce", f"expired {now - expires:.0f} s ago (nonces live {self.ttl} s)")
        if expires > now + self.ttl + 5:
            raise DstackError("nonce", "expires further ahead than this KMS issues nonces")
        return expires

    def consume(self, nonce):
        """Use a checked nonce up. Raises DstackError when it was used already (or is not valid)."""
        expires = self.check(nonce)
        db = self._db()
        try:
            db.execute("INSERT INTO consumed VALUES (?, ?)", (bytes(nonce), expires))
        except sqlite3.IntegrityError:
            raise DstackError("nonce", "was already used (a nonce is good for one request)") from None
        self._consumed += 1
        if self._consumed % PURGE_EVERY == 0:
            db.execute("DELETE FROM consumed WHERE expires <= ?", (int(self.clock()),))

    def consumed_count(self):
        return self._db().execute("SELECT COUNT(*) FROM consumed WHERE expires > ?", (int(self.clock()),)).fetchone()[0]
