#!/usr/bin/env bash
# The hardware-virtualization lane: runs flick's integration tests inside an L1 Linux under QEMU
# TCG, whose emulated AMD CPU has SVM with nested paging, so flick runs there on KVM-AMD as on a
# real AMD host (no PVM, guest kernel code not emulated, Linux user space works).
#
#   scripts/nested-lane.sh                 the lane's default test selection
#   scripts/nested-lane.sh --tests REGEX   only (and all) the tests whose binary::name matches REGEX
#   scripts/nested-lane.sh --list          print the plan and exit
#   scripts/nested-lane.sh --keep          keep the work directory (logs) even when all passed
#
# Exit status: 0 all passed, 1 a test failed (or L1 died), 2 usage, 3 the lane could not be set up
# (scripts/test.sh turns 3 into a loud skip outside CI and a failure in CI).
#
# The L1 kernel and modules come from Debian's linux-image-6.1.0-*-amd64 package (apt-get
# download, dpkg-deb -x; never installed). L1 boots its ELF vmlinux (cut out of the bzImage, saves
# the XZ decompression under TCG) with a small uncompressed initramfs (busybox + modules +
# scripts/nested-lane/init), mounts the host's root read-only over 9p under a tmpfs overlay and
# runs the repository's own test binaries there (scripts/nested-lane/run-tests): the same
# assertions as on the host, with the host's ip, dnsmasq, curl and make. Everything downloaded or
# built is cached in $FLICK_CACHE_DIR/nested (default ~/.cache/flick/nested), keyed by its inputs.
# See docs/nested-lane.md.
set -euo pipefail

SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")
REPO=$(cd "$(dirname "$SCRIPT")/.." && pwd)
LANE_SRC=$REPO/scripts/nested-lane
CACHE=${FLICK_CACHE_DIR:-${HOME:-/root}/.cache/flick}/nested
# The L1 kernel package; the newest linux-image-6.1.0-N-amd64 that linux-image-amd64 depends on
# unless set.
L1_PACKAGE=${FLICK_NESTED_L1_PACKAGE:-}
L1_MEM_MIB=${FLICK_NESTED_L1_MEM_MIB:-6144}
BOOT_TIMEOUT=180      # QEMU start to the first test starting
TEST_TIMEOUT=${FLICK_NESTED_TEST_TIMEOUT:-120}             # one test-guest test
LINUX_TEST_TIMEOUT=${FLICK_NESTED_LINUX_TEST_TIMEOUT:-240} # one Linux test
FROZEN_AFTER=60       # no heartbeat from L1 for this long: L1 froze
SETUP_TIMEOUT=900     # each host-side preparation step (cargo, downloads)
# L1's own modules, with their dependencies resolved from the .ko files.
L1_MODULES=(virtio_pci 9pnet_virtio 9p overlay tun kvm-amd)

# By default the lane runs every integration test except the few whose assertions are wall-clock
# bounds that TCG's slowness breaks (see docs/nested-lane.md): those comparing throughput with and
# without a rate limiter (the unthrottled guest I/O is itself slow here), and the API upload test
# that detects curl's 1 s Expect timeout with a 900 ms bound (the upload alone took ~0.9 s in L1).
# The jailer tests are host-side confinement (chroot, cgroups, namespaces, uids), which the host
# run covers; L1's root is a 9p overlay without cgroup hierarchies.
# `binary::test` names are matched.
DEFAULT_EXCLUDE='rate_limit|::curl_large_body_with_expect_continue_does_not_stall$|^jailer::'

START=$SECONDS
say() { printf '[nested-lane %4ds] %s\n' $((SECONDS - START)) "$*" >&2; }
setup_fail() {
	printf '[nested-lane %4ds] SETUP FAILED: %s\n' $((SECONDS - START)) "$*" >&2
	exit 3
}

tests_re=.
exclude_re=$DEFAULT_EXCLUDE
list_only=0
keep=0
while (($#)); do
	case $1 in
	--tests)
		tests_re=${2:?--tests needs a regular expression}
		exclude_re=
		shift
		;;
	--list) list_only=1 ;;
	--keep) keep=1 ;;
	-h | --help)
		sed -n '2,/^set -euo/p' "$SCRIPT" | sed '$d; s/^# \{0,1\}//'
		exit 0
		;;
	*)
		echo "nested-lane: unknown argument: $1" >&2
		exit 2
		;;
	esac
	shift
