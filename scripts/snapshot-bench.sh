#!/usr/bin/env bash
# Full against diff snapshots of one test-guest microVM, per guest RAM size:
#
#   scripts/snapshot-bench.sh [--flick PATH] [--mem "256 1024"] [--runs N]
#
# For each size, one flick (API socket, track_dirty_pages on) boots the test guest in halt mode
# (tg.exit=halt: booted, then idle), is paused and takes a Full snapshot, is resumed for 100 ms,
# paused again and takes a Diff snapshot; N times. Printed per size: the median and max of the
# time flick reports for each kind ("full|diff snapshot created in N us", its log), and the
# bytes each memory file holds on disk (allocated blocks: holes are not counted), median.
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
printf '%-9s %-6s %22s %22s %16s\n' "RAM" "kind" "create, median (ms)" "create, max (ms)" "on disk (KiB)"
for mib in $sizes; do
	: >"$work/full.t" && : >"$work/diff.t" && : >"$work/full.b" && : >"$work/diff.b"
	for ((i = 0; i < runs; i++)); do
		rm -f "$work/api.sock" "$work/log"
		"$flick" --api-sock "$work/api.sock" --log-path "$work/log" --level Info >/dev/null 2>&1 &
		pid=$!
		for _ in $(seq 100); do [[ -S $work/api.sock ]] && break; sleep 0.02; done
		api PUT /boot-source "{\"kernel_image_path\": \"$guest\", \"boot_args\": \"tg.exit=halt tg.smp=0 tg.quiet=1\"}"
		api PUT /machine-config "{\"vcpu_count\": 1, \"mem_size_mib\": $mib, \"track_dirty_pages\": true}"
		api PUT /actions '{"action_type": "InstanceStart"}'
		sleep 0.3
		api PATCH /vm '{"state": "Paused"}'
		api PUT /snapshot/create "{\"snapshot_type\": \"Full\", \"snapshot_path\": \"$work/full.state\", \"mem_file_path\": \"$work/full.mem\"}"
		api PATCH /vm '{"state": "Resumed"}'
		sleep 0.1
		api PATCH /vm '{"state": "Paused"}'
		api PUT /snapshot/create "{\"snapshot_type\": \"Diff\", \"snapshot_path\": \"$work/diff.state\", \"mem_file_path\": \"$work/diff.mem\"}"
		kill "$pid" && wait "$pid" 2>/dev/null || true
		pid=
		sed -n 's/.*full snapshot created in \([0-9]*\) us.*/\1/p' "$work/log" >>"$work/full.t"
		sed -n 's/.*diff snapshot created in \([0-9]*\) us.*/\1/p' "$work/log" >>"$work/diff.t"
		allocated "$work/full.mem" >>"$work/full.b"
		allocated "$work/diff.mem" >>"$work/diff.b"
	done
	for kind in full diff; do
		printf '%-9s %-6s %22.2f %22.2f %16d\n' "$mib MiB" "$kind" \
			"$(median <"$work/$kind.t" | awk '{ print $1 / 1000 }')" \
			"$(maxof <"$work/$kind.t" | awk '{ print $1 / 1000 }')" \
			"$(($(median <"$work/$kind.b") / 1024))"
	done
done
