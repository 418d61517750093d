# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Serving the guest agent's app on its unix sockets with gunicorn.

Sockets: /var/run/dstack.sock (the API the SDKs look for first) and /var/run/tappd.sock (the
legacy path of TappdClient); both serve the same app, so both services answer on either.

Socket mode: 0666 by default, set deliberately. The app's containers run as any user (root or
not, whatever their images say) and reach the agent through the socket file mounted into them
(`- /var/run/dstack.sock:/var/run/dstack.sock`); connecting to a unix socket needs write
permission on it, so anything narrower locks out non-root containers. The socket is only inside
the CVM, whose processes are all the app's; dstack's own systemd socket is even wider (0777).
Deployments that run every container as one group can pass a narrower mode (--socket-mode 0660).
The mode is applied at bind (through the umask, so the socket is never wider than asked for,
even for a moment) and once more with chmod when the server is ready.

At start a stale socket file (left by a crash) is removed; a socket some process still answers
on, or a path that is not a socket, is refused rather than taken over. At stop gunicorn unlinks
the sockets, and an exit hook removes whatever is left.
"""

import os
import socket
import stat

from ansible_collections.dstack.tee.agents.wsgi import run_gunicorn
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError

DEFAULT_SOCKET = "/var/run/dstack.sock"
DEFAULT_TAPPD_SOCKET = "/var/run/tappd.sock"
DEFAULT_SOCKET_MODE = 0o666
DEFAULT_WORKERS = 1
DEFAULT_THREADS = 8
GRACEFUL_TIMEOUT = 5
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes with the terminating NUL


def parse_mode(text):
    """A socket mode from octal text ("0666", "666", "0o660")."""
    try:
        mode = int(str(text).lower().removeprefix("0o"), 8)
    except ValueError:
        raise DstackError("--socket-mode", f"must be an octal mode such as 0666, not {str(text)[:16]!r}") from None
    if not 0 <= mode <= 0o777:
        raise DstackError("--socket-mode", "must be between 0000 and 0777")
    return mode


def _answers(path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        try:
            probe.connect(path)
        except OSError:
            return False
        return True


def prepare_socket(path):
    """Make `path` ready to bind: its folder made, a stale socket file removed; the absolute path."""
    path = os.path.abspath(path)
    if len(path.encode()) > MAX_SOCKET_PATH:
        raise DstackError("socket", f"{path} is longer than the {MAX_SOCKET_PATH} bytes a unix socket path may have")
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return path
    if not stat.S_ISSOCK(info.st_mode):
        raise DstackError("socket", f"{path} exists and is not a socket; it is not replaced")
    if _answers(path):
        raise DstackError("socket", f"{path} is in use: another process answers on it")
    os.unlink(path)
    return path


def remove_socket(path):
    """Remove a socket file we made (nothing else: a path that is not a socket is left alone)."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def serve(app, sockets, mode=DEFAULT_SOCKET_MODE, workers=DEFAULT_WORKERS, threads=DEFAULT_THREADS, on_ready=None):
    """Serve `app` on the unix sockets until SIGTERM or SIGINT; returns only through SystemExit.

    on_ready(paths) is called in the server process once every socket listens with its mode set.
    """
    paths = [prepare_socket(p) for p in dict.fromkeys(p for p in sockets if p)]
    if not paths:
        raise DstackError("socket", "no socket to listen on")

    def when_ready(server):  # pylint: disable=unused-argument
        for path in paths:
            os.chmod(path, mode)
        if on_ready:
            on_ready(paths)

    def on_exit(server):  # pylint: disable=unused-argument
        for path in paths:
            remove_socket(path)

    settings = {
        "bind": [f"unix:{p}" for p in paths], "umask": 0o777 & ~mode, "workers": workers,
        "worker_class": "gthread", "threads": threads, "timeout": 60, "graceful_timeout": GRACEFUL_TIMEOUT,
        "errorlog": "-", "loglevel": "warning", "proc_name": "dstack-guest-agent",
        "when_ready": when_ready, "on_exit": on_exit,
    }
    run_gunicorn(app, **settings)
