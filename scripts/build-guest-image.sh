#!/usr/bin/env bash
# Builds the dstack.tee guest image from Debian packages, in the layout dstack's VMM expects:
#   metadata.json  bzImage  initramfs.img  ovmf.fd  rootfs.img.verity  packages.manifest
#   sha256sum.txt  digest.txt (the os_image_hash = sha256 of sha256sum.txt, as dstack computes it)
# The rootfs is Debian 12 (debootstrap --variant=minbase) with Debian's kernel (from
# bookworm-backports, for TDX guest support), python3, podman and this checkout's guest agent
# (agents/guest/, what it imports from agents/ and plugins/module_utils/, under
# /opt/dstack/ansible_collections/dstack/tee, started by /usr/local/bin/dstack-guest-agent).
# It is a squashfs with a dm-verity hash tree appended; the root hash is in metadata.json and the
# cmdline.
#
# The boot: the kernel, then initramfs-tools, whose local-top script dstack-verity opens the rootfs
# disk (/dev/vda) as /dev/mapper/dstack-root with the cmdline's dstack.rootfs_hash and
# dstack.rootfs_size (the VM powers off, saying why, when it does not verify) and mounts it
# read-only; then PID 1 is /usr/local/sbin/dstack-init (init= on the cmdline; its header says what
# it mounts where), which runs the guest agent.
#
# Usage: scripts/build-guest-image.sh [--out DIR] [--cache DIR] [--no-cache] [--firmware FILE]
#                                     [--print-inputs]
#   --out DIR        where the image folder goes (default: build/guest-image); replaced as a whole
#   --cache DIR      built images by inputs' hash, and the downloaded .debs (default:
#                    /var/cache/dstack-guest-image)
#   --no-cache       build even if an image with the same inputs is cached, and do not store it (the
#                    downloaded .debs are still shared: apt checks each against the signed indexes)
#   --firmware FILE  the VM firmware the image carries as ovmf.fd (default: this machine's Debian
#                    OVMF, /usr/share/OVMF/OVMF_CODE.fd, which boots the no_tee VMs here). A TD needs
#                    a TDX build of it (TDVF), such as the OVMF.fd of Canonical's TDX PPA or Ubuntu
#                    25.10's OVMF.inteltdx.fd; metadata.json's ovmf_variant then says "custom"
#   --print-inputs   print the inputs hash (the cache key) and stop, building nothing
#
# Reproducible: the inputs are this script, the firmware, the collection's files that go into the
# image, and the Debian mirror's state (the sha256 of each suite's Packages index, which fixes every version apt
# resolves). Their hash is the cache key; the versions apt installed are recorded in
# packages.manifest (inside the rootfs too). Every time in the image is SOURCE_DATE_EPOCH, files
# that differ from build to build (logs, caches, machine-id, Debian's .pyc) are removed; the .pyc are
# compiled again, reproducibly (hash-based, a fixed PYTHONHASHSEED).
set -euo pipefail
# debootstrap, chroot and veritysetup live in sbin, which a user's PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

MIRROR="${DSTACK_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${DSTACK_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
SUITE=bookworm
# Every time stamp in the image (2024-01-01). A constant, so that it is part of this script's hash.
export SOURCE_DATE_EPOCH=1704067200
# Packages on top of minbase. --no-install-recommends: only what is named here and its Depends.
# The kernel comes from bookworm-backports: bookworm's own 6.1 is built without CONFIG_INTEL_TDX_GUEST
# (and has neither /dev/tdx_guest nor configfs-tsm), so it could not boot as a TDX guest.
PACKAGES=(
  "linux-image-amd64/$SUITE-backports" initramfs-tools kmod udev
  python3 python3-cryptography python3-flask python3-yaml python3-pyroute2 gunicorn
  podman runc conmon iptables iproute2 wireguard-tools wireguard-go ca-certificates cryptsetup-bin e2fsprogs
  python3-dotenv
)
# Python packages the guest agent needs that bookworm lacks or has too old: these wheels from PyPI,
# each pinned by version and sha256 ("URL SHA256"), unpacked into /usr/local's dist-packages. Their
# own dependencies are Debian's (PACKAGES): PyYAML and python-dotenv (podman-compose).
#   podman-compose 1.6  the app's runner (plugins/module_utils/compose_runner.py; bookworm has 1.0.3)
#   coincurve 21        secp256k1 through libsecp256k1 (module_utils/kdf.py: the app's k256 key,
#                       GetKey's signature chain, the KMS's env key signature); no dependencies
#   pycryptodome        keccak (module_utils/signatures.py) as Crypto.Hash: Debian's
#                       python3-pycryptodome is the Cryptodome (pycryptodomex) namespace
#   dcap-qvl 0.7        quote verification (module_utils/attestation.py: the gateway's RA-TLS quote)
#   cryptography 44     the certificate API the agent uses (not_valid_after_utc, 42+;
#                       verify_directly_issued_by, 40+: RA-TLS, the gateway client's cache): bookworm's
#                       python3-cryptography is 38 (kept: it brings python3-cffi-backend, which 44 needs)
#   gunicorn 27         the project's (pyproject.toml): bookworm's 20.1 cannot run a worker class given
#                       as a class (its worker_class_str), which the Worker API's deadline worker is
WHEELS=(
  "https://files.pythonhosted.org/packages/93/31/b38c2656bad6265168902793c60145b172788a79e4b15de212af9bd78728/podman_compose-1.6.0-py3-none-any.whl 98e48af25d44c10ecef948163bfcca002e32aa8bbb7e66593fbd4faff7270c30"
  "https://files.pythonhosted.org/packages/9d/b7/df41dbcec3f70e383fa024949ce8956ff3b2a1b9eac330fba18c2115eece/coincurve-21.0.0-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl 9070804d7c71badfe4f0bf19b728cfe7c70c12e733938ead6b1db37920b745c0"
  "https://files.pythonhosted.org/packages/5f/e9/a09476d436d0ff1402ac3867d933c61805ec2326c6ea557aeeac3825604e/pycryptodome-3.23.0-cp37-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64.whl c8987bd3307a39bc03df5c8e0e3d8be0c4c3518b7f044b0f4c15d1aa78f52575"
  "https://files.pythonhosted.org/packages/c7/36/57a333cfb37a2f9d0e3e5bd43f9939c0ad4c48c41667ae2243ef46e69d7e/dcap_qvl-0.7.0-cp38-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64.whl 131e991020a9c02b1e6043b2ac0bdae3f7eb02cbfbde8faac4aa2b9336ab3857"
  "https://files.pythonhosted.org/packages/68/fb/d61a4defd0d6cee20b1b8a1ea8f5e25007e26aeb413ca53835f0cae2bcd1/cryptography-44.0.3-cp39-abi3-manylinux_2_28_x86_64.whl cb90f60e03d563ca2445099edf605c16ed1d5b15182d21831f58460c48bffb93"
  "https://files.pythonhosted.org/packages/f7/46/19ce73424bc4bcac3f0c104950fa776abdfa4515f25104916a62b63b672a/gunicorn-27.0.1-py3-none-any.whl 378b26b9a38adcf4592f28828233c1716acc55e833ea06bf48719782efaa0d10"
)
# Modules the boot needs before the rootfs is mounted (virtio disk, verity, squashfs, vsock, 9p).
# Only these (and what they depend on) go into the initramfs (MODULES=list): a VM's hardware is known.
INITRAMFS_MODULES=(virtio_pci virtio_blk virtio_net virtio_console virtio_rng squashfs dm_verity
                   dm_crypt ext4 overlay vsock vmw_vsock_virtio_transport 9p 9pnet_virtio)
