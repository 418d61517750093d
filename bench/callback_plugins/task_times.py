# -*- coding: utf-8 -*-
# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The wall time of each task of a playbook run, for bench/bench_deploy.py.

Not part of the collection: the bench enables it with ANSIBLE_CALLBACK_PLUGINS=bench/callback_plugins
and ANSIBLE_CALLBACKS_ENABLED=task_times, and names the output file in DSTACK_BENCH_TASK_TIMES. At the
end of the run it writes there, as JSON, the time the run started (this plugin's load) and each task
in order: its name (role prefixed), its start (time.time()) and its seconds, from its start to the
next task's start (or the run's end), so that the per-task figures add up to the run, Ansible's own
work between tasks included. (ansible.posix's profile_tasks prints much the same; it is not a
dependency of this project.)
"""

import json
import os
import time

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: task_times
type: aggregate
short_description: the wall time of each task, as JSON, for bench/bench_deploy.py
description: Writes each task's name, start and seconds to the file named in DSTACK_BENCH_TASK_TIMES.
requirements: [enabled in ANSIBLE_CALLBACKS_ENABLED]
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "task_times"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self):
        super().__init__()
        self.loaded = time.time()
        self.tasks = []

    def _close(self, now):
        if self.tasks and self.tasks[-1]["seconds"] is None:
            self.tasks[-1]["seconds"] = now - self.tasks[-1]["start"]

    def _start(self, task):
        now = time.time()
        self._close(now)
        role = task._role.get_name() if getattr(task, "_role", None) else ""  # pylint: disable=protected-access
        name = task.get_name().strip()
        self.tasks.append({"name": f"{role} : {name}" if role and not name.startswith(role) else name,
                           "action": task.action, "start": now, "seconds": None})

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._start(task)

    def v2_playbook_on_handler_task_start(self, task):
        self._start(task)

    def v2_playbook_on_play_start(self, play):
        self._close(time.time())

    def v2_playbook_on_stats(self, stats):
        now = time.time()
        self._close(now)
        path = os.environ.get("DSTACK_BENCH_TASK_TIMES")
        if path:
            with open(path, "w", encoding="utf-8") as handle:
                json.dump({"loaded": self.loaded, "end": now, "tasks": self.tasks}, handle)
