"""Each host is its own machine: no task in roles/ reads or writes a path that belongs to another
host's service unless it runs on that host (delegate_to it).

The paths of another host's service are the variables below (each role's names for them) and any
`hostvars[...]` folder or path. A task whose module arguments name one must be delegated to the
host that owns it; messages, conditions and facts (debug, fail, assert, set_fact) touch no file.
"""

import re
from pathlib import Path

import pytest
import yaml

ROLES = Path(__file__).resolve().parents[2] / "roles"

# role -> {variable naming a path on another host: the variable naming that host}
FOREIGN_PATHS = {
    "app": {  # runs on the controller
        "dstack_app_kms_state_dir": "dstack_app_kms_host",
        "dstack_app_gateway_state_dir": "dstack_app_gateway_host",
        "dstack_app_gateway_config": "dstack_app_gateway_host",
    },
    "gateway": {"dstack_gateway_kms_state_dir": "dstack_gateway_kms_host"},
    "kms": {"dstack_kms_sim_state_src": "dstack_kms_sim_state_host"},
    "vmm": {},
    "acme_lab": {},
    "tdx_host": {},
    # The collection is packed on the controller; the host gets the archive by copy's src.
    "runtime": {"dstack_runtime_source": "localhost"},
}
NO_FILES = {"ansible.builtin.debug", "ansible.builtin.fail", "ansible.builtin.assert", "ansible.builtin.set_fact",
            "ansible.builtin.include_tasks", "ansible.builtin.import_tasks", "ansible.builtin.include_role",
            "ansible.builtin.import_role", "ansible.builtin.meta"}
TASK_KEYWORDS = {"name", "when", "vars", "loop", "loop_control", "register", "delegate_to", "changed_when",
                 "failed_when", "check_mode", "no_log", "tags", "until", "retries", "delay", "become",
                 "run_once", "environment", "ignore_errors", "notify", "args"}


def _tasks(items):
    for task in items or []:
        if not isinstance(task, dict):
            continue
        if "block" in task:
            for part in ("block", "rescue", "always"):
                yield from _tasks(task.get(part))
        else:
            yield task


def _module(task):
    return next((key for key in task if key not in TASK_KEYWORDS), None)


def violations(role, tasks, foreign):
    """(role, task name, what it names, where it should run) for each task that names a path of
    another host's service without running there."""
    found = []
    for task in _tasks(tasks):
        module = _module(task)
        if module is None or module in NO_FILES:
            continue
        text = yaml.safe_dump({module: task[module], "args": task.get("args"), "loop": task.get("loop")})
        delegated = str(task.get("delegate_to", ""))
        for variable, host in foreign.items():
            if variable in text and host not in delegated:
                found.append((role, task.get("name"), variable, host))
        # Another host's folder or path by its variable: hostvars[...].<something>_dir/_path/...
        if not delegated and any(name.endswith(("_dir", "_path", "_file", "_sock", "_socket"))
                                 for name in re.findall(r"hostvars\[[^\]]+\]\.(\w+)", text)):
            found.append((role, task.get("name"), "hostvars[...] path", "its host"))
    return found


def _role_tasks():
    for task_file in sorted(ROLES.glob("*/tasks/*.yml")):
        role = task_file.parent.parent.name
        yield role, task_file, yaml.safe_load(task_file.read_text())


def test_every_role_is_listed():
    assert {role for role, _path, _tasks in _role_tasks()} == set(FOREIGN_PATHS)


@pytest.mark.parametrize("role, task_file, tasks", list(_role_tasks()), ids=lambda v: getattr(v, "name", None))
def test_no_task_touches_another_hosts_files_without_running_there(role, task_file, tasks):
    assert not violations(role, tasks, FOREIGN_PATHS[role]), task_file


def test_the_check_finds_a_task_that_is_not_delegated():
    tasks = [{"name": "allow", "dstack.tee.allowlist": {"path": "{{ dstack_app_kms_state_dir }}/auth-config.json"}},
             {"block": [{"name": "sock", "dstack.tee.verify_quote": {
                 "socket": "{{ hostvars[h].dstack_vmm_run_path }}/x/dstack.sock"}}]},
             {"name": "fine", "dstack.tee.allowlist": {"path": "{{ dstack_app_kms_state_dir }}/auth-config.json"},
              "delegate_to": "{{ dstack_app_kms_host }}"},
             {"name": "a message", "ansible.builtin.debug": {"msg": "{{ dstack_app_kms_state_dir }}"}}]
    assert violations("app", tasks, FOREIGN_PATHS["app"]) == [
        ("app", "allow", "dstack_app_kms_state_dir", "dstack_app_kms_host"),
        ("app", "sock", "hostvars[...] path", "its host")]