# root=, rootfstype= and ro are initramfs-tools' (the verity device local-top/dstack-verity opens).
CMDLINE_BASE="root=/dev/mapper/dstack-root rootfstype=squashfs ro init=/usr/local/sbin/dstack-init console=ttyS0 panic=1 net.ifnames=0 biosdevname=0 mce=off oops=panic pci=noearly pci=nommconf random.trust_cpu=y random.trust_bootloader=n tsc=reliable no-kvmclock"
# The collection's home inside the rootfs (PYTHONPATH of the guest agent).
COLLECTION_ROOT=/opt/dstack
OVMF=/usr/share/OVMF/OVMF_CODE.fd
OVMF_VARIANT=debian-ovmf

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPT="$ROOT/scripts/build-guest-image.sh"
OUT="$ROOT/build/guest-image"
CACHE=/var/cache/dstack-guest-image
USE_CACHE=1
PRINT_INPUTS=0

step() { printf '==> [%4ss] %s\n' "$SECONDS" "$*" >&2; }
die() { printf 'build-guest-image: %s\n' "$*" >&2; exit 1; }

while (($#)); do
  case "$1" in
    --out) [[ $# -ge 2 && -n "$2" ]] || die "--out needs a folder"; OUT="$2"; shift 2 ;;
    --cache) [[ $# -ge 2 && -n "$2" ]] || die "--cache needs a folder"; CACHE="$2"; shift 2 ;;
    --no-cache) USE_CACHE=0; shift ;;
    --firmware)
      [[ $# -ge 2 && -n "$2" ]] || die "--firmware needs a file"
      [[ -f "$2" && -r "$2" ]] || die "--firmware $2: not a readable file"
      [[ -s "$2" ]] || die "--firmware $2: the file is empty"
      OVMF="$(realpath "$2")"; OVMF_VARIANT=custom; shift 2 ;;
    --print-inputs) PRINT_INPUTS=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/{/^#/p}' "$SCRIPT"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
OUT="$(realpath -m "$OUT")"
CACHE="$(realpath -m "$CACHE")"

((EUID == 0)) || die "must run as root (debootstrap, chroot and mounts need it)"
[[ "$(uname -m)" == x86_64 ]] || die "builds an amd64 image and must run on x86_64, not $(uname -m)"

step "host tools"
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v mksquashfs >/dev/null || need+=(squashfs-tools)
command -v veritysetup >/dev/null || need+=(cryptsetup-bin)
command -v curl >/dev/null || need+=(curl)
[[ -f "$OVMF" ]] || need+=(ovmf)
if ((${#need[@]})); then
  step "installing ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >&2 \
    || die "could not install ${need[*]} with apt-get"
fi

mkdir -p "$CACHE/images" "$CACHE/debs" "$CACHE/wheels" "$CACHE/work"
# One build at a time per cache (the .deb folder and apt's lock in it are shared), its inputs read
# once the lock is held; --print-inputs only reads them.
if ((!PRINT_INPUTS)); then
  exec 9>"$CACHE/lock"
  flock 9
fi

# --- inputs -------------------------------------------------------------------------------------
step "resolve: the mirror's package indexes"
# The Packages index of each suite names every version apt can resolve: its sha256 (from the suite's
# InRelease, stable across re-signing) pins the package set. apt checks InRelease's signature in the
# build; the same lines are compared with what apt verified once the rootfs is made.
packages_index_hashes() {  # stdin: an InRelease file; prints "<sha256> main/binary-amd64/Packages.xz"
  awk '/^SHA256:/ {s=1; next} /^[A-Za-z]/ {s=0} s && $3 == "main/binary-amd64/Packages.xz" {print $1, $3}'
}
mirror_state=""
for suite_url in "$MIRROR/dists/$SUITE" "$MIRROR/dists/$SUITE-updates" "$MIRROR/dists/$SUITE-backports" \
                 "$SECURITY_MIRROR/dists/$SUITE-security"; do
  line="$(curl -fsSL --retry 3 -m 60 "$suite_url/InRelease" | packages_index_hashes)" \
    || die "could not read $suite_url/InRelease (is the Debian mirror reachable?)"
  [[ -n "$line" ]] || die "$suite_url/InRelease names no main/binary-amd64/Packages.xz"
  mirror_state+="${suite_url##*/dists/} $line"$'\n'
done

# The guest agent and what it imports (not the host's agents: a VMM change is no new image).
collection_files() {  # the collection's files that go into the image, relative to $ROOT, sorted
  (cd "$ROOT" && git ls-files -- agents/guest agents/cli_support.py agents/wsgi.py plugins/module_utils galaxy.yml) \
    | grep -v -e '/__pycache__/' -e '\.pyc$' | LC_ALL=C sort
}
mapfile -t files < <(collection_files)
((${#files[@]})) || die "no collection files found under $ROOT (not a git checkout?)"
for f in "${files[@]}"; do [[ -f "$ROOT/$f" ]] || die "$f is tracked by git but missing from the checkout"; done
inputs="$(
  printf 'script %s\n' "$(sha256sum <"$SCRIPT" | cut -d' ' -f1)"
  printf 'firmware %s %s\n' "$OVMF_VARIANT" "$(sha256sum <"$OVMF" | cut -d' ' -f1)"
  printf '%s' "$mirror_state"
  (cd "$ROOT" && sha256sum -- "${files[@]}")
)"
KEY="$(printf '%s' "$inputs" | sha256sum | cut -d' ' -f1)"
step "inputs hash $KEY"
if ((PRINT_INPUTS)); then
  printf '%s\n' "$KEY"
  exit 0
fi

publish() {  # copy the image folder $1 to $OUT, replacing what was there
  local tmp="$OUT.tmp.$$"
  rm -rf "$tmp"
  mkdir -p "$(dirname "$OUT")"
  cp -a "$1" "$tmp"
  rm -rf "$OUT"
  mv "$tmp" "$OUT"
}

if ((USE_CACHE)) && [[ -f "$CACHE/images/$KEY/digest.txt" ]]; then
  echo "build-guest-image: reusing the cached image for inputs $KEY ($CACHE/images/$KEY)" >&2
  publish "$CACHE/images/$KEY"
  step "done: $OUT (os_image_hash $(cat "$OUT/digest.txt"))"
  exit 0
fi

# --- build --------------------------------------------------------------------------------------
WORK="$(mktemp -d "$CACHE/work/build.XXXXXX")"
RFS="$WORK/rootfs"
IMG="$WORK/image"
mkdir -p "$RFS" "$IMG"

unmount_all() {  # every mount under the rootfs, deepest first
  local m
  while read -r m; do umount -l "$m" 2>/dev/null || true; done \
    < <(findmnt -rn -o TARGET | grep -F "$RFS/" | LC_ALL=C sort -r)
}
cleanup() {
  unmount_all
  # Never delete through a mount that is still there (/dev, /proc of the host).
  if findmnt -rn -o TARGET | grep -qF "$RFS/"; then
    echo "build-guest-image: mounts remain under $RFS; not removing $WORK" >&2
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT
trap 'exit 1' INT TERM

in_root() {  # a command inside the rootfs with a fixed environment
  chroot "$RFS" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 TZ=UTC HOME=/root \
    DEBIAN_FRONTEND=noninteractive SOURCE_DATE_EPOCH="$SOURCE_DATE_EPOCH" "$@"
}

step "debootstrap --variant=minbase $SUITE (the .debs are cached in $CACHE/debs)"
# No fsync per unpacked file: a crash only loses this throwaway tree (removed again before packing).
mkdir -p "$RFS/etc/dpkg/dpkg.cfg.d"
echo force-unsafe-io >"$RFS/etc/dpkg/dpkg.cfg.d/00-dstack-build-unsafe-io"
debootstrap --variant=minbase --arch=amd64 --cache-dir="$CACHE/debs" "$SUITE" "$RFS" "$MIRROR" \
  >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }

step "apt sources, mounts"
cat >"$RFS/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $MIRROR $SUITE-backports main
deb $SECURITY_MIRROR $SUITE-security main
EOF
# No daemon starts inside the build; no docs or translations.
printf '#!/bin/sh\nexit 101\n' >"$RFS/usr/sbin/policy-rc.d"
chmod 755 "$RFS/usr/sbin/policy-rc.d"
cat >"$RFS/etc/dpkg/dpkg.cfg.d/01-dstack-exclude" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
# Kernel modules for hardware a VM does not have: never unpacked (smaller, faster rootfs and initramfs).
for dir in sound drivers/media drivers/net/wireless net/wireless net/mac80211 drivers/bluetooth net/bluetooth \
           drivers/infiniband drivers/staging drivers/gpu drivers/isdn drivers/iio drivers/net/can \
           drivers/input/touchscreen drivers/input/joystick drivers/usb/serial drivers/hid; do
  echo "path-exclude /lib/modules/*/kernel/$dir/*" >>"$RFS/etc/dpkg/dpkg.cfg.d/01-dstack-exclude"
done
cat >"$RFS/etc/apt/apt.conf.d/01-dstack" <<'EOF'
Acquire::Languages "none";
APT::Install-Recommends "false";
Dpkg::Options { "--force-confdef"; "--force-confold"; };
EOF
# Read when the kernel's initramfs is made (a dpkg trigger, at the end of the install): the file is
# initramfs-tools' conffile, kept as written here (--force-confold).
mkdir -p "$RFS/etc/initramfs-tools/conf.d"
printf '%s\n' "${INITRAMFS_MODULES[@]}" >"$RFS/etc/initramfs-tools/modules"
echo MODULES=list >"$RFS/etc/initramfs-tools/conf.d/dstack-modules"
# veritysetup in the initramfs: the boot opens the rootfs with the root hash from the cmdline.
mkdir -p "$RFS/etc/initramfs-tools/hooks"
cat >"$RFS/etc/initramfs-tools/hooks/dstack-verity" <<'EOF'
#!/bin/sh
case "$1" in prereqs) exit 0 ;; esac
. /usr/share/initramfs-tools/hook-functions
copy_exec /usr/sbin/veritysetup /usr/sbin
EOF
chmod 755 "$RFS/etc/initramfs-tools/hooks/dstack-verity"
# The local-top script that opens it (initramfs-tools copies /etc/initramfs-tools/scripts/).
mkdir -p "$RFS/etc/initramfs-tools/scripts/local-top"
cat >"$RFS/etc/initramfs-tools/scripts/local-top/dstack-verity" <<'EOF'
#!/bin/sh
# dstack-verity (initramfs-tools local-top): opens the image's rootfs disk as the dm-verity device
# /dev/mapper/dstack-root, which initramfs-tools then mounts (root= on the cmdline). The disk is
# the squashfs with its hash tree appended at dstack.rootfs_size bytes; dstack.rootfs_hash is the
# tree's root hash. A rootfs that does not verify is never mounted: the VM powers off with the
# reason on the console (not initramfs-tools' panic, which panic=1 turns into a reboot: booting
# the same disk again cannot change the answer).
case "$1" in prereqs) exit 0 ;; esac
. /scripts/functions

DISK=/dev/vda
NAME=dstack-root

fail() {
	echo "dstack-verity: FATAL: $*"
	echo "dstack-verity: FATAL: the root filesystem is not verified, so it is not mounted; powering off"
	sync
	sleep 1
	poweroff -f
}

hash=
size=
read -r cmdline </proc/cmdline
for arg in $cmdline; do
	case "$arg" in
	dstack.rootfs_hash=*) hash="${arg#dstack.rootfs_hash=}" ;;
	dstack.rootfs_size=*) size="${arg#dstack.rootfs_size=}" ;;
	esac
done
[ -n "$hash" ] || fail "no dstack.rootfs_hash= on the kernel cmdline"
[ -n "$size" ] || fail "no dstack.rootfs_size= on the kernel cmdline"
case "$size" in *[!0-9]*) fail "dstack.rootfs_size=$size is not a number of bytes" ;; esac

wait_for_udev 10
tries=0
while [ ! -b "$DISK" ]; do
	tries=$((tries + 1))
	[ "$tries" -le 30 ] || fail "no rootfs disk $DISK after 30 s"
	sleep 1
done
veritysetup open "$DISK" "$NAME" "$DISK" "$hash" --hash-offset="$size" \
	|| fail "veritysetup open $DISK with root hash $hash (hash tree at $size) failed"
# open checks nothing against the root hash: the first read does. Read the squashfs superblock,
# then ask the kernel whether it found a block that does not verify (C, else V).
fstype=$(blkid -p -s TYPE -o value "/dev/mapper/$NAME" 2>/dev/null)
status=$(dmsetup status "$NAME" 2>/dev/null)
case "$status" in
*" verity V"*) ;;
*) fail "$DISK does not verify against root hash $hash (dm-verity status: ${status:-none})" ;;
esac
[ "$fstype" = squashfs ] || fail "/dev/mapper/$NAME holds no squashfs (found: ${fstype:-nothing})"
echo "dstack-verity: $DISK verified: /dev/mapper/$NAME (root hash $hash, hash tree at $size)"
EOF
chmod 755 "$RFS/etc/initramfs-tools/scripts/local-top/dstack-verity"
mount -t proc proc "$RFS/proc"
mount -t sysfs sysfs "$RFS/sys"
mount --bind /dev "$RFS/dev"
mount --bind "$CACHE/debs" "$RFS/var/cache/apt/archives"

step "apt-get install ${PACKAGES[*]}"
{
  in_root apt-get update &&
  in_root apt-get -y dist-upgrade &&
  in_root apt-get install -y "${PACKAGES[@]}"
} >"$WORK/apt.log" 2>&1 || { tail -30 "$WORK/apt.log" >&2; die "apt-get in the rootfs failed (log above)"; }

step "check the mirror state apt verified"
verified=""
for suite in "$SUITE" "$SUITE-updates" "$SUITE-backports" "$SUITE-security"; do
  releases=("$RFS"/var/lib/apt/lists/*_dists_"${suite}"_InRelease)
  release="${releases[0]}"
  [[ -e "$release" ]] || die "apt fetched no InRelease for $suite"
  verified+="$suite $(packages_index_hashes <"$release")"$'\n'
done
[[ "$verified" == "$mirror_state" ]] || die "the Debian mirror changed during the build (its Packages indexes differ from the ones hashed at the start); run the build again"

step "guest agent: the collection under $COLLECTION_ROOT"
dest="$RFS$COLLECTION_ROOT/ansible_collections/dstack/tee"
mkdir -p "$dest"
(cd "$ROOT" && cp --parents -- "${files[@]}" "$dest/")
cat >"$RFS/usr/local/bin/dstack-guest-agent" <<EOF
#!/bin/sh
# The guest agent of dstack.tee (the collection is in $COLLECTION_ROOT; the rootfs is read-only).
export PYTHONPATH=$COLLECTION_ROOT PYTHONDONTWRITEBYTECODE=1
exec /usr/bin/python3 -m ansible_collections.dstack.tee.agents.guest.cli "\$@"
EOF
chmod 755 "$RFS/usr/local/bin/dstack-guest-agent"
in_root /usr/local/bin/dstack-guest-agent --help >"$WORK/agent-help.txt" 2>&1 \
  || { cat "$WORK/agent-help.txt" >&2; die "the guest agent does not start inside the rootfs"; }

step "Python wheels from PyPI (${#WHEELS[@]}, pinned by sha256)"
fetch_wheel() {  # URL SHA256: the wheel in $CACHE/wheels (downloaded once, checked every time); prints its path
  local url="$1" sum="$2" wheel="$CACHE/wheels/${1##*/}"
  if ! echo "$sum  $wheel" | sha256sum -c --status 2>/dev/null; then
    curl -fsSL --retry 3 -m 120 -o "$wheel.tmp" "$url" || die "could not download $url"
    echo "$sum  $wheel.tmp" | sha256sum -c --status \
      || { rm -f "$wheel.tmp"; die "$url does not have the pinned sha256 $sum"; }
    mv "$wheel.tmp" "$wheel"
  fi
  printf '%s\n' "$wheel"
}
site="$(in_root python3 -c 'import sys; print("/usr/local/lib/python3.%d/dist-packages" % sys.version_info[1])')"
mkdir -p "$RFS$site"
for entry in "${WHEELS[@]}"; do
  read -r url sum <<<"$entry"
  wheel="$(fetch_wheel "$url" "$sum")"
  python3 -m zipfile -e "$wheel" "$RFS$site" || die "could not unpack $wheel"
done
chmod -R u=rwX,go=rX "$RFS$site"
# The agent's whole boot path inside the rootfs: each module it imports, and the optional packages
# those modules only report missing when used (a boot with the KMS or the gateway would fail late).
in_root /usr/bin/env PYTHONPATH="$COLLECTION_ROOT" PYTHONDONTWRITEBYTECODE=1 python3 - >"$WORK/agent-imports.txt" 2>&1 <<'PYEOF' \
  || { cat "$WORK/agent-imports.txt" >&2; die "the guest agent's boot path lacks a Python package inside the rootfs (above)"; }
import importlib
base = "ansible_collections.dstack.tee."
for name in ("agents.guest.cli", "agents.guest.boot", "agents.guest.api", "agents.guest.worker",
             "agents.guest.gateway_link", "plugins.module_utils.kms_client", "plugins.module_utils.gateway_client",
             "gunicorn.app.base", "gunicorn.workers.gthread", "podman_compose"):
    importlib.import_module(name if name.startswith(("gunicorn", "podman")) else base + name)
from ansible_collections.dstack.tee.plugins.module_utils import app_certs, attestation, kdf, signatures, wireguard
missing = [what for what, present in (("dcap-qvl (attestation)", attestation.HAS_DCAP_QVL),
                                      ("coincurve (kdf)", kdf.HAS_SECP256K1),
                                      ("cryptography (app_certs)", app_certs.HAS_CRYPTOGRAPHY),
                                      ("pyroute2 (wireguard)", wireguard.HAS_PYROUTE2))
           if not present]
import cryptography
if int(cryptography.__version__.split(".", maxsplit=1)[0]) < 42:
    missing.append(f"cryptography 42+ (found {cryptography.__version__}: no Certificate.not_valid_after_utc)")
import gunicorn
if gunicorn.version_info[0] != 27:
    missing.append(f"gunicorn 27 (found {gunicorn.__version__}: the Worker API's worker class needs it)")
if missing:
    raise SystemExit("missing: " + ", ".join(missing))
secret = bytes(range(1, 33))
assert kdf.k256_recover(b"1" * 32, kdf.k256_sign(secret, b"1" * 32)) == kdf.k256_public_key(secret)
assert signatures.keccak(b"").hex().startswith("c5d24601")
PYEOF
# The gateway step's tunnel (wireguard.WgInterface runs wireguard-go, as on the hosts).
in_root wireguard-go --version >"$WORK/wireguard-go.txt" 2>&1 \
  || { cat "$WORK/wireguard-go.txt" >&2; die "wireguard-go does not run inside the rootfs"; }
cat >"$RFS/usr/local/bin/podman-compose" <<'EOF'
#!/bin/sh
exec /usr/bin/python3 -m podman_compose "$@"
EOF
chmod 755 "$RFS/usr/local/bin/podman-compose"
in_root /usr/local/bin/podman-compose --version >"$WORK/podman-compose.txt" 2>&1 \
  || { cat "$WORK/podman-compose.txt" >&2; die "podman-compose does not run inside the rootfs"; }

step "podman: /etc/containers/containers.conf"
# The app's podman (dstack-init gives the agent CONTAINERS_CONF=this file, which replaces podman's
# defaults): runc and rlimits as compose_runner.CONTAINERS_CONF sets them on the hosts; no systemd
# and no journald in the guest, so cgroupfs, events to a file and k8s-file container logs (which
# `podman logs` reads for the console and the Worker's /logs). Storage: overlay on the data disk
# (/var/lib/containers, dstack-init), not on a tmpfs: the app's images would fill the VM's memory.
mkdir -p "$RFS/etc/containers"
cat >"$RFS/etc/containers/containers.conf" <<'CONF'
# dstack.tee guest: podman without systemd (scripts/build-guest-image.sh)
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF

step "boot: /usr/local/sbin/dstack-init (PID 1)"
mkdir -p "$RFS/dstack/share" "$RFS/dstack/data"
cat >"$RFS/usr/local/sbin/dstack-init" <<'EOF'
#!/bin/sh
# dstack-init: PID 1 of the dstack.tee guest (init= on the kernel cmdline). initramfs-tools has
# opened the dm-verity root (local-top/dstack-verity) and mounted it read-only (squashfs); /proc,
# /sys, /dev and /run come from the initramfs. This makes what must be writable, and mounts:
#   /dstack/share     the config share, read-only (9p, tag host-shared): app-compose.json,
#                     .sys-config.json, .encrypted-env, .instance_info, .user-config
#   /dstack/data      the data disk /dev/vdb, ext4 (made at the first boot, when blkid finds nothing
#                     on the disk; anything else there stops the boot); /var/lib/containers is its
#                     containers/ folder
#   /var, /etc/cni/net.d  overlays: the image's folder under a tmpfs (podman writes its state and
#                     its CNI networks there); /tmp a tmpfs; cgroup2 at /sys/fs/cgroup
#   /etc/resolv.conf  bound from /run/dstack-init/resolv.conf; the rest of /etc stays read-only
# sets up QEMU's user networking (eth0 10.0.2.15/24, gateway 10.0.2.2, DNS 10.0.2.3) and loads tun
# (wireguard-go's), and runs the guest agent (work folder /run/dstack, a tmpfs: its RTMR state and
# runtime event log start empty at each power-on; socket /var/run/dstack.sock; --own-network: the
# VM's network is the CVM's, the gateway's tunnel goes up in it; CONTAINERS_CONF the image's
# /etc/containers/containers.conf), its output on the console behind "[agent] ".
# An agent that exits before its boot measured anything (no runtime event log yet: a host quote
# service not there yet, say) is started again, after 1 s, doubling to 60 s. Once the boot is
# measured the agent cannot boot again in this power-on (RTMR3 holds this boot's events; it refuses),
# so its exit powers the VM off: the host API has the boot's error, and a start is a new power-on.
# As PID 1 it reaps orphaned processes too: the shell waiting for the agent reaps any child that
# exits. Progress goes to the console as "dstack-init: [<uptime>s] ..."; a step the app cannot
# run without powers the VM off, the reason on the console.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
umask 022

SHARE=/dstack/share
SHARE_TAG=host-shared
DATA=/dstack/data
DATA_DISK=/dev/vdb
STATE=/run/dstack-init
WORK=/run/dstack
ADDRESS=10.0.2.15/24
GATEWAY=10.0.2.2
DNS=10.0.2.3

uptime_now() {
	read -r up rest </proc/uptime 2>/dev/null || up=0
	echo "$up"
}

say() {
	echo "dstack-init: [$(uptime_now)s] $*"
}

power_off() {
	sync
	echo o >/proc/sysrq-trigger
	while :; do sleep 60; done
}

fatal() {
	say "FATAL: $*"
	say "FATAL: the guest cannot run its app; powering off"
	power_off
}

shown() {  # arguments as one line, an empty one as ''
	line=
	for arg in "$@"; do
		[ -n "$arg" ] || arg="''"
		line="$line $arg"
	done
	echo "${line# }"
}

mount_once() {  # TYPE SOURCE TARGET OPTIONS: mount unless something is mounted there already
	mountpoint -q "$3" && return 0
	mount -t "$1" -o "$4" "$2" "$3" || fatal "cannot mount $1 $2 on $3"
}

writable() {  # DIR NAME: DIR made writable, an overlay of the image's DIR and a tmpfs layer
	mkdir -p "$STATE/layers/$2/upper" "$STATE/layers/$2/work"
	mount_once overlay overlay "$1" "lowerdir=$1,upperdir=$STATE/layers/$2/upper,workdir=$STATE/layers/$2/work"
}

say "starting (kernel $(uname -r))"
mount_once proc proc /proc nosuid,nodev,noexec
mount_once sysfs sysfs /sys nosuid,nodev,noexec
mount_once devtmpfs devtmpfs /dev mode=0755,nosuid
mkdir -p /dev/pts /dev/shm
mount_once devpts devpts /dev/pts gid=5,mode=0620,ptmxmode=0666,nosuid,noexec
mount_once tmpfs tmpfs /dev/shm mode=1777,nosuid,nodev
mount_once tmpfs tmpfs /run mode=0755,nosuid,nodev
mount_once cgroup2 cgroup2 /sys/fs/cgroup nsdelegate,nosuid,nodev,noexec
mount_once tmpfs tmpfs /tmp mode=1777,nosuid,nodev
mkdir -p "$STATE/layers"
mount_once tmpfs tmpfs "$STATE/layers" mode=0755
writable /var var
writable /etc/cni/net.d cni
printf 'nameserver %s\n' "$DNS" >"$STATE/resolv.conf"
mount --bind "$STATE/resolv.conf" /etc/resolv.conf || fatal "cannot bind $STATE/resolv.conf on /etc/resolv.conf"
read -r hostname </etc/hostname && echo "$hostname" >/proc/sys/kernel/hostname
say "mounted /proc /sys /dev /run /tmp cgroup2; /var and /etc/cni/net.d writable (overlays on tmpfs)"

mount_once 9p "$SHARE_TAG" "$SHARE" trans=virtio,version=9p2000.L,ro
names=
for path in "$SHARE"/.[!.]* "$SHARE"/*; do
	[ -e "$path" ] && names="$names ${path##*/}"
