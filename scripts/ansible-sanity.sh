#!/usr/bin/env bash
# Copyright: (c) dstack.tee developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
#
# Run `ansible-test sanity` on this collection without Galaxy or any other
# non-registry network access (only PyPI is used, to build ansible-test's
# per-test tool venvs under ~/.ansible/test/venv, which are cached across runs).
#
# Usage:
#   scripts/ansible-sanity.sh                  # all sanity tests
#   scripts/ansible-sanity.sh --test pep8      # one test (any ansible-test sanity args pass through)
#   scripts/ansible-sanity.sh --list-tests
#
# Environment:
#   ANSIBLE_TEST     path to the ansible-test executable to use
#   VENV_BIN         bin dir of a venv holding ansible-core (used if ANSIBLE_TEST is unset)
#   (otherwise ansible-test is taken from PATH, then from <repo>/.venv/bin)
#   SANITY_PYTHON    Python version passed to --python (default 3.11)
#   SANITY_KEEP=1    keep the temporary collection copy (its path is printed)
#   TMPDIR           where the temporary copy is made (default /tmp)
set -euo pipefail

REPO_ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
SANITY_PYTHON=${SANITY_PYTHON:-3.11}
NAMESPACE=dstack
NAME=tee

log() { printf '==> %s\n' "$*"; }
die() { printf 'ansible-sanity: error: %s\n' "$*" >&2; exit 2; }

# --- phase 1: locate ansible-test ------------------------------------------
log "[1/4] locating ansible-test"
if [[ -n "${ANSIBLE_TEST:-}" ]]; then
    ansible_test=$ANSIBLE_TEST
elif [[ -n "${VENV_BIN:-}" ]]; then
    ansible_test=$VENV_BIN/ansible-test
elif command -v ansible-test >/dev/null 2>&1; then
    ansible_test=$(command -v ansible-test)
elif [[ -x "$REPO_ROOT/.venv/bin/ansible-test" ]]; then
    ansible_test=$REPO_ROOT/.venv/bin/ansible-test
else
    die "ansible-test not found: activate the project venv (scripts/setup.sh), put its bin dir on PATH, or set ANSIBLE_TEST / VENV_BIN"
fi
[[ -x "$ansible_test" ]] || die "not executable: $ansible_test"
# Make sure helper tools (ansible, ansible-doc, python) come from the same venv.
PATH="$(cd -- "$(dirname -- "$ansible_test")" && pwd -P):$PATH"
export PATH
log "    using $ansible_test ($("$ansible_test" --version 2>/dev/null || echo 'unknown version'))"

# --- phase 2: offline stand-in for get-pip.py -----------------------------
# ansible-test bootstraps pip into each sanity venv with a get-pip.py it
# downloads from ci-files.testing.ansible.com (not reachable here). It looks
# for ~/.ansible/test/cache/get_pip_<pip version with dots as _>.py first.
read -r shebang <"$ansible_test" || true
read -r -a interp <<<"${shebang#\#!}"
pip_version=$("${interp[@]:-python3}" - <<'EOF' 2>/dev/null || true
import os, re, ansible_test
src = os.path.join(os.path.dirname(ansible_test.__file__), '_internal', 'python_requirements.py')
m = re.search(r"default_packages\s*=\s*dict\(\s*pip='([^']+)'", open(src).read())
print(m.group(1) if m else '')
EOF
)
pip_version=${pip_version:-24.2}
get_pip=${HOME}/.ansible/test/cache/get_pip_${pip_version//./_}.py
log "[2/4] ensuring offline get-pip stand-in: $get_pip"
stand_in=$(cat <<'EOF'
"""Offline stand-in for get-pip.py, written by dstack.tee scripts/ansible-sanity.sh.

ansible-test runs this inside a fresh `venv --without-pip` with pip install
arguments (e.g. `--disable-pip-version-check pip==24.2 --no-setuptools --no-wheel`).
Instead of the real (downloaded) get-pip.py we use the stdlib's bundled pip
via ensurepip, then let that pip install the requested packages from PyPI.
"""
import subprocess
import sys

DROPPED = ('--no-setuptools', '--no-wheel')


def main():
    args = [arg for arg in sys.argv[1:] if arg not in DROPPED]
    rc = subprocess.call([sys.executable, '-m', 'ensurepip'], stdout=subprocess.DEVNULL)
    if rc:
        sys.exit(rc)
    sys.exit(subprocess.call([sys.executable, '-m', 'pip', 'install'] + args))


if __name__ == '__main__':
    main()
EOF
)
if [[ ! -f "$get_pip" ]] || [[ "$(cat -- "$get_pip")" != "$stand_in" ]]; then
    mkdir -p -- "$(dirname -- "$get_pip")"
    printf '%s\n' "$stand_in" >"$get_pip.tmp.$$"
    mv -f -- "$get_pip.tmp.$$" "$get_pip"
    log "    (re)written"
else
    log "    up to date"
fi

# --- phase 3: copy the collection to .../ansible_collections/dstack/tee ----
# ansible-test requires the content to live at a path ending in
# ansible_collections/<ns>/<name> and resolves symlinks, so we copy:
# tracked + untracked-but-not-ignored files, minus local venvs/caches/output.
work=$(mktemp -d "${TMPDIR:-/tmp}/${NAMESPACE}-${NAME}-sanity.XXXXXX")
cleanup() {
    if [[ "${SANITY_KEEP:-0}" == 1 ]]; then
        log "kept collection copy: $work/ansible_collections/$NAMESPACE/$NAME"
    else
        rm -rf -- "$work"
    fi
}
trap cleanup EXIT
dest=$work/ansible_collections/$NAMESPACE/$NAME
mkdir -p -- "$dest"
log "[3/4] copying collection (git ls-files -co --exclude-standard) to $dest"
exclude_re='^(\.venv|venv|\.tox|\.nox|\.git|tests/output)/|(^|/)(__pycache__|\.pytest_cache|\.mypy_cache|\.ruff_cache|\.hypothesis|[^/]*\.egg-info)/|\.py[co]$|^[^/]*\.tar\.gz$'
(
    cd -- "$REPO_ROOT"
    git ls-files -z -co --exclude-standard \
        | { grep -zvE -- "$exclude_re" || true; } \
        | while IFS= read -r -d '' f; do
            # tracked-but-deleted files are listed by -c; skip them
            if [[ -e "$f" || -L "$f" ]]; then printf '%s\0' "$f"; fi
        done \
        | tar --null --no-recursion -T - -cf -
) | tar -xf - -C "$dest"
log "    $(find "$dest" -type f | wc -l) files"

# --- phase 4: run the sanity tests -------------------------------------------
# No --venv: it would build a delegation venv under tests/output of the
# throw-away copy on every run. No --requirements: that would pip-install into
# the venv running ansible-test. The per-test tool venvs (pylint, yamllint,
# voluptuous, ...) are created by ansible-test itself in ~/.ansible/test/venv
# and reused on later runs.
log "[4/4] ansible-test sanity --python $SANITY_PYTHON $*"
cd -- "$dest"
rc=0
"$ansible_test" sanity --python "$SANITY_PYTHON" "$@" || rc=$?
if [[ $rc -eq 0 ]]; then
    log "sanity: PASSED"
else
    log "sanity: FAILED (exit $rc)"
fi
exit "$rc"
