#!/usr/bin/env bash
# The whole test suite, as `make test` runs it after scripts/setup.sh --test:
#   1. ansible-test sanity on the collection (scripts/ansible-sanity.sh),
#   2. Molecule: every scenario in molecule/ (one per role: converge, idempotence, verify, cleanup),
#   3. pytest (unit, integration with real processes, the demo playbook end to end).
# pytest runs last so that its summary is the closing line. Exits non-zero if any part failed.
# The guest image's tests (its builds: debootstrap, apt, mksquashfs; its VM boot under TCG) share
# nothing with the others but libvirtd, and take minutes of one core: with no arguments they run
# beside everything else (their own pytest, its output printed after the main one's), so the
# suite's wall time stays within its budget on two cores.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
export PATH="$ROOT/.venv/bin:$PATH"
failed=()

# The main pytest of a whole run spreads over TEST_WORKERS processes (pytest-xdist; default 3 on
# this project's two-core CI), one test file per worker at a time: most tests wait on real services
# (with two workers the two cores idled 18% of the main pytest, measured with vmstat; a third uses
# that), and each test names its own ports, namespaces, interfaces and folders (free ports, the
# worker's pid, temporary folders), so two files never meet. The files that take minutes go first
# (tests/conftest.py SLOW_FILES), so that the run does not end with one of them alone. With
# arguments (one test, -x, --pdb, -s) pytest runs as one process, unless they add -n themselves.
workers=()
test_workers="${TEST_WORKERS:-3}"
if (($# > 0)); then
  :
elif ! [[ "$test_workers" =~ ^[1-9][0-9]*$ ]]; then
  echo "TEST_WORKERS must be a number of pytest processes (1 or more), not '${TEST_WORKERS}'" >&2
  exit 2
elif ((test_workers > 1)); then
  workers=(-n "$test_workers" --dist loadfile --no-loadscope-reorder)
fi

BESIDE=(tests/integration/test_guest_image.py tests/integration/test_guest_vm_boot.py
        tests/integration/test_libvirt_deploy.py)
beside_pid=""
if (($# == 0)); then
  beside_log="$(mktemp /tmp/dstack-tests-beside.XXXXXX)"
  printf '\033[1m==> pytest %s, beside the rest (its output at the end)\033[0m\n' "${BESIDE[*]}"
  DSTACK_TESTS_NO_SKIPS=1 "$ROOT/.venv/bin/python" -m pytest -p no:cacheprovider --durations=5 "${BESIDE[@]}" \
    >"$beside_log" 2>&1 &
  beside_pid=$!
fi

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

ignore=()
[[ -z "$beside_pid" ]] || for path in "${BESIDE[@]}"; do ignore+=("--ignore=$path"); done

printf '\033[1m==> pytest %s\033[0m\n' "${workers[*]}"
# A skipped test fails the run (tests/conftest.py): setup.sh --test installs all they need.
# --durations: the slowest tests in the log, where to look when the suite nears its time budget.
DSTACK_TESTS_NO_SKIPS=1 "$ROOT/.venv/bin/python" -m pytest --durations=30 "${workers[@]}" "${ignore[@]}" "$@"
rc=$?
# Exit code 5 means pytest collected nothing: that is a broken suite, not a pass.
((rc == 0)) || failed+=("pytest (exit $rc)")

if [[ -n "$beside_pid" ]]; then
  wait "$beside_pid"
  beside_rc=$?
  printf '\033[1m==> pytest %s (run beside the rest)\033[0m\n' "${BESIDE[*]}"
  cat "$beside_log"
  rm -f "$beside_log"
  ((beside_rc == 0)) || failed+=("pytest ${BESIDE[*]} (exit $beside_rc)")
fi

if ((${#failed[@]})); then
  printf 'make test: FAILED: %s\n' "${failed[*]}" >&2
  exit 1
fi
