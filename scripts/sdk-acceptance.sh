#!/usr/bin/env bash
# Acceptance check with Firecracker's own clients: builds the Firecracker Go SDK
# (one or more checkouts) and firectl from their sources with Debian's Go in
# GOPATH mode, then drives flick (and Firecracker, if given) with them:
#   - tests/sdk/main.go, built against each SDK checkout: the SDK README flow
#     (NewMachine/Start, pause/resume, full snapshot + load with WithSnapshot,
#     UpdateGuestDrive, rate limiters, MMDS, vsock, balloon, metrics, log FIFO,
#     Ctrl+Alt+Del shutdown, StopVMM), one PASS/FAIL line per step;
#   - firectl with --kernel --root-drive, --add-drive, --tap-device,
#     --vsock-device, --metadata, --vmm-log-fifo; PASS when the VMM it starts
#     reports "Running" on its API socket (and, for --metadata, serves it).
# Prints a side-by-side table. Not run by scripts/test.sh (needs fetched sources).
#
# Environment:
#   FC_GO_SDK_SRC    firecracker-go-sdk source directories, ':'-separated (required;
#                    e.g. a v1.0.0 and a head checkout); column label = dir name
#   FIRECTL_SRC      firectl source directory (optional; built against the first SDK)
#   FIRECRACKER_BIN  Firecracker binary for the side-by-side columns (optional)
#   FLICK_BIN        flick binary (default: cargo build --release, target/release/flick)
#   SDK_CACHE_DIR    build and work directory (default: $HOME/.cache/flick/sdk-acceptance)
#   FLICK_GUEST      guest for flick: testguest (default) or linux
#   FC_GUEST         guest for Firecracker: testguest (default) or linux
#   SDK_BOOT_WAIT    Go duration the core machine waits after Start (default 0s)
#   SDK_SHUTDOWN_WAIT  how long a VMM may take to exit after Ctrl+Alt+Del (default 10s)
#   SDK_NO_TAP=1     do not create a TAP (NIC, MMDS and firectl TAP steps are skipped)
#
# Needs root (TAP), /dev/kvm, golang-go and the golang-*-dev packages listed in
# docs/sdk-acceptance.md (installed with apt-get when missing).
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

die() { echo "sdk-acceptance: $*" >&2; exit 2; }

cache=${SDK_CACHE_DIR:-$HOME/.cache/flick/sdk-acceptance}
mkdir -p "$cache" || die "cannot create $cache"

# ---- what is missing --------------------------------------------------------
missing=()
[[ -n ${FC_GO_SDK_SRC:-} ]] || missing+=("FC_GO_SDK_SRC (firecracker-go-sdk source dir(s), ':'-separated)")
IFS=: read -r -a sdk_srcs <<<"${FC_GO_SDK_SRC:-}"
for d in "${sdk_srcs[@]}"; do
	[[ -f $d/machine.go ]] || missing+=("FC_GO_SDK_SRC entry $d has no machine.go")
done
if [[ -n ${FIRECTL_SRC:-} && ! -f ${FIRECTL_SRC}/options.go ]]; then
	missing+=("FIRECTL_SRC=$FIRECTL_SRC has no options.go")
fi
if [[ -n ${FIRECRACKER_BIN:-} && ! -x ${FIRECRACKER_BIN} ]]; then
	missing+=("FIRECRACKER_BIN=$FIRECRACKER_BIN is not executable")
