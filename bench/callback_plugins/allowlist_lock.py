# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""One dstack.tee.allowlist task at a time across ansible-playbook runs, for bench/bench_fleet.py.

Not part of the collection: bench_fleet.py runs several deploy-app.yml at once, and the allowlist
module reads, changes and rewrites the KMS's auth-config.json with no lock, so two runs that edit
it at the same moment lose one app's entry (its CVM then gets no keys). Until the module locks
the file itself, this plugin holds an exclusive flock on the file named in DSTACK_BENCH_ALLOWLIST_LOCK
(on the controller) from the start of an allowlist task to its result: the strategy calls
v2_playbook_on_task_start before it queues the task, so the task waits there. The lock goes with
the process if the run dies. The seconds waited for and held are appended, one line per task,
to DSTACK_BENCH_ALLOWLIST_TIMES when it is set.
"""

import fcntl
import os
import time

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: allowlist_lock
type: aggregate
short_description: serializes dstack.tee.allowlist tasks of concurrent runs, for bench/bench_fleet.py
description: Holds a flock on DSTACK_BENCH_ALLOWLIST_LOCK from an allowlist task's start to its result.
requirements: [enabled in ANSIBLE_CALLBACKS_ENABLED]
"""

ALLOWLIST_ACTIONS = {"dstack.tee.allowlist", "allowlist"}


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "allowlist_lock"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self):
        super().__init__()
        self.path = os.environ.get("DSTACK_BENCH_ALLOWLIST_LOCK", "")
        self.times_file = os.environ.get("DSTACK_BENCH_ALLOWLIST_TIMES", "")
        self.handle = None
        self.waited = self.locked_at = 0.0

    def _release(self):
        if self.handle is None:
            return
        held = time.time() - self.locked_at
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()
        self.handle = None
        if self.times_file:
            with open(self.times_file, "a", encoding="utf-8") as out:
                out.write(f"{self.waited:.3f} {held:.3f}\n")

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._release()
        if not self.path or not ({task.action, getattr(task, "resolved_action", None)} & ALLOWLIST_ACTIONS):
            return
        start = time.time()
        self.handle = open(self.path, "a", encoding="utf-8")  # pylint: disable=consider-using-with
        fcntl.flock(self.handle, fcntl.LOCK_EX)
        self.locked_at = time.time()
        self.waited = self.locked_at - start

    def v2_runner_on_ok(self, result):
        self._release()

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._release()

    def v2_runner_on_skipped(self, result):
        self._release()

    def v2_runner_on_unreachable(self, result):
        self._release()

    def v2_playbook_on_stats(self, stats):
        self._release()
