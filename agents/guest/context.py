# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""What the guest agent knows about its CVM: the config share, its private work folder, the TEE.

The boot (agents/guest/boot.py) fills the work folder; the socket API (agents/guest/api.py)
reads it. Both go through GuestContext, so each file has one reader and one writer.

Config share (the host writes it; dstack-reference 2.3), GuestPaths.config_dir:
    app-compose.json  .sys-config.json  .encrypted-env  .instance_info  .user-config
Work folder (only the guest; mode 0700), GuestPaths.work_dir:
    .appkeys.json (0600)        the keys the KMS released (dstack-reference 6.4)
    runtime_events.log          RTMR3 runtime events, JSON lines {"event", "payload" (base64)}
    runtime_events.log.lock     held while RTMR3 and that log change (events_locked)
    .decrypted-env(.json) 0600  the app's env after allowed_envs filtering
    instance.json               {instance_id_seed, instance_id, app_id}
    rtmrs.json                  this CVM's RTMRs, when the TEE is the simulator
    boot.json                   boot progress: {"stage", "done", "error", "events": [...]}
"""

import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass

from ansible_collections.dstack.tee.plugins.module_utils import app_compose as compose
from ansible_collections.dstack.tee.plugins.module_utils import eventlog, tdx, tdx_quote
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.fileio import atomic_write, read_bytes, read_json, read_text

VERSION = "0.5.11-dstack.tee"


@dataclass(frozen=True)
class GuestPaths:
    config_dir: str
    work_dir: str

    def config(self, name):
        return os.path.join(self.config_dir, name)

    def work(self, name):
        return os.path.join(self.work_dir, name)

    app_compose = property(lambda self: self.config("app-compose.json"))
    sys_config = property(lambda self: self.config(".sys-config.json"))
    encrypted_env = property(lambda self: self.config(".encrypted-env"))
    instance_info = property(lambda self: self.config(".instance_info"))
    user_config = property(lambda self: self.config(".user-config"))
    app_keys = property(lambda self: self.work(".appkeys.json"))
    runtime_log = property(lambda self: self.work("runtime_events.log"))
    decrypted_env = property(lambda self: self.work(".decrypted-env"))
    decrypted_env_json = property(lambda self: self.work(".decrypted-env.json"))
    instance = property(lambda self: self.work("instance.json"))
    rtmr_state = property(lambda self: self.work("rtmrs.json"))
    boot_state = property(lambda self: self.work("boot.json"))


class GuestContext:
    """One CVM as its guest agent sees it."""

    def __init__(self, paths, provider, cert_signer=None):
        self.paths = paths
        self.provider = provider
        self.cert_signer = cert_signer  # signs GetTlsKey CSRs: a KMS (SignCert) or, simulating, local keys

    @classmethod
    def open(cls, config_dir, work_dir, tee="auto", sim_state_dir=None, cert_signer=None):
        os.makedirs(work_dir, mode=0o700, exist_ok=True)
        paths = GuestPaths(os.path.abspath(config_dir), os.path.abspath(work_dir))
        return cls(paths, tdx.open_provider(tee, sim_state_dir, rtmr_state=paths.rtmr_state), cert_signer)

    @property
    def attestation_mode(self):
        return self.provider.attestation_mode

    # ---- the config share --------------------------------------------------------------------

    def app_compose_bytes(self):
        data = read_bytes(self.paths.app_compose, "app-compose.json", missing_ok=True)
        if data is None:
            raise DstackError("app-compose.json", f"is missing from the config share ({self.paths.config_dir})")
        return data

    def app_compose(self):
        return compose.parse(self.app_compose_bytes())

    def compose_hash(self):
        return hashlib.sha256(self.app_compose_bytes()).hexdigest()

    def sys_config(self):
        return read_json(self.paths.sys_config, ".sys-config.json", missing_ok=True) or {}

    def vm_config(self):
        """The vm_config JSON string of .sys-config.json ("" when there is none)."""
        value = self.sys_config().get("vm_config", "")
        return value if isinstance(value, str) else json.dumps(value)

    # ---- what the boot wrote -----------------------------------------------------------------

    def app_keys(self):
        """The released keys; DstackError when the boot has not got them (yet)."""
        keys = read_json(self.paths.app_keys, ".appkeys.json", missing_ok=True)
        if keys is None:
            raise DstackError("app_keys", "are not available: the boot has not fetched them")
        return keys

    def write_app_keys(self, keys):
        atomic_write(self.paths.app_keys, json.dumps(keys, indent=2, sort_keys=True).encode(), mode=0o600)

    def instance(self):
        """{instance_id_seed, instance_id, app_id} (hex), or {} before the boot measured them."""
        return read_json(self.paths.instance, "instance.json", missing_ok=True) or {}

    # ---- RTMR3 and the event log -------------------------------------------------------------

    def runtime_events(self):
        text = read_text(self.paths.runtime_log, "runtime_events.log", missing_ok=True)
        return eventlog.events_from_runtime_log(text) if text is not None else []

    def event_log(self):
        """The GetQuote event log: every runtime event as {imr, event_type, digest, event, event_payload}."""
        return [event.to_log_entry() for event in self.runtime_events()]

    @contextmanager
    def events_locked(self, exclusive=False):
        """RTMR3 and the runtime log change together: an emitter holds this lock exclusively, a
        quoter shared, so no quote sees an RTMR3 its event log does not replay to (workers,
        threads and the boot all take it; flock on a fresh open excludes threads too)."""
        with open(self.paths.runtime_log + ".lock", "a", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield

    def emit_event(self, name, payload=b""):
        if not isinstance(name, str) or not name:
            raise DstackError("event", "must be a non-empty name")
        with self.events_locked(exclusive=True):
            tdx.emit_runtime_event(self.provider, eventlog.RuntimeEvent(name, bytes(payload)), self.paths.runtime_log)

    def quote(self, report_data):
        """(quote bytes, event log JSON text) for report_data (at most 64 bytes), taken together."""
        padded = tdx_quote.pad_report_data(report_data)
        with self.events_locked():
            quote = self.provider.get_quote(padded)
            return quote, json.dumps(self.event_log())

    def read_rtmrs(self):
        return self.provider.read_rtmrs()
