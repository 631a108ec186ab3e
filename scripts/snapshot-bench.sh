#!/usr/bin/env bash
# Full against diff snapshots of one test-guest microVM, per guest RAM size:
#
#   scripts/snapshot-bench.sh [--flick PATH] [--mem "256 1024"] [--runs N]
#
# For each size, one flick (API socket, track_dirty_pages on) boots the test guest in halt mode
# (tg.exit=halt: booted, then idle), is paused and takes a Full snapshot, is resumed for 100 ms,
# paused again and takes a Diff snapshot ("booted"). Then a second flick restores that full
# snapshot (PUT /snapshot/load with enable_diff_snapshots, resumed), runs 100 ms and takes a Full
# and a Diff snapshot the same way ("restored": its RAM is the memory file, mapped privately,
# which a full snapshot reads in whole). N times. Printed per size and case: the median and max
# of the time flick reports for each kind ("full|diff snapshot created in N us", its log), and
# the bytes each memory file holds on disk (allocated blocks: holes are not counted), median.
# Builds the static release flick (scripts/build-release.sh) unless --flick is given, and the
# test guest. Needs curl. See docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
flick=""
sizes="256 1024"
runs=5
while (($#)); do
	case $1 in
	--flick) flick=$(readlink -f "${2:?--flick needs a path}"); shift ;;
	--mem) sizes=${2:?--mem needs sizes}; shift ;;
	--runs) runs=${2:?--runs needs a number}; shift ;;
	-h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
	*) echo "snapshot-bench: unknown argument $1" >&2; exit 2 ;;
	esac
	shift
done
command -v curl >/dev/null || { echo "snapshot-bench: needs curl" >&2; exit 1; }
[[ -n $flick ]] || flick=$(scripts/build-release.sh)
make -s -C resources/guest/test-guest OUT="$PWD/target/test-guest"
guest=$PWD/target/test-guest/testguest.elf
work=$(mktemp -d /tmp/snapshot-bench.XXXXXX)
pid=
cleanup() {
	[[ -n $pid ]] && kill "$pid" 2>/dev/null
	rm -rf "$work"
}
trap cleanup EXIT

api() { # api METHOD PATH BODY: fails unless the answer is 2xx
	local code
	code=$(curl -s -o "$work/answer" -w '%{http_code}' --unix-socket "$work/api.sock" -X "$1" \
		-H 'Content-Type: application/json' -d "$3" "http://localhost$2")
	[[ $code == 2* ]] || { echo "snapshot-bench: $1 $2 -> $code $(cat "$work/answer")" >&2; exit 1; }
}
median() { sort -n | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)] }'; }
maxof() { sort -n | tail -n1; }
allocated() { echo $(($(stat -c %b "$1") * $(stat -c %B "$1"))); }

echo "flick: $flick"
echo "host: $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-9s %-16s %22s %22s %16s\n' "RAM" "case" "create, median (ms)" "create, max (ms)" "on disk (KiB)"
start_flick() {
	rm -f "$work/api.sock" "$work/log"
	"$flick" --api-sock "$work/api.sock" --log-path "$work/log" --level Info >/dev/null 2>&1 &
	pid=$!
	for _ in $(seq 100); do [[ -S $work/api.sock ]] && break; sleep 0.02; done
}
# full_then_diff PREFIX: pause, Full snapshot, resume 100 ms, pause, Diff snapshot, stop flick;
# records times and sizes under PREFIX.
full_then_diff() {
	local p=$1
	api PATCH /vm '{"state": "Paused"}'
	api PUT /snapshot/create "{\"snapshot_type\": \"Full\", \"snapshot_path\": \"$work/$p-full.state\", \"mem_file_path\": \"$work/$p-full.mem\"}"
	api PATCH /vm '{"state": "Resumed"}'
	sleep 0.1
	api PATCH /vm '{"state": "Paused"}'
	api PUT /snapshot/create "{\"snapshot_type\": \"Diff\", \"snapshot_path\": \"$work/$p-diff.state\", \"mem_file_path\": \"$work/$p-diff.mem\"}"
	kill "$pid" && wait "$pid" 2>/dev/null || true
	pid=
	sed -n 's/.*full snapshot created in \([0-9]*\) us.*/\1/p' "$work/log" >>"$work/$p-full.t"
	sed -n 's/.*diff snapshot created in \([0-9]*\) us.*/\1/p' "$work/log" >>"$work/$p-diff.t"
	allocated "$work/$p-full.mem" >>"$work/$p-full.b"
	allocated "$work/$p-diff.mem" >>"$work/$p-diff.b"
}
for mib in $sizes; do
	rm -f "$work"/*.t "$work"/*.b
	for ((i = 0; i < runs; i++)); do
		start_flick
		api PUT /boot-source "{\"kernel_image_path\": \"$guest\", \"boot_args\": \"tg.exit=halt tg.smp=0 tg.quiet=1\"}"
		api PUT /machine-config "{\"vcpu_count\": 1, \"mem_size_mib\": $mib, \"track_dirty_pages\": true}"
		api PUT /actions '{"action_type": "InstanceStart"}'
		sleep 0.3
		full_then_diff booted
		start_flick
		api PUT /snapshot/load "{\"snapshot_path\": \"$work/booted-full.state\", \"mem_backend\": {\"backend_type\": \"File\", \"backend_path\": \"$work/booted-full.mem\"}, \"enable_diff_snapshots\": true, \"resume_vm\": true}"
		sleep 0.1
		full_then_diff restored
	done
	for p in booted-full booted-diff restored-full restored-diff; do
		printf '%-9s %-16s %22.2f %22.2f %16d\n' "$mib MiB" "$p" \
			"$(median <"$work/$p.t" | awk '{ print $1 / 1000 }')" \
			"$(maxof <"$work/$p.t" | awk '{ print $1 / 1000 }')" \
			"$(($(median <"$work/$p.b") / 1024))"
	done
done
