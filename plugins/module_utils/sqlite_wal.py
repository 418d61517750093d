# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""SQLite connections as the agents' stores keep them (the gateway's state, the KMS's used nonces).

    db = sqlite_wal.connect(path, timeout=10)   # autocommit, WAL journal, synchronous=NORMAL

Several processes may open one new file at the same moment (gunicorn's workers, two gateway
nodes on one state): SQLite answers the switch to WAL with "database is locked" at once, without
calling its busy handler, so the switch is retried here until the timeout.
"""

import sqlite3
import time


def connect(path, timeout=10.0, check_same_thread=True):
    """A connection to `path` in autocommit mode (isolation_level None), WAL journal,
    synchronous=NORMAL (a power loss may lose the last commits, never corrupt the file), waiting up
    to `timeout` seconds for other writers."""
    db = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=check_same_thread)
    try:
        db.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        deadline = time.monotonic() + timeout
        while True:
            try:
                db.execute("PRAGMA journal_mode = WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        db.execute("PRAGMA synchronous = NORMAL")
    except BaseException:
        db.close()
        raise
    return db