fi
[[ -c /dev/kvm ]] || missing+=("/dev/kvm")
if ((${#missing[@]})); then
	printf 'sdk-acceptance: missing: %s\n' "${missing[@]}" >&2
	exit 2
fi
[[ -z ${FIRECTL_SRC:-} ]] && echo "sdk-acceptance: FIRECTL_SRC not set: firectl steps skipped" >&2
[[ -z ${FIRECRACKER_BIN:-} ]] && echo "sdk-acceptance: FIRECRACKER_BIN not set: flick only" >&2

# ---- Go toolchain and libraries (Debian, GOPATH mode) -----------------------
go_pkgs=(golang-go golang-github-appc-cni-dev golang-github-containerd-fifo-dev
	golang-github-containernetworking-plugins-dev golang-github-go-openapi-analysis-dev
	golang-github-go-openapi-errors-dev golang-github-go-openapi-jsonpointer-dev
	golang-github-go-openapi-jsonreference-dev golang-github-go-openapi-loads-dev
	golang-github-go-openapi-runtime-dev golang-github-go-openapi-spec-dev
	golang-github-go-openapi-strfmt-dev golang-github-go-openapi-swag-dev
	golang-github-go-openapi-validate-dev golang-github-go-ping-ping-dev
	golang-github-google-uuid-dev golang-github-hashicorp-go-multierror-dev
	golang-github-mdlayher-vsock-dev golang-github-mdlayher-socket-dev
	golang-github-pkg-errors-dev golang-github-vishvananda-netlink-dev
	golang-github-vishvananda-netns-dev golang-github-jessevdk-go-flags-dev
	golang-golang-x-crypto-dev golang-golang-x-net-dev golang-golang-x-sys-dev
	golang-github-sirupsen-logrus-dev golang-github-stretchr-testify-dev)
need=()
for p in "${go_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if ((${#need[@]})); then
	echo "sdk-acceptance: installing ${need[*]}" >&2
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2 ||
		die "apt-get install failed: ${need[*]}"
fi
export GO111MODULE=off GOFLAGS= GOCACHE=$cache/gocache

# One GOPATH per SDK checkout: $cache/gopath-<label>/src/github.com/firecracker-microvm/...
labels=()
for d in "${sdk_srcs[@]}"; do
	label=$(basename "$d")
	labels+=("$label")
	gp=$cache/gopath-$label
	mkdir -p "$gp/src/github.com/firecracker-microvm"
	ln -sfn "$(realpath "$d")" "$gp/src/github.com/firecracker-microvm/firecracker-go-sdk"
	echo "sdk-acceptance: building tests/sdk against $d" >&2
	GOPATH=$gp:/usr/share/gocode go build -o "$cache/sdk-acceptance-$label" "$repo/tests/sdk/main.go" ||
		die "building tests/sdk against $d failed"
done
firectl=
if [[ -n ${FIRECTL_SRC:-} ]]; then
	gp=$cache/gopath-${labels[0]}
	ln -sfn "$(realpath "$FIRECTL_SRC")" "$gp/src/github.com/firecracker-microvm/firectl"
	echo "sdk-acceptance: building firectl against ${sdk_srcs[0]}" >&2
	GOPATH=$gp:/usr/share/gocode go build -o "$cache/firectl" github.com/firecracker-microvm/firectl ||
		die "building firectl failed"
	firectl=$cache/firectl
fi

# ---- VMMs and guests --------------------------------------------------------
if [[ -z ${FLICK_BIN:-} ]]; then
	cargo build --release >&2 || die "cargo build --release failed"
	FLICK_BIN=$repo/target/release/flick
fi
eval "$(scripts/guest-artifacts.sh)" || die "scripts/guest-artifacts.sh failed"
tg_dir=$cache/testguest
make -s -C resources/guest/test-guest OUT="$tg_dir" >&2 || die "building the test guest failed"

pvm_args="clearcpuid=smap,smep,popcnt,rdrand,rdseed,fsgsbase,avx,avx2,bmi1,bmi2,movbe,xsaveopt,xsavec,xsaves,pcid,invpcid,rdpid,umip,pku,ospke"
guest() { # guest NAME -> "kernel|rootfs|boot args"
	case $1 in
	linux) echo "$FLICK_KERNEL_VMLINUX|$FLICK_ROOTFS_EXT4|console=ttyS0 reboot=k panic=1 pci=off root=/dev/vda rw $pvm_args" ;;
	testguest)
		[[ -f $cache/blank.img ]] || truncate -s 1M "$cache/blank.img"
		echo "$tg_dir/testguest.elf|$cache/blank.img|console=ttyS0 tg.kbd=1"
		;;
	*) die "unknown guest $1" ;;
	esac
}

