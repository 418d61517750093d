# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Key-release nonces: single use, short expiry, bounded in number, shared by all server workers.

SQLite in the KMS state directory, so every gunicorn worker sees the same nonces and a nonce
consumed by one worker is gone for all. Consuming is one DELETE, so two requests racing with
the same nonce cannot both succeed.
"""

import os
import sqlite3
import time

from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.key_release import NONCE_SIZE

DEFAULT_TTL = 60
DEFAULT_MAX_OUTSTANDING = 10000


class NonceFlood(DstackError):
    """Too many nonces outstanding: refuse new ones until some expire or are used."""


class NonceStore:
    def __init__(self, path, ttl=DEFAULT_TTL, max_outstanding=DEFAULT_MAX_OUTSTANDING, clock=time.time):
        self.path = path
        self.ttl = ttl
        self.max_outstanding = max_outstanding
        self.clock = clock
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS nonces (nonce BLOB PRIMARY KEY, expires REAL NOT NULL)")

    def _connect(self):
        db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        return _Closing(db)

    def issue(self):
        """A fresh nonce and its expiry time; NonceFlood when too many are outstanding."""
        now = self.clock()
        nonce = os.urandom(NONCE_SIZE)
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM nonces WHERE expires <= ?", (now,))
                (count,) = db.execute("SELECT COUNT(*) FROM nonces").fetchone()
                if count >= self.max_outstanding:
                    raise NonceFlood("nonce", f"{count} nonces are outstanding (at most {self.max_outstanding}); "
                                              "try again when some have been used or expired")
                db.execute("INSERT INTO nonces VALUES (?, ?)", (nonce, now + self.ttl))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return nonce, now + self.ttl

    def consume(self, nonce):
        """Use a nonce up. Raises DstackError when it is unknown, already used, or expired."""
        now = self.clock()
        with self._connect() as db:
            row = db.execute("DELETE FROM nonces WHERE nonce = ? RETURNING expires", (bytes(nonce),)).fetchone()
        if row is None:
            raise DstackError("nonce", "is unknown or was already used (a nonce is good for one request)")
        if row[0] <= now:
            raise DstackError("nonce", f"expired {now - row[0]:.0f} s ago (nonces live {self.ttl} s)")

    def outstanding(self):
        with self._connect() as db:
            return db.execute("SELECT COUNT(*) FROM nonces WHERE expires > ?", (self.clock(),)).fetchone()[0]


class _Closing:
    def __init__(self, db):
        self.db = db

    def __enter__(self):
        return self.db

    def __exit__(self, *exc):
        self.db.close()
        return False
