#!/usr/bin/env bash
# The whole test suite, as `make test` runs it after scripts/setup.sh --test:
#   1. ansible-test sanity on the collection (scripts/ansible-sanity.sh),
#   2. Molecule: every scenario in molecule/ (one per role: converge, idempotence, verify, cleanup),
#   3. pytest (unit, integration with real processes, the demo playbook end to end).
# pytest runs last so that its summary is the closing line. Exits non-zero if any part failed.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
export PATH="$ROOT/.venv/bin:$PATH"
failed=()

printf '\033[1m==> ansible-test sanity\033[0m\n'
scripts/ansible-sanity.sh || failed+=("ansible-test sanity")

# Molecule: each scenario on its own (its own temporary root under /tmp and free ports), so that one
# failing does not hide the others; `molecule test` cleans up after a failure too. (Molecule prints
# "CRITICAL 'molecule/default/molecule.yml' glob failed" while looking for a shared default
# scenario: there is none, and that is fine.) Timings are printed per scenario.
printf '\033[1m==> molecule\033[0m\n'
shopt -s nullglob
if [[ ! -x "$ROOT/.venv/bin/molecule" ]]; then
  echo "molecule: not installed in $ROOT/.venv (scripts/setup.sh --test installs it)" >&2
  failed+=("molecule (not installed)")
else
  timings=()
  for config in molecule/*/molecule.yml; do
    scenario="$(basename "$(dirname "$config")")"
    printf '\033[1m--> molecule test -s %s\033[0m\n' "$scenario"
    started=$SECONDS
    if molecule test -s "$scenario" --no-command-borders; then
      timings+=("$scenario passed in $((SECONDS - started)) s")
    else
      timings+=("$scenario FAILED after $((SECONDS - started)) s")
      failed+=("molecule $scenario")
    fi
  done
  ((${#timings[@]})) || failed+=("molecule (no scenario in molecule/)")
  printf 'molecule: %s\n' "${timings[@]}"
fi

printf '\033[1m==> pytest\033[0m\n'
# A skipped test fails the run (tests/conftest.py): setup.sh --test installs all they need.
# --durations: the slowest tests in the log, where to look when the suite nears its time budget.
DSTACK_TESTS_NO_SKIPS=1 "$ROOT/.venv/bin/python" -m pytest --durations=30 "$@"
rc=$?
# Exit code 5 means pytest collected nothing: that is a broken suite, not a pass.
((rc == 0)) || failed+=("pytest (exit $rc)")

if ((${#failed[@]})); then
  printf 'make test: FAILED: %s\n' "${failed[*]}" >&2
  exit 1
fi
