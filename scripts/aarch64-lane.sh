#!/usr/bin/env bash
# The aarch64 lane: runs the static aarch64 flick on arm64 KVM inside an L1 Linux that QEMU TCG
# emulates with EL2 (`-M virt,virtualization=on,gic-version=3 -cpu max`), booting the arm64 test
# guest in several configurations (reset and power-off exit codes, boot timer, 1/2/4 vCPUs
# through PSCI CPU_ON, a virtio-blk drive in the device tree).
#
#   scripts/aarch64-lane.sh           run it
#   scripts/aarch64-lane.sh --keep    keep the work directory (logs) even when all passed
#
# Exit status: 0 all passed, 1 a case failed (or L1 died), 2 usage, 3 the lane could not be set
# up (scripts/test.sh turns 3 into a loud skip outside CI and a failure in CI).
#
# The L1 kernel comes from Debian's linux-image-6.1.0-*-arm64 package and busybox from
# busybox-static:arm64, both fetched by package name with `apt-get download` while the arm64
# architecture is added to dpkg for that moment, extracted with dpkg-deb -x, never installed.
# flick is cross-built statically (rustup's aarch64-unknown-linux-gnu target, Debian's
# gcc-aarch64-linux-gnu as linker, glibc's static libraries), the test guest with the same
# cross compiler. Downloads are cached in $FLICK_CACHE_DIR/aarch64 (default
# ~/.cache/flick/aarch64). See docs/aarch64.md.
set -euo pipefail

SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")
REPO=$(cd "$(dirname "$SCRIPT")/.." && pwd)
LANE_SRC=$REPO/scripts/aarch64-lane
CACHE=${FLICK_CACHE_DIR:-${HOME:-/root}/.cache/flick}/aarch64
L1_PACKAGE=${FLICK_AARCH64_L1_PACKAGE:-}
SETUP_TIMEOUT=900     # each host-side preparation step (packages, downloads, cargo)
KERNEL_TIMEOUT=1800   # building the project's arm64 guest kernel (cold: several minutes)
RUN_TIMEOUT=420       # the whole QEMU session
FROZEN_AFTER=90       # no console output from L1 for this long: L1 froze
TARGET=aarch64-unknown-linux-gnu

START=$SECONDS
say() { printf '[aarch64-lane %4ds] %s\n' $((SECONDS - START)) "$*" >&2; }
setup_fail() {
	printf '[aarch64-lane %4ds] SETUP FAILED: %s\n' $((SECONDS - START)) "$*" >&2
	exit 3
}

keep=0
while (($#)); do
	case $1 in
	--keep) keep=1 ;;
	-h | --help)
		sed -n '2,/^set -euo/p' "$SCRIPT" | sed '$d; s/^# \{0,1\}//'
		exit 0
		;;
	*)
		echo "aarch64-lane: unknown argument: $1" >&2
		exit 2
		;;
	esac
	shift
done

[[ $(uname -m) == x86_64 ]] || setup_fail "x86_64 hosts only (this is $(uname -m)); on an arm64 host run flick directly"
((EUID == 0)) || setup_fail "needs root (dpkg --add-architecture, apt-get)"

# ---------------------------------------------------------------------------
# Host packages (all amd64: QEMU, the cross compiler and cross glibc, cpio)
# ---------------------------------------------------------------------------
need=()
for tool in qemu-system-aarch64:qemu-system-arm aarch64-linux-gnu-gcc:gcc-aarch64-linux-gnu \
	cpio:cpio dpkg-deb:dpkg make:make mkfs.ext4:e2fsprogs; do
	command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool##*:}")