done
say "config share $SHARE_TAG mounted read-only at $SHARE:${names:- (empty)}"

[ -b "$DATA_DISK" ] || fatal "no data disk $DATA_DISK"
fstype=$(blkid -p -s TYPE -o value "$DATA_DISK")
case $? in
0) ;;
2)  # blkid found no signature at all: a new disk
	say "data disk $DATA_DISK is blank: making ext4"
	mkfs.ext4 -q -L dstack-data "$DATA_DISK" || fatal "mkfs.ext4 $DATA_DISK failed"
	fstype=ext4 ;;
*) fatal "blkid cannot probe the data disk $DATA_DISK" ;;
esac
[ "$fstype" = ext4 ] || fatal "the data disk $DATA_DISK holds ${fstype:-something} that is not ext4; not touching it"
mount_once ext4 "$DATA_DISK" "$DATA" noatime
mkdir -p "$DATA/containers" /var/lib/containers
mount --bind "$DATA/containers" /var/lib/containers || fatal "cannot bind $DATA/containers on /var/lib/containers"
say "data disk $DATA_DISK (ext4) mounted at $DATA; /var/lib/containers on it"

ip link set lo up
# wireguard-go (the gateway step's tunnel) opens /dev/net/tun, which exists once the module is in.
modprobe tun 2>/dev/null || say "network: no tun module; a gateway tunnel cannot come up"
if ip link show eth0 >/dev/null 2>&1; then
	if ip link set eth0 up && ip addr add "$ADDRESS" dev eth0 && ip route add default via "$GATEWAY" dev eth0; then
		say "network: eth0 $ADDRESS, gateway $GATEWAY, DNS $DNS"
	else
		say "network: could not configure eth0 ($ADDRESS via $GATEWAY); the guest may have no network"
	fi
