"""sqlite_wal.connect: processes opening one new database file at the same moment all get a WAL
connection (two gateway processes started together on a fresh state once failed with "database
is locked" at the switch to WAL, which SQLite does not wait for)."""

import multiprocessing
import sqlite3

from ansible_collections.dstack.tee.plugins.module_utils import sqlite_wal

OPENERS = 12
ROUNDS = 6


def _open_and_write(path, start, index):
    start.wait()
    db = sqlite_wal.connect(path, timeout=10)
    db.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER)")
    db.execute("INSERT INTO t VALUES (?)", (index,))
    mode = db.execute("PRAGMA journal_mode").fetchone()[0]
    db.close()
    if mode != "wal":
        raise SystemExit(f"journal_mode {mode}")


def test_processes_opening_a_new_file_together_all_get_wal(tmp_path):
    ctx = multiprocessing.get_context("fork")
    for round_no in range(ROUNDS):
        path = str(tmp_path / f"state-{round_no}.sqlite3")
        start = ctx.Event()
        procs = [ctx.Process(target=_open_and_write, args=(path, start, i)) for i in range(OPENERS)]
        for proc in procs:
            proc.start()
        start.set()
        for proc in procs:
            proc.join(30)
        assert [proc.exitcode for proc in procs] == [0] * OPENERS
        with sqlite3.connect(path) as check:
            assert check.execute("SELECT COUNT(*) FROM t").fetchone()[0] == OPENERS


def test_settings(tmp_path):
    db = sqlite_wal.connect(str(tmp_path / "x.sqlite3"), timeout=2.5)
    assert db.isolation_level is None
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 1          # NORMAL
    assert db.execute("PRAGMA busy_timeout").fetchone()[0] == 2500
