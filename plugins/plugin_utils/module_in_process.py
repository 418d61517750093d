# Copyright (c) 2026 dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Run this collection's modules on the controller without a new Python process each time.

Ansible runs every module task by starting a new interpreter with the module and its module_utils
packed as source in a zip (AnsiballZ): the interpreter starts, then compiles
ansible.module_utils.basic and ours from source, every task, because nothing imported from a zip
keeps its bytecode; and each module's zip is built once a run (0.4-0.5 s, most of it finding the
module_utils to pack). On two cores that is 0.5-0.9 s a task before the module does anything, most
of a deploy's time. When the task's host is the controller itself (the local connection, no become,
no async, no task environment) and its interpreter is the one running Ansible, the module is the
same code either way, so it runs instead in a child forked from the task's worker, which already
has that code imported with its bytecode. The child is made to look like a new interpreter
(logging, signals, sys.argv and sys.path, atexit, module_utils' controller switches, no core dump
of the controller's memory) and exits as one would (its threads joined, its atexit functions run).
Everything Ansible does around the module stays Ansible's code: its arguments, check mode and diff,
no_log, the result's parsing and errors. Any other task (SSH, become, another interpreter,
interpreter discovery not yet run) takes Ansible's own path, as does every task of a host whose
`dstack_modules_in_process` is false.
"""

from __future__ import annotations

import ast
import atexit
import json
import logging
import os
import re
import resource
import signal
import sys
import tempfile
import threading
import weakref

from ansible import constants as C
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
    from ansible.executor.module_common import _BuiltModule, _extract_interpreter, _get_module_metadata, _get_shebang
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

    # What _execute_module will run in a fork (decided before it asks whether to pipeline), then the
    # run itself once _configure_module has the module's final arguments.
    _in_process_target = None
    _in_process_run = None

    def _execute_module(self, module_name=None, module_args=None, tmp=None, task_vars=None, **kwargs):
        self._in_process_target = None
        if not kwargs.get('wrap_async'):
            self._in_process_target = self._in_process_target_for(module_name or self._task.action, task_vars or {})
        try:
            return super()._execute_module(module_name=module_name, module_args=module_args, tmp=tmp,
                                           task_vars=task_vars, **kwargs)
        finally:
            self._in_process_target = self._in_process_run = None

    def _in_process_target_for(self, module_name, task_vars):
        """The module's fqn, path, shebang and serialization profile when it is to run in a fork; or None.

        None for a module of another collection, one that the task's interpreter settings do not
        run under this Python, before interpreter discovery has run, or where Ansible was asked for
        something only its path does (remote files kept, AnsiballZ extensions, an rlimit).
        """
        if not (
            _RUN_MODULE is not None
            and self._connection.transport in ('local', 'ansible.builtin.local')
            and not self._connection.become
            and not self._task.async_val
            and not C.DEFAULT_KEEP_REMOTE_FILES
            and not self._compute_environment_string()
        ):
            return None
        found = self._shared_loader_obj.module_loader.find_plugin_with_context(
            module_name, '.py', collection_list=self._task.collections)
        ours = _OUR_MODULE_PATH.search(found.plugin_resolved_path or '') if found.resolved else None
        if ours is None:
            return None
        use_vars = task_vars['ansible_delegated_vars'][self._task.delegate_to] if self._task.delegate_to else task_vars
        if not boolean(self._templar.template(use_vars.get(SWITCH_VARIABLE, True)), strict=False):
            return None
        if (C.config.get_config_value('PYTHON_MODULE_RLIMIT_NOFILE', variables=use_vars)
                or _ExtensionManager.create(task_vars=use_vars).extension_names):
            return None
        with open(found.plugin_resolved_path, 'rb') as module_file:
            source = module_file.read()
        interpreter, interpreter_args = _extract_interpreter(source)
        try:
            shebang, interpreter = _get_shebang(interpreter or '/usr/bin/python', use_vars, self._templar, interpreter_args,
                                                remote_is_local=bool(getattr(self._connection, '_remote_is_local', False)))
        except InterpreterDiscoveryRequiredError:
            return None
        if interpreter != sys.executable:
            return None
        return dict(
            module_fqn='ansible_collections.dstack.tee.plugins.modules.' + ours.group(1),
            module_path=found.plugin_resolved_path,
            shebang=shebang,
            profile=_get_module_metadata(ast.parse(source)).serialization_profile,
        )

    def _is_pipelining_enabled(self, module_style, wrap_async=False):
        # In a fork the module needs no file on disk, as with pipelining.
        if self._in_process_target is not None and module_style == 'new' and not wrap_async:
            return True
        return super()._is_pipelining_enabled(module_style, wrap_async)

    def _configure_module(self, module_name, module_args, task_vars):
        target = self._in_process_target
        if target is None:
            return super()._configure_module(module_name, module_args, task_vars)
        encoder = get_module_encoder(target['profile'], Direction.CONTROLLER_TO_MODULE)
        self._in_process_run = dict(
            module_fqn=target['module_fqn'],
            json_params=json.dumps(dict(ANSIBLE_MODULE_ARGS=module_args), cls=encoder).encode(),
            profile=target['profile'],
        )
        display.vvv(f'{module_name}: runs in a fork of the task worker ({SWITCH_VARIABLE})', host=self._play_context.remote_addr)
        module_bits = _BuiltModule(b_module_data=b'', module_style='new', shebang=target['shebang'],
                                   serialization_profile=target['profile'])
        return module_bits, target['module_path']

    def _low_level_execute_command(self, cmd, sudoable=True, in_data=None, executable=None,
                                   encoding_errors='surrogate_then_replace', chdir=None):
        run, self._in_process_run = self._in_process_run, None
        if run is None:
            return super()._low_level_execute_command(cmd, sudoable=sudoable, in_data=in_data, executable=executable,
                                                      encoding_errors=encoding_errors, chdir=chdir)
        # As the local connection would: the task's folder as the working directory.
        return _run_forked(run, cwd=chdir or self._loader.get_basedir(), encoding_errors=encoding_errors)


def _as_a_new_interpreter() -> None:
    """Undo in the child what the controller and its worker set up, as a module's own process lacks it.

    Without this: a module's log lines would reach the controller's log file (Ansible's log_path
    configures the root logger), the worker's signal handlers would raise the controller's
    exceptions in the module, its atexit functions would run at the module's exit, the module would
    see ansible-playbook's command line (extra vars included) and its folder on sys.path, its
    warnings would go to the worker's display instead of its result, and a crash would dump the
    controller's memory (vault secrets, every host's variables) to a core file.
    """
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    for signum in signal.valid_signals():
        # Python handlers do not survive exec (ignored signals do): as in a new interpreter.
        if callable(signal.getsignal(signum)) and signum not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
    atexit._clear()  # pylint: disable=protected-access
    # The worker's finalizers are its own; the child's new ones must still run at its exit.
    for finalizer in list(weakref.finalize._registry):  # pylint: disable=protected-access
        finalizer.atexit = False
    weakref.finalize._registered_with_atexit = False  # pylint: disable=protected-access
    for logger in [logging.root, *logging.Logger.manager.loggerDict.values()]:
        if isinstance(logger, logging.Logger):
            logger.handlers.clear()
            logger.setLevel(logging.NOTSET)
            logger.disabled = False
            logger.propagate = True
    logging.root.setLevel(logging.WARNING)
    sys.argv = ['']
    try:
        script_dir = os.path.dirname(os.path.realpath(sys.modules['__main__'].__file__))
    except (AttributeError, KeyError, OSError, TypeError):
        script_dir = None
    sys.path = [entry for entry in sys.path if entry not in ('', '.', script_dir)]
    _module_utils_internal.is_controller = False
    _module_utils_internal.get_controller_serialize_map = dict
    _module_utils_internal.import_controller_module = lambda _module_name: None
    _traceback._is_traceback_enabled = _TARGET_TRACEBACK_SWITCH  # pylint: disable=protected-access


def _exit_as_an_interpreter(code) -> int:
    """What a new interpreter does at its end: join its threads, run its atexit functions, say a
    non-numeric exit code; returns the exit status."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        print(code, file=sys.stderr)
        status = 1
    current = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not current and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # pylint: disable=protected-access
    return status


