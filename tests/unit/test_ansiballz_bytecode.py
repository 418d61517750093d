"""roles/runtime/files/python/dstack_tee_ansiballz_bytecode.py: the bytecode of AnsiballZ payloads kept
between tasks. Its compile step on its own (entries, a changed source, a folder others may write to, a
corrupt entry, zips that are not payloads), then as Ansible runs it: a real ansible-playbook whose ping
task's bytecode comes from the cache (an entry planted for ping's exact source answers instead of ping),
and not from a folder others may write to, nor when turned off."""

import importlib.util
import marshal
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, VENV_BIN

import ansible.modules.ping

PATH = ROOT / "roles" / "runtime" / "files" / "python" / "dstack_tee_ansiballz_bytecode.py"
SPEC = importlib.util.spec_from_file_location("ansiballz_bytecode_under_test", PATH)
bytecode = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bytecode)

PAYLOAD = os.path.join("/tmp", "ansible_ping_payload_x1", "ansible_ping_payload.zip")


class Compiler:
    """zipimport's compile step, counted."""

    def __init__(self):
        self.calls = []

    def __call__(self, pathname, source):
        self.calls.append(pathname)
        return compile(source, pathname, "exec", dont_inherit=True)


def _folder(tmp_path):
    """The cache folder as cache_folder() lays it out, under a cache base of this user's own."""
    base = tmp_path / "cache-home"
    base.mkdir(mode=0o700, exist_ok=True)
    return base / "dstack-tee" / "ansiballz-bytecode"


def _run(code):
    scope = {}
    exec(code, scope)  # pylint: disable=exec-used
    return scope


def _filenames(code):
    yield code.co_filename
    for const in code.co_consts:
        if isinstance(const, type(code)):
            yield from _filenames(const)


SOURCE = b"def answer():\n    return (lambda: 42)()\n"


def test_an_entry_serves_the_next_payload_and_names_its_path(tmp_path):
    folder = _folder(tmp_path)
    compiler = Compiler()
    first = bytecode.compile_cached(compiler, PAYLOAD + "/ansible/module_utils/x.py", SOURCE, str(folder))
    assert len(compiler.calls) == 1 and _run(first)["answer"]() == 42
    (entry,) = folder.iterdir()
    assert oct(entry.stat().st_mode & 0o777) == "0o600" and oct(folder.stat().st_mode & 0o777) == "0o700"

    other_payload = "/tmp/ansible_ping_payload_y2/ansible_ping_payload.zip/ansible/module_utils/x.py"
    second = bytecode.compile_cached(compiler, other_payload, SOURCE, str(folder))
    assert len(compiler.calls) == 1, "the second payload compiled again"
    assert _run(second)["answer"]() == 42
    # Every nested code object names this payload, for its tracebacks (the lambda inside answer too).
    assert set(_filenames(second)) == {other_payload}


def test_a_changed_source_is_compiled_again_and_replaces_the_entry(tmp_path):
    folder, compiler = _folder(tmp_path), Compiler()
    bytecode.compile_cached(compiler, PAYLOAD + "/m.py", SOURCE, str(folder))
    changed = SOURCE.replace(b"42", b"43")
    code = bytecode.compile_cached(compiler, PAYLOAD + "/m.py", changed, str(folder))
    assert len(compiler.calls) == 2 and _run(code)["answer"]() == 43
    assert len(list(folder.iterdir())) == 1, "one entry per path inside the payloads"
    bytecode.compile_cached(compiler, PAYLOAD + "/m.py", changed, str(folder))
    assert len(compiler.calls) == 2


def test_a_corrupt_or_foreign_entry_is_compiled_over(tmp_path):
    folder, compiler = _folder(tmp_path), Compiler()
    bytecode.compile_cached(compiler, PAYLOAD + "/m.py", SOURCE, str(folder))
    (entry,) = folder.iterdir()
    header_length = len(importlib.util.MAGIC_NUMBER) + 1 + 32
    entry.write_bytes(entry.read_bytes()[:header_length] + b"\x00garbage")
    assert _run(bytecode.compile_cached(compiler, PAYLOAD + "/m.py", SOURCE, str(folder)))["answer"]() == 42
    assert len(compiler.calls) == 2
    # Another Python's magic number: not this interpreter's bytecode.
    entry.write_bytes(b"\x00\x00\r\n" + entry.read_bytes()[4:])
    bytecode.compile_cached(compiler, PAYLOAD + "/m.py", SOURCE, str(folder))
    assert len(compiler.calls) == 3


@pytest.mark.parametrize("level", [0, 1, 2])
@pytest.mark.parametrize("mode", [0o770, 0o702, 0o777])
def test_a_folder_others_may_write_to_is_not_used(tmp_path, mode, level):
    """The cache base, dstack-tee or ansiballz-bytecode writable by others: compiled each time, nothing kept."""
    folder, compiler = _folder(tmp_path), Compiler()
    folder.mkdir(parents=True, mode=0o700)
    [folder.parent.parent, folder.parent, folder][level].chmod(mode)
    for payload in (PAYLOAD, PAYLOAD.replace("x1", "y2")):
        bytecode.compile_cached(compiler, payload + "/m.py", SOURCE, str(folder))
    assert len(compiler.calls) == 2 and not list(folder.iterdir())


