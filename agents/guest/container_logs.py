# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The app's container output on the CVM's console, as in a dstack VM: the host cannot run the
engine inside the guest, so the guest forwards what its containers print.

Each line a container prints (stdout and stderr) is written to `out` (the agent's stdout: the
VMM's /logs ch=stdout with the process backend, the console in a VM), prefixed with the
container's compose name as docker compose prints it (`web-1  | hello`; the format is
module_utils/service_log.py, which the VMM's /logs filters by).

    following = start_following(runner, sys.stdout.buffer)
    ...
    following.stop()

One `<engine> logs --follow --timestamps` per container; a watcher asks the runner for the
project's containers (ComposeRunner.ps) at the start, when a follower ends, and now and then.
A container is followed from its first line. Once its follower ended (the container stopped), it
is followed again from the last timestamp printed, at the next look (at once when the follower had
printed, then after 1, 2, 4 ... 30 s): a restarted container's new run is printed however briefly
it ran, and no line is printed twice. Lines read together share one timestamp (conmon stamps a
read, not a line: `echo run; echo done` gives two lines of one nanosecond), so the follow again
starts just before that timestamp and skips only as many of its lines as were printed: a
follower that ended between two such lines (the engine stops following when the container
exits) loses neither. The timestamps are taken off the lines. Nothing of the app's env is on the
engine's command line.
"""

import calendar
import collections
import logging
import re
import subprocess
import threading
import time

from ansible_collections.dstack.tee.plugins.module_utils.compose_runner import service_and_number
from ansible_collections.dstack.tee.plugins.module_utils import service_log
from ansible_collections.dstack.tee.plugins.module_utils.app_compose import parse_compose_yaml
from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError
from ansible_collections.dstack.tee.plugins.module_utils.fileio import read_text

log = logging.getLogger("dstack.guest.container_logs")
MAX_LINE = 16 * 1024     # a longer line is written in pieces, each with the prefix
RESCAN = 1.0             # the first wait before asking for the containers again while one is not followed
RESCAN_MAX = 30.0        # ... doubled up to this; also the wait while every container is followed
# RFC 3339 as docker and podman print it before each line with --timestamps.
_STAMP_RE = re.compile(rb"\A(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d) ")


def start_following(runner, out, services=None, rescan=RESCAN, rescan_max=RESCAN_MAX):
    """Follow the output of `runner`'s containers (a ComposeRunner once its `up` returned) onto
    `out` (a binary stream); returns what stop() ends it with. `services`: the compose's service
    names, for the width of the prefix column (default: those of the runner's compose file)."""
    return ContainerLogs(runner, out, services, rescan, rescan_max).start()


def _compose_services(runner):
    try:
        return list(parse_compose_yaml(read_text(runner.compose_file, "docker_compose_file"),
                                       "docker_compose_file")["services"])
    except (AttributeError, DstackError):
        return []


class ContainerLogs:
    def __init__(self, runner, out, services=None, rescan=RESCAN, rescan_max=RESCAN_MAX):
        self.runner = runner
        self.out = out
        services = _compose_services(runner) if services is None else services
        self.width = max((len(service_log.label(name, 1)) for name in services), default=0)
        self.rescan, self.rescan_max = rescan, rescan_max
        self._write_lock = threading.Lock()    # one whole line at a time on `out`
        self._follow_lock = threading.Lock()   # no follower is started once stop() began
        self._stopping = threading.Event()
        self._wake = threading.Event()         # a follower ended: look at the containers again
        self._followers = {}                   # container name -> _Follower
        self._last = {}                        # container name -> _Printed: its last timestamp
        self._unstamped = set()                # containers whose lines came without a timestamp
        self._watcher = threading.Thread(target=self._watch, name="container-logs", daemon=True)

    def start(self):
        if getattr(self.runner, "engine", None) != "none":  # "none": no containers, nothing to follow
            self._watcher.start()
        return self

    def stop(self, timeout=10.0):
        """Stop following: the watcher and every follower end (their engine processes terminated)."""
        with self._follow_lock:
            self._stopping.set()
        self._wake.set()
        if self._watcher.is_alive():
            self._watcher.join(timeout)
        for follower in list(self._followers.values()):
            follower.stop(timeout)

    def following(self):
        """The containers followed right now (tests)."""
        return sorted(name for name, follower in self._followers.items() if follower.alive())

    # ---- the watcher ----------------------------------------------------------------------------

    def _watch(self):
        wait = self.rescan
        while not self._stopping.is_set():
            for name, status in self._containers():
                if self._stopping.is_set():
                    return
                follower = self._followers.get(name)
                if follower is not None and (follower.alive() or (
                        name in self._unstamped and not status.startswith("Up"))):
                    continue
                # Not followed: first seen, or its follower ended with it. Followed (again) from the
                # last line printed: a container restarted meanwhile, however briefly it ran, has
                # its new lines printed; one still stopped prints nothing and ends.
                self._follow(name)
            woken = self._wake.wait(wait)
            self._wake.clear()
            wait = self.rescan if woken else min(wait * 2, self.rescan_max)

    def _containers(self):
        try:
            return self.runner.ps()
        except (DstackError, OSError, subprocess.SubprocessError) as exc:
            log.warning("cannot list the app's containers to follow their output: %s", exc)
            return []

    def _follow(self, name):
        since = self._last.get(name)
        with self._follow_lock:
            if self._stopping.is_set():
                return
            try:
                argv, env = self.runner.logs_command(name, timestamps=True, follow=True,
                                                     since=None if since is None else since.before())
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,  # pylint: disable=consider-using-with
                                        stderr=subprocess.STDOUT, env=env)
            except OSError as exc:
                log.warning("cannot follow the output of %s: %s", name, exc)
                return
            self._followers[name] = _Follower(self, name, proc, since)

    # ---- the followers' output ------------------------------------------------------------------

    def label_of(self, container):
        """A container's name in the console: <service>-<n> for the project's, else its own name."""
        service, number = service_and_number(container, self.runner.project)
        if service and service_log.SERVICE_RE.match(service):
            return service_log.label(service, number)
        return container

    def write(self, head, text):
        with self._write_lock:
            try:
                self.out.write(head + text + (b"" if text.endswith(b"\n") else b"\n"))
                self.out.flush()
            except (OSError, ValueError) as exc:  # the console is gone (the agent is stopping)
                log.warning("cannot write the containers' output: %s", exc)
                self._stopping.set()

    def printed(self, container, key):
        last = self._last.get(container)
        if last is None or key > last.key:
            self._last[container] = _Printed(key, 1)
        elif key == last.key:
            self._last[container] = _Printed(key, last.count + 1)

    def ended(self, container, printed, stamped):
        """A follower ended. One that printed something (its container ran) has the containers
        looked at again at once: a restart is followed with no wait. One whose lines had no
        timestamp cannot skip them when following again: only once its container runs again."""
        if printed and not stamped:
            self._unstamped.add(container)
        if printed:
            self._wake.set()


class _Follower:
    """One `<engine> logs --follow` and the thread that writes its lines."""

    def __init__(self, owner, name, proc, since):
        self.owner, self.name, self.proc, self.since = owner, name, proc, since
        name_width = max(owner.width, len(owner.label_of(name)))
        self.head = service_log.prefix(owner.label_of(name), name_width)
        self.thread = threading.Thread(target=self._copy, name=f"logs-{name}"[:15], daemon=True)
        self.thread.start()

    def alive(self):
        return self.thread.is_alive()

    def _copy(self):
        printed = stamped = False
        # The engine gives what follows since.before() (podman: after it, docker: from it); what
        # was printed before is dropped here: older lines, and the first `count` of the last stamp.
        skip = 0 if self.since is None else self.since.count
        try:
            for line in iter(lambda: self.proc.stdout.readline(MAX_LINE), b""):
                key, text = _split_stamp(line)
                if key is not None and self.since is not None:
                    if key < self.since.key:
                        continue
                    if key == self.since.key and skip:
                        skip -= 1
                        continue
                if key is not None:
                    self.owner.printed(self.name, key)
                    stamped = True
                self.owner.write(self.head, text)
                printed = True
        except (OSError, ValueError):
            pass  # stop() closed the pipe
        finally:
            self.proc.wait()
            self.owner.ended(self.name, printed, stamped)

    def stop(self, timeout):
        if self.proc.poll() is None:
            self.proc.terminate()
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.proc.kill()
            self.thread.join(timeout)


class _Printed(collections.namedtuple("_Printed", "key count")):
    """A container's last printed timestamp (its sort key: (epoch seconds, nanoseconds) UTC) and
    how many lines of that very timestamp were printed."""

    def before(self):
        """--since for following again: RFC 3339 UTC one nanosecond before `key`, which both
        engines read to the nanosecond."""
        seconds, nanos = divmod(self.key[0] * 1_000_000_000 + self.key[1] - 1, 1_000_000_000)
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{nanos:09d}Z"


def _split_stamp(line):
    """(sort key of the line's timestamp, the line after it), or (None, line) when it has none."""
    match = _STAMP_RE.match(line)
    if not match:
        return None, line
    seconds, fraction, zone = (group.decode("ascii") if group else "" for group in match.groups())
    try:
        epoch = calendar.timegm(time.strptime(seconds, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None, line
    if zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        epoch -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    return (epoch, int(fraction.ljust(9, "0"))), line[match.end():]
