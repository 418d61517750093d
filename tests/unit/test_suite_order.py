"""tests/conftest.py's SLOW_FILES: each names a test file that exists (a renamed file would silently
lose its place at the front of make test's workers' queue)."""

from conftest import ROOT, SLOW_FILES


def test_every_slow_file_exists_once():
    assert len(set(SLOW_FILES)) == len(SLOW_FILES)
    missing = [path for path in SLOW_FILES if not (ROOT / path).is_file()]
    assert not missing, f"tests/conftest.py SLOW_FILES names files that are not there: {missing}"
