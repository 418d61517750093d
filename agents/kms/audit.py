# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The KMS audit log: one JSON line per release or refusal, appended, never rewritten.

Each line has the time, method, decision and reason, the app's identity and the quote's identity
(tdx_quote.quote_identity: a digest of its signed parts; quote_sha256 only for bytes that do not
parse as a quote).
It never holds a key: the writer takes only the fields listed in FIELDS.

Durability: no answer leaves the KMS before its line is on disk (fdatasync: the data and the
file's size, not its times, which a reader never needs). The fsyncs are batched (group commit):
while one thread's fsync runs, the lines other threads write wait for the next one, which covers
them all; on the asyncio worker's event loop, record() returns once the line is written and the
answer is held until one fdatasync has covered the lines of every release answered in that loop
turn (wsgi.defer_until_answered); anywhere else record() returns only once its line is on disk. The file stays open
(reopened when the path is another file, e.g. after log rotation, or in a forked worker).
"""

import functools
import json
import os
import threading
import time

from ansible_collections.dstack.tee.agents.wsgi import defer_until_answered

FIELDS = ("method", "decision", "reason", "app_id", "compose_hash", "instance_id", "device_id", "os_image_hash", "mr_aggregated",
          "quote_identity", "quote_sha256", "tcb_status", "attestation_mode", "kms_mode", "remote_addr")


class AuditLog:
    def __init__(self, path):
        self.path = path
        self._lock = threading.Lock()
        self._synced = threading.Condition(self._lock)
        self._fd = None
        self._owner = None  # (pid, st_dev, st_ino) of the open file
        self._written = 0   # lines this process wrote ...
        self._durable = 0   # ... and how many of them an fsync has covered
        self._syncing = False

    def record(self, **entry):
        line = {"time": round(time.time(), 3)}
        line.update({k: entry[k] for k in FIELDS if entry.get(k) not in (None, "")})
        data = (json.dumps(line, sort_keys=True) + "\n").encode("utf-8")
        with self._lock:
            fd = self._open()
            os.write(fd, data)  # one write on an O_APPEND file: lines from several workers never interleave
            self._written += 1
            mine = self._written
        if not defer_until_answered(functools.partial(self.sync_upto, mine)):
            self.sync_upto(mine)

    def sync_upto(self, line):
        """Return once this process's lines up to the line-th are on disk."""
        with self._lock:
            while self._durable < line:
                if self._syncing:
                    self._synced.wait()
                    continue
                self._sync()

    def _sync(self):
        """Called with the lock held: fsync every line written so far (the lock is released meanwhile,
        so other threads' lines queue up for the next fsync)."""
        fd = os.dup(self._fd)  # the file may be reopened meanwhile: this descriptor stays valid
        self._syncing = True
        upto = self._written
        self._lock.release()
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
            self._lock.acquire()
            self._syncing = False
            self._synced.notify_all()
        self._durable = max(self._durable, upto)

    def _open(self):
        """Called with the lock held: the open log file, reopened in a forked process or when the path
        names another file (rotated, removed); the old file's lines are made durable first."""
        while True:
            try:
                stat = os.stat(self.path)
                current = (os.getpid(), stat.st_dev, stat.st_ino)
            except FileNotFoundError:
                current = None
            if self._fd is not None and current == self._owner:
                return self._fd
            if self._fd is not None and self._owner[0] == os.getpid():
                if self._syncing:
                    self._synced.wait()
                    continue  # look again: another thread may have reopened it meanwhile
                if self._durable < self._written:
                    os.fdatasync(self._fd)
                    self._durable = self._written
            elif self._fd is not None:  # inherited over fork: this process counts its own lines
                self._written = self._durable = 0
                self._syncing = False
            if self._fd is not None:
                os.close(self._fd)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            stat = os.fstat(self._fd)
            self._owner = (os.getpid(), stat.st_dev, stat.st_ino)
            return self._fd

    def read(self):
        try:
            with open(self.path, encoding="utf-8") as handle:
                return [json.loads(line) for line in handle if line.strip()]
        except FileNotFoundError:
            return []
