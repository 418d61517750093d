"""This collection's modules run in a fork of Ansible's task worker on the controller
(plugins/plugin_utils/module_in_process.py): the same results as Ansible's own path, and that path
wherever the fork would not be the same (another interpreter, a task environment, the switch off)."""

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, run_playbook

SECRETS = ("in-process-secret-one", "in-process-secret-two")
FORKED = "runs in a fork of the task worker"

PLAYBOOK = """
- hosts: localhost
  gather_facts: false
  tasks:
    - name: ports
      dstack.tee.ports_free:
        ports: [{port: 1, name: one}]
      register: ports
    - name: a refusal
      dstack.tee.tdx_host_facts:
        sysroot: "{{ work }}/no-such-root"
      register: refusal
      ignore_errors: true
    - name: secrets and a warning
      dstack.tee.env_encrypt: "{{ env_args | combine({'env': {'A': secrets[0], 'B': secrets[1]}}) }}"
      register: encrypted
    - name: check mode and diff
      dstack.tee.app_compose:
        compose: "services:\\n  web:\\n    image: nginx\\n"
        name: hello
        dest: "{{ work }}/app-compose.json"
      check_mode: true
      diff: true
      register: compose
    - name: in a task environment
      dstack.tee.ports_free:
        ports: [{port: 2, name: two}]
      environment: {DSTACK_IN_PROCESS_TEST: "1"}
      register: with_environment
    - name: the results
      ansible.builtin.copy:
        dest: "{{ work }}/results.json"
        content: "{{ {'ports': ports, 'refusal': refusal, 'encrypted': encrypted, 'compose': compose,
                      'with_environment': with_environment} | to_json }}"
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The playbook above run with the fork (the default) and with dstack_modules_in_process=false."""
    from ansible_collections.dstack.tee.plugins.module_utils import root_keys  # pylint: disable=import-outside-toplevel
    work = tmp_path_factory.mktemp("in-process")
    keys, _created = root_keys.load_or_create(str(work / "kms"))
    app_id = "11" * 20
    signed = keys.env_pubkey_response(app_id)
    env_args = {"public_key": signed["public_key"], "app_id": app_id, "verify_signature": False}
    (work / "playbook.yml").write_text(PLAYBOOK)
    results = {}
    for switch in ("true", "false"):
        folder = work / switch
        folder.mkdir()
        (folder / "vars.json").write_text(json.dumps(
            {"work": str(folder), "env_args": env_args, "secrets": list(SECRETS), "dstack_modules_in_process": switch}))
        proc = run_playbook(work / "playbook.yml", "-vvv", "-e", f"@{folder / 'vars.json'}")
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        results[switch] = (proc, json.loads((folder / "results.json").read_text()), str(folder))
    return results


def _comparable(result, work):
    """A result without what differs from run to run (its folder, a fresh ciphertext)."""
    text = json.dumps(result).replace(work, "<work>")
    result = json.loads(text)
    result.pop("encrypted_env", None)
    return result


def test_our_modules_run_in_the_fork_unless_a_task_environment_or_the_switch_says_otherwise(runs):
    forked = runs["true"][0]
    assert forked.stdout.count(FORKED) == 4, forked.stdout[-3000:]
    assert "dstack.tee.ports_free: " + FORKED in forked.stdout
    assert FORKED not in runs["false"][0].stdout


@pytest.mark.parametrize("task", ["ports", "refusal", "encrypted", "compose", "with_environment"])
def test_the_fork_gives_the_results_of_ansibles_own_path(runs, task):
    forked, forked_folder = runs["true"][1:]
    own_path, own_folder = runs["false"][1:]
    assert _comparable(forked[task], forked_folder) == _comparable(own_path[task], own_folder)


def test_what_the_module_says_reaches_the_result_as_on_its_own_path(runs):
    results = runs["true"][1]
    assert results["refusal"]["failed"] and "no-such-root is not a directory" in results["refusal"]["msg"]
    warnings = [w["event"]["msg"] if isinstance(w, dict) else w for w in results["encrypted"]["warnings"]]
    assert any("verify_signature is false" in w for w in warnings)
    assert results["encrypted"]["env_keys"] == ["A", "B"] and len(results["encrypted"]["encrypted_env"]) > 120
    assert results["compose"]["changed"] and "name: hello" in results["compose"]["diff"]["after"]
    assert results["ports"]["ports"][0]["free"] is True