def _run_forked(run: dict, cwd: str, encoding_errors: str) -> dict:
    """Run one module in a child of this process; its rc, stdout and stderr as a connection gives them."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:  # the child: never returns
            status = 1
            try:
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.stdin = open(0, 'r', closefd=False)  # pylint: disable=consider-using-with
                sys.stdout = open(1, 'w', closefd=False)  # pylint: disable=consider-using-with
                sys.stderr = open(2, 'w', closefd=False)  # pylint: disable=consider-using-with
                os.chdir(cwd)
                _as_a_new_interpreter()
                try:
                    _RUN_MODULE(modlib_path='', extensions={}, **run)
                    status = _exit_as_an_interpreter(None)
                except SystemExit as exit_:
                    status = _exit_as_an_interpreter(exit_.code)
            except BaseException:  # pylint: disable=broad-exception-caught
                import traceback  # pylint: disable=import-outside-toplevel
                traceback.print_exc()
                status = 1
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(status)  # no atexit function or buffer of the worker's runs here
        # A task's timeout or ^C raises here. As on Ansible's path, a timed-out module is left to
        # finish; ^C reaches it with the worker's process group.
        status = os.waitpid(pid, 0)[1]
        # As `sh -c` reports a command a signal killed: 128 + the signal.
        rc = os.waitstatus_to_exitcode(status)
        rc = 128 - rc if rc < 0 else rc
        out.seek(0)
        err.seek(0)
        stdout = to_text(out.read(), errors=encoding_errors)
        stderr = to_text(err.read(), errors=encoding_errors)
    return dict(rc=rc, stdout=stdout, stdout_lines=stdout.splitlines(), stderr=stderr, stderr_lines=stderr.splitlines())
