# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The local allowlist (auth-simple's auth-config.json, dstack-reference 5.3): edits, one home.

{"gatewayAppId", "osImages": [...], "kms": {"mrAggregated", "devices", "allowAnyDevice"},
 "apps": {"0x<app_id>": {"composeHashes": [...], "devices": [...], "allowAnyDevice": bool}}}
Hex values are written lowercase with a 0x prefix, as auth-simple compares them.
"""

import copy
import json

from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError, parse_hex

EMPTY = {"gatewayAppId": "", "osImages": [], "kms": {"mrAggregated": [], "devices": [], "allowAnyDevice": False},
         "apps": {}}


def hex0x(value, field, length):
    return "0x" + parse_hex(value, field, length=length).hex()


def parse(text):
    if text is None or not text.strip():
        return copy.deepcopy(EMPTY)
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise DstackError("path", f"the allowlist is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise DstackError("path", "the allowlist must be a JSON object")
    return doc


def render(doc):
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _set_members(items, wanted, state):
    current = [str(i).lower() for i in items]
    if state == "present":
        return current + [w for w in wanted if w not in current]
    return [c for c in current if c not in wanted]


def apply(doc, app_id=None, compose_hashes=(), state="present", os_images=(), devices=(), allow_any_device=None,
          gateway_app_id=None):
    """A new allowlist dict with the requested changes (the input is not modified)."""
    doc = copy.deepcopy(doc)
    if os_images:
        doc["osImages"] = _set_members(doc.get("osImages", []), [hex0x(h, "os_images", 32) for h in os_images],
                                       "present")
    if gateway_app_id is not None:
        doc["gatewayAppId"] = gateway_app_id
    if app_id:
        key = hex0x(app_id, "app_id", 20)
        apps = doc.setdefault("apps", {})
        # Keys in other spellings (no 0x, upper case) are the same app.
        for other in [k for k in apps if k != key and k.lower().removeprefix("0x") == key[2:]]:
            apps[key] = apps.pop(other)
        app = apps.setdefault(key, {"composeHashes": [], "devices": [], "allowAnyDevice": False})
        hashes = [hex0x(h, "compose_hashes", 32) for h in compose_hashes]
        app["composeHashes"] = _set_members(app.get("composeHashes", []), hashes, state)
        if devices:
            app["devices"] = _set_members(app.get("devices", []), [hex0x(d, "devices", 32) for d in devices], "present")
        if allow_any_device is not None:
            app["allowAnyDevice"] = bool(allow_any_device)
    return doc
