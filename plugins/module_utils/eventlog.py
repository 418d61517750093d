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
import dataclasses
from dataclasses import dataclass

from ansible_collections.dstack.tee.plugins.module_utils import json_limits
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError, parse_hex

DSTACK_EVENT_TYPE = 0x08000001
RTMR3 = 3
RTMR_SIZE = 48
INIT_MR = bytes(RTMR_SIZE)
# What states the app's identity. Read only from the events before boot-mr-done, each exactly
# once: after boot-mr-done the app could add events of its own (EmitEvent), so no identity may be
# taken from there.
IDENTITY_EVENTS = ("app-id", "compose-hash", "instance-id", "os-image-hash", "key-provider")
# The order this project's boot measures in. dstack-util measures os-image-hash and key-provider
# after boot-mr-done (their values come back from its key fetch); here they are identity and come
# before it, so the KMS decides on measured values, not on what the request says.
BOOT_EVENTS = ("system-preparing", "app-id", "compose-hash", "instance-id", "os-image-hash", "key-provider",
               "boot-mr-done", "mr-kms", "storage-fs", "system-ready")
# Names a boot may measure before boot-mr-done, and between it and system-ready (dstack's later
# names included, so that a dstack guest's log reads too).
PRE_BOOT_EVENTS = ("system-preparing",) + IDENTITY_EVENTS + ("init-script-hash", "gpu-policy-hash", "gpu-attestation")
POST_BOOT_EVENTS = ("mr-kms", "os-image-hash", "key-provider", "storage-fs", "system-ready")
# Every name the boot uses: EmitEvent refuses them all, and none may follow system-ready.
RESERVED_EVENTS = tuple(dict.fromkeys(PRE_BOOT_EVENTS + ("boot-mr-done",) + POST_BOOT_EVENTS))
_BOOT_PHASE_EVENTS = PRE_BOOT_EVENTS + ("boot-mr-done",)  # what read_boot_log allows up to boot-mr-done
_V1_PREFIX = DSTACK_EVENT_TYPE.to_bytes(4, "little") + b":"


def _jcs(value):
    # JCS (RFC 8785) for what v2 digests hold: an object of short strings and one integer.
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def event_digest(name, payload, version=1):
    """The 48-byte digest of a dstack runtime event."""
    payload = bytes(payload)
    if version == 1:
        return hashlib.sha384(b"".join((_V1_PREFIX, name.encode("utf-8"), b":", payload))).digest()
    if version == 2:
        return hashlib.sha384(_jcs({"name": name, "payload": payload.hex(),
                                    "type": DSTACK_EVENT_TYPE})).digest()
    raise DstackError("event_log_version", f"unknown version {version!r} (expected 1 or 2)")


def check_rtmr_args(index, digest):
    """What an RTMR extension takes, for every TEE provider: an index 0 to 3 and a SHA-384 digest."""
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= 3:
        raise DstackError("rtmr", f"index must be 0 to 3, got {index!r}")
    _check_digest(digest)


def _check_digest(digest):
    if not isinstance(digest, (bytes, bytearray)):
        raise DstackError("digest", f"must be bytes, not {type(digest).__name__}")
    if len(digest) != RTMR_SIZE:
        raise DstackError("digest", f"must be {RTMR_SIZE} bytes (SHA-384), got {len(digest)}")


def extend(mr, digest):
    """One RTMR extend: SHA-384(mr || digest)."""
    _check_digest(digest)
    return _extend(mr, digest)


def _extend(mr, digest):
    """extend() of a digest already known to be 48 bytes (parsed to that length, or computed)."""
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


class ParsedEventLog(list):
    """Entries parse_event_log has checked already (replay and read_boot_log take them as they are).

    A verifier replays the log and reads it (replay_event_log, read_boot_log): each runtime
    event's digest is computed once for both, kept per (name, payload, version)."""

    def __init__(self, entries=()):
        super().__init__(entries)
        self._digests = {}

    def event_digest(self, name, payload, version=1):
        """event_digest(name, payload, version), computed once per log."""
        key = (name, payload, version)
        digest = self._digests.get(key)
        if digest is None:
            digest = self._digests[key] = event_digest(name, payload, version)
        return digest


def parse_event_log(event_log, field="event_log"):
    """Entries of a GetQuote event_log (a JSON string or a list); each checked for shape."""
    if isinstance(event_log, ParsedEventLog):
        return event_log
    if isinstance(event_log, (str, bytes)):
        event_log = json_limits.loads(event_log, field)
    if not isinstance(event_log, list):
        raise DstackError(field, "must be a JSON array of events")
    entries = []
    for pos, entry in enumerate(event_log):
        # Every entry of every request passes here: the field names are only spelled out for an error.
        if not isinstance(entry, dict):
            raise DstackError(f"{field}[{pos}]", "must be an object")
        imr = entry.get("imr")
        if isinstance(imr, bool) or not isinstance(imr, int) or not 0 <= imr <= 3:
            raise DstackError(f"{field}[{pos}].imr", "must be an integer 0 to 3")
        event_type = entry.get("event_type")
        if isinstance(event_type, bool) or not isinstance(event_type, int):
            raise DstackError(f"{field}[{pos}].event_type", "must be an integer")
        name = entry.get("event", "") or ""
        if not isinstance(name, str):
            raise DstackError(f"{field}[{pos}].event", "must be a string")
        if not name.isascii():  # ASCII always encodes; a lone surrogate does not
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                raise DstackError(f"{field}[{pos}].event", "is not valid Unicode") from None
        try:
            digest = parse_hex(entry.get("digest", ""), "digest", length=RTMR_SIZE)
            payload = parse_hex(entry.get("event_payload", "") or "", "event_payload", allow_empty=True)
        except DstackError as exc:
            raise DstackError(f"{field}[{pos}].{exc.field}", exc.reason) from None
        entries.append({"imr": imr, "event_type": event_type, "digest": digest, "event": name,
                        "event_payload": payload})
    return ParsedEventLog(entries)


