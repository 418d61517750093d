#!/usr/bin/env bash
# Which Linux guests boot under this machine's /dev/kvm, and which stall, in one command.
#
# Boots Debian's stock kernel (linux-image-amd64) with a tiny busybox initramfs whose /init prints
# a marker line and powers off, under QEMU with KVM and with TCG, across machine types, CPU
# models, firmware (SeaBIOS, OVMF) and kernel parameters, then through libvirt with the domain XML
# the VMM's libvirt backend renders for a no_tee VM (plugins/module_utils/libvirt_domain.py).
# Two speed cases first time a 150-byte guest's CPU loop (KVM against TCG). Each case prints one
# line: USERSPACE (wall time, the guest's own uptime at /init), STALL (the last console line before
# the timeout), EMULATION FAILURE (KVM gave up on an instruction) or ABORT (QEMU's error). Needs
# root, qemu-system-x86 and apt (it downloads the Debian packages into $PROBE_DIR, installs
# nothing); the libvirt cases also need libvirt-daemon-system and the project's .venv
# (scripts/setup.sh). Every process it starts it stops again. About 9 minutes on this machine.
#
#   scripts/kvm-boot-probe.sh                 # all cases
#   PROBE_TIMEOUT=40 scripts/kvm-boot-probe.sh
#   PROBE_ONLY='tcg|libvirt' scripts/kvm-boot-probe.sh   # cases whose name matches the regex
set -u

REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${PROBE_DIR:-/var/tmp/kvm-boot-probe}   # /var/tmp: libvirt's qemu user must reach it
TIMEOUT=${PROBE_TIMEOUT:-20}                 # a guest that works is at /init in under 10 s (TCG)
ONLY=${PROBE_ONLY:-.}
MARK=KVMPROBE-USERSPACE
LOOP_N=2000000
STARTED_DAEMONS=()
DOMAIN=kvm-boot-probe

die() { echo "kvm-boot-probe: $*" >&2; exit 2; }
[ "$(id -u)" = 0 ] || die "run as root (it opens /dev/kvm and may start libvirtd)"
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 is missing (apt-get install -y qemu-system-x86)"
if ! { mkdir -p "$WORK" && chmod 755 "$WORK" && cd "$WORK"; }; then die "cannot use $WORK"; fi

