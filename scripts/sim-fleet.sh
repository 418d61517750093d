#!/usr/bin/env bash
# A simulated fleet: N hosts on this machine that are separate where a deployment can tell. Each
# host has its own network namespace with one address on a shared bridge (the controller, in the
# root namespace, has .1), its own sshd (root login with a key made here) and its own mount and UTS
# namespaces: /var/lib/dstack, /run/dstack, /etc/dstack, /run/netns and /run/wireguard are bind
# mounts of the host's own folders, and `hostname` says hostN. Everything else (/usr, this checkout, its .venv, /tmp) is
# this machine's, shared. Ansible reaches the hosts over real SSH with the inventory `up` writes.
#
# Usage: scripts/sim-fleet.sh [options] up N    make hosts 1..N (running ones are kept; hosts
#                                                beyond N are removed), write the inventory
#        scripts/sim-fleet.sh [options] status  one line per host; exit 1 if one is not running
#        scripts/sim-fleet.sh [options] down    remove every process, namespace, link, cgroup and
#                                                the state folder (also after a partial up)
#        scripts/sim-fleet.sh [options] ssh hostN [COMMAND...]   a shell or a command on hostN
# A host also has its own /etc/hosts (the fleet's names), and reaches beyond the bridge through
# the controller (masquerade), as a server reaches its DNS resolver.
# Options:
#   --dir DIR        state folder (default .fleet in the checkout): keys, known_hosts, inventory.yml,
#                    hosts/hostN/{var-lib-dstack,run-dstack,etc-dstack,run-netns,...,sshd.log}
#   --id K           0-255 (default 0, or the one `up` recorded in DIR): bridge dstack-fleetK with
#                    10.231.K.1/24, hostN at 10.231.K.(10+N), namespaces dstack-fleetK-hostN
#   --kms LIST, --gateway LIST, --vmm LIST   (up) the hosts of the inventory groups dstack_kms,
#                    dstack_gateway, dstack_vmm: numbers and ranges, "1,3" or "2-4", or "" for
#                    none. Default: host1 in dstack_kms and dstack_gateway, hosts 2..N in dstack_vmm
#                    (with N=1, host1 in all three).
#   --python PATH    (up) the hosts' Python for Ansible (default the checkout's .venv/bin/python,
#                    which every host sees: the root filesystem is shared)
#   --private-podman (up; kept until down) each host its own podman too: /var/lib/containers,
#                    /var/lib/cni, /etc/cni/net.d, /run/containers and /run/libpod private (images
#                    must then be loaded on each host). Without it the hosts share this machine's
#                    podman: each sees the others' containers, and container names must differ.
# Needs root (namespaces, mounts, links), iproute2, util-linux and Debian's openssh-server.
set -euo pipefail
# Root's tools (iptables, sshd) also when called with a user's PATH.
export PATH="/usr/local/sbin:/usr/sbin:/sbin:$PATH"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELF="$REPO/scripts/sim-fleet.sh"
SSHD=/usr/sbin/sshd
MAX_HOSTS=200                 # addresses .11 to .210 of the /24
SSHD_START_TIMEOUT=10         # seconds for one sshd to listen
STOP_TIMEOUT=5                # seconds between SIGTERM and SIGKILL at down
# /run/netns and /run/wireguard too: the namespaces a host names (its CVMs', its gateway's) and its
# WireGuard interfaces' UAPI sockets would otherwise meet those of every other host and this machine.
PRIVATE_DIRS=(/var/lib/dstack /run/dstack /etc/dstack /run/netns /run/wireguard)
PODMAN_DIRS=(/var/lib/containers /var/lib/cni /etc/cni/net.d /run/containers /run/libpod)

say() { printf 'sim-fleet: %s\n' "$*"; }
die() { printf 'sim-fleet: error: %s\n' "$*" >&2; exit 1; }
# Runs a command; on failure stops with what was being done and the command's own message.
try() {
  local what="$1" out
  shift
  out="$("$@" 2>&1)" || die "$what: '$*' failed: ${out:-no message}"
}