else
	say "network: no eth0; the guest has no network"
fi

mkdir -p "$WORK"
set -- run --tee auto --config-dir "$SHARE" --work-dir "$WORK" --socket /var/run/dstack.sock --tappd-socket '' \
	--own-network
delay=1
while :; do
	say "starting the guest agent: dstack-guest-agent $(shown "$@")"
	{
		env -i PATH="$PATH" HOME=/root LANG=C.UTF-8 PYTHONUNBUFFERED=1 CONTAINERS_CONF=/etc/containers/containers.conf \
			dstack-guest-agent "$@" </dev/null 2>&1
		echo $? >"$STATE/agent.status"
	} | sed -u 's/^/[agent] /'
	read -r status <"$STATE/agent.status" || status=unknown
	# The agent's runtime event log (agents/guest/context.py): the events its boot put into RTMR3.
	if [ -s "$WORK/runtime_events.log" ]; then
		say "the guest agent exited with status $status after its boot was measured; it cannot boot again before the next power-on: powering off"
		power_off
	fi
	say "the guest agent exited with status $status before its boot measured anything; starting it again in $delay s"
	sleep "$delay"
	delay=$((delay * 2))
	[ "$delay" -le 60 ] || delay=60
done
EOF
chmod 755 "$RFS/usr/local/sbin/dstack-init"
# The agent's flags dstack-init passes: a renamed one fails here, not in a booted VM.
in_root /usr/local/bin/dstack-guest-agent run --help >"$WORK/agent-run-help.txt" 2>&1 \
  || { cat "$WORK/agent-run-help.txt" >&2; die "dstack-guest-agent run --help fails inside the rootfs"; }
