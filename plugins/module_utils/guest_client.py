# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A client of a CVM's guest agent socket (/var/run/dstack.sock): the dstack SDK's HTTP API.

Used by whatever runs inside a CVM and needs its quote: the verify_quote module (through the
VMM's run folder on the host) and `dstack-kms onboard` (a KMS replica proving its boot to the
source KMS). One request per connection, HTTP/1.0, JSON body; errors name the socket.
"""

import json
import socket as socketlib

from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError

DEFAULT_SOCKET = "/var/run/dstack.sock"
MAX_ANSWER_BYTES = 16 * 1024 * 1024


def call(path, method, params=None, timeout=60.0, field="socket"):
    """POST /<method> on the guest agent's unix socket; the JSON answer, or a DstackError."""
    body = json.dumps(params or {}).encode()
    request = (f"POST /{method} HTTP/1.0\r\nHost: dstack\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    chunks, size = [], 0
    try:
        with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(path)
            conn.sendall(request)
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                size += len(chunk)
                if size > MAX_ANSWER_BYTES:
                    raise DstackError(field, f"{method} on {path} answered more than {MAX_ANSWER_BYTES} bytes")
                chunks.append(chunk)
    except OSError as exc:
        raise DstackError(field, f"cannot ask the guest agent at {path} for {method}: {exc.strerror or exc}") from None
    head, _sep, payload = b"".join(chunks).partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1:2]
    if status != [b"200"]:
        first = head.splitlines()[0][:80].decode(errors="replace") if head else "nothing"
        raise DstackError(field, f"{method} on {path} answered {first}: {payload[:200].decode(errors='replace')}")
    try:
        return json.loads(payload)
    except ValueError:
        raise DstackError(field, f"{method} on {path} did not answer JSON") from None


def get_quote(path, report_data, timeout=60.0, field="socket"):
    """GetQuote: {quote, event_log, report_data, vm_config} for report_data (at most 64 bytes)."""
    return call(path, "GetQuote", {"report_data": bytes(report_data).hex()}, timeout=timeout, field=field)


def info(path, timeout=60.0, field="socket"):
    """Info: the CVM's app_id, instance_id, mr_aggregated, device_id, os_image_hash, ..."""
    return call(path, "Info", {}, timeout=timeout, field=field)