def test_no_secret_in_either_output(runs):
    for proc in (run[0] for run in runs.values()):
        for secret in SECRETS:
            assert secret not in proc.stdout + proc.stderr


def test_a_module_that_raises_or_never_exits_fails_with_its_error(tmp_path):
    """The fork's own failures: a module's exception reaches the result as Ansible's wrapper gives
    it, and a module that returns without exit_json fails instead of passing silently."""
    out = _probe(tmp_path, {
        "raises": "raise ValueError('the probe raised this')\n",
        "returns": "x = 1\n",
        "says": "import sys\nsys.exit('the probe says this')\n",
    })
    raised = json.loads(out["raises"]["stdout"])
    assert out["raises"]["rc"] == 1 and raised["failed"]
    assert "the probe raised this" in json.dumps(raised["exception"])
    returned = json.loads(out["returns"]["stdout"])
    assert out["returns"]["rc"] == 1 and "did not handle its own exit" in json.dumps(returned)
    assert out["says"]["rc"] == 1 and "the probe says this" in out["says"]["stderr"]


def test_the_child_is_a_new_interpreter_not_the_controller(tmp_path):
    """What the worker set up does not reach the module: the controller's log handler, its signal
    handlers, its atexit functions, its command line; and the module's own exit work runs."""
    out = _probe(tmp_path, {"exits": textwrap.dedent(f"""
        import atexit, json, logging, signal, sys, threading, time
        from ansible.module_utils import _internal
        logging.getLogger("dstack.probe").warning("probe log line")
        def late():
            time.sleep(0.3)
            open({str(tmp_path / 'thread-ran')!r}, "w").close()
        threading.Thread(target=late).start()
        atexit.register(lambda: open({str(tmp_path / 'atexit-ran')!r}, "w").close())
        print(json.dumps({{"is_controller": _internal.is_controller, "argv": sys.argv,
                          "alarm_handler": signal.getsignal(signal.SIGALRM) == signal.SIG_DFL,
                          "int_handler": signal.getsignal(signal.SIGINT) is signal.default_int_handler}}))
        sys.exit(3)
    """)})
    exits = out["exits"]
    said = json.loads(exits["stdout"])
    assert exits["rc"] == 3 and said["is_controller"] is False
    assert said["argv"] == [str(tmp_path / "fork_probe" / "exits.py")]
    assert said["alarm_handler"] is True and said["int_handler"] is True
    assert "probe log line" in exits["stderr"]  # logging's last resort, as in a new process
    assert "probe log line" not in (tmp_path / "controller.log").read_text()
    assert (tmp_path / "thread-ran").exists() and (tmp_path / "atexit-ran").exists()
    # The controller's atexit function ran once, in the controller, not in the child.
    assert (tmp_path / "controller-atexit").read_text().split() == [str(out["controller_pid"])]


def _probe(tmp_path, modules):
    """Run each module source of `modules` through the fork from a controller-like process (a
    logging file handler, a SIGALRM handler, an atexit function); their rc, stdout and stderr."""
    package = tmp_path / "fork_probe"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, source in modules.items():
        (package / f"{name}.py").write_text(source)
    script = textwrap.dedent(f"""
        import atexit, json, logging, os, signal, sys
        sys.path.insert(0, {str(tmp_path)!r})
        sys.path.insert(0, {str(ROOT / '.venv' / 'collections')!r})
        logging.basicConfig(filename={str(tmp_path / 'controller.log')!r}, level=logging.INFO)
        signal.signal(signal.SIGALRM, lambda *_: None)
        atexit.register(lambda: open({str(tmp_path / 'controller-atexit')!r}, "a").write(f"{{os.getpid()}}\\n"))
        from ansible_collections.dstack.tee.plugins.plugin_utils import module_in_process
        out = {{"controller_pid": os.getpid()}}
        for name in {sorted(modules)!r}:
            run = dict(module_fqn="fork_probe." + name, json_params=b'{{"ANSIBLE_MODULE_ARGS": {{}}}}', profile="legacy")
            out[name] = module_in_process._run_forked(run, cwd={str(tmp_path)!r}, encoding_errors="surrogate_then_replace")
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])