# ---- inputs: Debian's kernel, busybox-static, OVMF (downloaded once, kept in $WORK) ------------
fetch() {
    [ -s vmlinuz ] && [ -s vmlinux ] && [ -s initrd.gz ] && [ -s OVMF.fd ] && [ -s "loop-$LOOP_N" ] && return
    local kpkg
    kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    [ -n "$kpkg" ] || die "apt-cache does not know linux-image-amd64 (apt-get update?)"
    if ! { rm -rf debs root && mkdir debs && (cd debs && apt-get download "$kpkg" busybox-static ovmf >/dev/null 2>&1); }; then
        die "apt-get download $kpkg busybox-static ovmf failed"
    fi
    for deb in debs/*.deb; do dpkg-deb -x "$deb" root; done
    cp root/boot/vmlinuz-* vmlinuz && cp root/usr/share/ovmf/OVMF.fd OVMF.fd && echo "$kpkg" > kernel.txt
    rm -rf initfs && mkdir -p initfs/bin initfs/proc && cp root/bin/busybox initfs/bin/
    cat > initfs/init <<EOF
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
echo "$MARK uptime=\$(/bin/busybox cut -d' ' -f1 /proc/uptime)s cpu=\$(/bin/busybox sed -n 's/^model name.*: //p' /proc/cpuinfo | /bin/busybox head -n1)"
/bin/busybox poweroff -f
EOF
    chmod 755 initfs/init
    # newc cpio written here, so the probe needs no cpio(1)
    python3 - initfs initrd.gz <<'EOF' || die "building the initramfs failed"
import gzip, os, sys
root, out = sys.argv[1], sys.argv[2]
def entry(name, mode, data, ino):
    head = ("070701" + "".join("%08X" % v for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0))).encode() + name.encode() + b"\0"
    return head + b"\0" * (-len(head) % 4) + data + b"\0" * (-len(data) % 4)
buf, ino = bytearray(), 1
for dirpath, dirs, files in os.walk(root):
    dirs.sort()
    for name in sorted(dirs) + sorted(files):
        path = os.path.join(dirpath, name)
        data = b"" if os.path.isdir(path) else open(path, "rb").read()
        buf += entry(os.path.relpath(path, root), os.lstat(path).st_mode, data, ino)
        ino += 1
buf += entry("TRAILER!!!", 0, b"", 0)
open(out, "wb").write(gzip.compress(bytes(buf), 1, mtime=0))
EOF
    # the uncompressed ELF inside the bzImage: QEMU boots it through its PVH note (32-bit entry,
    # no real-mode setup code, so no EDD probe)
    python3 -c 'import lzma; d = open("vmlinuz", "rb").read()
open("vmlinux", "wb").write(lzma.LZMADecompressor().decompress(d[d.find(b"\xfd7zXZ\0"):]))' \
        || die "extracting vmlinux from vmlinuz failed"
    # 150-byte multiboot guests: enter long mode, count N down (2 instructions a turn), say so on
    # COM1, exit through isa-debug-exit. Two of them (N=1 and N=$LOOP_N) time the CPU itself: the
    # difference of their run times leaves QEMU's start and the BIOS out.
    python3 - 1 "$LOOP_N" <<'PY' || die "writing the loop guests failed"
import struct, sys
def com1(msg):  # mov edx, 0x3f8; (mov al, c; out dx, al)...
    return b"\xba\xf8\x03\x00\x00" + b"".join(b"\xb0" + bytes([c]) + b"\xee" for c in msg)
long_mode = (b"\xc7\x05\x00\x00\x20\x00\x03\x10\x20\x00"      # PML4[0] -> PDPT (page tables at 2 MiB)
             b"\xc7\x05\x00\x10\x20\x00\x03\x20\x20\x00"      # PDPT[0] -> PD
             b"\xc7\x05\x00\x20\x20\x00\x83\x00\x00\x00"      # PD[0] = the first 2 MiB, identity
             b"\x0f\x20\xe0\x83\xc8\x20\x0f\x22\xe0"          # CR4.PAE
             b"\xb8\x00\x00\x20\x00\x0f\x22\xd8"              # CR3
             b"\xb9\x80\x00\x00\xc0\x0f\x32\x0d\x00\x01\x00\x00\x0f\x30"  # EFER.LME
             b"\x0f\x20\xc0\x0d\x00\x00\x00\x80\x0f\x22\xc0")  # CR0.PG
magic, flags, base = 0x1BADB002, 0x00010000, 0x100000
header = struct.pack("<8I", magic, flags, (-(magic + flags)) & 0xFFFFFFFF, base, base, 0, 0, base + 32)
for n in sys.argv[1:]:
    count = b"\xb9" + struct.pack("<I", int(n)) + b"\x49\x75\xfd"   # mov ecx, n; 1: dec ecx; jnz 1b
    code = b"\xfa" + long_mode + count + com1(b"KVMPROBE-LOOP done\n") + b"\xb0\x00\xe6\xf4\xf4\xeb\xfd"
    open(f"loop-{n}", "wb").write(header + code)
PY
    chmod 644 vmlinuz vmlinux initrd.gz OVMF.fd loop-1 "loop-$LOOP_N"
    rm -rf debs root initfs   # the kernel package unpacked is 400 MB of modules the probe never uses
}

since() { awk -v t0="$1" -v t1="$(date +%s.%N)" 'BEGIN { printf "%.1f", t1 - t0 }'; }

# ---- one case: QEMU directly ---------------------------------------------------------------------
verdict() {  # $1 log, $2 rc, $3 wall seconds
    local log=$1 rc=$2 wall=$3 line
    if line=$(grep -a -m1 "$MARK" "$log"); then
        echo "USERSPACE in ${wall}s wall (${line#"$MARK "})"
    elif grep -aq 'KVM internal error' "$log"; then   # QEMU pauses the guest and waits for the timeout
        line=$(grep -a -m1 '^Code=' "$log" | cut -c1-90)
        echo "EMULATION FAILURE: KVM internal error ($(grep -a -m1 -o 'emulation failure' "$log" || echo see log)); ${line}"
    elif [ "$rc" = 124 ]; then
        line=$(tr -d '\r' < "$log" | sed 's/\x1b[[][0-9;?]*[a-zA-Z]//g; s/\x1b.//g' | grep -av 'terminating on signal' | grep -a '...' | tail -n1)
        echo "STALL: nothing more after ${TIMEOUT}s; last console line: ${line:-<none>}"
    else
        line=$(grep -a -m1 -i 'qemu-system-x86_64:.*\(error\|fail\|abort\|not\)' "$log" || tail -n1 "$log")
        echo "ABORT (exit $rc): $line"
    fi
}

case_qemu() {  # $1 name, $2 accel (kvm|tcg), $3 kernel image, $4 kernel cmdline extra, rest: qemu options
    local name=$1 accel=$2 kernel=$3 extra=$4; shift 4
    [[ $name =~ $ONLY ]] || return 0
    local log="$WORK/$name.log" t0 rc
    local accel_opt=(-accel tcg); [ "$accel" = kvm ] && accel_opt=(-accel kvm)
    t0=$(date +%s.%N)
    {   # the braces keep bash's own "Aborted" notice out of the report (the verdict says it)
        timeout "$TIMEOUT" qemu-system-x86_64 "${accel_opt[@]}" -m 512 -nographic -no-reboot "$@" \
            -kernel "$kernel" -initrd initrd.gz -append "console=ttyS0 panic=-1 $extra" >"$log" 2>&1 </dev/null
    } 2>/dev/null
    rc=$?
    printf '%-26s %s\n' "$name" "$(verdict "$log" "$rc" "$(since "$t0")")"
}

case_speed() {  # $1 name, $2 accel: guest instructions a second, from the two loop guests
    local name=$1 accel=$2 n t0 rc walls=()
    [[ $name =~ $ONLY ]] || return 0
    for n in 1 "$LOOP_N"; do
        t0=$(date +%s.%N)
        { timeout "$TIMEOUT" qemu-system-x86_64 -accel "$accel" -m 64 -nographic -no-reboot \
            -device isa-debug-exit,iobase=0xf4,iosize=4 -kernel "loop-$n" >"$WORK/$name-$n.log" 2>&1 </dev/null; } 2>/dev/null
        rc=$?; walls+=("$(since "$t0")")
        if ! grep -aq KVMPROBE-LOOP "$WORK/$name-$n.log"; then
            printf '%-26s %s\n' "$name" "$(verdict "$WORK/$name-$n.log" "$rc" "${walls[-1]}")"; return
        fi
    done
    printf '%-26s %s\n' "$name" "$(awk -v a="${walls[0]}" -v b="${walls[1]}" -v n=$((2 * LOOP_N)) 'BEGIN {
        d = b - a
        more = d > 0.3 ? sprintf("%.1fs more", d) : "no measurable extra time"
        rate = d > 0.3 ? sprintf("%.1f", n / d / 1e6) : sprintf("over %.0f", n / 0.3 / 1e6)
        printf "RAN %d more guest instructions in %s (%.1fs against %.1fs): %s M instructions/s", n, more, b, a, rate }')"
}

# ---- one case: libvirt, with the domain XML the VMM's libvirt backend renders (no_tee) -----------
stop_daemons() {
    virsh -c qemu:///system destroy "$DOMAIN" >/dev/null 2>&1
    virsh -c qemu:///system undefine "$DOMAIN" >/dev/null 2>&1
    local pid
    for pid in "${STARTED_DAEMONS[@]}"; do kill "$pid" 2>/dev/null; done
}
trap stop_daemons EXIT

libvirt_up() {
    virsh -c qemu:///system uri >/dev/null 2>&1 && return 0
    [ -x /usr/sbin/libvirtd ] && [ -x /usr/sbin/virtlogd ] || return 1
    chgrp kvm /dev/kvm 2>/dev/null && chmod 660 /dev/kvm   # machine-recipes.md: qemu runs as libvirt-qemu
    local exe pid _try
    for exe in virtlogd libvirtd; do
        if ! pgrep -x "$exe" >/dev/null; then
            "/usr/sbin/$exe" -d && sleep 0.5
            pid=$(pgrep -nx "$exe") && STARTED_DAEMONS+=("$pid")
        fi
    done
    for _try in $(seq 50); do virsh -c qemu:///system uri >/dev/null 2>&1 && return 0; sleep 0.2; done
    return 1
}

case_libvirt() {  # $1 name, $2 domain type (kvm|qemu)
    local name=$1 dtype=$2
    [[ $name =~ $ONLY ]] || return 0
    local py="$REPO/.venv/bin/python" log="$WORK/$name.log" xml="$WORK/$name.xml" t0 _tick wall
    if [ ! -x "$py" ]; then printf '%-26s %s\n' "$name" "SKIPPED: no $py (scripts/setup.sh)"; return; fi
    if ! command -v virsh >/dev/null || ! libvirt_up; then
        printf '%-26s %s\n' "$name" "SKIPPED: libvirt's daemon is not installed or did not start"; return
    fi
    rm -f "$log"
    "$py" - "$WORK" "$dtype" "$log" "$TIMEOUT" >"$xml" <<'EOF' || { printf '%-26s %s\n' "$name" "SKIPPED: rendering failed"; return; }
import sys
from ansible_collections.dstack.tee.plugins.module_utils import libvirt_domain as ld
work, dtype, log = sys.argv[1:4]
print(ld.render_domain_xml(ld.DomainSpec(
    name="kvm-boot-probe", kernel=f"{work}/vmlinuz", initrd=f"{work}/initrd.gz",
    cmdline="console=ttyS0 panic=-1", memory_mb=512, vcpu=1, no_tee=True,
    serial_log=log, domain_type=dtype)), end="")
EOF
    virsh -c qemu:///system destroy "$DOMAIN" >/dev/null 2>&1; virsh -c qemu:///system undefine "$DOMAIN" >/dev/null 2>&1
    if ! virsh -c qemu:///system define "$xml" >/dev/null 2>"$WORK/$name.err"; then
        printf '%-26s %s\n' "$name" "ABORT (define): $(head -n1 "$WORK/$name.err")"; return
    fi
    t0=$(date +%s.%N)
    if ! virsh -c qemu:///system start "$DOMAIN" >/dev/null 2>"$WORK/$name.err"; then
        printf '%-26s %s\n' "$name" "ABORT (start): $(head -n1 "$WORK/$name.err")"
        virsh -c qemu:///system undefine "$DOMAIN" >/dev/null 2>&1; return
    fi
    for _tick in $(seq $((TIMEOUT * 5))); do
        grep -aq "$MARK" "$log" 2>/dev/null && break
        virsh -c qemu:///system domstate "$DOMAIN" 2>/dev/null | grep -q 'shut off' && break
        sleep 0.2
    done
    wall=$(since "$t0")
    virsh -c qemu:///system destroy "$DOMAIN" >/dev/null 2>&1; virsh -c qemu:///system undefine "$DOMAIN" >/dev/null 2>&1
    if grep -aq "$MARK" "$log" 2>/dev/null; then
        printf '%-26s %s\n' "$name" "$(verdict "$log" 0 "$wall")"
    else
        # no video device in the domain: SeaBIOS and the kernel's setup code print nowhere, so a
        # guest that never reaches its console leaves the serial log empty
        printf '%-26s %s\n' "$name" "$(verdict "$log" 124 "$wall")"
    fi
}

# ---- the run ---------------------------------------------------------------------------------------
fetch
echo "kernel: $(cat kernel.txt); QEMU: $(qemu-system-x86_64 --version | head -n1); logs in $WORK"
kvm_mod=$(for m in kvm_intel kvm_amd kvm_pvm; do [ -d /sys/module/$m ] && printf '%s ' $m; done)
echo "/dev/kvm: $(stat -c '%A %U:%G' /dev/kvm 2>/dev/null || echo missing); KVM modules: ${kvm_mod:-none};" \
     "CPU: $(sed -n 's/^model name.*: //p' /proc/cpuinfo | head -n1), vmx/svm flag: $(grep -m1 -ow 'vmx\|svm' /proc/cpuinfo || echo none)"
case " $kvm_mod " in *" kvm_pvm "*) echo "note: kvm_pvm is PVM (pagetable-based virtualization), not VMX/SVM: it runs only PVM-enabled guest kernels";; esac
echo "cases (timeout ${TIMEOUT}s each):"
case_speed speed-tcg                tcg
case_speed speed-kvm                kvm
case_qemu tcg-pc                   tcg vmlinuz ""
case_qemu tcg-q35-split            tcg vmlinuz ""  -machine q35,kernel-irqchip=split,hpet=off
case_qemu tcg-pvh-vmlinux          tcg vmlinux "earlyprintk=serial,ttyS0"
case_qemu tcg-pc-ovmf              tcg vmlinuz ""  -bios OVMF.fd
case_qemu kvm-pc                   kvm vmlinuz ""
case_qemu kvm-pc-earlyprintk       kvm vmlinuz "earlyprintk=serial,ttyS0,115200 ignore_loglevel"
case_qemu kvm-q35-split            kvm vmlinuz ""  -machine q35,kernel-irqchip=split,hpet=off
case_qemu kvm-edd-off              kvm vmlinuz "edd=off"
case_qemu kvm-noapic               kvm vmlinuz "noapic"
case_qemu kvm-nokaslr              kvm vmlinuz "nokaslr"
case_qemu kvm-tsc-reliable         kvm vmlinuz "tsc=reliable"
case_qemu kvm-clocksource-jiffies  kvm vmlinuz "clocksource=jiffies"
case_qemu kvm-all-params           kvm vmlinuz "edd=off noapic nokaslr tsc=reliable clocksource=jiffies earlyprintk=serial,ttyS0"
case_qemu kvm-smp1                 kvm vmlinuz ""  -smp 1
case_qemu kvm-smp2                 kvm vmlinuz ""  -smp 2
case_qemu kvm-cpu-qemu64           kvm vmlinuz ""  -cpu qemu64
case_qemu kvm-cpu-max              kvm vmlinuz ""  -cpu max
case_qemu kvm-cpu-Skylake-Server   kvm vmlinuz ""  -cpu Skylake-Server
case_qemu kvm-cpu-EPYC             kvm vmlinuz ""  -cpu EPYC
case_qemu kvm-cpu-host             kvm vmlinuz ""  -cpu host
case_qemu kvm-cpu-host-noarchcap   kvm vmlinuz ""  -cpu host,-arch-capabilities
case_qemu kvm-pc-ovmf              kvm vmlinuz ""  -bios OVMF.fd
case_libvirt libvirt-no_tee-kvm       kvm
case_libvirt libvirt-no_tee-qemu      qemu
case " $kvm_mod " in *" kvm_pvm "*) cat <<'TXT'
reading: with kvm_pvm, a kernel not built as a PVM guest runs under KVM's instruction emulator
(speed-kvm against speed-tcg), so STALL means "still running, far too slowly to print": Debian's
kernel leaves its real-mode setup ("Probing EDD") and is still decompressing itself when the
timeout ends it; OVMF stops on an instruction the emulator lacks. TCG (libvirt <domain type='qemu'>)
boots the same kernel to /init in seconds.
TXT
esac