# ---- the host's own side: runs inside its new namespaces, then becomes its sshd -----------------
if [[ "${1:-}" == "__host_init" ]]; then
  # Args: HOSTDIR NAME PRIVATE_DIR... Runs under `nsenter --net` + `unshare --mount --uts
  # --propagation slave`: mounts made here stay in this host, the root namespace's later mounts
  # still reach it.
  hostdir="$2" name="$3"
  shift 3
  for target in "$@"; do
    src="${target#/}"
    src="$hostdir/${src//\//-}"              # /var/lib/dstack -> HOSTDIR/var-lib-dstack
    mount --bind "$src" "$target"
  done
  # Its own /etc/hosts: its name and the fleet's resolve at once (getfqdn, Ansible's facts).
  mount --bind "$hostdir/etc-hosts" /etc/hosts
  # /sys shows the network devices of the namespace that mounted it: a sysfs mounted here shows
  # this host's (lo, eth0), so tools that list /sys/class/net (Ansible's facts) see the host's own.
  # Only the net parts are replaced: /sys/fs/cgroup stays, podman needs it.
  sysfs="$(mktemp -d /tmp/sim-fleet-sysfs.XXXXXX)"
  mount -t sysfs sysfs "$sysfs"
  mount --bind "$sysfs/class/net" /sys/class/net
  mount --bind "$sysfs/devices/virtual/net" /sys/devices/virtual/net
  umount -l "$sysfs"
  rmdir "$sysfs"
  hostname "$name"
  exec "$SSHD" -D -f "$hostdir/sshd_config" -E "$hostdir/sshd.log"
fi

