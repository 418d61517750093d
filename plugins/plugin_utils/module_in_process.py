# Copyright (c) 2026 dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Run this collection's modules on the controller without a new Python process each time.

Ansible runs every module task by starting a new interpreter with the module and its module_utils
packed as source in a zip (AnsiballZ): the interpreter starts, then compiles
ansible.module_utils.basic and ours from source, every task, because nothing imported from a zip
keeps its bytecode. On two cores that is 0.5-0.9 s a task before the module does anything, most of a
deploy's time. When the task's host is the controller itself (the local connection, no become, no
async, no task environment) and its interpreter is the one running Ansible, the module is the same
code either way, so it runs instead in a child forked from the task's worker, which already has
that code imported with its bytecode. Everything Ansible does around the module stays: its
arguments, check mode and diff, no_log, interpreter discovery, the result's parsing and errors.
Any other task (SSH, become, another interpreter) takes Ansible's own path, as does every task of a
host whose `dstack_modules_in_process` is false.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import sys
import tempfile

from ansible.module_utils.common.json import Direction, get_module_encoder
from ansible.module_utils.common.text.converters import to_text
from ansible.module_utils.parsing.convert_bool import boolean
from ansible.plugins.action.normal import ActionModule as NormalAction
from ansible.utils.display import Display

try:
    # Imported here, once per worker and with their bytecode, so that the forked child finds them
    # loaded; the zip path would compile them again. These are Ansible's own internals for its
    # AnsiballZ wrapper (ansible-core 2.19): where they are not as expected, every task takes
    # Ansible's path.
    from ansible.module_utils import _internal as _module_utils_internal
    from ansible.module_utils import basic  # noqa: F401  pylint: disable=unused-import
    from ansible.module_utils._internal import _traceback
    from ansible.module_utils._internal._ansiballz import _loader
    from ansible.executor.interpreter_discovery import InterpreterDiscoveryRequiredError
    from ansible.executor.module_common import _BuiltModule, _get_module_metadata, _get_shebang
    from ansible._internal._ansiballz._builder import ExtensionManager as _ExtensionManager
    _TARGET_TRACEBACK_SWITCH = _traceback._is_module_traceback_enabled
    _RUN_MODULE = _loader.run_module
except (ImportError, AttributeError):
    _RUN_MODULE = None

display = Display()

# The host variable that turns this off (true by default): false gives every task Ansible's own path.
SWITCH_VARIABLE = 'dstack_modules_in_process'

# Only this collection's modules, which are written to run this way (no module-level state kept
# between runs, results only through exit_json/fail_json).
_OUR_MODULE_PATH = re.compile(r'/ansible_collections/dstack/tee/plugins/modules/([a-z_][a-z0-9_]*)\.py$')


