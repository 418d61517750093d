#!/usr/bin/env bash
# The whole test suite, as `make test` runs it after scripts/setup.sh --test:
#   1. ansible-test sanity on the collection (scripts/ansible-sanity.sh),
#   2. pytest (unit, integration with real processes, the demo playbook end to end).
# pytest runs last so that its summary is the closing line. Exits non-zero if any part failed.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
export PATH="$ROOT/.venv/bin:$PATH"
failed=()

printf '\033[1m==> ansible-test sanity\033[0m\n'
scripts/ansible-sanity.sh || failed+=("ansible-test sanity")

printf '\033[1m==> pytest\033[0m\n'
"$ROOT/.venv/bin/python" -m pytest "$@"
rc=$?
# Exit code 5 means pytest collected nothing: that is a broken suite, not a pass.
((rc == 0)) || failed+=("pytest (exit $rc)")

if ((${#failed[@]})); then
  printf 'make test: FAILED: %s\n' "${failed[*]}" >&2
  exit 1
fi