for flag in --tee --config-dir --work-dir --socket --tappd-socket --own-network; do
  grep -q -e "$flag " "$WORK/agent-run-help.txt" || die "dstack-guest-agent run has no $flag (dstack-init passes it)"
done

step "package manifest"
# shellcheck disable=SC2016  # dpkg-query's own ${...} fields
in_root dpkg-query -W -f '${Package} ${Version} ${Architecture}\n' | LC_ALL=C sort >"$IMG/packages.manifest"
cp "$IMG/packages.manifest" "$RFS$COLLECTION_ROOT/packages.manifest"

step "kernel and initramfs (made in the install, with SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH)"
kver="$(in_root linux-version list | LC_ALL=C sort -V | tail -1)"
[[ -n "$kver" ]] || die "no kernel installed in the rootfs"
[[ -f "$RFS/boot/initrd.img-$kver" ]] || die "the kernel's install made no initramfs"
grep -qx dm_verity "$RFS/etc/initramfs-tools/modules" || die "initramfs-tools replaced its modules list"
in_root lsinitramfs "/boot/initrd.img-$kver" >"$WORK/initramfs.list"
grep -q 'sbin/veritysetup$' "$WORK/initramfs.list" \
  || die "the initramfs has no veritysetup (hook /etc/initramfs-tools/hooks/dstack-verity)"