def test_a_folder_of_another_user_or_a_link_is_not_used(tmp_path):
    """Root whose HOME is another user's: nothing made there, nothing read; a symlinked folder: not followed."""
    folder, compiler = _folder(tmp_path), Compiler()
    os.chown(folder.parent.parent, 65534, 65534)
    bytecode.compile_cached(compiler, PAYLOAD + "/m.py", SOURCE, str(folder))
    assert len(compiler.calls) == 1 and not folder.parent.exists()

    os.chown(folder.parent.parent, os.geteuid(), os.getegid())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    folder.parent.mkdir(mode=0o700)
    folder.symlink_to(elsewhere)
    for payload in (PAYLOAD, PAYLOAD.replace("x1", "y2")):
        bytecode.compile_cached(compiler, payload + "/m.py", SOURCE, str(folder))
    assert len(compiler.calls) == 3 and not list(elsewhere.iterdir())


def test_zips_other_than_payloads_and_an_unwritable_folder_compile_as_before(tmp_path):
    compiler = Compiler()
    folder = _folder(tmp_path)
    for path in ("/srv/app.zip/m.py", "/tmp/x/other_payload.zip/m.py", "/tmp/x/ansible_ping_payload.zip/"):
        bytecode.compile_cached(compiler, path, SOURCE, str(folder))
    assert len(compiler.calls) == 3 and not folder.parent.exists()
    folder.parent.write_text("a file where the folder would be")
    code = bytecode.compile_cached(compiler, PAYLOAD + "/m.py", SOURCE, str(folder))
    assert _run(code)["answer"]() == 42 and len(compiler.calls) == 4


def test_the_folder_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert bytecode.cache_folder() == str(tmp_path / "dstack-tee" / "ansiballz-bytecode")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert bytecode.cache_folder() == str(tmp_path / "home" / ".cache" / "dstack-tee" / "ansiballz-bytecode")


# --- As Ansible runs it ------------------------------------------------------------------------------

PLAY = """
- hosts: localhost
  gather_facts: false
  tasks:
    - ansible.builtin.ping:
      register: pinged
    - ansible.builtin.debug:
        msg: "PING={{ pinged.ping }}"
"""


def _ping(tmp_path, cache_home, **env):
    play = tmp_path / "play.yml"
    play.write_text(PLAY)
    result = subprocess.run(
        [str(VENV_BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local",
         "-e", f"ansible_python_interpreter={VENV_BIN / 'python'}", str(play)],
        capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path,
        env=dict(os.environ, XDG_CACHE_HOME=str(cache_home), ANSIBLE_NOCOLOR="1", **env))
    assert result.returncode == 0, result.stdout + result.stderr
    # Whatever the output's format (the callback and its result format may come from the environment).
    answered = re.findall(r"PING=([a-z]+)", result.stdout)
    assert len(set(answered)) == 1, result.stdout
    return answered[0]


def _plant(folder):
    """An entry for ping's exact source whose code answers 'planted' instead of 'pong'."""
    source = Path(ansible.modules.ping.__file__).read_bytes()
    name, header = bytecode._entry("ansible/modules/ping.py", source)  # pylint: disable=protected-access
    planted = source.replace(b"data=dict(type='str', default='pong')", b"data=dict(type='str', default='planted')")
    assert planted != source, "ping's source changed: the planted entry needs another edit"
    (folder / name).write_bytes(header + marshal.dumps(compile(planted, "ping.py", "exec")))


def test_ansible_playbook_takes_a_payloads_bytecode_from_the_cache(tmp_path):
    """The venv that scripts/setup.sh makes loads the cache at start-up (its .pth); a first run fills it
    (one entry per module_utils file and the module); an entry planted for ping's source is what runs."""
    pth = subprocess.run([str(VENV_BIN / "python"), "-c", "import zipimport, sys; "
                          "print(getattr(zipimport._compile_source, 'dstack_tee_cached', False))"],
                         capture_output=True, text=True, check=True, env=dict(os.environ, XDG_CACHE_HOME=str(tmp_path)))
    assert pth.stdout.strip() == "True", "the venv's .pth did not install the cache (scripts/setup.sh)"
    cache_home = tmp_path / "cache"
    folder = cache_home / "dstack-tee" / "ansiballz-bytecode"
    assert _ping(tmp_path, cache_home) == "pong"
    entries = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}
    assert len(entries) > 20, sorted(entries)
    assert _ping(tmp_path, cache_home) == "pong"
    assert {path.name: path.stat().st_mtime_ns for path in folder.iterdir()} == entries, "a second run wrote again"

    _plant(folder)
    assert _ping(tmp_path, cache_home) == "planted"
    assert _ping(tmp_path, cache_home, DSTACK_TEE_ANSIBALLZ_BYTECODE="0") == "pong"
    folder.chmod(0o777)
    assert _ping(tmp_path, cache_home) == "pong"
    folder.chmod(0o700)
    assert _ping(tmp_path, cache_home) == "planted"


def test_the_module_itself_imports_nothing_heavy_at_start_up():
    """Every Python of the venv imports it: only modules an interpreter has loaded at start-up anyway."""
    started = subprocess.run([sys.executable, "-c", "import sys; print(' '.join(sys.modules))"],
                             capture_output=True, text=True, check=True).stdout.split()
    result = subprocess.run([sys.executable, "-S", "-c",
                             f"import sys; before = set(sys.modules); sys.path.insert(0, {str(PATH.parent)!r}); "
                             "import dstack_tee_ansiballz_bytecode; print(' '.join(set(sys.modules) - before))"],
                            capture_output=True, text=True, check=True)
    imported = set(result.stdout.split()) - {"dstack_tee_ansiballz_bytecode"}
    assert imported and imported <= set(started), imported - set(started)
