#!/usr/bin/env bash
# Full against diff snapshots of one test-guest microVM, per guest RAM size, for flick and, side
# by side in the same run, any VMM with Firecracker's API:
#
#   scripts/snapshot-bench.sh [--flick PATH] [--vmm NAME=PATH]... [--mem "256 1024"] [--runs N]
#
# For each VMM and size: the VMM (API socket) boots the test guest in halt mode (tg.exit=halt:
# booted, then idle) with track_dirty_pages, is paused and takes a Full snapshot, is resumed for
# 100 ms, paused again and takes a Diff snapshot ("booted"). Then a second process of the same
# VMM loads that full snapshot (PUT /snapshot/load, mem_backend File, enable_diff_snapshots,
# resume_vm), runs 100 ms and takes a Full and a Diff snapshot the same way ("restored": its RAM
# is the memory file, mapped privately). N times. Printed per VMM, size and case: the median and
# max wall time of the PUT /snapshot/create request (curl's time_total: from sending the request
# to the answer, which comes once both files are written), and the bytes each memory file holds
# on disk (allocated blocks: holes are not counted), median.
# Builds the static release flick (scripts/build-release.sh) unless --flick is given, and the
# test guest. Needs curl. See docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
flick=""
vmms=()
sizes="256 1024"
runs=5
while (($#)); do
	case $1 in
	--flick) flick=$(readlink -f "${2:?--flick needs a path}"); shift ;;
	--vmm) vmms+=("${2:?--vmm needs NAME=PATH}"); shift ;;
	--mem) sizes=${2:?--mem needs sizes}; shift ;;
	--runs) runs=${2:?--runs needs a number}; shift ;;
	-h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
	*) echo "snapshot-bench: unknown argument $1" >&2; exit 2 ;;
	esac
	shift
done
command -v curl >/dev/null || { echo "snapshot-bench: needs curl" >&2; exit 1; }
[[ -n $flick ]] || flick=$(scripts/build-release.sh)
vmms=("flick=$flick" "${vmms[@]}")
make -s -C resources/guest/test-guest OUT="$PWD/target/test-guest"
guest=$PWD/target/test-guest/testguest.elf
work=$(mktemp -d /tmp/snapshot-bench.XXXXXX)
pid=
cleanup() {
	[[ -n $pid ]] && kill "$pid" 2>/dev/null
	rm -rf "$work"
}
trap cleanup EXIT

# api METHOD PATH BODY [TIMES]: fails unless the answer is 2xx; with TIMES, appends the request's
# wall time in ms to that file.
api() {
	local out code ms
	out=$(curl -s -o "$work/answer" -w '%{http_code} %{time_total}' --unix-socket "$work/api.sock" \
		-X "$1" -H 'Content-Type: application/json' -d "$3" "http://localhost$2")
	code=${out% *}
	[[ $code == 2* ]] || { echo "snapshot-bench: $1 $2 -> $code $(cat "$work/answer")" >&2; exit 1; }
	if [[ -n ${4:-} ]]; then
		ms=$(awk -v t="${out#* }" 'BEGIN { printf "%.3f", t * 1000 }')
		echo "$ms" >>"$4"
	fi
}
median() { sort -n | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)] }'; }
maxof() { sort -n | tail -n1; }
allocated() { echo $(($(stat -c %b "$1") * $(stat -c %B "$1"))); }

start_vmm() { # start_vmm BINARY
	rm -f "$work/api.sock"
	"$1" --api-sock "$work/api.sock" >"$work/vmm.log" 2>&1 &
	pid=$!
	for _ in $(seq 250); do [[ -S $work/api.sock ]] && break; sleep 0.02; done
	[[ -S $work/api.sock ]] || { echo "snapshot-bench: $1 did not open its API socket" >&2; cat "$work/vmm.log" >&2; exit 1; }
}
# full_then_diff PREFIX: pause, Full snapshot, resume 100 ms, pause, Diff snapshot, stop the VMM;
# records times and sizes under PREFIX.
full_then_diff() {
	local p=$1
	api PATCH /vm '{"state": "Paused"}'
	api PUT /snapshot/create "{\"snapshot_type\": \"Full\", \"snapshot_path\": \"$work/$p-full.state\", \"mem_file_path\": \"$work/$p-full.mem\"}" "$work/$p-full.t"
	api PATCH /vm '{"state": "Resumed"}'
	sleep 0.1
	api PATCH /vm '{"state": "Paused"}'
	api PUT /snapshot/create "{\"snapshot_type\": \"Diff\", \"snapshot_path\": \"$work/$p-diff.state\", \"mem_file_path\": \"$work/$p-diff.mem\"}" "$work/$p-diff.t"
	kill "$pid" && wait "$pid" 2>/dev/null || true
	pid=
	allocated "$work/$p-full.mem" >>"$work/$p-full.b"
	allocated "$work/$p-diff.mem" >>"$work/$p-diff.b"
}

echo "host: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), load average $(cut -d' ' -f1-3 /proc/loadavg)"
for v in "${vmms[@]}"; do echo "${v%%=*}: ${v#*=}"; done
printf '%-12s %-9s %-14s %20s %18s %15s\n' "VMM" "RAM" "case" "create, median (ms)" "create, max (ms)" "on disk (KiB)"
for mib in $sizes; do
	for v in "${vmms[@]}"; do
		name=${v%%=*} bin=${v#*=}
		rm -f "$work"/*.t "$work"/*.b
		for ((i = 0; i < runs; i++)); do
			start_vmm "$bin"
			api PUT /boot-source "{\"kernel_image_path\": \"$guest\", \"boot_args\": \"tg.exit=halt tg.smp=0 tg.quiet=1\"}"
			api PUT /machine-config "{\"vcpu_count\": 1, \"mem_size_mib\": $mib, \"track_dirty_pages\": true}"
			api PUT /actions '{"action_type": "InstanceStart"}'
			sleep 0.3
			full_then_diff booted
			start_vmm "$bin"
			api PUT /snapshot/load "{\"snapshot_path\": \"$work/booted-full.state\", \"mem_backend\": {\"backend_type\": \"File\", \"backend_path\": \"$work/booted-full.mem\"}, \"enable_diff_snapshots\": true, \"resume_vm\": true}"
			sleep 0.1
			full_then_diff restored
		done
		for p in booted-full booted-diff restored-full restored-diff; do
			printf '%-12s %-9s %-14s %20.2f %18.2f %15d\n' "$name" "$mib MiB" "$p" \
				"$(median <"$work/$p.t")" "$(maxof <"$work/$p.t")" \
				"$(($(median <"$work/$p.b") / 1024))"
		done
	done
done
