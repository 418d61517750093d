#!/usr/bin/env bash
# Sets up everything `make demo` and `make test` need, and is quick when it is all there already:
#   1. Debian packages (apt-get, only the missing ones),
#   2. the project venv .venv/ with the Python dependencies (pip, only when pyproject.toml changed),
#   3. the collection link .venv/collections/ansible_collections/dstack/tee -> this checkout, on the
#      venv's path with the bytecode cache of Ansible's module payloads, and the collection compiled.
# Usage: scripts/setup.sh [--test | --fleet]   (--test also installs what the test suite needs,
#        --fleet what `make fleet-demo` needs besides make demo's: openssh-server for the hosts' sshd)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
WITH_TEST=0 WITH_FLEET=0
[[ "${1:-}" == "--test" ]] && WITH_TEST=1 WITH_FLEET=1
[[ "${1:-}" == "--fleet" ]] && WITH_FLEET=1

step() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

# ---- 1. Debian packages -------------------------------------------------------------------
APT_PACKAGES=(git make gcc python3 python3-venv python3-dev libffi-dev)
# Later issues add here: podman runc pebble wireguard-go ... (one list, one install step).
# The simulated CVM's container runner (machine-recipes.md: podman with runc; images made
# locally from busybox-static), also what `make demo` will run apps with. podman-compose comes
# from PyPI into the venv (pyproject.toml: 1.6+; Debian's 1.0 sleeps 1 s after each container).
APT_PACKAGES+=(podman runc busybox-static)
# The gateway's WireGuard hub and the CVMs' tunnels: no kernel module here, so wireguard-go (a
# userspace interface; wg-quick falls back to it) and wg; ip netns for each CVM's namespace;
# iptables for the rules inside it (the Worker port off eth0, the WireGuard port to the gateways).
APT_PACKAGES+=(wireguard-go wireguard-tools iproute2 iptables)
# What only the tests need: ansible-test sanity's shellcheck; the VMM web UI's test in a real
# headless Chromium (Debian's chromium and chromedriver, driven by Selenium).
((WITH_TEST)) && APT_PACKAGES+=(shellcheck chromium chromium-driver)
# The gateway benchmark's references: HAProxy on the same routes, wrk as the load tool.
((WITH_TEST)) && APT_PACKAGES+=(haproxy wrk)
# The gateway cluster's tests: a real three-member etcd on loopback ports (etcd 3.4, etcdctl).
((WITH_TEST)) && APT_PACKAGES+=(etcd-server etcd-client)
# make demo's certificates (roles/acme_lab) and the gateway's ACME tests: Pebble (the Let's Encrypt
# test server) validating DNS-01 against a real BIND9 taking RFC 2136 updates (named, nsupdate, dig,
# named-journalprint).
APT_PACKAGES+=(pebble bind9 bind9-dnsutils)
# The simulated fleet (scripts/sim-fleet.sh): each host's own sshd, reached by ssh with its key.
((WITH_FLEET)) && APT_PACKAGES+=(openssh-server openssh-client)
# node and npm for the contracts' compiler: Debian's, unless a node with npm is there already
# (machines that ship their own Node.js have no Debian npm package, and must not get one).
((WITH_TEST)) && ! command -v npm >/dev/null 2>&1 && APT_PACKAGES+=(nodejs npm)
# The libvirt backend's tests: libvirt-python's build (libvirt-dev, pkg-config), libvirtd with
# QEMU/KVM for qemu:///system (the tests start the daemon), qemu-img, and xmllint for the schema checks.
((WITH_TEST)) && APT_PACKAGES+=(libvirt-dev pkg-config libvirt-daemon-system libvirt-daemon-driver-qemu
                                libvirt-clients qemu-system-x86 qemu-utils libxml2-utils)
# The guest image's build (scripts/build-guest-image.sh, tests/integration/test_guest_image.py).
((WITH_TEST)) && APT_PACKAGES+=(debootstrap squashfs-tools cryptsetup-bin)

