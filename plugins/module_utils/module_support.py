# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""What the dstack.tee modules share: reading inputs and writing a file atomically, only on change."""

import os
import tempfile

from ansible_collections.dstack.tee.plugins.module_utils import fileio
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError


def read_text(module, path, field):
    """The UTF-8 text of a file named by an option, or fail naming the option."""
    try:
        return fileio.read_text(path, field)
    except DstackError as exc:
        module.fail_json(msg=str(exc), field=field)
    return None


def read_bytes(path, field="path"):
    """A file's bytes, or None when it does not exist (fileio.read_bytes)."""
    return fileio.read_bytes(path, field, missing_ok=True)


def write_file(module, dest, data, field="dest"):
    """Write bytes to dest through a temp file in its folder and module.atomic_move.

    Returns whether the bytes changed. In check mode nothing is written. The folder must exist,
    so that a typo in dest fails here instead of creating a tree.
    """
    dest = os.path.abspath(dest)  # atomic_move needs a folder even for a bare file name
    before = read_bytes(dest, field)
    if before == data:
        return False
    if module.check_mode:
        # An earlier task of the same check run may be the one that would make the folder.
        return True
    folder = os.path.dirname(dest)
    if not os.path.isdir(folder):
        module.fail_json(msg=f"{field}: the folder {folder} does not exist", field=field)
    fd, tmp = tempfile.mkstemp(prefix=".dstack-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        module.atomic_move(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return True


def apply_file_attributes(module, dest, changed):
    """owner/group/mode from the module's file arguments; True when they (or the bytes) changed."""
    if not os.path.exists(dest) and module.check_mode:
        return changed
    file_args = module.load_file_common_arguments(module.params, path=dest)
    return module.set_fs_attributes_if_different(file_args, changed)
