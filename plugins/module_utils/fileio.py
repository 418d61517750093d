# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""File reads that name the field on error, atomic file writes, lock files, JSON file reads and TOML
configuration reads: the one home for agents, commands and module_utils (module_support turns the
errors into fail_json)."""

import fcntl
import json
import os
import tempfile
from contextlib import contextmanager

from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError


@contextmanager
def locked(path, mode=fcntl.LOCK_EX):
    """An fcntl lock (LOCK_EX or LOCK_SH) on `path`, a lock file beside the data (the data is
    replaced by atomic_write, not rewritten in place, so the lock cannot be on the data itself)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)  # closing drops the lock


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


def read_bytes(path, field, missing_ok=False):
    """A file's bytes; DstackError naming `field` (and the path) when it cannot be read. With
    missing_ok, a file that does not exist is None."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError as exc:
        if missing_ok:
            return None
        raise DstackError(field, f"cannot read {path}: {exc.strerror}") from None
    except OSError as exc:
        raise DstackError(field, f"cannot read {path}: {exc.strerror}") from None


def read_text(path, field, encoding="utf-8", missing_ok=False):
    """A file's text (read_bytes, then decoded); DstackError naming `field` when it is not text in
    that encoding."""
    data = read_bytes(path, field, missing_ok)
    if data is None:
        return None
    try:
        return data.decode(encoding)
    except UnicodeDecodeError:
        raise DstackError(field, f"{path} is not {encoding.upper()} text") from None


def read_json(path, field, missing_ok=False):
    """A JSON file's value (read_bytes, then parsed); DstackError naming `field` when it is not JSON.
    With missing_ok, a file that does not exist is None."""
    data = read_bytes(path, field, missing_ok)
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError as exc:
        raise DstackError(field, f"{path} is not JSON: {exc}") from None


def read_toml(path, field="config"):
    """A TOML file (an agent's configuration) as a dict; DstackError naming `field` when it cannot be
    read or is not TOML."""
    import tomllib  # pylint: disable=import-outside-toplevel
    text = read_text(path, field)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise DstackError(field, f"{path} is not valid TOML: {exc}") from None