missing=()
if command -v dpkg-query >/dev/null 2>&1; then
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
fi
if ((${#missing[@]})); then
  step "installing Debian packages: ${missing[*]}"
  SUDO=""
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || die "need root (or sudo) to apt-get install: ${missing[*]}"
    SUDO="sudo"
  fi
  export DEBIAN_FRONTEND=noninteractive
  # Another apt (unattended-upgrades on a fresh machine, a second setup) holds dpkg's lock for a
  # while: wait for it up to 10 minutes rather than fail at once.
  APT_WAIT=(-o DPkg::Lock::Timeout=600)
  $SUDO apt-get "${APT_WAIT[@]}" update -qq || die "apt-get update failed (is a Debian mirror reachable?)"
  $SUDO apt-get "${APT_WAIT[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
else
  step "Debian packages: all present"
fi

# ---- 2. the venv ----------------------------------------------------------------------------
# Prefer the first python3 on PATH that is 3.11 or newer (pyenv's on the project machines,
# Debian's /usr/bin/python3 on a fresh Debian 12).
PY=""
for cand in "${PYTHON:-}" python3 /usr/bin/python3 python3.12 python3.11; do
  [[ -n "$cand" ]] || continue
  if command -v "$cand" >/dev/null 2>&1 \
     && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    PY="$cand"; break
  fi
done
[[ -n "$PY" ]] || die "no Python 3.11 or newer found (set PYTHON=/path/to/python3.11)"

if [[ ! -x "$VENV/bin/python" ]]; then
  step "creating the venv .venv/ with $("$PY" --version)"
  "$PY" -m venv "$VENV" || die "python -m venv failed (Debian needs python3-venv)"
fi

extras=""
((WITH_TEST)) && extras="[test]"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh" | sha256sum | cut -c1-16)$extras"
stamp="$VENV/.dstack-setup-stamp"
have="$(cat "$stamp" 2>/dev/null || true)"
# A stamp made with [test] also satisfies a plain setup.
if [[ "$have" != "$want" && "$have" != "${want}[test]" ]]; then
  step "installing Python packages into .venv/ (pip, about 30 s the first time)"
  log="$VENV/pip-install.log"
  if ! { "$VENV/bin/python" -m pip install --upgrade pip \
         && "$VENV/bin/python" -m pip install -e "$ROOT$extras"; } >"$log" 2>&1; then
    tail -n 25 "$log" >&2
    die "pip install -e .$extras failed (is PyPI reachable? full log: $log)"
  fi
  echo "$want" > "$stamp"
else
  step "Python packages: up to date"
fi

# ---- 3. the collection, importable and findable by Ansible ------------------------------------
COLL="$VENV/collections/ansible_collections/dstack"
mkdir -p "$COLL"
if [[ "$(readlink "$COLL/tee" 2>/dev/null)" != "$ROOT" ]]; then
  ln -sfn "$ROOT" "$COLL/tee"
fi
site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# The collection on the venv's path, and the bytecode cache of Ansible's module payloads loaded at
# each start (roles/runtime/files/python/dstack_tee_ansiballz_bytecode.py; the runtime role writes
# the same lines on a fleet's hosts).
printf '%s\n' "$VENV/collections" "$COLL/tee/roles/runtime/files/python" "import dstack_tee_ansiballz_bytecode" \
  > "$site/dstack_tee_collection.pth"
"$VENV/bin/python" -c 'import ansible_collections.dstack.tee.plugins.module_utils' \
  || die "the collection is not importable from .venv (see above)"
# The collection's bytecode, written now: where PYTHONDONTWRITEBYTECODE is set (as in the sessions
# on this project's machines) Python would otherwise compile the agents' and the plugins' sources at
# each start.
"$VENV/bin/python" -m compileall -q -j 0 "$ROOT/agents" "$ROOT/plugins" "$ROOT/roles/runtime/files/python" >/dev/null \
  || die "python -m compileall failed on the collection (see above)"
# ---- 4. the contracts' toolchain (tests only): solc, OpenZeppelin, ganache from the lock file ---
if ((WITH_TEST)) && [[ -f "$ROOT/contracts/package-lock.json" ]]; then
  lock="$(sha256sum "$ROOT/contracts/package-lock.json" | cut -c1-16)"
  if [[ "$(cat "$ROOT/contracts/node_modules/.dstack-stamp" 2>/dev/null)" != "$lock" ]]; then
    step "installing the contracts' npm packages (solc, OpenZeppelin, ganache)"
    (cd "$ROOT/contracts" && npm ci --no-audit --no-fund --loglevel=error >/dev/null) \
      || die "npm ci in contracts/ failed (is the npm registry reachable?)"
    echo "$lock" > "$ROOT/contracts/node_modules/.dstack-stamp"
  fi
fi
step "ready: .venv/ (activate with: . .venv/bin/activate)"