class InProcessModuleAction(NormalAction):
    """Ansible's action for a module (ansible.builtin.normal), run in a fork when it may be."""

    _in_process_run = None

    def _in_process_eligible(self) -> bool:
        """Whether this task's module would run on this machine under this interpreter, as is."""
        return (
            _RUN_MODULE is not None
            and self._connection.transport in ('local', 'ansible.builtin.local')
            and not self._connection.become
            and not self._task.async_val
            and not self._compute_environment_string()
        )

    def _is_pipelining_enabled(self, module_style, wrap_async=False):
        # In a fork the module needs no file on disk, as with pipelining.
        if module_style == 'new' and not wrap_async and self._in_process_eligible():
            return True
        return super()._is_pipelining_enabled(module_style, wrap_async)

    def _configure_module(self, module_name, module_args, task_vars):
        self._in_process_run = None
        planned = self._in_process_plan(module_name, module_args, task_vars)
        if planned is None:
            return super()._configure_module(module_name, module_args, task_vars)
        self._in_process_run, module_bits, module_path = planned
        return module_bits, module_path

    def _in_process_plan(self, module_name, module_args, task_vars):
        """What to run in a fork, the module as Ansible would describe it, and its path; or None.

        None for a module of another collection, one that the task's interpreter settings do not
        run under this Python, or before interpreter discovery has run; Ansible's path then does
        everything as usual. Ansible's own build of the module (its zip: 0.4-0.5 s a module a run,
        most of it finding the module_utils to pack) is not needed here.
        """
        if not self._in_process_eligible():
            return None
        found = self._shared_loader_obj.module_loader.find_plugin_with_context(
            module_name, '.py', collection_list=self._task.collections)
        ours = _OUR_MODULE_PATH.search(found.plugin_resolved_path or '') if found.resolved else None
        if ours is None:
            return None
        use_vars = task_vars.get('ansible_delegated_vars')[self._task.delegate_to] if self._task.delegate_to else task_vars
        if not boolean(self._templar.template(use_vars.get(SWITCH_VARIABLE, True)), strict=False):
            return None
        try:
            shebang, interpreter = _get_shebang('/usr/bin/python', use_vars, self._templar,
                                                remote_is_local=bool(getattr(self._connection, '_remote_is_local', False)))
        except InterpreterDiscoveryRequiredError:
            return None
        if interpreter != sys.executable or _ExtensionManager.create(task_vars=use_vars).extension_names:
            return None
        with open(found.plugin_resolved_path, 'rb') as module_file:
            profile = _get_module_metadata(ast.parse(module_file.read())).serialization_profile
        encoder = get_module_encoder(profile, Direction.CONTROLLER_TO_MODULE)
        run = dict(
            module_fqn='ansible_collections.dstack.tee.plugins.modules.' + ours.group(1),
            json_params=json.dumps(dict(ANSIBLE_MODULE_ARGS=module_args), cls=encoder).encode(),
            profile=profile,
        )
        module_bits = _BuiltModule(b_module_data=b'', module_style='new', shebang=shebang, serialization_profile=profile)
        display.vvv(f'{module_name}: runs in a fork of the task worker ({SWITCH_VARIABLE})', host=self._play_context.remote_addr)
        return run, module_bits, found.plugin_resolved_path

    def _low_level_execute_command(self, cmd, sudoable=True, in_data=None, executable=None,
                                   encoding_errors='surrogate_then_replace', chdir=None):
        run, self._in_process_run = self._in_process_run, None
        if run is None:
            return super()._low_level_execute_command(cmd, sudoable=sudoable, in_data=in_data, executable=executable,
                                                      encoding_errors=encoding_errors, chdir=chdir)
        # As the local connection would: the task's folder as the working directory.
        return _run_forked(run, cwd=chdir or self._loader.get_basedir(), encoding_errors=encoding_errors)


def _as_on_a_target() -> None:
    """Undo what importing Ansible's controller did to module_utils, as a module's own process has it.

    On the controller, a module's warnings would go to the worker's display instead of its result,
    and its tracebacks would follow the controller's settings instead of the task's.
    """
    _module_utils_internal.is_controller = False
    _module_utils_internal.get_controller_serialize_map = dict
    _module_utils_internal.import_controller_module = lambda _module_name: None
    _traceback._is_traceback_enabled = _TARGET_TRACEBACK_SWITCH


def _run_forked(run: dict, cwd: str, encoding_errors: str) -> dict:
    """Run one module in a child of this process; its rc, stdout and stderr as a connection gives them."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                for signum in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(signum, signal.SIG_DFL)
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.stdin = open(0, 'r', closefd=False)  # pylint: disable=consider-using-with
                sys.stdout = open(1, 'w', closefd=False)  # pylint: disable=consider-using-with
                sys.stderr = open(2, 'w', closefd=False)  # pylint: disable=consider-using-with
                os.chdir(cwd)
                _as_on_a_target()
                _RUN_MODULE(modlib_path='', extensions={}, **run)
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            except BaseException:  # pylint: disable=broad-exception-caught
                import traceback  # pylint: disable=import-outside-toplevel
                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)  # no atexit handler or buffer of the parent's runs twice
        try:
            status = os.waitpid(pid, 0)[1]
        except BaseException:
            # The task was interrupted (its timeout, ^C): the child must not outlive it.
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
        rc = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout = to_text(out.read(), errors=encoding_errors)
        stderr = to_text(err.read(), errors=encoding_errors)
    return dict(rc=rc, stdout=stdout, stdout_lines=stdout.splitlines(), stderr=stderr, stderr_lines=stderr.splitlines())
