# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The app's container output on a CVM's console: each line a container printed, prefixed with
the container's compose name as docker compose prints it (`web-1  | hello`).

The guest agent writes these lines to its stdout (agents/guest/container_logs.py); the VMM's
/logs picks one service's lines by their prefix (its `service` parameter, `dstack-vmm logs
--service`). This module is the one home of that format, on both sides.
"""

import re

from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError

# The compose specification's service names, bounded.
SERVICE_RE = re.compile(r"\A[a-zA-Z0-9._-]{1,64}\Z")
# <service>-<number>, padded, " | ": the service is everything before the last -<number>.
_LINE_RE = re.compile(rb"\A([a-zA-Z0-9._-]+)-\d+ *\| ")


def label(service, number):
    """A container's name in the console, as docker compose names it: web-1."""
    return f"{service}-{number}"


def prefix(name, width=0):
    """The bytes before each line of container `name` (a label), padded to `width` columns."""
    return f"{name.ljust(width)}  | ".encode("utf-8", "replace")


def service_of(line):
    """The service whose container printed this console line (bytes), or None for another line
    (the agent's own)."""
    match = _LINE_RE.match(line)
    return match.group(1).decode("ascii") if match else None


def check_service(value, field="service"):
    """A service name given by a caller: None (every line) or a compose service name."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not SERVICE_RE.match(value):
        raise DstackError(field, "must be a compose service name (letters, digits, '.', '_' and '-'; at most 64)")
    return value
