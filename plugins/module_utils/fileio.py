# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Atomic file writes and TOML configuration reads for the agents and commands (Ansible modules use
module_support instead)."""

import os
import tempfile

from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError


def atomic_write(path, data, mode=0o644):
    """Write bytes to path so that readers see the old file or the new one, never a part.

    The temp file is made with `mode` from the start, so a secret is never readable by others,
    even for a moment.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_toml(path, field="config"):
    """A TOML file (an agent's configuration) as a dict; DstackError naming `field` when it cannot be
    read or is not TOML."""
    import tomllib  # pylint: disable=import-outside-toplevel
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise DstackError(field, f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise DstackError(field, f"{path} is not valid TOML: {exc}") from None
