"""dstack.tee.runtime: the agents on a host of their own. The role packs this checkout's agents,
unpacks them under its home, makes a venv with pyproject.toml's dependencies (here from a folder of
wheels, as on a host without PyPI: --no-index --find-links) and writes the agents' commands; those
commands then run from that copy, not from the checkout. A second run changes nothing; check mode
on a new home writes nothing.
"""

import json
import re
import subprocess
import sys
import tomllib

from conftest import NO_COMPILE, ROOT, VENV_BIN, run_playbook

PLAYBOOK = """
- name: The agents on this host
  hosts: localhost
  gather_facts: false
  roles:
    - role: dstack.tee.runtime
  post_tasks:
    - name: Show what the roles that follow read
      ansible.builtin.debug:
        msg: >-
          RUNTIME bin={{ dstack_runtime_bin_dir }} python={{ dstack_runtime_venv_python }}
          interpreter={{ ansible_python_interpreter }}
"""


def _inventory(tmp_path):
    """The host's interpreter as an inventory variable (an -e would outrank the role's set_fact)."""
    inventory = tmp_path / "inventory.ini"
    inventory.write_text(f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}\n")
    return inventory


def _run(tmp_path, home, wheels, *extra):
    playbook = tmp_path / "runtime.yml"
    playbook.write_text(PLAYBOOK)
    return run_playbook(playbook, "-i", str(_inventory(tmp_path)),
                        "-e", json.dumps({"dstack_runtime_home": str(home),
                                          "dstack_runtime_python": sys.executable,
                                          "dstack_runtime_pip_extra_args": f"--no-index --find-links {wheels} {NO_COMPILE}"}),
                        *extra, timeout=900)


def _changed(stdout):
    found = re.search(r"localhost\s*:\s*ok=\d+\s+changed=(\d+)", stdout)
    assert found, stdout[-3000:]
    return int(found.group(1))


def test_the_agents_run_from_their_own_copy_and_a_second_run_changes_nothing(tmp_path, runtime_wheels):
    home = tmp_path / "opt" / "dstack-tee"
    first = _run(tmp_path, home, runtime_wheels)
    assert first.returncode == 0, first.stdout[-5000:] + first.stderr[-2000:]
    assert _changed(first.stdout) > 0
    # The modules of the plays that follow run with the venv's Python.
    assert (f"RUNTIME bin={home}/venv/bin python={home}/venv/bin/python interpreter={home}/venv/bin/python"
            in re.sub(r"\s+", " ", first.stdout))

    # Every command of pyproject.toml, in the venv's bin beside its Python and supervisord (the VMM
    # starts dstack-guest-agent from beside its own Python).
    with open(ROOT / "pyproject.toml", "rb") as src:
        scripts = tomllib.load(src)["project"]["scripts"]
    bin_dir = home / "venv" / "bin"
    assert all((bin_dir / name).is_file() for name in [*scripts, "python", "supervisord"])

    # The collection the venv imports is the unpacked copy, not this checkout.
    where = subprocess.run([str(bin_dir / "python"), "-c",
                            "import ansible_collections.dstack.tee.agents.kms.cli as m; print(m.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout.strip()
    releases = sorted(home.glob("agents-*"))
    assert len(releases) == 1 and where == f"{home}/collections/ansible_collections/dstack/tee/agents/kms/cli.py"
    assert (home / "collections/ansible_collections/dstack/tee").resolve() == releases[0]
    assert not str(ROOT) in where
    # The venv's Python keeps the bytecode of Ansible's module payloads (the .pth's last line), with the
    # module from the unpacked copy, and starts with nothing on stderr.
    cached = subprocess.run([str(bin_dir / "python"), "-c", "import zipimport, dstack_tee_ansiballz_bytecode as m; "
                             "print(zipimport._compile_source.dstack_tee_cached, m.__file__)"],
                            capture_output=True, text=True, check=True, cwd=tmp_path)
    assert cached.stderr == ""
    assert cached.stdout.split() == [
        "True", f"{home}/collections/ansible_collections/dstack/tee/roles/runtime/files/python/dstack_tee_ansiballz_bytecode.py"]

    # A command works: dstack-kms makes root keys, with the venv's dependencies.
    state = tmp_path / "kms"
    made = subprocess.run([str(bin_dir / "dstack-kms"), "init", "--state-dir", str(state)],
                          capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert (state / "root-ca.crt").is_file() and (state / "root-k256.key").is_file()
    assert str(VENV_BIN) not in (bin_dir / "dstack-kms").read_text()

    second = _run(tmp_path, home, runtime_wheels)
    assert second.returncode == 0, second.stdout[-5000:]
    assert _changed(second.stdout) == 0, second.stdout[-5000:]
    assert sorted(home.glob("agents-*")) == releases


def test_check_mode_on_a_new_host_writes_nothing(tmp_path, runtime_wheels):
    home = tmp_path / "new" / "dstack-tee"
    checked = _run(tmp_path, home, runtime_wheels, "--check", "--diff")
    assert checked.returncode == 0, checked.stdout[-5000:] + checked.stderr[-2000:]
    assert _changed(checked.stdout) > 0
    assert not (tmp_path / "new").exists()


def test_a_relative_home_is_refused_naming_the_setting(tmp_path):
    refused = _run(tmp_path, "opt/dstack-tee", tmp_path / "no-wheels")
    assert refused.returncode != 0
    assert "dstack_runtime_home must be an absolute folder" in refused.stdout
    assert not (tmp_path / "opt").exists()


def test_a_source_without_the_agents_is_refused_naming_the_setting(tmp_path):
    playbook = tmp_path / "runtime.yml"
    playbook.write_text(PLAYBOOK)
    home = tmp_path / "opt" / "dstack-tee"
    (tmp_path / "not-a-checkout" / "agents").mkdir(parents=True)
    refused = run_playbook(playbook, "-i", str(_inventory(tmp_path)), "-e",
                           json.dumps({"dstack_runtime_home": str(home), "dstack_runtime_python": sys.executable,
                                       "dstack_runtime_source": str(tmp_path / "not-a-checkout")}), timeout=300)
    assert refused.returncode != 0
    text = re.sub(r"\s+", " ", refused.stdout)
    assert f"dstack_runtime_source: {tmp_path / 'not-a-checkout'} has no plugins/module_utils, pyproject.toml" in text, \
        text[-3000:]
    assert "non-zero return code" not in text
    assert not home.exists()


def test_a_python_that_cannot_make_the_venv_stops_the_role_naming_it(tmp_path):
    playbook = tmp_path / "runtime.yml"
    playbook.write_text(PLAYBOOK)
    home = tmp_path / "opt" / "dstack-tee"
    for python, why in (("/nonexistent/python3", "could not be run here"), (str(tmp_path / "old-python"), "is older than 3.11")):
        (tmp_path / "old-python").write_text("#!/bin/sh\nexit 1\n")
        (tmp_path / "old-python").chmod(0o755)
        refused = run_playbook(playbook, "-i", str(_inventory(tmp_path)), "-e",
                               json.dumps({"dstack_runtime_home": str(home), "dstack_runtime_python": python}),
                               timeout=300)
        assert refused.returncode != 0
        text = re.sub(r"\s+", " ", refused.stdout)
        assert f"dstack_runtime_python ({python}) must be Python 3.11 or later" in text and why in text, text[-3000:]
        assert not home.exists()
