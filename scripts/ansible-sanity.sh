#!/usr/bin/env bash
# Copyright: (c) dstack.tee developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
#
# Run `ansible-test sanity` on this collection without Galaxy or any other
# non-registry network access. Only PyPI is used: ansible-test builds one tool
# venv per sanity test (pylint, yamllint, voluptuous, ...) under
# ~/.ansible/test/venv on the first run and reuses them afterwards.
#
# Usage:
#   scripts/ansible-sanity.sh                      # all sanity tests
#   scripts/ansible-sanity.sh --test pep8          # one test; any ansible-test sanity args pass through
#   scripts/ansible-sanity.sh --test pylint --test yamllint
#   scripts/ansible-sanity.sh --list-tests
#
# Environment:
#   ANSIBLE_TEST    path of the ansible-test executable to use
#   VENV_BIN        bin dir of a venv with ansible-core (used when ANSIBLE_TEST is unset)
#                   otherwise ansible-test is taken from PATH, then from <repo>/.venv/bin
#   SANITY_PYTHON   Python version for --python (default 3.11)
#   SANITY_KEEP=1   keep the temporary collection copy (path is printed), e.g. for tests/output
#   TMPDIR          where the temporary copy is made (default /tmp)
#
# Exit status: that of ansible-test (0 = all sanity tests passed), 2 on setup errors.
set -euo pipefail

REPO_ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
SANITY_PYTHON=${SANITY_PYTHON:-3.11}

log() { printf '==> %s\n' "$*"; }
die() { printf 'ansible-sanity: error: %s\n' "$*" >&2; exit 2; }

[[ -f "$REPO_ROOT/galaxy.yml" ]] || die "no galaxy.yml in $REPO_ROOT"
namespace=$(sed -n 's/^namespace:[[:space:]]*\([A-Za-z0-9_]*\).*/\1/p' "$REPO_ROOT/galaxy.yml")
name=$(sed -n 's/^name:[[:space:]]*\([A-Za-z0-9_]*\).*/\1/p' "$REPO_ROOT/galaxy.yml")
namespace=${namespace:-dstack}
name=${name:-tee}

# --- 1: locate ansible-test ----------------------------------------------------
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
    die "ansible-test not found: run scripts/setup.sh and activate .venv, put its bin dir on PATH, or set ANSIBLE_TEST / VENV_BIN"
fi
[[ -x "$ansible_test" ]] || die "not executable: $ansible_test"
# Helper tools (ansible-doc, python, ...) must come from the same venv.
PATH="$(cd -- "$(dirname -- "$ansible_test")" && pwd -P):$PATH"
export PATH
log "    $ansible_test ($("$ansible_test" --version 2>/dev/null || echo 'version unknown'))"

# --- 2: offline stand-in for get-pip.py ------------------------------------------
# Every sanity tool venv is made with `venv --without-pip` and bootstrapped by
# running ~/.ansible/test/cache/get_pip_<pip version, dots as _>.py, which
# ansible-test otherwise downloads from ci-files.testing.ansible.com (see
# ansible_test/_util/target/setup/requirements.py). The pip version is read from
# ansible_test/_internal/python_requirements.py (24.2 in ansible-core 2.19).
read -r shebang <"$ansible_test" || true
read -r -a interp <<<"${shebang#\#!}"
pip_version=$("${interp[@]:-python3}" - 2>/dev/null <<'EOF' || true
import os, re, ansible_test
src = os.path.join(os.path.dirname(ansible_test.__file__), '_internal', 'python_requirements.py')
m = re.search(r"default_packages\s*=\s*dict\(\s*pip='([^']+)'", open(src).read())
print(m.group(1) if m else '')
EOF
)
pip_version=${pip_version:-24.2}
get_pip=$HOME/.ansible/test/cache/get_pip_${pip_version//./_}.py
log "[2/4] offline get-pip stand-in: $get_pip"
stand_in=$(cat <<'EOF'
"""Offline stand-in for get-pip.py, written by dstack.tee scripts/ansible-sanity.sh.

ansible-test runs this inside a fresh `venv --without-pip` with pip install
arguments such as `--disable-pip-version-check pip==24.2 --no-setuptools --no-wheel`.
Instead of the real (downloaded) get-pip.py, bootstrap the pip bundled with the
stdlib (ensurepip), then let it install the requested packages from the index.
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
if [[ -f "$get_pip" && "$(cat -- "$get_pip")" == "$stand_in" ]]; then
    log "    up to date"
else
    mkdir -p -- "$(dirname -- "$get_pip")"
    printf '%s\n' "$stand_in" >"$get_pip.tmp.$$"
    mv -f -- "$get_pip.tmp.$$" "$get_pip"
    log "    written"
fi

# --- 3: copy the collection to <tmp>/ansible_collections/<ns>/<name> -------------
# ansible-test needs the content at a path ending in ansible_collections/<ns>/<name>
# and resolves symlinks, so copy the files git knows about (tracked plus
# untracked-but-not-ignored). Local venvs, caches and test output are dropped even
# when .gitignore misses them: ansible-test would lint every .py file in them.
work=$(mktemp -d "${TMPDIR:-/tmp}/${namespace}-${name}-sanity.XXXXXX")
# shellcheck disable=SC2317  # invoked via trap
cleanup() {
    if [[ "${SANITY_KEEP:-0}" == 1 ]]; then
        log "kept collection copy: $work/ansible_collections/$namespace/$name"
    else
        rm -rf -- "$work"
    fi
}
trap cleanup EXIT
dest=$work/ansible_collections/$namespace/$name
mkdir -p -- "$dest"
log "[3/4] copying collection files to $dest"
exclude_re='^(\.venv|venv|\.tox|\.nox|\.git|tests/output)/|(^|/)(__pycache__|\.pytest_cache|\.mypy_cache|\.ruff_cache|\.hypothesis|[^/]*\.egg-info)/|\.py[co]$|^[^/]*\.tar\.gz$'
(
    cd -- "$REPO_ROOT"
    git ls-files -z -co --exclude-standard \
        | { grep -zvE -- "$exclude_re" || true; } \
        | while IFS= read -r -d '' f; do
            # -c also lists tracked files deleted from the worktree; skip those
            if [[ -e "$f" || -L "$f" ]]; then printf '%s\0' "$f"; fi
        done \
        | tar --null --no-recursion -T - -cf -
) | tar -xf - -C "$dest"
log "    $(find "$dest" -type f | wc -l) files"

# --- 4: ansible-test sanity -----------------------------------------------------
# No --venv: it would rebuild a delegation venv inside the throw-away copy on every
# run. No --requirements: it would pip-install into the venv running ansible-test.
# Without either, ansible-test uses the current interpreter as controller and its
# own cached per-test venvs, so a second run takes seconds.
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
