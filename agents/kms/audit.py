# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The KMS audit log: one JSON line per release or refusal, appended, never rewritten.

Each line has the time, method, decision and reason, the app's identity and the quote's identity
(tdx_quote.quote_identity: a digest of its signed parts; quote_sha256 only for bytes that do not
parse as a quote).
It never holds a key: the writer takes only the fields listed in FIELDS.
"""

import json
import os
import time

FIELDS = ("method", "decision", "reason", "app_id", "compose_hash", "instance_id", "device_id", "os_image_hash", "mr_aggregated",
          "quote_identity", "quote_sha256", "tcb_status", "attestation_mode", "kms_mode", "remote_addr")


class AuditLog:
    def __init__(self, path):
        self.path = path

    def record(self, **entry):
        line = {"time": round(time.time(), 3)}
        line.update({k: entry[k] for k in FIELDS if entry.get(k) not in (None, "")})
        data = (json.dumps(line, sort_keys=True) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, data)  # one write on an O_APPEND file: lines from several workers never interleave
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self):
        try:
            with open(self.path, encoding="utf-8") as handle:
                return [json.loads(line) for line in handle if line.strip()]
        except FileNotFoundError:
            return []