done

[[ $(uname -m) == x86_64 ]] || setup_fail "x86_64 hosts only (this is $(uname -m))"
((EUID == 0)) || setup_fail "needs root (network namespaces in L1, apt-get on the host)"

# ---------------------------------------------------------------------------
# Host packages
# ---------------------------------------------------------------------------
need=()
for tool in qemu-system-x86_64:qemu-system-x86 busybox:busybox-static xz:xz-utils cpio:cpio \
	dpkg-deb:dpkg make:make gcc:gcc curl:curl ip:iproute2 dnsmasq:dnsmasq-base; do
	command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool##*:}")
done
if [[ ! -x /bin/busybox ]] || ! /bin/busybox --list | grep -qx insmod; then
	need+=(busybox-static)
fi
if ((${#need[@]})); then
	say "installing ${need[*]}"
	export DEBIAN_FRONTEND=noninteractive
	timeout "$SETUP_TIMEOUT" apt-get install -o DPkg::Lock::Timeout=300 -y -q --no-install-recommends "${need[@]}" >&2 ||
		{ timeout "$SETUP_TIMEOUT" apt-get update -q >&2 &&
			timeout "$SETUP_TIMEOUT" apt-get install -o DPkg::Lock::Timeout=300 -y -q --no-install-recommends "${need[@]}" >&2; } ||
		setup_fail "cannot install ${need[*]}"
fi

mkdir -p "$CACHE"
hash16() { sha256sum | cut -c1-16; }

# ---------------------------------------------------------------------------
# L1 kernel and modules, from the Debian package
# ---------------------------------------------------------------------------
if [[ -z $L1_PACKAGE ]]; then
	L1_PACKAGE=$(apt-cache depends linux-image-amd64 2>/dev/null |
		sed -n 's/^ *Depends: \(linux-image-6\.1\.0-[0-9]*-amd64\)$/\1/p' | head -n1)
	[[ -n $L1_PACKAGE ]] || setup_fail "apt-cache does not know linux-image-amd64 (run apt-get update)"
fi
L1_VERSION=$(apt-cache show --no-all-versions "$L1_PACKAGE" 2>/dev/null | sed -n 's/^Version: //p' | head -n1)
[[ -n $L1_VERSION ]] || setup_fail "apt-cache does not know $L1_PACKAGE"
KVER=${L1_PACKAGE#linux-image-}
L1_DIR=$CACHE/l1-$KVER-$L1_VERSION-$(sha256sum <<<"${L1_MODULES[*]}" | cut -c1-8)

# Cuts the compressed kernel out of a bzImage (boot protocol >= 2.08: the setup header's
# payload_offset/payload_length) and decompresses it to the ELF vmlinux.
extract_vmlinux() {
	local bz=$1 out=$2 setup_sects offset length magic size
	setup_sects=$(od -An -tu1 -j $((0x1f1)) -N1 "$bz" | tr -d ' ')
	((setup_sects == 0)) && setup_sects=4
	offset=$(od -An -tu4 -j $((0x248)) -N4 "$bz" | tr -d ' ')
	length=$(od -An -tu4 -j $((0x24c)) -N4 "$bz" | tr -d ' ')
	offset=$(((setup_sects + 1) * 512 + offset))
	# The payload ends with the decompressed size (32-bit little endian), which the kernel's
	# build appends after the compressed stream.
	size=$(od -An -tu4 -j $((offset + length - 4)) -N4 "$bz" | tr -d ' ')
	magic=$(od -An -tx1 -j "$offset" -N6 "$bz" | tr -d ' ')
	case $magic in
	fd377a585a00) tail -c +$((offset + 1)) "$bz" | head -c $((length - 4)) | xz -dc >"$out" ;;
	1f8b*) tail -c +$((offset + 1)) "$bz" | head -c $((length - 4)) | gzip -dc >"$out" ;;
	*) return 1 ;;
	esac
	[[ $(stat -c %s "$out") == "$size" && $(od -An -tx1 -N4 "$out" | tr -d ' ') == 7f454c46 ]]
}

# The .ko files of a module and its dependencies, dependencies first.
resolve_modules() {
	local moddir=$1 m
	shift
	declare -gA KO_PATH=() KO_DONE=()
	local f n
	while IFS= read -r f; do
		n=$(basename "$f" .ko)
		KO_PATH[${n//-/_}]=$f
	done < <(find "$moddir" -name '*.ko')
	ORDER=()
	for m in "$@"; do add_module "${m//-/_}"; done
}
add_module() {
	local m=$1 f deps d
	[[ -n ${KO_DONE[$m]:-} ]] && return 0
	f=${KO_PATH[$m]:-}
	[[ -n $f ]] || setup_fail "L1 package has no module $m (built in?)"
	KO_DONE[$m]=1
	deps=$(tr '\0' '\n' <"$f" | sed -n 's/^depends=//p' | head -n1)
	for d in ${deps//,/ }; do add_module "${d//-/_}"; done
	ORDER+=("$f")
}

# One preparation at a time (other worktrees may run the lane at the same moment).
exec 9>"$CACHE/.lock"
timeout "$SETUP_TIMEOUT" flock 9 || setup_fail "another lane held $CACHE/.lock too long"
if [[ ! -s $L1_DIR/vmlinux || ! -s $L1_DIR/modules/order ]]; then
	say "L1 kernel: $L1_PACKAGE $L1_VERSION (apt-get download, dpkg-deb -x; not installed)"
	tmp=$CACHE/.tmp-l1.$$
	rm -rf -- "$tmp"
	mkdir -p "$tmp/deb" "$tmp/out/modules"
	trap 'rm -rf -- "$tmp"' EXIT
	(cd "$tmp/deb" && timeout "$SETUP_TIMEOUT" apt-get download "$L1_PACKAGE=$L1_VERSION" >&2) ||
		setup_fail "apt-get download $L1_PACKAGE=$L1_VERSION failed"
	timeout "$SETUP_TIMEOUT" dpkg-deb -x "$tmp"/deb/*.deb "$tmp/x" || setup_fail "dpkg-deb -x failed"
	extract_vmlinux "$tmp/x/boot/vmlinuz-$KVER" "$tmp/out/vmlinux" ||
		setup_fail "cannot extract the ELF vmlinux from vmlinuz-$KVER"
	resolve_modules "$tmp/x/lib/modules/$KVER" "${L1_MODULES[@]}"
	for f in "${ORDER[@]}"; do
		cp "$f" "$tmp/out/modules/"
		basename "$f" >>"$tmp/out/modules/order"
	done
	cp "$tmp/x/boot/config-$KVER" "$tmp/out/config"
	rm -rf -- "$L1_DIR"
	mv -T "$tmp/out" "$L1_DIR"
	rm -rf -- "$tmp"
	trap - EXIT
	say "L1 kernel: cached in $L1_DIR ($(tr '\n' ' ' <"$L1_DIR/modules/order"))"
else
	say "L1 kernel: cached: $L1_DIR"
fi

# ---------------------------------------------------------------------------
# L1 initramfs: busybox, the modules, the init script (uncompressed: faster under TCG)
# ---------------------------------------------------------------------------
bb_version=$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null || /bin/busybox | head -n1)
initrd_key=$({
	echo "$bb_version"
	sha256sum "$LANE_SRC/init" | cut -d' ' -f1
	basename "$L1_DIR"
} | hash16)
INITRD=$CACHE/initramfs-$initrd_key.cpio
if [[ ! -s $INITRD ]]; then
	tmp=$CACHE/.tmp-initrd.$$
	rm -rf -- "$tmp"
	mkdir -p "$tmp"/root/{bin,dev,proc,sys,modules}
	cp /bin/busybox "$tmp/root/bin/busybox"
	for a in $(/bin/busybox --list); do
		[[ $a == busybox ]] || ln -s busybox "$tmp/root/bin/$a"
	done
	cp "$L1_DIR"/modules/* "$tmp/root/modules/"
	install -m 0755 "$LANE_SRC/init" "$tmp/root/init"
	mknod -m 600 "$tmp/root/dev/console" c 5 1
	(cd "$tmp/root" && find . -mindepth 1 | LC_ALL=C sort |
		cpio --quiet -o -H newc -R 0:0 --reproducible) >"$tmp/initramfs.cpio"
	mv "$tmp/initramfs.cpio" "$INITRD"
	rm -rf -- "$tmp"
	say "L1 initramfs: built $INITRD ($(($(stat -c %s "$INITRD") / 1024)) KiB)"
fi
exec 9>&-

# ---------------------------------------------------------------------------
# What L1 runs: the guest artifacts, the test guests, the test binaries, the plan
# ---------------------------------------------------------------------------
say "guest artifacts (scripts/guest-artifacts.sh)"
artifacts=$(timeout "$SETUP_TIMEOUT" "$REPO/scripts/guest-artifacts.sh") || setup_fail "scripts/guest-artifacts.sh failed"
eval "$artifacts"

# Built here, where gcc is fast: tests/common builds into target/test-guest, tests/api.rs into
# target/tmp/test-guest (CARGO_TARGET_TMPDIR); in L1 make then finds them up to date.
say "test guests (make)"
for out in "$REPO/target/test-guest" "$REPO/target/tmp/test-guest"; do
	timeout "$SETUP_TIMEOUT" make -s -C "$REPO/resources/guest/test-guest" OUT="$out" >&2 ||
		setup_fail "building the test guests failed"
done

say "test binaries (cargo test --no-run)"
bins=$(cd "$REPO" && timeout "$SETUP_TIMEOUT" cargo test --no-run --tests --message-format=json 2>/dev/null |
	python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"] + "\t" + m["executable"])
') || setup_fail "cargo test --no-run failed"
[[ -n $bins ]] || setup_fail "cargo listed no integration-test binaries"

WORK=$(mktemp -d /tmp/flick-nested-lane.XXXXXX)
plan=$WORK/plan
: >"$plan"
while IFS=$'\t' read -r target exe; do
	while IFS= read -r t; do
		[[ $target::$t =~ $tests_re ]] || continue
		# Tests that boot Linux: the whole `linux` binary, and `linux_*` tests in the others.
		limit=$TEST_TIMEOUT
		[[ $target == linux || ${t##*::} == linux_* ]] && limit=$LINUX_TEST_TIMEOUT
		[[ -n $exclude_re && $target::$t =~ $exclude_re ]] && continue
		printf '%s\t%s\t%s\n' "$exe" "$t" "$limit" >>"$plan"
	done < <("$exe" --list --format terse 2>/dev/null | sed -n 's/: test$//p')
done <<<"$bins"
total=$(wc -l <"$plan")
((total > 0)) || setup_fail "no test matches $tests_re"
if ((list_only)); then
	awk -F'\t' '{ n = $1; sub(".*/", "", n); sub("-[^-]*$", "", n); print n "::" $2 " (timeout " $3 " s)" }' "$plan"
	rm -rf -- "$WORK"
	exit 0
fi

install -m 0755 "$LANE_SRC/run-tests" "$WORK/run-tests"
{
	printf 'export FLICK_REPO=%q\n' "$REPO"
	for v in FLICK_KERNEL_VMLINUX FLICK_KERNEL_BZIMAGE FLICK_ROOTFS_EXT4 FLICK_INITRAMFS; do
		printf 'export %s=%q\n' "$v" "${!v}"
	done
} >"$WORK/env"
: >"$WORK/results"

# ---------------------------------------------------------------------------
# QEMU sessions
# ---------------------------------------------------------------------------
# L1 writes /lane/heartbeat every 5 s. When the heartbeat stops for FROZEN_AFTER seconds, L1 itself
# froze (under QEMU TCG, L1's timer seems never to fire: on an Intel host 1-2 freezes a run);
# the lane then boots a new L1 for the tests not done yet, the interrupted one first, at most
# MAX_RESTARTS times, and says so. A test that hangs while L1 is alive is a failure.
MAX_RESTARTS=${FLICK_NESTED_MAX_RESTARTS:-6}
cp "$plan" "$WORK/plan.all"
reported=0
restarts=0
froze=()
session_total=0
l1_setup=
stuck=
kvm_ready=

print_new_results() {
	local n status name secs
	n=$(wc -l <"$WORK/results")
	while ((reported < n)); do
		reported=$((reported + 1))
		IFS=$'\t' read -r status name secs < <(sed -n "${reported}p" "$WORK/results")
		printf '%s %s (%s s)\n' "$status" "$name" "$secs"
		next=$(sed -n "$((reported + 1))p" "$WORK/plan.all" | cut -f3)
		deadline=$((SECONDS + ${next:-0} + 60))
	done
}

# Asks QEMU's monitor what the L1 vCPU is doing (for the log of a stalled session).
monitor_dump() {
	timeout 10 python3 - "$1" <<'PY' || true
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.settimeout(3)
s.connect(sys.argv[1])
for cmd in (b"info status\n", b"info registers\n"):
    s.sendall(cmd)
    time.sleep(1)
out = b""
try:
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        out += chunk
except socket.timeout:
    pass
sys.stdout.write(out.decode(errors="replace"))
PY
}

session=0
while :; do
	done_count=$(wc -l <"$WORK/results")
	tail -n +$((done_count + 1)) "$WORK/plan.all" >"$WORK/plan"
	remaining=$(wc -l <"$WORK/plan")
	((remaining > 0)) || break
	session=$((session + 1))
	grep -v '^export LANE_DONE=' "$WORK/env" >"$WORK/env.new" || true
	echo "export LANE_DONE=$done_count" >>"$WORK/env.new"
	mv "$WORK/env.new" "$WORK/env"
	rm -f "$WORK/heartbeat" "$WORK/monitor.sock"
	console=$WORK/l1-console.$session.log
	say "L1 session $session: QEMU TCG, -cpu max (AMD SVM + NPT), -smp 1, ${L1_MEM_MIB} MiB;" \
		"$remaining of $total tests; logs in $WORK"
	qemu_start=$SECONDS
	qemu-system-x86_64 \
		-accel tcg,thread=multi -cpu max -smp 1 -m "$L1_MEM_MIB" \
		-nodefaults -display none -no-reboot -no-user-config \
		-serial "file:$console" -monitor "unix:$WORK/monitor.sock,server=on,wait=off" \
		-kernel "$L1_DIR/vmlinux" -initrd "$INITRD" \
		-append "console=ttyS0 panic=-1 loglevel=4 mitigations=off nokaslr rdinit=/init" \
		-virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap" \
		-virtfs "local,path=$WORK,mount_tag=lane,security_model=none,multidevs=remap" \
		</dev/null >"$WORK/qemu.$session.log" 2>&1 &
	qemu=$!

	# Prints the results as they arrive; stops QEMU when L1 makes no progress for longer than the
	# running test's own timeout (enforced inside L1) plus a margin.
	deadline=$((SECONDS + BOOT_TIMEOUT + $(sed -n 1p "$WORK/plan" | cut -f3) + 30))
	stalled=0
	while kill -0 "$qemu" 2>/dev/null; do
		print_new_results
		beat_age=0
		[[ -e $WORK/heartbeat ]] && beat_age=$(($(date +%s) - $(stat -c %Y "$WORK/heartbeat")))
		if ((SECONDS > deadline || beat_age > FROZEN_AFTER)); then
			stalled=1
			monitor_dump "$WORK/monitor.sock" >"$WORK/l1-stall.$session.txt" 2>&1
			kill "$qemu" 2>/dev/null || true
			sleep 1
			kill -9 "$qemu" 2>/dev/null || true
			break
		fi
		sleep 1
	done
	qemu_rc=0
	wait "$qemu" 2>/dev/null || qemu_rc=$?
	session_total=$((session_total + SECONDS - qemu_start))
	print_new_results
	[[ -n $kvm_ready ]] || kvm_ready=$(grep -o '/dev/kvm ready after [0-9.]* s' "$console" 2>/dev/null | head -n1 || true)
	l1_setup=$(grep -o 'L1-SETUP-FAILED.*' "$console" 2>/dev/null | head -n1 || true)
	[[ -z $l1_setup ]] || break
	((reported < total)) || break

	current=$(sed -n "$((reported + 1))p" "$WORK/plan.all" | cut -f2)
	beat_age=-1
	[[ -e $WORK/heartbeat ]] && beat_age=$(($(date +%s) - $(stat -c %Y "$WORK/heartbeat")))
	if ((stalled)) && ((beat_age >= 0 && beat_age < 30)); then
		# L1 was alive: the test itself hung beyond its timeout.
		bin=$(sed -n "$((reported + 1))p" "$WORK/plan.all" | cut -f1)
		short=${bin##*/}
		printf 'FAIL\t%s::%s\t-\n' "${short%-*}" "$current" >>"$WORK/results"
		echo "nested-lane: the test outlived its timeout while L1 was alive" >>"$WORK/logs/$((reported + 1)).log"
		print_new_results
		stuck="$current hung while L1 was alive"
	elif ((stalled)); then
		froze+=("$current (heartbeat ${beat_age}s old; $(grep -m1 -o 'RIP=[0-9a-f]*' "$WORK/l1-stall.$session.txt" || echo 'no RIP'))")
		echo "nested lane: L1 FROZE during $current (no heartbeat for ${beat_age} s); QEMU killed" >&2
	else
		froze+=("$current (QEMU exited with status $qemu_rc)")
		echo "nested lane: L1 ENDED during $current (QEMU exit status $qemu_rc)" >&2
	fi
	if ((restarts >= MAX_RESTARTS)); then
		[[ -n $stuck ]] || stuck="L1 froze or died ${#froze[@]} time(s), restarts used up"
		break
	fi
	restarts=$((restarts + 1))
done
ln -sf "l1-console.$session.log" "$WORK/l1-console.log"

# ---------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------
passed=$(grep -c '^PASS' "$WORK/results" || true)
failed=$(grep -c '^FAIL' "$WORK/results" || true)
skipped=$(grep -c '^SKIP' "$WORK/results" || true)
notrun=$((total - passed - failed - skipped))

if ((failed)); then
	echo "--- failed tests (last lines of each log; all logs in $WORK/logs):"
	i=0
	while IFS=$'\t' read -r status name secs; do
		i=$((i + 1))
		[[ $status == FAIL ]] || continue
		echo "--- $name: $WORK/logs/$i.log"
		tail -n 25 "$WORK/logs/$i.log" | sed 's/^/    /'
	done <"$WORK/results"
fi
if [[ -n $l1_setup || -n $stuck ]] || ((notrun)); then
	echo "--- L1 console (last 40 lines of $WORK/l1-console.log):"
	tail -n 40 "$WORK/l1-console.log" 2>/dev/null | sed 's/^/    /'
	[[ -s $WORK/qemu.$session.log ]] && sed 's/^/    qemu: /' "$WORK/qemu.$session.log"
fi
for f in "${froze[@]}"; do
	echo "nested lane: WARNING: L1 froze or died during $f; a new L1 ran the rest"
done

# The test guest's timings (scripts/nested-lane/run-tests), for the x86-vs-arm64 table.
if [[ -s $WORK/timings ]]; then
	median() { sort -n | awk '{ v[NR] = $1 } END { if (NR) printf "%.1f", v[int((NR + 1) / 2)] / 1000 }'; }
	echo "nested lane: x86 test guest (1 vCPU, 128 MiB, tg.count=3), $(wc -l <"$WORK/timings") runs:" \
		"spawn to exit median $(cut -f1 "$WORK/timings" | median) ms," \
		"Guest-boot-time median $(cut -f2 "$WORK/timings" | median) ms (nearest rank)"
else
	echo "nested lane: WARNING: no test-guest timings (L1 did not get to them)"
fi
echo "nested lane: $passed passed, $failed failed, $skipped skipped, $notrun not run (of $total);" \
	"QEMU ${session_total} s in $session session(s) (${kvm_ready:-/dev/kvm never ready}), lane ${SECONDS} s"
if [[ -n $l1_setup ]]; then
	echo "nested lane: FAILED: L1 setup: ${l1_setup#L1-SETUP-FAILED }"
	exit 1
fi
if [[ -n $stuck ]]; then
	echo "nested lane: FAILED: $stuck"
	exit 1
fi
if ((failed || notrun)); then
	echo "nested lane: FAILED (QEMU exit status $qemu_rc; logs in $WORK)"
	exit 1
fi
if ((keep)); then
	echo "nested lane: logs kept in $WORK"
else
	rm -rf -- "$WORK"
fi
echo "nested lane: PASSED"