# ---- options ---------------------------------------------------------------------------------
command_name="" count="" ssh_target="" dir="" fleet_id="" python="" private_podman_set=0
kms_list="" gateway_list="" vmm_list="" kms_set=0 gateway_set=0 vmm_set=0
ssh_args=()
need_value() { [[ $# -ge 2 ]] || die "option $1 needs a value"; }
while [[ $# -gt 0 ]]; do
  if [[ "$command_name" == ssh && -n "$ssh_target" ]]; then
    ssh_args=("$@"); break
  fi
  case "$1" in
    --dir) need_value "$@"; dir="$2"; shift 2 ;;
    --id) need_value "$@"; fleet_id="$2"; shift 2 ;;
    --python) need_value "$@"; python="$2"; shift 2 ;;
    --private-podman) private_podman_set=1; shift ;;
    --kms) need_value "$@"; kms_list="$2"; kms_set=1; shift 2 ;;
    --gateway) need_value "$@"; gateway_list="$2"; gateway_set=1; shift 2 ;;
    --vmm) need_value "$@"; vmm_list="$2"; vmm_set=1; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$SELF" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    up|down|status|ssh)
      [[ -z "$command_name" ]] || die "one command at a time (got $command_name and $1)"
      command_name="$1"; shift
      if [[ "$command_name" == up ]]; then
        [[ $# -ge 1 ]] || die "up needs the number of hosts (up N)"
        count="$1"; shift
      elif [[ "$command_name" == ssh ]]; then
        [[ $# -ge 1 ]] || die "ssh needs a host (ssh hostN [COMMAND...])"
        ssh_target="$1"; shift
        [[ "${1:-}" == "--" ]] && shift
      fi ;;
    *) die "unknown argument '$1' (commands: up N, status, down, ssh hostN; --help)" ;;
  esac
done
[[ -n "$command_name" ]] || die "no command (up N, status, down, ssh hostN; --help)"
[[ "$(id -u)" -eq 0 ]] || die "needs root (network namespaces, mounts, links)"

dir="$(realpath -m "${dir:-$REPO/.fleet}")"
[[ "$dir" =~ ^[A-Za-z0-9_./+-]+$ ]] \
  || die "--dir '$dir': only letters, digits and _ . / + - (it goes into SSH options unquoted)"
# ssh's connection sockets DIR/cp/ADDRESS plus its 17-byte temporary suffix stay under 107 bytes.
((${#dir} <= 70)) || die "--dir '$dir': at most 70 characters (ssh's control sockets live in it)"
recorded_id="" private_podman=0
if [[ -f "$dir/fleet.env" ]]; then
  recorded_id="$(sed -n 's/^FLEET_ID=//p' "$dir/fleet.env")"
  private_podman="$(sed -n 's/^PRIVATE_PODMAN=//p' "$dir/fleet.env")"
  [[ "$private_podman" == 1 ]] || private_podman=0
fi
if [[ -n "$fleet_id" ]]; then
  [[ "$fleet_id" =~ ^[0-9]{1,3}$ && $((10#$fleet_id)) -le 255 ]] || die "--id '$fleet_id': a number 0-255"
  fleet_id=$((10#$fleet_id))
  [[ -z "$recorded_id" || "$recorded_id" == "$fleet_id" ]] \
    || die "--id $fleet_id: $dir holds fleet $recorded_id (down it first, or use another --dir)"
else
  fleet_id="${recorded_id:-0}"
fi

BRIDGE="dstack-fleet$fleet_id"
SUBNET="10.231.$fleet_id"
NS_PREFIX="dstack-fleet$fleet_id-host"
VETH_PREFIX="dsf${fleet_id}h"                 # root side of hostN's veth: interface names stop at 15
NAT_RULE=(POSTROUTING -s "$SUBNET.0/24" ! -d "$SUBNET.0/24" -m comment --comment "dstack-fleet$fleet_id"
          -j MASQUERADE)
LOCK_DIR=/run/lock
[[ -d "$LOCK_DIR" ]] || LOCK_DIR=/tmp
MOUNT_POINTS_MADE="$LOCK_DIR/dstack-sim-fleet.mount-points"   # machine-wide: every fleet uses them
CGROUP_ROOT="$(findmnt -rn -t cgroup2 -o TARGET | head -n 1 || true)"
CGROUP="${CGROUP_ROOT:+$CGROUP_ROOT/dstack-fleet$fleet_id}"

# The host's private folders (mount targets): each is HOSTDIR/<its path with - for />.
host_private_dirs() {
  printf '%s\n' "${PRIVATE_DIRS[@]}"
  if ((private_podman)); then printf '%s\n' "${PODMAN_DIRS[@]}"; fi
}

host_names() {  # "1 3" -> "host1,host3"
  local names=() i
  for i in $1; do names+=("host$i"); done
  if ((${#names[@]})); then (IFS=,; echo "${names[*]}"); else echo none; fi
}
# The fleet's /etc/hosts, as each host sees it. Rewritten in place (a bind mount holds the inode).
write_hosts_file() {
  local file="$1" n="$2" k
  {
    echo "127.0.0.1 localhost"
    echo "::1 localhost ip6-localhost ip6-loopback"
    echo "$SUBNET.1 controller"
    for ((k = 1; k <= n; k++)); do echo "$(host_addr "$k") host$k"; done
  } > "$file"
}

host_addr() { echo "$SUBNET.$((10 + $1))"; }
host_dir() { echo "$dir/hosts/host$1"; }
# The controller's SSH options for the fleet. The connection sharing sockets (Ansible's
# ControlPersist) live in the fleet's folder: a fleet made again after down, with new host keys
# at the same addresses, never meets a master connection to the old one.
ssh_options() {
  echo "-o UserKnownHostsFile=$dir/known_hosts -o GlobalKnownHostsFile=/dev/null" \
       "-o StrictHostKeyChecking=yes -o IdentitiesOnly=yes -o BatchMode=yes -o ControlPath=$dir/cp/%h"
}

# The hosts that exist in any form (namespace, link, cgroup, folder), by number.
existing_hosts() {
  {
    ip netns list 2>/dev/null | awk '{print $1}' | sed -n "s/^$NS_PREFIX\([0-9]\{1,\}\)$/\1/p"
    ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' \
      | sed -n "s/^$VETH_PREFIX\([0-9]\{1,\}\)$/\1/p"
    [[ -n "$CGROUP" && -d "$CGROUP" ]] && find "$CGROUP" -mindepth 1 -maxdepth 1 -name 'host*' \
      -printf '%f\n' | sed -n 's/^host\([0-9]\{1,\}\)$/\1/p'
    [[ -d "$dir/hosts" ]] && find "$dir/hosts" -mindepth 1 -maxdepth 1 -name 'host*' -printf '%f\n' \
      | sed -n 's/^host\([0-9]\{1,\}\)$/\1/p'
    true
  } | sort -nu
}

# The pid of hostN's sshd if it runs in hostN's network namespace, else nothing.
sshd_pid() {
  local pidfile pid
  pidfile="$(host_dir "$1")/sshd.pid"
  [[ -f "$pidfile" ]] || return 0
  pid="$(cat "$pidfile" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ && -e "/run/netns/$NS_PREFIX$1" ]] || return 0
  [[ "$(readlink "/proc/$pid/exe" 2>/dev/null)" == "$SSHD" ]] || return 0
  [[ "$(stat -Lc %i "/proc/$pid/ns/net" 2>/dev/null)" == "$(stat -Lc %i "/run/netns/$NS_PREFIX$1")" ]] \
    || return 0
  echo "$pid"
}

host_listening() {
  timeout 2 bash -c "exec 3<>/dev/tcp/$(host_addr "$1")/22" 2>/dev/null
}

# Every process of hostN: its cgroup (sshd and all it started), its network namespace (what
# entered it from outside, such as `ip netns exec`), and their descendants (a container's
# processes: the runtime moves them to its own cgroup and namespaces, under their conmon).
host_pids() {
  local cg="${CGROUP:+$CGROUP/host$1}" seeds
  seeds="$(
    [[ -n "$cg" && -d "$cg" ]] && find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null
    [[ -e "/run/netns/$NS_PREFIX$1" ]] && ip netns pids "$NS_PREFIX$1" 2>/dev/null
    true
  )"
  [[ -n "${seeds//[[:space:]]/}" ]] || return 0
  ps -e -o pid=,ppid= | awk -v seeds="$seeds" '
    BEGIN { n = split(seeds, s); for (k = 1; k <= n; k++) keep[s[k]] = 1 }
    { parent[$1] = $2 }
    END {
      do {
        grew = 0
        for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; grew = 1 }
      } while (grew)
      for (p in keep) if (p in parent) print p
    }' | sort -nu
}

# The containers podman runs for hostN (their conmon is in the host's cgroup), removed from inside
# the host, so podman's shared state and storage mounts are cleaned up as well as the processes.
host_remove_containers() {
  local i="$1" cg="${CGROUP:+$CGROUP/host$1}" pid ids=() enter
  [[ -n "$cg" && -d "$cg" ]] || return 0
  while read -r pid; do
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == conmon ]] || continue
    ids+=("$(tr '\0' '\n' < "/proc/$pid/cmdline" 2>/dev/null | sed -n '/^-c$/{n;p;q}')")
  done < <(find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null)
  ((${#ids[@]})) || return 0
  # podman must run in the host's mount namespace (its containers' mounts are there): its sshd's.
  enter="$(sshd_pid "$i")"
  [[ -n "$enter" ]] || return 0   # no way into the host left: the kills below stop them
  say "host$i: removing its ${#ids[@]} container(s)"
  timeout 60 nsenter -t "$enter" -m -n -u podman rm -f -t 0 "${ids[@]}" >/dev/null 2>&1 \
    || say "host$i: podman rm -f ${ids[*]} failed; stopping their processes instead"
}

host_down() {
  local i="$1" cg="${CGROUP:+$CGROUP/host$1}" pids waited=0
  host_remove_containers "$i"
  pids="$(host_pids "$i")"
  if [[ -n "$pids" ]]; then
    # shellcheck disable=SC2086  # a list of pids
    kill -TERM $pids 2>/dev/null || true
    while [[ -n "$(host_pids "$i")" ]] && ((waited < STOP_TIMEOUT * 10)); do
      sleep 0.1; waited=$((waited + 1))
    done
    pids="$(host_pids "$i")"
    if [[ -n "$pids" ]]; then
      [[ -n "$cg" && -f "$cg/cgroup.kill" ]] && echo 1 > "$cg/cgroup.kill" 2>/dev/null
      # shellcheck disable=SC2086
      kill -KILL $pids 2>/dev/null || true
      waited=0
      while [[ -n "$(host_pids "$i")" ]] && ((waited < 50)); do sleep 0.1; waited=$((waited + 1)); done
      pids="$(host_pids "$i")"
      [[ -z "$pids" ]] || die "host$i: processes $pids survive SIGKILL"
    fi
  fi
  # The link first: deleting it takes its peer in the namespace at once, while a namespace's own
  # devices go in the background once it is freed.
  if ip link show "$VETH_PREFIX$i" >/dev/null 2>&1 && ! ip link del "$VETH_PREFIX$i" 2>/dev/null; then
    ! ip link show "$VETH_PREFIX$i" >/dev/null 2>&1 || die "host$i: cannot remove its link $VETH_PREFIX$i"
  fi
  if [[ -e "/run/netns/$NS_PREFIX$i" ]]; then
    try "host$i: removing its network namespace" ip netns del "$NS_PREFIX$i"
  fi
  if [[ -n "$cg" && -d "$cg" ]]; then
    # Children first (a container runtime may have made some under it).
    find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true
    [[ ! -d "$cg" ]] || die "host$i: its cgroup $cg cannot be removed"
  fi
}

fleet_down() {
  local i removed=0
  for i in $(existing_hosts); do
    host_down "$i"
    say "host$i: removed"
    removed=1
  done
  # The controller's SSH connections into the fleet (Ansible's persistent masters) would wait for
  # hosts that are gone.
  local pid
  for pid in $(ss -Htnp dst "$SUBNET.0/24" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u); do
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == ssh ]] && kill "$pid" 2>/dev/null
  done
  while command -v iptables >/dev/null && iptables -t nat -C "${NAT_RULE[@]}" 2>/dev/null; do
    try "removing the hosts' way out" iptables -t nat -D "${NAT_RULE[@]}"
  done
  if ip link show "$BRIDGE" >/dev/null 2>&1; then
    try "removing the bridge $BRIDGE" ip link del "$BRIDGE"
    say "bridge $BRIDGE: removed"
    removed=1
  fi
  [[ -n "$CGROUP" && -d "$CGROUP" ]] && { rmdir "$CGROUP" || die "cannot remove the cgroup $CGROUP"; }
  # The mount points an up made in the root namespace, once no fleet's host may use them (the
  # machine-wide lock keeps another fleet's up from starting hosts meanwhile).
  exec 8>"$LOCK_DIR/dstack-sim-fleet.lock"
  if [[ -f "$MOUNT_POINTS_MADE" ]] && flock -w 30 8 \
     && ! ip netns list 2>/dev/null | awk '{print $1}' | grep -q '^dstack-fleet[0-9]*-host[0-9]*$'; then
    while read -r target; do rmdir "$target" 2>/dev/null || true; done < "$MOUNT_POINTS_MADE"
    rm -f "$MOUNT_POINTS_MADE"
  fi
  exec 8>&-
  if [[ -f "$dir/fleet.env" ]]; then
    # No mount may be under the folder (the hosts' mounts lived in their own namespaces).
    if findmnt -rn -o TARGET | grep -qF "$dir/"; then
      die "something is mounted under $dir: not removing it ($(findmnt -rn -o TARGET | grep -F "$dir/" | head -n 3))"
    fi
    rm -rf -- "$dir"
    say "state folder $dir: removed"
    removed=1
  fi
  ((removed)) || say "no fleet $fleet_id here (nothing to remove)"
}

# "1,3-4" -> "1 3 4", each within 1..N, or stop naming the option.
parse_hosts() {
  local option="$1" list="$2" n="$3" part from to out=()
  [[ -z "$list" ]] && return 0
  IFS=',' read -ra parts <<< "$list"
  for part in "${parts[@]}"; do
    if [[ "$part" =~ ^([0-9]+)-([0-9]+)$ ]]; then
      from=$((10#${BASH_REMATCH[1]})) to=$((10#${BASH_REMATCH[2]}))
    elif [[ "$part" =~ ^[0-9]+$ ]]; then
      from=$((10#$part)) to=$((10#$part))
    else
      die "$option '$list': '$part' is not a host number or range (such as 2 or 2-4)"
    fi
    ((from >= 1 && to <= n && from <= to)) \
      || die "$option '$list': '$part' is outside the hosts 1..$n"
    for ((h = from; h <= to; h++)); do out+=("$h"); done
  done
  printf '%s\n' "${out[@]}" | sort -nu | tr '\n' ' '
}

write_inventory() {
  local n="$1" kms="$2" gateway="$3" vmm="$4" tmp i group hosts
  tmp="$dir/inventory.yml.tmp"
  {
    echo "# The simulated fleet: written by scripts/sim-fleet.sh up $n (--dir $dir --id $fleet_id)."
    echo "# Each host is reached over SSH as root at its own address. It shares this machine's root"
    echo "# filesystem except its private /var/lib/dstack, /run/dstack, /etc/dstack, /run/netns and"
    echo "# /run/wireguard, so the checkout's venv Python (ansible_python_interpreter) is on every host."
    echo "all:"
    echo "  vars:"
    echo "    ansible_user: root"
    echo "    ansible_ssh_private_key_file: $dir/id_ed25519"
    echo "    ansible_ssh_common_args: \"$(ssh_options)\""
    echo "    ansible_python_interpreter: $python"
    echo "    # One SSH round trip per module instead of three (no temporary files to copy first)."
    echo "    ansible_pipelining: true"
    echo "    # The roles' state in each host's private folder; deploy-app.yml's build folders on the"
    echo "    # controller (this machine), in the fleet's folder."
    echo "    dstack_root: /var/lib/dstack"
    echo "    dstack_app_build_dir: $dir/build"
    echo "  hosts:"
    for ((i = 1; i <= n; i++)); do
      echo "    host$i:"
      echo "      ansible_host: $(host_addr "$i")"
    done
    echo "  children:"
    for group in kms gateway vmm; do
      case "$group" in kms) hosts="$kms" ;; gateway) hosts="$gateway" ;; vmm) hosts="$vmm" ;; esac
      echo "    dstack_$group:"
      if [[ -z "${hosts// /}" ]]; then
        echo "      hosts: {}"
      else
        echo "      hosts:"
        for i in $hosts; do echo "        host$i:"; done
      fi
      # The services other hosts use listen on the host's address (their URLs name it).
      case "$group" in
        kms) printf '      vars:\n        dstack_kms_listen: 0.0.0.0:9201\n' ;;
        vmm) printf '      vars:\n        dstack_vmm_listen: 0.0.0.0:9080\n'
             printf '        dstack_vmm_tokens: ["{{ lookup(%s) }}"]\n' "'file', '$dir/vmm-token'" ;;
      esac
    done
  } > "$tmp"
  mv -f "$tmp" "$dir/inventory.yml"
}

host_up() {
  local i="$1" n="$2" hd addr ns veth cg pid started waited=0
  hd="$(host_dir "$i")" addr="$(host_addr "$i")" ns="$NS_PREFIX$i" veth="$VETH_PREFIX$i"
  cg="${CGROUP:+$CGROUP/host$i}"
  pid="$(sshd_pid "$i")"
  if [[ -n "$pid" ]] && host_listening "$i"; then
    say "host$i $addr: running (sshd pid $pid), kept"
    return 0
  fi
  # Whatever is left of it (a partial up, a killed sshd) goes: the host starts from scratch, as
  # after a reboot, keeping /var/lib/dstack and /etc/dstack.
  host_down "$i"
  started="$(date +%s%N)"
  local private=() target folder
  mapfile -t private < <(host_private_dirs)
  for target in "${private[@]}"; do
    folder="${target#/}"
    folder="$hd/${folder//\//-}"
    mkdir -p "$folder"
    # /run is empty at boot (podman, for one, takes an empty /run/libpod for a reboot).
    [[ "$target" != /run/* ]] || find "$folder" -mindepth 1 -delete
  done
  rm -f "$hd/sshd.pid"
  write_hosts_file "$hd/etc-hosts" "$n"
  if [[ ! -f "$hd/ssh_host_ed25519_key" ]]; then
    try "host$i: making its host key" ssh-keygen -q -t ed25519 -N '' -C "host$i" -f "$hd/ssh_host_ed25519_key"
  fi
  cat > "$hd/sshd_config" <<EOF
# host$i of the simulated fleet (scripts/sim-fleet.sh): root logs in with the fleet's key only.
ListenAddress $addr:22
HostKey $hd/ssh_host_ed25519_key
PidFile $hd/sshd.pid
AuthorizedKeysFile $dir/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
# The checkout's folders may be group-writable; the fleet's own files are 0600 in a 0700 folder.
StrictModes no
UseDNS no
PrintMotd no
Subsystem sftp internal-sftp
# Ansible's forks and the benchmarks open many connections at once.
MaxStartups 200:30:400
MaxSessions 100
EOF
  try "host$i: checking its sshd_config" "$SSHD" -t -f "$hd/sshd_config"

  try "host$i: making its network namespace $ns" ip netns add "$ns"
  try "host$i: bringing up lo" ip -n "$ns" link set lo up
  try "host$i: making its link $veth" ip link add "$veth" type veth peer name eth0 netns "$ns"
  try "host$i: attaching $veth to $BRIDGE" ip link set "$veth" master "$BRIDGE" up
  # A fixed MAC per address: a host made again keeps it, so the neighbour caches of the controller
  # and of the other hosts (which may still hold the old one) stay right.
  try "host$i: setting eth0's MAC" ip -n "$ns" link set eth0 address "$(printf '02:44:46:%02x:%02x:%02x' \
    "$fleet_id" $((i / 256)) $((i % 256)))"
  try "host$i: giving eth0 $addr" ip -n "$ns" addr add "$addr/24" dev eth0
  try "host$i: bringing up eth0" ip -n "$ns" link set eth0 up
  try "host$i: its default route via $SUBNET.1" ip -n "$ns" route add default via "$SUBNET.1"
  ip neigh flush to "$addr" dev "$BRIDGE" >/dev/null 2>&1 || true
  if [[ -n "$cg" ]]; then
    try "host$i: making its cgroup $cg" mkdir -p "$cg"
  fi
  # The sshd (and everything a session starts) in the host's cgroup, so down finds all of it.
  (
    [[ -z "$cg" ]] || echo "$BASHPID" > "$cg/cgroup.procs"
    exec setsid nsenter --net="/run/netns/$ns" \
      unshare --mount --uts --propagation slave -- "$SELF" __host_init "$hd" "host$i" "${private[@]}"
  ) </dev/null >"$hd/init.log" 2>&1 &
  local launcher=$!
  while [[ ! -s "$hd/sshd.pid" ]]; do
    if ! kill -0 "$launcher" 2>/dev/null; then
      wait "$launcher" || true
      die "host$i: its sshd stopped before listening on $addr:22: $(tail -n 5 "$hd/init.log" "$hd/sshd.log" 2>/dev/null | tr '\n' ' ')"
    fi
    ((waited < SSHD_START_TIMEOUT * 100)) \
      || die "host$i: its sshd did not listen on $addr:22 within $SSHD_START_TIMEOUT s (log: $hd/sshd.log)"
    sleep 0.01; waited=$((waited + 1))
  done
  host_listening "$i" || die "host$i: $addr:22 does not answer from the controller (log: $hd/sshd.log)"
  say "host$i $addr: started (sshd pid $(cat "$hd/sshd.pid"), $(( ($(date +%s%N) - started) / 1000000 )) ms)"
}

fleet_up() {
  local n="$1" i kms gateway vmm
  [[ "$n" =~ ^[0-9]{1,4}$ ]] || die "up N: N must be a number from 1 to $MAX_HOSTS (got '$n')"
  n=$((10#$n))
  ((n >= 1 && n <= MAX_HOSTS)) || die "up N: N must be a number from 1 to $MAX_HOSTS (got $n)"
  python="${python:-$REPO/.venv/bin/python}"
  [[ -x "$python" ]] || die "--python $python: not an executable (run scripts/setup.sh, or give --python)"
  [[ -x "$SSHD" ]] || die "$SSHD is missing: apt-get install openssh-server (scripts/setup.sh --test does)"
  local d
  ((kms_set)) || kms_list=1
  ((gateway_set)) || gateway_list=1
  ((vmm_set)) || { if ((n == 1)); then vmm_list=1; else vmm_list="2-$n"; fi; }
  kms="$(parse_hosts --kms "$kms_list" "$n")"
  gateway="$(parse_hosts --gateway "$gateway_list" "$n")"
  vmm="$(parse_hosts --vmm "$vmm_list" "$n")"

  if ((private_podman_set && !private_podman)); then
    [[ -z "$(existing_hosts)" ]] \
      || die "--private-podman: fleet $fleet_id runs with this machine's podman (down it first)"
    private_podman=1
  fi
  if [[ ! -f "$dir/fleet.env" ]] && ip link show "$BRIDGE" >/dev/null 2>&1; then
    die "the bridge $BRIDGE exists but $dir has no fleet on it (another fleet with --id $fleet_id?" \
        "Use another --id, or its --dir with down; 'down --id $fleet_id' removes it by name)"
  fi
  mkdir -p "$dir/hosts" "$dir/cp"
  chmod 700 "$dir"
  # The folder ignores itself, so git status stays clean wherever it is.
  [[ -f "$dir/.gitignore" ]] || echo '*' > "$dir/.gitignore"
  printf 'FLEET_ID=%s\nPRIVATE_PODMAN=%s\n' "$fleet_id" "$private_podman" > "$dir/fleet.env"

  # The private folders' mount points must exist in the root namespace (a bind mount needs a
  # target); the ones made here are removed by the down that leaves no fleet on the machine.
  exec 8>"$LOCK_DIR/dstack-sim-fleet.lock"
  flock -w 60 8 || die "another sim-fleet.sh holds $LOCK_DIR/dstack-sim-fleet.lock for over 60 s"
  for d in $(host_private_dirs); do
    if [[ ! -d "$d" ]]; then
      try "making the mount point $d" mkdir -p "$d"
      echo "$d" >> "$MOUNT_POINTS_MADE"
    fi
  done
  [[ -d /run/sshd ]] || try "making sshd's privilege separation folder /run/sshd" mkdir -p -m 0755 /run/sshd

  if [[ ! -f "$dir/id_ed25519" ]]; then
    try "making the controller's key" ssh-keygen -q -t ed25519 -N '' -C "dstack-fleet$fleet_id" -f "$dir/id_ed25519"
  fi
  cp "$dir/id_ed25519.pub" "$dir/authorized_keys"
  # The VMMs' API token (a VMM listening beyond loopback requires one): the inventory reads it.
  if [[ ! -f "$dir/vmm-token" ]]; then
    (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/vmm-token")
  fi

  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    try "making the bridge $BRIDGE" ip link add "$BRIDGE" type bridge
    try "giving $BRIDGE $SUBNET.1/24" ip addr add "$SUBNET.1/24" dev "$BRIDGE"
    try "bringing up $BRIDGE" ip link set "$BRIDGE" up
    say "bridge $BRIDGE $SUBNET.1/24: created"
  else
    say "bridge $BRIDGE $SUBNET.1/24: kept"
  fi
  if command -v iptables >/dev/null; then
    iptables -t nat -C "${NAT_RULE[@]}" 2>/dev/null \
      || try "letting the hosts out through the controller" iptables -t nat -A "${NAT_RULE[@]}"
  else
    say "no iptables: the hosts reach only the bridge (no DNS resolver)"
  fi

  for i in $(existing_hosts); do
    if ((i > n)); then
      host_down "$i"
      rm -rf -- "$(host_dir "$i")"
      say "host$i: removed (beyond $n)"
    fi
  done
  for ((i = 1; i <= n; i++)); do host_up "$i" "$n"; done
  exec 8>&-
  for ((i = 1; i <= n; i++)); do write_hosts_file "$(host_dir "$i")/etc-hosts" "$n"; done

  : > "$dir/known_hosts.tmp"
  for ((i = 1; i <= n; i++)); do
    echo "host$i,$(host_addr "$i") $(cut -d' ' -f1,2 "$(host_dir "$i")/ssh_host_ed25519_key.pub")" \
      >> "$dir/known_hosts.tmp"
  done
  mv -f "$dir/known_hosts.tmp" "$dir/known_hosts"
  write_inventory "$n" "$kms" "$gateway" "$vmm"
  say "inventory: $dir/inventory.yml (dstack_kms: $(host_names "$kms"); dstack_gateway:" \
      "$(host_names "$gateway"); dstack_vmm: $(host_names "$vmm"))"
}

fleet_status() {
  local i pid bad=0 hosts
  hosts="$(existing_hosts)"
  if [[ -z "$hosts" ]]; then
    say "no fleet $fleet_id here ($dir)"
    return 1
  fi
  for i in $hosts; do
    pid="$(sshd_pid "$i")"
    if [[ -n "$pid" ]] && host_listening "$i"; then
      say "host$i $(host_addr "$i"): running (sshd pid $pid, namespace $NS_PREFIX$i)"
    else
      say "host$i $(host_addr "$i"): not running (scripts/sim-fleet.sh up starts it again)"
      bad=1
    fi
  done
  [[ -f "$dir/inventory.yml" ]] && say "inventory: $dir/inventory.yml"
  return "$bad"
}

fleet_ssh() {
  local target="$1" i
  [[ "$target" =~ ^host([0-9]+)$ ]] || die "ssh '$target': a host name such as host1"
  i="${BASH_REMATCH[1]}"
  [[ -f "$dir/known_hosts" && -d "$(host_dir "$i")" ]] || die "ssh $target: no such host in $dir"
  # shellcheck disable=SC2046  # the options are words without spaces (checked --dir)
  exec ssh -i "$dir/id_ed25519" $(ssh_options) "root@$(host_addr "$i")" "${ssh_args[@]}"
}

case "$command_name" in
  up|down)
    # One change at a time on a fleet (its id names the machine-wide parts, whatever --dir).
    lock="$LOCK_DIR/dstack-sim-fleet$fleet_id.lock"
    exec 9>"$lock"
    flock -n 9 || die "another sim-fleet.sh is changing fleet $fleet_id (lock $lock)"
    if [[ "$command_name" == up ]]; then
      fleet_up "$count"
    else
      fleet_down
      rm -f "$lock"   # held until exit: an up waiting on it has failed already (flock -n)
    fi ;;
  status) fleet_status ;;
  ssh) fleet_ssh "$ssh_target" ;;
esac
