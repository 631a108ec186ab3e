#!/bin/sh
# Checks the test guest's virtio-net driver against QEMU's microvm virtio-net-device, on
# tap devices in a private network namespace (created here, deleted on exit).
# Usage: qemu-net-check.sh OUT_DIR. Needs root (ip netns, tap devices),
# qemu-system-x86_64, /dev/kvm, /dev/net/tun, python3 and ping (iputils-ping).
# Ends with "N passed, N failed".
#
# In the namespace: tgtap0 10.0.2.1/24 (MAC 02:00:0a:00:02:01) and tgtap1 10.0.3.1/24;
# the guest is 10.0.2.2 (MAC 06:00:0a:00:02:02) on the first device and 10.0.3.2 on
# the second. The first -device goes to the transport at 0xfeb00e00 (IRQ 12), the
# second to 0xfeb00c00 (IRQ 11).
set -u
OUT=${1:-build}
PVH="$OUT/testguest-pvh.elf"
QEMU=${QEMU:-qemu-system-x86_64}
HERE=$(cd "$(dirname "$0")" && pwd)
PEER="python3 $HERE/net-peer.py"
NS=tgnet$$
DEV0="virtio_mmio.device=512@0xfeb00e00:12"
DEV1="virtio_mmio.device=512@0xfeb00c00:11"
pass=0
fail=0
tmp=$(mktemp -d)
cleanup() {
	[ -n "${qpid:-}" ] && kill "$qpid" 2>/dev/null
	ip netns del "$NS" 2>/dev/null
	rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

in_ns() { ip netns exec "$NS" "$@"; }
ok() { pass=$((pass + 1)); echo "ok   $1"; }
bad() {
	fail=$((fail + 1))
	echo "FAIL $1: $2"
	sed 's/^/     | /' "$tmp/out" 2>/dev/null
}

ip netns add "$NS" || { echo "cannot create a network namespace (root needed)"; exit 1; }
in_ns ip link set lo up
in_ns ip tuntap add tgtap0 mode tap
in_ns ip link set tgtap0 address 02:00:0a:00:02:01
in_ns ip addr add 10.0.2.1/24 dev tgtap0
in_ns ip link set tgtap0 up
in_ns ip tuntap add tgtap1 mode tap
in_ns ip addr add 10.0.3.1/24 dev tgtap1
in_ns ip link set tgtap1 up

# nic ID TAP MAC [DEVICE_OPTS]: QEMU arguments for one virtio-net device on TAP
nic() {
	echo "-netdev tap,id=$1,ifname=$2,script=no,downscript=no -device virtio-net-device,netdev=$1,mac=$3${4:-}"
}
NIC0=$(nic n0 tgtap0 06:00:0a:00:02:02)
NIC1=$(nic n1 tgtap1 06:00:0a:00:03:02)

# qemu MACHINE_OPTS APPEND QEMU_ARGS...: serial output (CR removed) in $tmp/out
qemu() {
	mopts=$1 append=$2
	shift 2
	in_ns timeout 120 "$QEMU" -M "microvm,x-option-roms=off,rtc=off,acpi=off$mopts" -accel kvm \
		-cpu host -m 128 -smp 1 -nodefaults -no-user-config -nographic -serial stdio \
		-no-reboot -kernel "$PVH" -append "tg.quiet=1 $append" "$@" 2>"$tmp/err" |
		tr -d '\r' >"$tmp/out"
}
modern() { qemu ",auto-kernel-cmdline=off" "$@" -global virtio-mmio.force-legacy=false; }
# As modern(), in the background (qpid). The output grows in $tmp/raw as QEMU writes it
# (CRs included); finish_bg waits for QEMU and copies it to $tmp/out without them.
modern_bg() {
	append=$1
	shift
	: >"$tmp/raw"
	in_ns timeout 120 "$QEMU" -M "microvm,x-option-roms=off,rtc=off,acpi=off,auto-kernel-cmdline=off" \
		-accel kvm -cpu host -m 128 -smp 1 -nodefaults -no-user-config -nographic \
		-serial stdio -no-reboot -global virtio-mmio.force-legacy=false -kernel "$PVH" \
		-append "tg.quiet=1 $append" "$@" >"$tmp/raw" 2>"$tmp/err" </dev/null &
	qpid=$!
}
# wait_line TEXT: until QEMU's output has a line starting with TEXT (at most 20 s)
wait_line() {
	for _ in $(seq 200); do
		grep -q "^$1" "$tmp/raw" && return 0
		sleep 0.1
	done
	return 1
}
finish_bg() {
	wait "$qpid"
	qpid=
	tr -d '\r' <"$tmp/raw" >"$tmp/out"
}

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
# matches NAME REGEX...: every (basic) REGEX matches a whole line of the output
matches() {
	name=$1
	shift
	for re in "$@"; do
		if ! grep -qx -- "$re" "$tmp/out"; then
			bad "$name" "no line matching: $re"
			return 1
		fi
	done
	ok "$name"
}

# shellcheck disable=SC2086
modern "tg.virtio=1 tg.net=info $DEV0" $NIC0
has "info" "virtio: slot=0 base=0xfeb00e00 irq=12 id=1 version=2" \
	"net0: mac=06:00:0a:00:02:02 mtu=1500 status=1" "testguest: done" &&
	matches "info: features (VERSION_1, MAC, STATUS)" \
		"net0: features=0x100010020 offered=0x[0-9a-f]* rx_buffers=64 tx_slots=64 buffer=1536 descs_per_frame=1"

# Two devices, QEMU's own virtio_mmio.device= entries, an MTU offered by the first.
# shellcheck disable=SC2046,SC2086
qemu "" "tg.net=info tg.net_split=1" -global virtio-mmio.force-legacy=false \
	$(nic n0 tgtap0 06:00:0a:00:02:02 ,host_mtu=1400) $NIC1
has "info, two devices, MTU" "net0: mac=06:00:0a:00:02:02 mtu=1400 status=1" \
	"net1: mac=06:00:0a:00:03:02 mtu=1500 status=1" &&
	matches "info: split buffers" \
		"net0: features=0x100010028 offered=0x[0-9a-f]* rx_buffers=32 tx_slots=32 buffer=1536 descs_per_frame=2"

# shellcheck disable=SC2086
modern "tg.net=ping $DEV0" $NIC0
has "ping" "net0: arp peer=10.0.2.1 mac=02:00:0a:00:02:01" "net0: ping seq=1 ok" \
	"net0: ping seq=2 ok" "net0: ping seq=3 ok" "net0: ping done ok=3/3" "testguest: done"

# shellcheck disable=SC2086
modern "tg.net=ping tg.net_split=1 tg.ping_count=5 $DEV0" $NIC0
has "ping, header and frame in separate descriptors" "net0: ping seq=5 ok" \
	"net0: ping done ok=5/5"

# shellcheck disable=SC2086
modern "tg.net=ping tg.net_dev=1 tg.ip=10.0.3.2 tg.peer=10.0.3.1 tg.ping_count=2 $DEV0 $DEV1" \
	$NIC0 $NIC1
has "ping on the second device" "net1: ping done ok=2/2"

# shellcheck disable=SC2086
modern "tg.net=ping tg.peer=10.0.2.99 tg.net_timeout_ms=400 $DEV0" $NIC0
has "ping, no such peer" "net0: arp peer=10.0.2.99 timeout" "net0: ping done ok=0/3"

# The host pings the guest and echoes UDP through it; "tg-stop" ends serve.
for split in 0 1; do
	: >"$tmp/ping"
	: >"$tmp/echo"
	# shellcheck disable=SC2086
	modern_bg "tg.net=serve tg.serve_ms=0 tg.net_split=$split $DEV0" $NIC0
	if wait_line "net0: serve ready"; then
		in_ns ping -c 3 -i 0.2 -W 2 10.0.2.2 >"$tmp/ping" 2>&1
		in_ns ping -c 2 -i 0.2 -W 2 -s 1472 -M do 10.0.2.2 >>"$tmp/ping" 2>&1
		in_ns $PEER echo 10.0.2.2 --count 50 --size -1 >"$tmp/echo" 2>&1
		in_ns $PEER stop 10.0.2.2 >>"$tmp/echo" 2>&1
	else
		kill "$qpid"
	fi
	finish_bg
	if grep -q "3 received" "$tmp/ping" && grep -q "2 received" "$tmp/ping"; then
		ok "serve (split=$split): host pings the guest"
	else
		bad "serve (split=$split): host pings the guest" "$(cat "$tmp/ping")"
	fi
	grep -q "^echo: ok=50/50 " "$tmp/echo" && ok "serve (split=$split): UDP echo" ||
		bad "serve (split=$split): UDP echo" "$(cat "$tmp/echo")"
	matches "serve (split=$split): counts" "net0: serve done arp=[1-9][0-9]* icmp=5 udp=51"
	sed -n 's/^echo: /     | echo: /p' "$tmp/echo"
done

# shellcheck disable=SC2086
modern "tg.net=serve tg.serve_ms=300 $DEV0" $NIC0
has "serve, time limit" "net0: serve done arp=0 icmp=0 udp=0" "testguest: done"

# Transmit into a UDP sink, then receive what a sender blasts at the guest.
for split in 0 1; do
	rm -f "$tmp/ready"
	in_ns $PEER sink --port 9 --ready "$tmp/ready" >"$tmp/sink" &
	spid=$!
	for _ in $(seq 100); do [ -e "$tmp/ready" ] && break; sleep 0.05; done
	# shellcheck disable=SC2086
	modern_bg "tg.net=bench tg.net_frames=3000 tg.net_rx_frames=3000 tg.net_split=$split $DEV0" \
		$NIC0
	in_ns $PEER blast 10.0.2.2 --port 9 --watch "$tmp/raw" --seconds 60 >"$tmp/blast"
	finish_bg
	wait "$spid"
	matches "bench (split=$split)" "tsc: khz=[0-9]* source=[a-z0-9-]*" \
		"netbench: dev=net0 mac=06:00:0a:00:02:02 mtu=1500 size=1400 .*" \
		"netbench: tx frames=3000 bytes=4200000 us=[0-9]*" \
		"netbench: rx frames=3000 bytes=4200000 us=[0-9]*" &&
		{ grep -q "^sink: frames=3000 bytes=4200000 .* lost=0 reordered=0" "$tmp/sink" &&
			ok "bench (split=$split): all datagrams at the sink, in order" ||
			bad "bench (split=$split): sink" "$(cat "$tmp/sink")"; }
	sed -n 's/^\(tsc\|netbench\): /     | &/p' "$tmp/out"
	sed 's/^/     | /' "$tmp/sink"
done

# With a disk: slots and numbering of both drivers, the network after counting.
truncate -s 8M "$tmp/disk.img"
# shellcheck disable=SC2086
modern "tg.blk=check tg.net=ping tg.ping_count=1 tg.net_late=1 tg.count=1 $DEV0 $DEV1" $NIC0 \
	-drive id=d0,file="$tmp/disk.img",format=raw,if=none -device virtio-blk-device,drive=d0
has "with a block device, tg.net_late=1" "blk0: readback ok" "net0: ping done ok=1/1" &&
	{ [ "$(grep -n -e '^count: 1$' -e '^net0: arp' "$tmp/out" | cut -d: -f2 | tr '\n' ' ')" = \
		"count net0 " ] && ok "tg.net_late=1: after counting" ||
		bad "tg.net_late=1: after counting" "wrong order"; }

# shellcheck disable=SC2086
qemu ",auto-kernel-cmdline=off" "tg.virtio=1 tg.net=info $DEV0" $NIC0
has "legacy (version 1) device refused" "virtio: slot=0 base=0xfeb00e00 irq=12 id=1 version=1" \
	"virtio: slot=0 error=unsupported-version version=1" "net0: error=init slot=0"

# shellcheck disable=SC2086
modern "tg.net=ping tg.net_dev=3 $DEV0" $NIC0
has "no device net3" "net: no device net3"

modern "tg.net=info"
has "no devices" "net: none" "testguest: done"

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