grep -qx 'scripts/local-top/dstack-verity' "$WORK/initramfs.list" \
  || die "the initramfs has no scripts/local-top/dstack-verity"
cp "$RFS/boot/vmlinuz-$kver" "$IMG/bzImage"
cp "$RFS/boot/initrd.img-$kver" "$IMG/initramfs.img"
cp "$OVMF" "$IMG/ovmf.fd"

step "strip what differs from build to build"
unmount_all
rm -f "$RFS/usr/sbin/policy-rc.d" "$RFS/etc/dpkg/dpkg.cfg.d/00-dstack-build-unsafe-io" "$RFS"/boot/initrd.img-* "$RFS"/boot/vmlinuz-*
rm -rf "$RFS"/var/lib/apt/lists/* "$RFS"/var/cache/apt/* "$RFS"/var/cache/debconf/*-old \
  "$RFS"/var/cache/ldconfig/aux-cache "$RFS"/var/lib/dpkg/*-old "$RFS"/etc/*- \
  "$RFS"/var/lib/systemd/random-seed "$RFS"/var/lib/dbus/machine-id "$RFS"/etc/ssh/ssh_host_* \
  "$RFS"/tmp/* "$RFS"/var/tmp/* "$RFS"/root/.bash_history "$RFS"/var/log/* "$RFS"/run/*
mkdir -p "$RFS/var/cache/apt/archives/partial"
find "$RFS" \( -name __pycache__ -o -name '*.pyc' \) -prune -exec rm -rf {} +
# The Python bytecode, compiled again the same way in every build: the rootfs is read-only, so
# without it every Python start compiles each module it imports from source (the guest agent with
# the standard library, podman-compose: a minute and more of a TCG VM's CPU per boot). Hash-based
# .pyc (checked against the source's hash, no mtime in them), one process compiling the folders in
# order, PYTHONHASHSEED fixed (set and frozenset constants are in hash order): the same bytes from
# the same inputs.
stdlib="$(in_root python3 -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')"
in_root PYTHONHASHSEED=0 python3 -m compileall -q --invalidation-mode checked-hash \
  "$stdlib" /usr/lib/python3/dist-packages "$site" "$COLLECTION_ROOT" >"$WORK/compileall.log" 2>&1 \
  || { tail -20 "$WORK/compileall.log" >&2; die "python3 -m compileall failed inside the rootfs"; }
: >"$RFS/etc/machine-id"
echo dstack >"$RFS/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tdstack\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$RFS/etc/hosts"
: >"$RFS/etc/resolv.conf"

step "rootfs: squashfs (all times $SOURCE_DATE_EPOCH) and dm-verity"
# mksquashfs refuses SOURCE_DATE_EPOCH together with the options that say the same.
env -u SOURCE_DATE_EPOCH mksquashfs "$RFS" "$WORK/rootfs.squashfs" -noappend -comp zstd -Xcompression-level 6 -all-time "$SOURCE_DATE_EPOCH" \
  -mkfs-time "$SOURCE_DATE_EPOCH" -no-progress >"$WORK/mksquashfs.log" 2>&1 \
  || { tail -20 "$WORK/mksquashfs.log" >&2; die "mksquashfs failed"; }
data_size=$(stat -c %s "$WORK/rootfs.squashfs")
data_size=$(( (data_size + 4095) / 4096 * 4096 ))  # verity works on whole 4 KiB blocks
truncate -s "$data_size" "$WORK/rootfs.squashfs"
mv "$WORK/rootfs.squashfs" "$IMG/rootfs.img.verity"
# A fixed salt and UUID: veritysetup picks random ones otherwise.
salt="$(printf 'dstack.tee guest rootfs' | sha256sum | cut -d' ' -f1)"
veritysetup format --salt="$salt" --uuid=00000000-0000-4000-8000-000000000000 \
  --data-block-size=4096 --hash-block-size=4096 --hash-offset="$data_size" \
  "$IMG/rootfs.img.verity" "$IMG/rootfs.img.verity" >"$WORK/verity.txt" \
  || die "veritysetup format failed"
rootfs_hash="$(awk -F: '/^Root hash/ {gsub(/[ \t]/, "", $2); print $2}' "$WORK/verity.txt")"
[[ "$rootfs_hash" =~ ^[0-9a-f]{64}$ ]] || die "veritysetup printed no root hash"

step "metadata.json, sha256sum.txt, digest.txt"
version="$(awk '$1 == "version:" {print $2}' "$ROOT/galaxy.yml")"
cmdline="$CMDLINE_BASE dstack.rootfs_hash=$rootfs_hash dstack.rootfs_size=$data_size"
python3 - "$IMG/metadata.json" "$cmdline" "$rootfs_hash" "$version" "$kver" "$OVMF_VARIANT" <<'EOF'
import json, os, sys
path, cmdline, rootfs_hash, version, kernel_version, ovmf_variant = sys.argv[1:]
meta = {"cmdline": cmdline, "kernel": "bzImage", "initrd": "initramfs.img", "bios": "ovmf.fd",
        "rootfs": "rootfs.img.verity", "rootfs_hash": rootfs_hash, "shared_ro": True,
        "version": version, "is_dev": False, "ovmf_variant": ovmf_variant,
        "kernel_version": kernel_version, "distribution": "debian-12", "packages": "packages.manifest",
        "source_date_epoch": int(os.environ["SOURCE_DATE_EPOCH"])}
with open(path, "w", encoding="utf-8") as out:
    json.dump(meta, out, indent=2, sort_keys=True)
    out.write("\n")
EOF
(
  cd "$IMG" || exit 1
  export LC_ALL=C  # the glob sorts bytewise, as sort(1) in C
  files=()
  for name in *; do
    [[ "$name" == sha256sum.txt || "$name" == digest.txt ]] || files+=("$name")
  done
  sha256sum -- "${files[@]}" >sha256sum.txt
)
sha256sum <"$IMG/sha256sum.txt" | cut -d' ' -f1 >"$IMG/digest.txt"
find "$IMG" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

if ((USE_CACHE)); then
  rm -rf "$CACHE/images/$KEY.tmp"
  cp -a "$IMG" "$CACHE/images/$KEY.tmp"
  rm -rf "$CACHE/images/$KEY"
  mv "$CACHE/images/$KEY.tmp" "$CACHE/images/$KEY"
  printf '%s\n' "$inputs" >"$CACHE/images/$KEY.inputs"  # what the key is a hash of
  # Only the three newest images stay (each is about 180 MB); the .inputs file's time is the build's.
  find "$CACHE/images" -maxdepth 1 -name '*.inputs' -printf '%T@ %p\n' | sort -rn | tail -n +4 | cut -d' ' -f2- \
    | while read -r stale; do
    rm -rf "${stale%.inputs}" "$stale"
  done
fi
publish "$IMG"
step "done: $OUT (os_image_hash $(cat "$OUT/digest.txt"))"
