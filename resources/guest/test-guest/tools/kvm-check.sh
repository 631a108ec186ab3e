#!/bin/sh
# Boots both test guests with kvm-boot (Firecracker's entry conventions, straight on
# /dev/kvm) and checks their serial output. Usage: kvm-check.sh OUT_DIR
# Ends with "N passed, N failed"; exits non-zero if anything failed.
set -u
OUT=${1:-build}
KB="$OUT/kvm-boot"
LINUX="$OUT/testguest.elf"
PVH="$OUT/testguest-pvh.elf"
pass=0
fail=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# run NAME EXPECTED_RC ARGS...: stdout (CR removed) in $tmp/out, stderr in $tmp/err
run() {
	name=$1 want_rc=$2
	shift 2
	"$KB" "$@" >"$tmp/out.raw" 2>"$tmp/err"
	rc=$?
	tr -d '\r' <"$tmp/out.raw" >"$tmp/out"
	if [ "$rc" -ne "$want_rc" ]; then
		bad "$name" "exit status $rc, expected $want_rc"
		return 1
	fi
	return 0
}

ok() { pass=$((pass + 1)); echo "ok   $1"; }
bad() {
	fail=$((fail + 1))
	echo "FAIL $1: $2"
	sed 's/^/     | /' "$tmp/out" "$tmp/err" 2>/dev/null
}

# has NAME LINE...: every LINE appears as a whole line of the output
has() {
	name=$1
	shift
	for line in "$@"; do
		if ! grep -qxF -- "$line" "$tmp/out"; then
			bad "$name" "missing line: $line"
			return
		fi
	done
	ok "$name"
}

for proto in linux64 pvh; do
	if [ $proto = pvh ]; then img=$PVH flag=--pvh; else img=$LINUX flag=; fi

	if run "$proto: default, 1 vCPU" 0 $flag --cmdline "tg.count=2" "$img"; then
		cat >"$tmp/want" <<EOT
testguest: start protocol=$proto
cmdline: tg.count=2
e820: 0x0-0x9fc00 type=1
e820: 0x100000-0x8000000 type=1
mem: usable=130687 KiB
mptable: cpus=1 apic_ids=0
smp: online=1/1
count: 1
count: 2
testguest: done
EOT
		if ! cmp -s "$tmp/want" "$tmp/out"; then
			bad "$proto: default, 1 vCPU" "output differs: $(diff "$tmp/want" "$tmp/out" | tr '\n' ' ')"
		elif ! grep -q 'boot timer: vcpu 0 wrote 123' "$tmp/err"; then
			bad "$proto: default, 1 vCPU" "no boot-timer write"
		elif ! grep -q 'i8042 reset' "$tmp/err"; then
			bad "$proto: default, 1 vCPU" "no i8042 reset"
		else
			ok "$proto: default, 1 vCPU"
		fi
	fi

	run "$proto: 4 vCPUs" 0 $flag --smp 4 "$img" &&
		has "$proto: 4 vCPUs" "mptable: cpus=4 apic_ids=0,1,2,3" "smp: online=4/4 apic_ids=0,1,2,3"

	run "$proto: tg.smp=0" 0 $flag --smp 2 --cmdline "tg.smp=0" "$img" &&
		has "$proto: tg.smp=0" "mptable: cpus=2 apic_ids=0,1" "smp: skipped" "testguest: done"

	run "$proto: command line on the preferred trampoline page" 0 $flag --smp 2 \
		--cmdline-addr 0x3000 --cmdline "tg.count=1" "$img" &&
		has "$proto: command line on the preferred trampoline page" \
			"cmdline: tg.count=1" "smp: online=2/2 apic_ids=0,1"

	if run "$proto: tg.timer=0" 0 $flag --cmdline "a=b tg.timer=0 c" "$img"; then
		if grep -q 'boot timer' "$tmp/err"; then
			bad "$proto: tg.timer=0" "boot timer written"
		else
			has "$proto: tg.timer=0" "cmdline: a=b tg.timer=0 c" "testguest: done"
		fi
	fi

	run "$proto: tg.exit=fault" 2 $flag --cmdline "tg.exit=fault" "$img" &&
		has "$proto: tg.exit=fault" "testguest: fault"

	run "$proto: tg.exit=halt" 4 $flag --timeout 1 --cmdline "tg.exit=halt" "$img" &&
		has "$proto: tg.exit=halt" "testguest: done"

	run "$proto: tg.echo=1" 0 $flag --cmdline "tg.echo=1" --input "hello
quit
" "$img" &&
		has "$proto: tg.echo=1" "echo: ready" "hello" "q" "echo: done" "testguest: done"

	if run "$proto: tg.quiet=1" 0 $flag --smp 2 --cmdline "tg.quiet=1 tg.count=1" "$img"; then
		printf 'count: 1\ntestguest: done\n' >"$tmp/want"
		if cmp -s "$tmp/want" "$tmp/out"; then
			ok "$proto: tg.quiet=1"
		else
			bad "$proto: tg.quiet=1" "output differs"
		fi
	fi

	run "$proto: tg.count/tg.delay_ms" 0 $flag --cmdline "tg.count=3 tg.delay_ms=20" "$img" &&
		has "$proto: tg.count/tg.delay_ms" "count: 1" "count: 2" "count: 3"

	# kvm-boot has no virtio device (MMIO reads return 0): this checks the parsing.
	run "$proto: virtio_mmio.device entries" 0 $flag --cmdline "tg.virtio=1 tg.blk=check \
virtio_mmio.device=4K@0xc0001000:5 virtio_mmio.device=0x200@0xc0002000:6:1 \
virtio_mmio.device=4096@3221237760:7 virtio_mmio.device=4K@0x100000000:8 \
virtio_mmio.device=16@0xc0005000:9 virtio_mmio.device=4K@0xc0006000 virtio_mmio.device=4K" "$img" &&
		has "$proto: virtio_mmio.device entries" \
			"virtio: slot=0 base=0xc0001000 irq=5 error=bad-magic magic=0x0" \
			"virtio: slot=1 base=0xc0002000 irq=6 error=bad-magic magic=0x0" \
			"virtio: slot=2 base=0xc0003000 irq=7 error=bad-magic magic=0x0" \
			"virtio: slot=3 base=0x100000000 irq=8 error=unmapped" \
			"virtio: slot=4 base=0xc0005000 irq=9 error=too-small size=0x10" \
			"blk: none" "testguest: done"

	run "$proto: tg.virtio=1 without devices" 0 $flag --cmdline "tg.virtio=1" "$img" &&
		has "$proto: tg.virtio=1 without devices" "virtio: none" "testguest: done"
done

# The Linux-protocol image must not carry the PVH note; the PVH one is also a valid vmlinux.
run "pvh image through the linux64 entry" 0 --cmdline "tg.count=1" "$PVH" &&
	has "pvh image through the linux64 entry" "testguest: start protocol=linux64" "count: 1"
if "$KB" --pvh "$LINUX" >/dev/null 2>&1; then
	fail=$((fail + 1))
	echo "FAIL testguest.elf has a PVH note"
else
	ok "testguest.elf has no PVH note"
fi

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
