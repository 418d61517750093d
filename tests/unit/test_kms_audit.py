"""The KMS audit log: no record() returns before an fdatasync covered its line (on the asyncio
worker's loop: no answer is sent before it); fsyncs are shared by concurrent writers and by the
releases of one loop turn (group commit); a failing disk fails the answers; a rotated log file is
followed."""

import json
import os
import threading
import time

import pytest

from ansible_collections.dstack.tee.agents.kms import audit as audit_module
from ansible_collections.dstack.tee.agents.kms.audit import AuditLog


def test_no_record_returns_before_its_line_is_fsynced(tmp_path, monkeypatch):
    path = tmp_path / "audit.log"
    log = AuditLog(str(path))
    synced_sizes, real_fdatasync = [], os.fdatasync

    def slow_fdatasync(fd):  # the real fdatasync, slowed so that writers pile up behind it
        size = os.fstat(fd).st_size
        time.sleep(0.02)
        real_fdatasync(fd)
        synced_sizes.append(size)

    monkeypatch.setattr(audit_module.os, "fdatasync", slow_fdatasync)
    failures = []

    def writer(index):
        for round_ in range(10):
            marker = f"{index}-{round_}"
            log.record(method="GetAppKey", decision="release", reason=marker)
            end = path.read_text().index(marker)  # the line is in the file, and an fsync covered it
            if not any(size > end for size in synced_sizes):
                failures.append(marker)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 160 and not failures
    assert sorted(line["reason"] for line in lines) == sorted(f"{i}-{r}" for i in range(16) for r in range(10))
    assert len(synced_sizes) < 160 / 2  # fsyncs shared by the writers waiting behind one
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_a_rotated_log_is_followed(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(str(path))
    log.record(method="GetAppKey", decision="release", reason="before")
    os.rename(path, tmp_path / "audit.log.1")
    log.record(method="GetAppKey", decision="refuse", reason="after")
    assert [line["reason"] for line in log.read()] == ["after"]
    assert "before" in (tmp_path / "audit.log.1").read_text()


def test_on_the_event_loop_one_fdatasync_covers_the_lines_of_a_loop_turn(tmp_path, monkeypatch):
    # The asyncio worker's fast path collects what its answers wait for (wsgi.defer_until_answered):
    # record() then only writes its line, and the answer waits for the fdatasync done for them all.
    from ansible_collections.dstack.tee.agents import wsgi  # pylint: disable=import-outside-toplevel

    path = tmp_path / "audit.log"
    log = AuditLog(str(path))
    synced_sizes, real_fdatasync = [], os.fdatasync

    def counted_fdatasync(fd):
        synced_sizes.append(os.fstat(fd).st_size)
        real_fdatasync(fd)

    monkeypatch.setattr(audit_module.os, "fdatasync", counted_fdatasync)
    before_answers = []
    token = wsgi._BEFORE_ANSWER.set(before_answers)  # pylint: disable=protected-access
    try:
        for marker in ("a", "b", "c"):
            log.record(method="GetAppKey", decision="release", reason=marker)
    finally:
        wsgi._BEFORE_ANSWER.reset(token)  # pylint: disable=protected-access
    assert [line["reason"] for line in log.read()] == ["a", "b", "c"] and synced_sizes == []
    for done in before_answers:
        done()
    assert synced_sizes == [path.stat().st_size]     # one fdatasync, covering the three lines
    log.record(method="GetAppKey", decision="refuse", reason="d")   # no answer being made: synced at once
    assert synced_sizes[-1] == path.stat().st_size and len(synced_sizes) == 2


def test_a_failing_fdatasync_fails_the_answer_and_the_next_line_tries_again(tmp_path, monkeypatch):
    from ansible_collections.dstack.tee.agents import wsgi  # pylint: disable=import-outside-toplevel

    path = tmp_path / "audit.log"
    log = AuditLog(str(path))
    failing, real_fdatasync = [True], os.fdatasync

    def broken_fdatasync(fd):
        if failing[0]:
            raise OSError(5, "Input/output error")
        real_fdatasync(fd)

    monkeypatch.setattr(audit_module.os, "fdatasync", broken_fdatasync)
    before_answers = []
    token = wsgi._BEFORE_ANSWER.set(before_answers)  # pylint: disable=protected-access
    try:
        log.record(method="GetAppKey", decision="release", reason="a")
    finally:
        wsgi._BEFORE_ANSWER.reset(token)  # pylint: disable=protected-access
    with pytest.raises(OSError):
        before_answers[0]()          # the answer is not sent (FastPrpc.flush closes its connection)
    with pytest.raises(OSError):
        log.record(method="GetAppKey", decision="release", reason="b")
    failing[0] = False
    log.record(method="GetAppKey", decision="release", reason="c")   # a disk that works again
    assert [line["reason"] for line in log.read()] == ["a", "b", "c"]
