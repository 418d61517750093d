"""The KMS audit log: no record() returns before an fdatasync covered its line; fsyncs are shared by
concurrent writers (group commit); a rotated log file is followed."""

import json
import os
import threading
import time

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