tap=
if [[ -z ${SDK_NO_TAP:-} ]]; then
	tap=sdkacc$$
	tap=${tap:0:15}
	if ip tuntap add dev "$tap" mode tap && ip link set "$tap" up; then
		trap 'ip link del "$tap" 2>/dev/null' EXIT
	else
		echo "sdk-acceptance: cannot create TAP $tap: NIC steps skipped" >&2
		tap=
	fi
fi

vmms=("flick|$FLICK_BIN|${FLICK_GUEST:-testguest}")
[[ -n ${FIRECRACKER_BIN:-} ]] && vmms+=("firecracker|$FIRECRACKER_BIN|${FC_GUEST:-testguest}")

results=$cache/results
rm -rf "$results"
mkdir -p "$results"
columns=()

# ---- SDK program --------------------------------------------------------------
for v in "${vmms[@]}"; do
	IFS='|' read -r vname vbin vguest <<<"$v"
	IFS='|' read -r kernel rootfs args <<<"$(guest "$vguest")"
	for label in "${labels[@]}"; do
		col="$vname/$label"
		columns+=("$col")
		work=$cache/work/$vname-$label
		rm -rf "$work"
		mkdir -p "$work"
		echo "sdk-acceptance: $col (guest $vguest), logs in $work" >&2
		"$cache/sdk-acceptance-$label" -bin "$vbin" -kernel "$kernel" -rootfs "$rootfs" \
			-boot-args "$args" -tap "$tap" -workdir "$work" \
			-boot-wait "${SDK_BOOT_WAIT:-0s}" -shutdown-wait "${SDK_SHUTDOWN_WAIT:-10s}" \
			2>"$work/stderr" | tee "$results/${col//\//_}" >&2
	done
done

# ---- firectl -----------------------------------------------------------------
api_get() { curl -s --max-time 2 --unix-socket "$1" "http://localhost$2"; }

# firectl_case COLUMNFILE WORK NAME BIN CHECK ARGS...: runs firectl until the VMM
# reports Running (or 30 s), then CHECK (a shell function taking the socket), then stops it.
firectl_case() {
	local out=$1 work=$2 name=$3 bin=$4 checkfn=$5
	shift 5
	local sock=$work/$name.sock
	rm -f "$sock"
	# In its own session, so that the VMM it starts (which outlives a firectl that gives up
	# after a failed Start) can be ended with it, by process group.
	setsid "$firectl" --firecracker-binary="$bin" -s "$sock" "$@" \
		</dev/null >"$work/$name.out" 2>&1 &
	local pid=$! state= i
	for ((i = 0; i < 60; i++)); do
		state=$(api_get "$sock" / 2>/dev/null | jq -r .state 2>/dev/null)
		[[ $state == Running ]] && break
		kill -0 $pid 2>/dev/null || break
		sleep 0.5
	done
	if [[ $state == Running ]]; then
		local why
		if why=$($checkfn "$sock"); then
			echo "PASS firectl/$name" >>"$out"
		else
			echo "FAIL firectl/$name: $why" >>"$out"
		fi
	else
		local last
		last=$(grep -v '^\s*$' "$work/$name.out" | grep -i 'error\|fail\|fatal' | tail -n 2 | tr '\n' ' ')
		[[ -n $last ]] || last=$(tail -n 2 "$work/$name.out" | tr '\n' ' ')
		echo "FAIL firectl/$name: VMM not Running (state '${state}'): ${last:0:400}" >>"$out"
	fi
	kill -TERM $pid 2>/dev/null
	for ((i = 0; i < 20; i++)); do kill -0 $pid 2>/dev/null || break; sleep 0.25; done
	kill -KILL $pid 2>/dev/null
	wait $pid 2>/dev/null
	# The VMM, if firectl left it running: firectl's process group (its pid, from setsid).
	kill -KILL -- -$pid 2>/dev/null
	return 0
}
ok() { :; }
check_log() {
	[[ -s $work/vmm.log ]] || { echo "nothing in the log file"; return 1; }
}
check_mmds() {
	local got
	got=$(api_get "$1" /mmds)
	[[ $(jq -c . <<<"$got" 2>/dev/null) == '{"latest":{"id":"sdk"}}' ]] || { echo "GET /mmds answered: ${got:0:200}"; return 1; }
}

