#!/bin/sh
# Checks the test guest's virtio-mmio and virtio-blk drivers against QEMU's microvm
# machine (a reference virtio-mmio implementation). Usage: qemu-blk-check.sh OUT_DIR
# Needs qemu-system-x86_64, /dev/kvm and python3. Ends with "N passed, N failed".
#
# microvm with acpi=off has 8 virtio-mmio transports of 512 bytes at 0xfeb00000 + 512*i
# with IRQ 5 + i; -device places the first device on the last transport (0xfeb00e00,
# IRQ 12), the second on 0xfeb00c00 (IRQ 11). QEMU offers version 1 (legacy) devices
# unless virtio-mmio.force-legacy=false.
set -u
OUT=${1:-build}
PVH="$OUT/testguest-pvh.elf"
QEMU=${QEMU:-qemu-system-x86_64}
HERE=$(dirname "$0")
PAT="python3 $HERE/blk-pattern.py"
DEV0="virtio_mmio.device=512@0xfeb00e00:12"
DEV1="virtio_mmio.device=512@0xfeb00c00:11"
pass=0
fail=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

ok() { pass=$((pass + 1)); echo "ok   $1"; }
bad() {
	fail=$((fail + 1))
	echo "FAIL $1: $2"
	sed 's/^/     | /' "$tmp/out" 2>/dev/null
}

# qemu MACHINE_OPTS APPEND QEMU_ARGS...: serial output (CR removed) in $tmp/out
qemu() {
	mopts=$1 append=$2
	shift 2
	timeout 120 "$QEMU" -M "microvm,x-option-roms=off,rtc=off,acpi=off$mopts" -accel kvm \
		-cpu host -m 128 -smp 1 -nodefaults -no-user-config -nographic -serial stdio \
		-no-reboot -kernel "$PVH" -append "tg.quiet=1 $append" "$@" 2>"$tmp/err" |
		tr -d '\r' >"$tmp/out"
}
modern() { qemu ",auto-kernel-cmdline=off" "$@" -global virtio-mmio.force-legacy=false; }
rw() { echo "-drive id=$1,file=$2,format=raw,if=none -device virtio-blk-device,drive=$1${3:-}"; }
ro() { echo "-drive id=$1,file=$2,format=raw,if=none,readonly=on -device virtio-blk-device,drive=$1${3:-}"; }

# has NAME LINE...: every LINE appears as a whole line of the output
has() {
	name=$1
	shift
	for line in "$@"; do
		if ! grep -qxF -- "$line" "$tmp/out"; then
			bad "$name" "missing line: $line"
			return 1
		fi
	done
	ok "$name"
}

truncate -s 64M "$tmp/rw.img"
truncate -s 8M "$tmp/ro.img"
$PAT write "$tmp/ro.img" 3 0 64
cp "$tmp/ro.img" "$tmp/ro.orig"

# shellcheck disable=SC2046
modern "tg.virtio=1 tg.blk=check $DEV0" $(rw d0 "$tmp/rw.img" ,serial=disk-0)
has "check, writable" "virtio: slot=0 base=0xfeb00e00 irq=12 id=2 version=2" \
	"blk0: capacity=131072 ro=0 flush=1 serial=disk-0" "blk0: write ok sectors=0-7" \
	"blk0: flush ok" "blk0: readback ok" "testguest: done" &&
	{ $PAT verify "$tmp/rw.img" 1 0 8 >/dev/null && ok "check, writable: pattern on the host" ||
		bad "check, writable: pattern on the host" "$($PAT verify "$tmp/rw.img" 1 0 8)"; }

# Two devices, entries appended by QEMU itself ("virtio_mmio.device=512@0x...:N").
# shellcheck disable=SC2046
qemu "" "tg.virtio=1 tg.blk=check tg.blk_seed=2" -global virtio-mmio.force-legacy=false \
	$(rw d0 "$tmp/rw.img" ,serial=disk-0) $(ro d1 "$tmp/ro.img" ,serial=disk-1)
has "check, writable and read-only, QEMU's own entries" \
	"virtio: slot=0 base=0xfeb00e00 irq=12 id=2 version=2" \
	"virtio: slot=1 base=0xfeb00c00 irq=11 id=2 version=2" \
	"blk0: readback ok" "blk1: capacity=16384 ro=1 flush=1 serial=disk-1" \
	"blk1: ro write status=1" "blk1: read ok" "testguest: done" &&
	{ cmp -s "$tmp/ro.img" "$tmp/ro.orig" && ok "read-only image unchanged" ||
		bad "read-only image unchanged" "ro.img was modified"; }

# Over more than the 1 MiB buffer, so in several requests.
# shellcheck disable=SC2046
modern "tg.blk=write tg.blk_seed=7 tg.blk_sector=100 tg.blk_count=3000 $DEV0" $(rw d0 "$tmp/rw.img")
has "write" "blk0: write ok sectors=100-3099" "blk0: flush ok" &&
	{ $PAT verify "$tmp/rw.img" 7 100 3000 >/dev/null && ok "write: pattern on the host" ||
		bad "write: pattern on the host" "$($PAT verify "$tmp/rw.img" 7 100 3000)"; }

$PAT write "$tmp/rw.img" 9 50 20
crc=$($PAT crc "$tmp/rw.img" 50 20)
# shellcheck disable=SC2046
modern "tg.blk=read tg.blk_sector=50 tg.blk_count=20 $DEV0 $DEV1" $(rw d0 "$tmp/rw.img") \
	$(ro d1 "$tmp/ro.img")
has "read: checksum of host-written data" "blk0: read sectors=50-69 $crc" \
	"blk1: read sectors=50-69 $($PAT crc "$tmp/ro.img" 50 20)"

# shellcheck disable=SC2046
modern "tg.blk=check tg.blk_sector=16380 $DEV0" $(rw d0 "$tmp/ro.img")
has "range beyond the capacity" "blk0: error=range sector=16380 count=8 capacity=16384"

# shellcheck disable=SC2046
qemu ",auto-kernel-cmdline=off" "tg.virtio=1 tg.blk=check $DEV0" $(rw d0 "$tmp/rw.img")
has "legacy (version 1) device refused" "virtio: slot=0 base=0xfeb00e00 irq=12 id=2 version=1" \
	"virtio: slot=0 error=unsupported-version version=1" "blk0: error=init slot=0"

# shellcheck disable=SC2046
modern "tg.blk=hostile $DEV0" $(rw d0 "$tmp/rw.img")
n=$(grep -c '^hostile: ' "$tmp/out")
if has "hostile requests, then a valid read" "hostile: valid-read status=0" "testguest: done"; then
	[ "$n" -eq 12 ] && ok "hostile: 12 lines" || bad "hostile: 12 lines" "$n lines"
fi

# shellcheck disable=SC2046
modern "tg.blk=bench tg.blk_ops=200 tg.blk_mib=4 $DEV0 $DEV1" $(rw d0 "$tmp/rw.img") \
	$(ro d1 "$tmp/ro.img")
grep -q '^tsc: khz=[0-9]* source=' "$tmp/out" &&
	grep -q '^blkbench: randread4k ops=200 us=[0-9]*$' "$tmp/out" &&
	grep -q '^blkbench: seqread mib=4 us=[0-9]*$' "$tmp/out" &&
	grep -q '^blkbench: seqwrite mib=4 us=[0-9]*$' "$tmp/out" && ok "bench" ||
	bad "bench" "missing lines"
sed -n 's/^\(tsc\|blkbench\): /     | &/p' "$tmp/out"

modern "tg.virtio=1 tg.blk=check"
has "no devices" "virtio: none" "blk: none" "testguest: done"

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
