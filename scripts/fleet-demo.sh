#!/usr/bin/env bash
# make fleet-demo: the main job on a simulated fleet instead of one machine. scripts/sim-fleet.sh
# makes HOSTS hosts (network namespaces with their own sshd and private state folders, and their
# own podman store each), site.yml brings up the KMS and the gateway on host1 and a VMM on each
# other host, over SSH from the inventory; deploy-app.yml deploys examples/hello with REPLICAS
# instances on as many VMM hosts (the sample image shipped to each), each checked through the
# gateway; the app's URL and a curl line that reaches it are printed.
# Usage (as root): scripts/fleet-demo.sh [HOSTS]   (default 3; REPLICAS default 2, at most HOSTS-1)
# make fleet-down (scripts/sim-fleet.sh down) removes the fleet and everything on it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FLEET="$ROOT/.fleet"
HOSTS="${1:-3}"
step() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'fleet-demo: error: %s\n' "$*" >&2; exit 1; }

if ! [[ "$HOSTS" =~ ^[0-9]+$ ]] || ((HOSTS < 2)); then
  die "HOSTS must be a number of hosts, 2 or more (got '$HOSTS')"
fi
REPLICAS="${REPLICAS:-$((HOSTS - 1 < 2 ? HOSTS - 1 : 2))}"
if ! [[ "$REPLICAS" =~ ^[0-9]+$ ]] || ((REPLICAS < 1 || REPLICAS >= HOSTS)); then
  die "REPLICAS must be 1 to $((HOSTS - 1)), the number of VMM hosts (got '$REPLICAS')"
fi
(($(id -u) == 0)) || die "needs root (network namespaces, mounts): sudo make fleet-demo"
cd "$ROOT"
export ANSIBLE_CONFIG="$ROOT/ansible.cfg"

step "the fleet: $HOSTS hosts (scripts/sim-fleet.sh up $HOSTS --private-podman)"
scripts/sim-fleet.sh --dir "$FLEET" up "$HOSTS" --private-podman

step "site.yml on $FLEET/inventory.yml: the KMS and the gateway on host1, a VMM on host2..host$HOSTS"
.venv/bin/ansible-playbook -i "$FLEET/inventory.yml" playbooks/site.yml

step "the sample image on the controller (deploy-app.yml ships it to each VMM host that lacks it)"
examples/hello/image/build.sh localhost/dstack-hello:latest

# examples/hello as it is, plus its placement and the image to ship (the hosts have no registry).
app="$FLEET/apps/hello"
mkdir -p "$app"
cp examples/hello/docker-compose.yaml examples/hello/secrets.env "$app/"
{ cat examples/hello/app.yml
  printf '# make fleet-demo: one instance on each of %s VMM hosts, the image shipped to each.\n' "$REPLICAS"
  printf 'replicas: %s\nimages:\n  - name: localhost/dstack-hello:latest\n' "$REPLICAS"
} > "$app/app.yml"

step "deploy-app.yml: examples/hello, $REPLICAS instances"
.venv/bin/ansible-playbook -i "$FLEET/inventory.yml" playbooks/deploy-app.yml -e "app_dir=$app"
printf '\nThe fleet runs until: make fleet-down\n'
