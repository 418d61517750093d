#!/usr/bin/env bash
# make stop: stop what make demo started under ROOT, and return once all of it is down: the CVMs'
# supervisord first (each guest agent takes its containers down as it stops), then the services'
# (the KMS, Pebble and BIND9, the gateway and the VMM). Each supervisord gets SIGTERM, stops its programs and exits;
# this waits for it and for every process under it, then for the CVMs' containers (a guest agent
# killed before its containers were down leaves them: they are removed).
# Whatever still runs after STOP_TIMEOUT seconds is named, the stop goes on in the background
# (log: ROOT/stop.log) holding ROOT/stop.lock until all is down, and this exits 1.
# `--wait` (make demo, before it starts anything) waits for that lock, at most STOP_WAIT_TIMEOUT s.
#
# Usage: scripts/stop-demo.sh [--wait] [ROOT]     (ROOT: default .demo in the repository)
# Environment: STOP_TIMEOUT (default 90), STOP_WAIT_TIMEOUT (default 600)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mode="stop"
case "${1:-}" in
  --wait) mode="wait"; shift ;;
  --finish) mode="finish"; shift ;;  # the background part of a stop (inherits the lock on fd 9)
esac
root="$(realpath -ms "${1:-$REPO/.demo}")"
STOP_TIMEOUT="${STOP_TIMEOUT:-90}"
STOP_WAIT_TIMEOUT="${STOP_WAIT_TIMEOUT:-600}"

say() { printf '%s\n' "$*"; }

[[ -d "$root" ]] || { [[ $mode == wait ]] || say "make stop: nothing to stop ($root does not exist)"; exit 0; }

if [[ $mode == wait ]]; then
  [[ -e "$root/stop.lock" ]] || exit 0  # no stop ever ran here
  exec 9>>"$root/stop.lock"
  if ! flock -n 9; then
    say "make demo: waiting for the previous make stop to finish (at most ${STOP_WAIT_TIMEOUT} s; log: $root/stop.log)"
    flock -w "$STOP_WAIT_TIMEOUT" 9 || {
      say "make demo: error: the previous make stop is still stopping after ${STOP_WAIT_TIMEOUT} s (see $root/stop.log)" >&2
      exit 1
    }
  fi
  exit 0
fi
if [[ $mode == stop ]]; then
  exec 9>>"$root/stop.lock"
  flock -n 9 || { say "make stop: another make stop is under way; waiting for it"; flock 9; }
fi

# A process as "pid:start time" (field 22 of /proc/PID/stat), so that a reused pid is not waited for.
ident() {
  local stat rest
  local -a fields
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  rest="${stat##*) }"
  read -r -a fields <<<"$rest"
  printf '%s:%s\n' "$1" "${fields[19]}"
}
alive() {
  local pid="${1%%:*}"
  [[ "$(ident "$pid" 2>/dev/null)" == "$1" ]]
}
# The supervisord running FOLDER/supervisord.conf (its pid file, checked against its command line).
supervisord_pid() {
  local pid
  pid="$(cat "$1/supervisord.pid" 2>/dev/null)" || return 0
  [[ "$pid" =~ ^[0-9]+$ ]] || return 0
  tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qxF "$1/supervisord.conf" && printf '%s\n' "$pid"
  return 0
}
# PID and every process under it, as idents.
tree() {
  local -a queue=("$1") children
  local table pid
  table="$(ps -e -o pid=,ppid=)"
  while ((${#queue[@]})); do
    pid="${queue[0]}"
    queue=("${queue[@]:1}")
    ident "$pid" || true
    mapfile -t children < <(awk -v p="$pid" '$2 == p {print $1}' <<<"$table")
    queue+=("${children[@]}")
  done
}
# The containers of this root's CVMs: "id name" lines (the compose project's folder is run/<CVM id>/work).
containers() {
  local ids
  ids="$(find "$root/run" -mindepth 1 -maxdepth 1 -type d ! -name supervisor -printf '%f\n' 2>/dev/null)"
  [[ -n "$ids" ]] && command -v podman >/dev/null || return 0
  podman ps -a --format '{{.ID}} {{.Names}} {{index .Labels "com.docker.compose.project.working_dir"}}' 2>/dev/null \
    | while read -r id name dir; do
        [[ -n "$dir" ]] && grep -qxF "$(basename "$(dirname "$dir")")" <<<"$ids" && [[ "$dir" == */run/*/work ]] \
          && printf '%s %s\n' "$id" "$name"
      done
  return 0
}
running() {  # the idents among the arguments still alive
  local p
  for p in "$@"; do alive "$p" && printf '%s\n' "$p"; done
  return 0
}
describe() {  # "pid (command line)" for each ident
  local p
  for p in "$@"; do
    printf '  pid %s (%s)\n' "${p%%:*}" "$(tr '\0' ' ' <"/proc/${p%%:*}/cmdline" 2>/dev/null | cut -c1-160)"
  done
}

# Stop each supervisord in turn and wait for its processes, until DEADLINE (in $SECONDS).
# Leaves the processes and containers still there in $left; returns 1 when anything is left.
stop_all() {
  local deadline="$1" folder pid
  local -a procs rest
  left=""
  for folder in "$root/run/supervisor" "$root/services"; do
    pid="$(supervisord_pid "$folder")"
    [[ -n "$pid" ]] || continue
    mapfile -t procs < <(tree "$pid")
    kill -TERM "$pid" 2>/dev/null || true
    while mapfile -t rest < <(running "${procs[@]}") && ((${#rest[@]})) && ((SECONDS < deadline)); do
      sleep 0.2
    done
    if ((${#rest[@]})); then
      left="$(describe "${rest[@]}")"
      return 1
    fi
    stopped=$((stopped + ${#procs[@]}))
    if [[ $folder == "$root/run/supervisor" ]]; then
      local stale
      stale="$(containers)"
      if [[ -n "$stale" ]]; then
        # A guest agent killed before its containers were down: remove them.
        say "make stop: removing containers the CVMs left: $(cut -d' ' -f2 <<<"$stale" | tr '\n' ' ')"
        cut -d' ' -f1 <<<"$stale" | xargs podman rm -f -t 5 >/dev/null 2>&1 || true
        stale="$(containers)"
        if [[ -n "$stale" ]]; then
          left="  containers: $(cut -d' ' -f2 <<<"$stale" | tr '\n' ' ')"
          return 1
        fi
      fi
    fi
  done
  return 0
}

stopped=0
if [[ $mode == finish ]]; then
  if stop_all $((SECONDS + STOP_WAIT_TIMEOUT)); then
    say "$(date -Is) make stop: finished in the background: everything under $root is down"
  else
    say "$(date -Is) make stop: still running after $STOP_WAIT_TIMEOUT more seconds:"
    say "$left"
  fi
  exit 0
fi

if stop_all $((SECONDS + STOP_TIMEOUT)); then
  if ((stopped)); then
    say "make stop: everything under $root is down ($stopped processes stopped)"
  else
    say "make stop: nothing of $root was running"
  fi
  exit 0
fi
say "make stop: still stopping after ${STOP_TIMEOUT} s:"
say "$left"
say "make stop: the stop goes on in the background (log: $root/stop.log); make demo waits for it"
# The background part inherits fd 9, so it holds the lock (make demo's --wait) until it is done.
setsid "$0" --finish "$root" </dev/null >>"$root/stop.log" 2>&1 &
exit 1
