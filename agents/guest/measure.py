# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The RTMR3 boot measurements, in one place (eventlog.BOOT_EVENTS is the order and its reasons).

Before key fetch: system-preparing, app-id, compose-hash, instance-id, os-image-hash,
                  key-provider, boot-mr-done (the identity the KMS decides on).
After it:         mr-kms (when known), storage-fs, system-ready.
"""

import json

from ansible_collections.dstack.tee.plugins.module_utils.errors import parse_hex


def key_provider_payload(name, provider_id=""):
    """The key-provider event payload: {"name": "kms"|"local"|"none", "id": hex}, compact JSON."""
    return json.dumps({"name": name, "id": provider_id}, separators=(",", ":")).encode()


def measure_identity(ctx, app_id, compose_hash, instance_id, os_image_hash, key_provider, key_provider_id=""):
    """Events up to boot-mr-done: what the KMS sees when it decides on the keys."""
    ctx.emit_event("system-preparing", b"")
    ctx.emit_event("app-id", parse_hex(app_id, "app_id", length=20))
    ctx.emit_event("compose-hash", parse_hex(compose_hash, "compose_hash", length=32))
    ctx.emit_event("instance-id", parse_hex(instance_id or "", "instance_id", length=(0, 20), allow_empty=True))
    ctx.emit_event("os-image-hash", parse_hex(os_image_hash or "", "os_image_hash", length=(0, 32), allow_empty=True))
    ctx.emit_event("key-provider", key_provider_payload(key_provider, key_provider_id))
    ctx.emit_event("boot-mr-done", b"")


def measure_system(ctx, mr_kms="", storage_fs="ext4"):
    """Events after key fetch, up to system-ready."""
    if mr_kms:
        ctx.emit_event("mr-kms", parse_hex(mr_kms, "mr_kms"))
    ctx.emit_event("storage-fs", storage_fs.encode())
    ctx.emit_event("system-ready", b"")
