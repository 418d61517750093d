# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""PATH with the system directories: iptables and other root tools live in /usr/sbin and /sbin,
which a plain user's PATH or `env -i`'s lacks, and podman's network plugins look for them there."""

import os
import shutil


def with_sbin(path=None):
    """`path` (default: this process's PATH) with /usr/sbin and /sbin appended when missing."""
    entries = [entry for entry in (os.environ.get("PATH", "/usr/bin:/bin") if path is None else path).split(os.pathsep)
               if entry]
    return os.pathsep.join(entries + [entry for entry in ("/usr/sbin", "/sbin") if entry not in entries])


def which(command):
    """The path of a system command, looked for in with_sbin(); the bare name when not found."""
    return shutil.which(command, path=with_sbin()) or command
