# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The RTMR3 runtime event log (dstack-reference 7.3): digests v1 and v2, replay, JSON forms.

v1 digest: SHA-384(u32_le(0x08000001) || ":" || name || ":" || payload).
v2 digest: SHA-384 of the JCS JSON {"name", "payload" (hex), "type": 134217729}.
Replay: R = 48 zero bytes; for each event R = SHA-384(R || digest).
"""

import base64
import hashlib
import json
from dataclasses import dataclass

from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError, parse_hex

DSTACK_EVENT_TYPE = 0x08000001
RTMR3 = 3
INIT_MR = bytes(48)
# The order dstack-util setup emits its events in (the last three come after key fetch).
BOOT_EVENTS = ("system-preparing", "app-id", "compose-hash", "instance-id", "boot-mr-done",
               "mr-kms", "os-image-hash", "key-provider", "storage-fs", "system-ready")
# Events that state the app's identity: each may appear once before system-ready.
IDENTITY_EVENTS = ("app-id", "compose-hash", "instance-id", "key-provider", "os-image-hash", "mr-kms")


def _jcs(value):
    # JCS (RFC 8785) for what v2 digests hold: an object of short strings and one integer.
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def event_digest(name, payload, version=1):
    """The 48-byte digest of a dstack runtime event."""
    payload = bytes(payload)
    if version == 1:
        return hashlib.sha384(DSTACK_EVENT_TYPE.to_bytes(4, "little") + b":" + name.encode("utf-8")
                              + b":" + payload).digest()
    if version == 2:
        return hashlib.sha384(_jcs({"name": name, "payload": payload.hex(),
                                    "type": DSTACK_EVENT_TYPE})).digest()
    raise DstackError("event_log_version", f"unknown version {version!r} (expected 1 or 2)")


def extend(mr, digest):
    """One RTMR extend: SHA-384(mr || digest)."""
    if len(digest) != 48:
        raise DstackError("digest", f"must be 48 bytes, got {len(digest)}")
    return hashlib.sha384(bytes(mr) + bytes(digest)).digest()


def replay(digests):
    """RTMR value after extending 48 zero bytes with each digest in turn."""
    mr = INIT_MR
    for digest in digests:
        mr = extend(mr, digest)
    return mr


@dataclass(frozen=True)
class RuntimeEvent:
    """One dstack runtime event, as emitted into RTMR3."""
    name: str
    payload: bytes = b""

    def digest(self, version=1):
        return event_digest(self.name, self.payload, version)

    def to_log_entry(self, version=1):
        """The GetQuote event_log entry: {imr, event_type, digest, event, event_payload}."""
        return {"imr": RTMR3, "event_type": DSTACK_EVENT_TYPE, "digest": self.digest(version).hex(),
                "event": self.name, "event_payload": self.payload.hex()}

    def to_runtime_line(self):
        """A line of /run/log/dstack/runtime_events.log: {"event", "payload" (base64)}."""
        return json.dumps({"event": self.name, "payload": base64.b64encode(self.payload).decode()},
                          separators=(",", ":"))


def events_from_runtime_log(text):
    """RuntimeEvents from runtime_events.log JSON lines."""
    events = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            events.append(RuntimeEvent(entry["event"], base64.b64decode(entry["payload"], validate=True)))
        except (ValueError, KeyError, TypeError):
            raise DstackError(f"runtime event log line {lineno}", "is not {\"event\", \"payload\" (base64)}") from None
    return events


def parse_event_log(event_log, field="event_log"):
    """Entries of a GetQuote event_log (a JSON string or a list); each checked for shape."""
    if isinstance(event_log, (str, bytes)):
        try:
            event_log = json.loads(event_log)
        except ValueError as exc:
            raise DstackError(field, f"is not valid JSON: {exc}") from None
    if not isinstance(event_log, list):
        raise DstackError(field, "must be a JSON array of events")
    entries = []
    for pos, entry in enumerate(event_log):
        where = f"{field}[{pos}]"
        if not isinstance(entry, dict):
            raise DstackError(where, "must be an object")
        imr = entry.get("imr")
        if isinstance(imr, bool) or not isinstance(imr, int) or not 0 <= imr <= 3:
            raise DstackError(f"{where}.imr", "must be an integer 0 to 3")
        if not isinstance(entry.get("event_type"), int):
            raise DstackError(f"{where}.event_type", "must be an integer")
        entries.append({
            "imr": imr,
            "event_type": entry["event_type"],
            "digest": parse_hex(entry.get("digest", ""), f"{where}.digest", length=(48,)),
            "event": entry.get("event", "") or "",
            "event_payload": parse_hex(entry.get("event_payload", "") or "", f"{where}.event_payload",
                                       allow_empty=True),
        })
    return entries


def replay_event_log(event_log, version=1):
    """{imr: RTMR bytes} from an event log.

    Runtime events (event_type 0x08000001) have their digest recomputed from name and payload;
    the stored digest is ignored, as a verifier must. Other events are replayed from their digest.
    """
    per_imr = {imr: INIT_MR for imr in range(4)}
    for entry in parse_event_log(event_log):
        if entry["event_type"] == DSTACK_EVENT_TYPE:
            digest = event_digest(entry["event"], entry["event_payload"], version)
        else:
            digest = entry["digest"]
        per_imr[entry["imr"]] = extend(per_imr[entry["imr"]], digest)
    return per_imr


def runtime_events(event_log, until="system-ready"):
    """The RTMR3 runtime events (name, payload) up to and including `until`.

    Refuses an identity event (app-id, compose-hash, ...) that appears twice, since a second one
    could make a verifier read another identity than the one measured first.
    """
    events = []
    seen = set()
    for entry in parse_event_log(event_log):
        if entry["imr"] != RTMR3 or entry["event_type"] != DSTACK_EVENT_TYPE:
            continue
        name = entry["event"]
        if name in IDENTITY_EVENTS:
            if name in seen:
                raise DstackError("event_log", f"has the identity event {name!r} twice")
            seen.add(name)
        events.append(RuntimeEvent(name, entry["event_payload"]))
        if until and name == until:
            break
    return events