done
[[ -e /usr/aarch64-linux-gnu/lib/libc.a ]] || need+=(libc6-dev-arm64-cross)
if ((${#need[@]})); then
	say "installing ${need[*]}"
	export DEBIAN_FRONTEND=noninteractive
	timeout "$SETUP_TIMEOUT" apt-get install -o DPkg::Lock::Timeout=300 -y -q --no-install-recommends "${need[@]}" >&2 ||
		{ timeout "$SETUP_TIMEOUT" apt-get update -q >&2 &&
			timeout "$SETUP_TIMEOUT" apt-get install -o DPkg::Lock::Timeout=300 -y -q --no-install-recommends "${need[@]}" >&2; } ||
		setup_fail "cannot install ${need[*]}"
fi
if ! rustup target list --installed 2>/dev/null | grep -qx "$TARGET"; then
	say "adding the rustup target $TARGET"
	timeout "$SETUP_TIMEOUT" rustup target add "$TARGET" >&2 || setup_fail "rustup cannot add $TARGET"
fi

mkdir -p "$CACHE"

# ---------------------------------------------------------------------------
# arm64 packages: the L1 kernel and busybox, downloaded by name, extracted
# ---------------------------------------------------------------------------
# Adds the arm64 architecture to dpkg for the duration of `apt-get download`; removed again
# (with its package lists) whatever happens.
with_arm64() {
	local added=0 rc=0
	if ! dpkg --print-foreign-architectures | grep -qx arm64; then
		dpkg --add-architecture arm64 || return 1
		added=1
	fi
	"$@" || rc=$?
	if ((added)); then
		dpkg --remove-architecture arm64 || true
	fi
	return "$rc"
}

download_arm64() {
	local dir=$1
	shift
	timeout "$SETUP_TIMEOUT" apt-get update -q -o DPkg::Lock::Timeout=300 >&2 || return 1
	if [[ -z $L1_PACKAGE ]]; then
		L1_PACKAGE=$(apt-cache depends linux-image-arm64:arm64 2>/dev/null |
			sed -n 's/^ *Depends: \(linux-image-6\.1\.0-[0-9]*-arm64\)\(:arm64\)\{0,1\}$/\1/p' | head -n1)
		[[ -n $L1_PACKAGE ]] || { echo "apt-cache does not know linux-image-arm64:arm64" >&2; return 1; }
	fi
	(cd "$dir" && timeout "$SETUP_TIMEOUT" apt-get download -q "$L1_PACKAGE:arm64" busybox-static:arm64 >&2)
}

# Modules the Linux guest loads from its initramfs (Debian builds them as modules), and the ones
# L1 loads (tun, for the guest's TAP), with their dependencies, read from each .ko's modinfo
# `depends=`.
GUEST_MODULES=(virtio_mmio virtio_blk virtio_net)
L1_MODULES=(tun)
declare -A KO_FILE=() KO_ADDED=()
KO_ORDER=()
add_module() {
	local name=${1//-/_} file dep
	[[ -n ${KO_ADDED[$name]:-} ]] && return 0
	file=${KO_FILE[$name]:-}
	[[ -n $file ]] || { echo "no module $name in the kernel package" >&2; return 1; }
	KO_ADDED[$name]=1
	for dep in $(tr '\0' '\n' <"$file" | sed -n 's/^depends=//p' | head -n1 | tr ',' ' '); do
		add_module "$dep" || return 1
	done
	KO_ORDER+=("$file")
}
# collect_modules TREE OUT MODULE...: copies the modules and their dependencies into OUT, with
# OUT/order listing them in loading order.
collect_modules() {
	local tree=$1 out=$2 f m
	shift 2
	KO_FILE=() KO_ADDED=() KO_ORDER=()
	while IFS= read -r f; do
		m=$(basename "$f" .ko)
		KO_FILE[${m//-/_}]=$f
	done < <(find "$tree" -name '*.ko')
	for m in "$@"; do add_module "$m" || return 1; done
	mkdir -p "$out"
	: >"$out/order"
	for f in "${KO_ORDER[@]}"; do
		cp "$f" "$out/"
		basename "$f" >>"$out/order"
	done
}

KERNEL=$CACHE/Image
BUSYBOX=$CACHE/busybox
MODULES=$CACHE/modules-$(sha256sum <<<"${GUEST_MODULES[*]}" | cut -c1-8)
L1_MODULES_DIR=$CACHE/l1-modules-$(sha256sum <<<"${L1_MODULES[*]}" | cut -c1-8)
if [[ ! -s $KERNEL || ! -x $BUSYBOX || ! -s $MODULES/order || ! -s $L1_MODULES_DIR/order ]]; then
	say "downloading the arm64 kernel and busybox packages (apt-get download, arm64 added to dpkg for it)"
	tmp=$(mktemp -d)
	chmod 755 "$tmp" # apt-get download fetches as the _apt user
	with_arm64 download_arm64 "$tmp" || { rm -rf "$tmp"; setup_fail "cannot download the arm64 packages"; }
	for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$tmp/x"; done
	vmlinuz=$(ls "$tmp"/x/boot/vmlinuz-* 2>/dev/null | head -n1)
	[[ -n $vmlinuz ]] || { rm -rf "$tmp"; setup_fail "no /boot/vmlinuz-* in the kernel package"; }
	# Debian ships the arm64 Image gzip-compressed; QEMU would inflate it on every run.
	if gzip -t "$vmlinuz" 2>/dev/null; then
		gzip -dc "$vmlinuz" >"$KERNEL.tmp"
	else
		cp "$vmlinuz" "$KERNEL.tmp"
	fi
	mv "$KERNEL.tmp" "$KERNEL"
	basename "$vmlinuz" >"$CACHE/kernel-version"
	cp "$tmp/x/bin/busybox" "$BUSYBOX"
	rm -rf "$MODULES" "$L1_MODULES_DIR"
	collect_modules "$tmp/x/lib/modules" "$MODULES" "${GUEST_MODULES[@]}" ||
		{ rm -rf "$tmp" "$MODULES"; setup_fail "cannot collect the guest's modules"; }
	collect_modules "$tmp/x/lib/modules" "$L1_MODULES_DIR" "${L1_MODULES[@]}" ||
		{ rm -rf "$tmp" "$L1_MODULES_DIR"; setup_fail "cannot collect L1's modules"; }
	rm -rf "$tmp"
	# Drop the arm64 package lists again.
	timeout "$SETUP_TIMEOUT" apt-get update -q -o DPkg::Lock::Timeout=300 >&2 || true
fi
[[ $(od -An -tx1 -j 56 -N4 "$KERNEL" | tr -d ' ') == 41524d64 ]] || setup_fail "$KERNEL is not an arm64 Image"
say "L1 kernel: $(cat "$CACHE/kernel-version" 2>/dev/null || echo Image)"

# ---------------------------------------------------------------------------
# flick (static aarch64) and the arm64 test guest
# ---------------------------------------------------------------------------
say "cross-building flick for $TARGET (static)"
FLICK_TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}/aarch64-static
(cd "$REPO" && CARGO_TARGET_DIR=$FLICK_TARGET_DIR \
	CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
	timeout "$SETUP_TIMEOUT" cargo build -q --target "$TARGET" --bin flick --bin flick-rebase-snap >&2) ||
	setup_fail "cannot cross-build flick for $TARGET"
FLICK=$FLICK_TARGET_DIR/$TARGET/debug/flick
say "the project's arm64 guest kernel and root file system (scripts/guest-artifacts.sh --arch arm64; cached)"
artifacts=$(timeout "$KERNEL_TIMEOUT" "$REPO/scripts/guest-artifacts.sh" --arch arm64) ||
	setup_fail "scripts/guest-artifacts.sh --arch arm64 failed"
eval "$artifacts"
for v in FLICK_KERNEL_ARM64_IMAGE FLICK_ROOTFS_ARM64_EXT4 FLICK_INITRAMFS_ARM64; do
	[[ -s ${!v:-} ]] || setup_fail "guest-artifacts.sh printed no $v"
done
say "building the arm64 test guest"
GUEST_OUT=$CACHE/test-guest
timeout "$SETUP_TIMEOUT" make -s -C "$REPO/resources/guest/test-guest-arm64" OUT="$GUEST_OUT" >&2 ||
	setup_fail "cannot build the arm64 test guest"

# ---------------------------------------------------------------------------
# The initramfs (uncompressed: faster to unpack under TCG)
# ---------------------------------------------------------------------------
WORK=$(mktemp -d /tmp/aarch64-lane.XXXXXX)
cleanup() {
	[[ -n ${QEMU_PID:-} ]] && kill "$QEMU_PID" 2>/dev/null
	if ((keep)) || [[ ${status:-1} != 0 ]]; then
		say "logs kept in $WORK"
	else
		rm -rf "$WORK"
	fi
}
trap cleanup EXIT
root=$WORK/root
mkdir -p "$root"/{bin,proc,sys,dev,tmp}
cp "$BUSYBOX" "$root/bin/busybox"
for applet in sh mount cat cut sleep grep sed awk timeout dd poweroff dmesg head tail sync rm kill printf \
	ls wc insmod tunctl ip md5sum tr cp du; do
	ln -s busybox "$root/bin/$applet"
done
cp "$LANE_SRC/init" "$root/init"
cp -r "$L1_MODULES_DIR" "$root/modules"
aarch64-linux-gnu-strip -o "$root/flick" "$FLICK"
aarch64-linux-gnu-strip -o "$root/flick-rebase-snap" "$(dirname "$FLICK")/flick-rebase-snap"
aarch64-linux-gnu-gcc -static -O2 -Wall -o "$root/api-client" "$LANE_SRC/api-client.c" ||
	setup_fail "cannot build the API client"
cp "$GUEST_OUT/testguest-arm64.bin" "$root/testguest-arm64.bin"
# A seccomp filter file (src/seccomp.rs' format) whose vmm and api programs allow everything and
# whose vcpu program traps ioctl (29 on arm64), so the vCPU thread's first KVM_RUN is trapped.
le() { # le BYTES VALUE: VALUE as BYTES little-endian bytes, as printf escapes
	local i
	for ((i = 0; i < $1; i++)); do printf '\\x%02x' $((($2 >> (8 * i)) & 255)); done
}
insn() { le 2 "$1" && le 1 "$2" && le 1 "$3" && le 4 "$4"; } # code jt jf k
program() { # program NAME INSTRUCTION...
	local name=$1
	shift
	le 8 ${#name}
	printf '%s' "$name"
	le 8 $#
	printf '%s' "$@"
}
ALLOW=0x7fff0000 TRAP=0x00030000
allow_all=$(insn 6 0 0 $ALLOW)
# A = syscall number; if A == 29 return TRAP else ALLOW.
trap_ioctl=("$(insn 0x20 0 0 0)" "$(insn 0x15 0 1 29)" "$(insn 6 0 0 $TRAP)" "$allow_all")
printf "$(le 8 3)$(program vmm "$allow_all")$(program api "$allow_all")$(program vcpu "${trap_ioctl[@]}")" \
	>"$root/trap-vcpu.bpf"
# The Linux guest: the same Debian Image, and a busybox initramfs of its own.
guest_root=$WORK/linux-guest
mkdir -p "$guest_root"/{bin,proc,sys,dev} "$root/linux"
cp "$BUSYBOX" "$guest_root/bin/busybox"
for applet in sh mount cat grep devmem reboot insmod head dd sync sed sleep awk ping tail ip dmesg; do
	ln -s busybox "$guest_root/bin/$applet"
done
cp -r "$MODULES" "$guest_root/modules"
cp "$LANE_SRC/guest-init" "$guest_root/init"
(cd "$guest_root" && find . | cpio -o -H newc --quiet) >"$root/linux/initramfs.cpio"
cp "$KERNEL" "$root/linux/Image"
# The project's kernel (everything built in) and root file system (busybox-static:arm64 with
# resources/guest/rootfs/init), as the ext4 image and as the initramfs.
cp "$FLICK_KERNEL_ARM64_IMAGE" "$root/linux/Image-flick"
cp "$FLICK_ROOTFS_ARM64_EXT4" "$root/linux/rootfs.ext4"
cp "$FLICK_INITRAMFS_ARM64" "$root/linux/initramfs-flick.cpio"
(cd "$root" && find . | cpio -o -H newc --quiet) >"$WORK/initramfs.cpio"
say "initramfs: $(($(stat -c %s "$WORK/initramfs.cpio") / 1024)) KiB"

# ---------------------------------------------------------------------------
# The QEMU session
# ---------------------------------------------------------------------------
LOG=$WORK/console.log
say "starting qemu-system-aarch64 (TCG, EL2, GICv3)"
QEMU_START=$SECONDS
# -nic none: L1 needs no network device (and QEMU then no NIC option ROM, a package of its own).
# audit=1: the kernel logs seccomp kills (audit type 1326, with the call's number), which the
# lane prints when a flick ends early.
timeout "$RUN_TIMEOUT" qemu-system-aarch64 -M virt,virtualization=on,gic-version=3 -cpu max \
	-accel tcg -smp 2 -m 1024 -nographic -nic none -no-reboot -kernel "$KERNEL" -initrd "$WORK/initramfs.cpio" \
	-append "console=ttyAMA0 rdinit=/init panic=-1 quiet loglevel=4 audit=1" >"$LOG" 2>&1 </dev/null &
QEMU_PID=$!
last_size=-1
last_change=$SECONDS
while kill -0 "$QEMU_PID" 2>/dev/null; do
	sleep 2
	size=$(stat -c %s "$LOG")
	if ((size != last_size)); then
		last_size=$size
		last_change=$SECONDS
	elif ((SECONDS - last_change > FROZEN_AFTER)); then
		say "no console output from L1 for ${FROZEN_AFTER}s: L1 froze"
		kill "$QEMU_PID" 2>/dev/null || true
		break
	fi
	if grep -q '^LANE-DONE' "$LOG"; then
		sleep 3
		kill "$QEMU_PID" 2>/dev/null || true
		break
	fi
done
wait "$QEMU_PID" 2>/dev/null || true
QEMU_PID=
QEMU_SPAN=$((SECONDS - QEMU_START))
tr -d '\r' <"$LOG" | grep -v 'heartbeat' | sed 's/^/  | /' >&2

status=0
if grep -q 'L1-SETUP-FAILED' "$LOG"; then
	say "SETUP FAILED: $(grep -m1 'L1-SETUP-FAILED' "$LOG" | tr -d '\r')"
	status=3
	exit 3
fi
mapfile -t results < <(tr -d '\r' <"$LOG" | grep '^LANE-RESULT ' | cut -d' ' -f2-)
if ((${#results[@]} == 0)); then
	say "FAIL: no case ran (L1 died or froze; console log above)"
	status=1
fi
for r in "${results[@]}"; do
	say "${r%% *}: ${r#* }"
	[[ $r == *" PASS"* ]] || status=1
done
grep -q '^LANE-DONE' "$LOG" || { say "FAIL: L1 did not finish the cases"; status=1; }
# The test guest's timing runs, for the x86-vs-arm64 table.
mapfile -t timings < <(tr -d '\r' <"$LOG" | sed -n 's/^LANE-TIMING spawn-to-exit=\([0-9.]*\)s boot-timer=\([0-9]*\)us$/\1 \2/p')
if ((${#timings[@]})); then
	median() { sort -n | awk '{ v[NR] = $1 } END { if (NR) printf "%.1f", v[int((NR + 1) / 2)] }'; }
	say "arm64 test guest (1 vCPU, 128 MiB, tg.count=3), ${#timings[@]} runs: spawn to exit median" \
		"$(printf '%s\n' "${timings[@]}" | awk '{ print $1 * 1000 }' | median) ms, Guest-boot-time median" \
		"$(printf '%s\n' "${timings[@]}" | awk '{ print $2 / 1000 }' | median) ms (nearest rank)"
fi
kvm_ready=$(tr -d '\r' <"$LOG" | sed -n 's/.*\/dev\/kvm ready after \([0-9.]*\) s.*/\1/p' | head -n1)
say "QEMU session ${QEMU_SPAN}s (/dev/kvm ready ${kvm_ready:-?}s after L1 kernel start); lane total $((SECONDS - START))s"
if ((status == 0)); then
	say "PASS: ${#results[@]} cases"
else
	say "FAILED"
fi
exit "$status"