if [[ -n $firectl ]]; then
	for v in "${vmms[@]}"; do
		IFS='|' read -r vname vbin vguest <<<"$v"
		IFS='|' read -r kernel rootfs args <<<"$(guest "$vguest")"
		col="$vname/firectl"
		columns+=("$col")
		out=$results/${col//\//_}
		: >"$out"
		work=$cache/work/$vname-firectl
		rm -rf "$work"
		mkdir -p "$work"
		cp "$rootfs" "$work/root.img"
		truncate -s 1M "$work/extra.img"
		base=(--kernel="$kernel" --root-drive="$work/root.img" --kernel-opts="$args" -c 1 -m 128)
		echo "sdk-acceptance: $col (guest $vguest), logs in $work" >&2
		firectl_case "$out" "$work" boot "$vbin" ok "${base[@]}"
		firectl_case "$out" "$work" add-drive "$vbin" ok "${base[@]}" --add-drive="$work/extra.img:ro"
		# -l: firectl makes the log FIFO and copies it into the file.
		firectl_case "$out" "$work" firecracker-log "$vbin" check_log "${base[@]}" \
			-l "$work/vmm.log" --log-level=Debug
		if [[ -n $tap ]]; then
			firectl_case "$out" "$work" tap-device "$vbin" ok "${base[@]}" --tap-device="$tap/06:00:ac:10:00:02"
			firectl_case "$out" "$work" metadata "$vbin" check_mmds "${base[@]}" \
				--tap-device="$tap/06:00:ac:10:00:02" --metadata='{"latest":{"id":"sdk"}}'
		else
			echo "SKIP firectl/tap-device: no TAP" >>"$out"
			echo "SKIP firectl/metadata: no TAP" >>"$out"
		fi
		firectl_case "$out" "$work" vsock-device "$vbin" ok "${base[@]}" --vsock-device="$work/v.sock:3"
		cat "$out" >&2
	done
fi

# ---- table ---------------------------------------------------------------------
# Rows in the order of the column that got furthest (most lines), then the others.
steps=$(for c in "${columns[@]}"; do echo "$(wc -l <"$results/${c//\//_}") ${c//\//_}"; done |
	sort -rn | while read -r _ f; do cat "$results/$f"; done | awk '$1 ~ /^(PASS|FAIL|SKIP)$/ { sub(":$", "", $2); print $2 }' | awk '!seen[$0]++')
{
	printf '| step |'
	for c in "${columns[@]}"; do printf ' %s |' "$c"; done
	printf '\n|---|'
	for c in "${columns[@]}"; do printf -- '---|'; done
	printf '\n'
	for s in $steps; do
		printf '| %s |' "$s"
		for c in "${columns[@]}"; do
			r=$(awk -v s="$s" '{ st=$2; sub(":$", "", st) } st == s { print $1; exit }' "$results/${c//\//_}")
			printf ' %s |' "${r:--}"
		done
		printf '\n'
	done
} | tee "$cache/table.md"
echo "sdk-acceptance: table in $cache/table.md, results in $results/, logs in $cache/work/" >&2
! grep -qh '^FAIL' "$results"/*
