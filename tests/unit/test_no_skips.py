"""make test fails when a test is skipped (issue 15 point 7): scripts/run-tests.sh runs pytest with
DSTACK_TESTS_NO_SKIPS=1, and tests/conftest.py then turns a run with a skip into a failure naming it.
Checked on a real pytest run of a test file that skips, with this suite's conftest as its plugin."""

import os
import re
import subprocess
import sys

from conftest import ROOT

SKIPPING = """import pytest


def test_needs_a_tool():
    pytest.skip("the tool is not installed")


def test_runs():
    assert True
"""


def _pytest(folder, no_skips):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"), DSTACK_TESTS_NO_SKIPS=no_skips)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                           "--rootdir", str(folder), str(folder / "test_skipping.py")],
                          capture_output=True, text=True, env=env, cwd=folder, timeout=120, check=False)


def test_a_skip_fails_the_run_naming_the_test_only_under_make_test(tmp_path):
    (tmp_path / "test_skipping.py").write_text(SKIPPING)
    strict = _pytest(tmp_path, "1")
    assert strict.returncode == 1, strict.stdout
    assert "skipped, which make test does not allow: test_skipping.py::test_needs_a_tool: " \
           "Skipped: the tool is not installed" in strict.stdout, strict.stdout
    relaxed = _pytest(tmp_path, "")
    assert relaxed.returncode == 0 and "1 passed, 1 skipped" in relaxed.stdout, relaxed.stdout


def test_make_test_runs_pytest_with_no_skips():
    script = (ROOT / "scripts" / "run-tests.sh").read_text(encoding="utf-8")
    assert re.search(r"^DSTACK_TESTS_NO_SKIPS=1 \"\$ROOT/\.venv/bin/python\" -m pytest ", script, re.M)
    assert re.search(r"^test: .*\n\tscripts/run-tests\.sh$", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M)
