# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The simulated TDX's platform (tdx_sim.PLATFORM_FILES: its PKI and quoting key) copied from one
host's state directory to another's, one module run on each host: the names checked, the files read
(dstack.tee.sim_platform_info), the writes planned, compared and made (dstack.tee.sim_platform).

The files hold private keys: no error and no diff carries a file's content, only its name, its mode
and whether its content changes."""

import os
import stat
from dataclasses import dataclass
from typing import Optional

from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.fileio import atomic_write, read_bytes, read_text
from ansible_collections.dstack.tee.plugins.module_utils.tdx_sim import PLATFORM_FILES

FOLDER_MODE = 0o700
KEY_MODE = 0o600   # a name ending .key
FILE_MODE = 0o644  # certificates, platform.json

__all__ = ["PLATFORM_FILES", "check_name", "file_mode", "read_platform", "plan_platform", "Plan", "FileState"]


def check_name(name, field):
    """`name` when it is a file of the folder itself: a non-empty string without a slash, `..` or NUL;
    else DstackError naming `field`."""
    if not isinstance(name, str) or not name:
        raise DstackError(field, f"a file name must be a non-empty string, got {name!r}")
    if "/" in name or ".." in name or "\0" in name or name == ".":
        raise DstackError(field, f"{name!r} is not a file name of the folder (no '/', '..' or NUL)")
    return name


def file_mode(name):
    """The mode a platform file is written with: 0600 for a private key (.key), else 0644."""
    return KEY_MODE if name.endswith(".key") else FILE_MODE


def _folder_mode(folder):
    """The folder's permission bits, or None when it does not exist; DstackError('path') when it is not a folder."""
    try:
        info = os.stat(folder)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DstackError("path", f"cannot read {folder}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise DstackError("path", f"{folder} is not a folder")
    return stat.S_IMODE(info.st_mode)


def read_platform(folder, names):
    """{name: text} of the files `names` in `folder` (every name checked before any file is read);
    DstackError naming `path` or `names` when the folder or a file cannot be read."""
    folder = os.path.abspath(folder)
    names = [check_name(name, "names") for name in names]
    if _folder_mode(folder) is None:
        raise DstackError("path", f"{folder} does not exist (the simulated TDX's state directory)")
    return {name: read_text(os.path.join(folder, name), "names") for name in names}


@dataclass(frozen=True)
class FileState:
    """One file as it is, or is to be: its bytes and mode (both None when there is no regular file)."""
    data: Optional[bytes] = None
    mode: Optional[int] = None

    def label(self, other=None):
        """The file's state for a diff: absent, or its mode and whether its content differs from
        `other`'s (never the content itself)."""
        if self.data is None:
            return "absent"
        hidden = "<hidden, changed>" if other is not None and other.data is not None and other.data != self.data \
            else "<hidden>"
        return f"mode {self.mode:04o}, {hidden}"


def _file_state(path):
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return FileState()
    except OSError as exc:
        raise DstackError("path", f"cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):  # a link or anything else is replaced by a file
        return FileState()
    return FileState(read_bytes(path, "path"), stat.S_IMODE(info.st_mode))


@dataclass
class Plan:
    """What dstack.tee.sim_platform finds and wants: the folder's mode (None: absent), and each file's
    state before and after, in the order of O(files)."""
    folder: str
    folder_mode: Optional[int]
    before: dict
    after: dict

    @property
    def written(self):
        """The files whose content or mode changes."""
        return [name for name, want in self.after.items() if self.before[name] != want]

    @property
    def changed(self):
        return self.folder_mode != FOLDER_MODE or bool(self.written)

    def diff(self):
        """before/after: the folder and each changed file by name, mode and `<hidden>` content."""
        before, after = [], []
        if self.folder_mode != FOLDER_MODE:
            before.append(f"{self.folder}/: " + ("absent" if self.folder_mode is None else f"folder {self.folder_mode:04o}"))
            after.append(f"{self.folder}/: folder {FOLDER_MODE:04o}")
        for name in self.written:
            before.append(f"{name}: {self.before[name].label()}")
            after.append(f"{name}: {self.after[name].label(self.before[name])}")
        return {"before": "".join(line + "\n" for line in before), "after": "".join(line + "\n" for line in after)}

    def apply(self):
        """Make the folder (0700), then write each changed file (atomically, with its mode) or set
        its mode alone; DstackError('path') when the host refuses."""
        try:
            if self.folder_mode is None:
                os.makedirs(self.folder, mode=FOLDER_MODE)
            if self.folder_mode != FOLDER_MODE:
                os.chmod(self.folder, FOLDER_MODE)  # makedirs' mode goes through the umask
            for name in self.written:
                path, was, want = os.path.join(self.folder, name), self.before[name], self.after[name]
                if was.data == want.data:
                    os.chmod(path, want.mode)
                else:
                    atomic_write(path, want.data, want.mode)
        except OSError as exc:
            raise DstackError("path", f"cannot write in {self.folder}: {exc.strerror or exc}") from None


def plan_platform(folder, files):
    """The Plan that makes `folder` hold `files` ({name: text}); every name and value is checked
    (DstackError naming `files`) before anything on disk is read."""
    folder = os.path.abspath(folder)
    if not isinstance(files, dict):
        raise DstackError("files", f"must be a dict of file name: text, not {type(files).__name__}")
    after = {}
    for name, text in files.items():
        check_name(name, "files")
        if not isinstance(text, str):
            raise DstackError("files", f"the content of {name} must be text, not {type(text).__name__}")
        after[name] = FileState(text.encode("utf-8"), file_mode(name))
    folder_mode = _folder_mode(folder)
    before = {name: _file_state(os.path.join(folder, name)) if folder_mode is not None else FileState()
              for name in after}
    return Plan(folder, folder_mode, before, after)