def replay_event_log(event_log, version=1):
    """{imr: RTMR bytes} from an event log.

    Runtime events (event_type 0x08000001) have their digest recomputed from name and payload;
    the stored digest is ignored, as a verifier must. Other events are replayed from their digest
    (read_boot_log refuses such events in RTMR3).
    """
    per_imr = {imr: INIT_MR for imr in range(4)}
    entries = parse_event_log(event_log)
    for entry in entries:
        if entry["event_type"] == DSTACK_EVENT_TYPE:
            digest = entries.event_digest(entry["event"], entry["event_payload"], version)
        else:
            digest = entry["digest"]
        per_imr[entry["imr"]] = _extend(per_imr[entry["imr"]], digest)
    return per_imr


@dataclass
class BootLog:
    """What an RTMR3 event log says, once read by the rules of read_boot_log.

    identity: {name: payload} of the IDENTITY_EVENTS measured before boot-mr-done (empty when
    the log has no boot-mr-done: an identity is only one once it is sealed). events: the runtime
    events up to and including system-ready. app_events: the app's own events after it.
    """
    identity: dict = dataclasses.field(default_factory=dict)
    events: list = dataclasses.field(default_factory=list)
    app_events: list = dataclasses.field(default_factory=list)
    sealed: bool = False
    ready: bool = False

    def get(self, name, default=b""):
        return self.identity.get(name, default)


def read_boot_log(event_log, version=1):
    """Read the RTMR3 runtime events by the one set of rules every verifier uses (the KMS, the
    verifier CLI, verify_quote, the guest). Raises DstackError naming the entry that breaks one:

    - every RTMR3 entry is a dstack runtime event (event_type 0x08000001) whose stored digest is
      the one recomputed from its name and payload: an entry a verifier cannot recompute could
      carry any name (this is how a relabelled log once posed as another app);
    - the first event is system-preparing; before boot-mr-done only the boot's own names, each
      once; between boot-mr-done and system-ready only the post-boot names, each once in the
      whole log; after system-ready no boot name at all;
    - the identity (IDENTITY_EVENTS) is read from the events before boot-mr-done only.
    Replaying against the quote's RTMR3 is the caller's (replay_event_log), and must also pass.
    """
    result = BootLog()
    seen = set()
    phase = "boot"
    entries = parse_event_log(event_log)
    for pos, entry in enumerate(entries):
        if entry["imr"] != RTMR3:
            continue
        if entry["event_type"] != DSTACK_EVENT_TYPE:
            raise DstackError(f"event_log[{pos}].event_type",
                              f"is {entry['event_type']}: only dstack runtime events ({DSTACK_EVENT_TYPE}), whose "
                              "digest a verifier recomputes, may extend RTMR3")
        name, payload = entry["event"], entry["event_payload"]
        if entry["digest"] != entries.event_digest(name, payload, version):
            raise DstackError(f"event_log[{pos}].digest",
                              f"is not the digest of the event {name[:64]!r} and its payload")
        event = RuntimeEvent(name, payload)
        if phase == "app":
            if name in RESERVED_EVENTS:
                raise DstackError(f"event_log[{pos}]",
                                  f"the boot event {name!r} follows system-ready (an app cannot measure it)")
            result.app_events.append(event)
            continue
        if not result.events and name != "system-preparing":
            raise DstackError(f"event_log[{pos}]", f"is {name[:64]!r}: a boot's first event is system-preparing")
        allowed = _BOOT_PHASE_EVENTS if phase == "boot" else POST_BOOT_EVENTS
        if name not in allowed:
            when = "before boot-mr-done" if phase == "boot" else "between boot-mr-done and system-ready"
            raise DstackError(f"event_log[{pos}]", f"the event {name[:64]!r} cannot come {when}")
        if name in seen:
            raise DstackError(f"event_log[{pos}]", f"has the boot event {name!r} a second time")
        seen.add(name)
        result.events.append(event)
        if phase == "boot" and name in IDENTITY_EVENTS:
            result.identity[name] = payload
        if name == "boot-mr-done":
            phase, result.sealed = "system", True
        elif name == "system-ready":
            phase, result.ready = "app", True
    if not result.sealed:
        result.identity = {}
    return result


def runtime_events(event_log, until="system-ready"):
    """The RTMR3 runtime events (RuntimeEvent) up to and including `until`, read by read_boot_log's
    rules (DstackError when the log breaks one)."""
    events = []
    for event in read_boot_log(event_log).events:
        events.append(event)
        if until and event.name == until:
            break
    return events
