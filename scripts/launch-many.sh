#!/usr/bin/env bash
# Starts N flick microVMs at once and reports how long until all are up and how much memory
# each one costs:
#
#   scripts/launch-many.sh N [--mem-mib 32] [--api] [--restore] [--json FILE] [--timeout-s S]
#                            [--flick PATH]
#
# With --restore (clones): one halted test guest is booted, paused and snapshotted, then the N
# VMs are restored from that one snapshot (`--restore-snapshot --restore-mem --resume`; every
# clone maps the same memory file MAP_PRIVATE, so unwritten guest pages stay shared in the page
# cache). A clone is up when its log has `snapshot loaded` (restored, vCPUs resumed); the private
# memory per clone (Private_Clean + Private_Dirty) is reported too.
#
# Each VM runs the test guest in halt mode (`tg.exit=halt tg.smp=0 tg.quiet=1`, so it stays
# up) with its own config, log file (--log-path) and, with --api (when this flick serves its
# API), its own socket. A VM is up when its log has the `Guest-boot-time` line. Reported:
# time from the first spawn until all are up, then per VM: Rss (sum over the flick processes
# / N), Pss, the VMM overhead (Rss of the mappings not sized like guest RAM) and the drop of
# the host's MemAvailable / N. Everything is killed and removed on exit or Ctrl-C.
# Builds flick (unless --flick PATH is given), the test guest and the harness first.
# See docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
case ${1:-} in
-h | --help) usage; exit 0 ;;
'' | *[!0-9]*) usage >&2; exit 2 ;;
esac
n=$1
shift
flick=""
args=()
while (($#)); do
	case $1 in
	--flick) flick=$(readlink -f "${2:?--flick needs a path}"); shift ;;
	*) args+=("$1") ;;
	esac
	shift
done

for tool in make:make gcc:gcc; do
	command -v "${tool%%:*}" >/dev/null 2>&1 || {
		apt-get update -qq && apt-get install -y -qq --no-install-recommends "${tool##*:}" >&2
	}
done
if [[ -z $flick ]]; then
	flick=$(scripts/build-release.sh)
fi
make -s -C resources/guest/test-guest OUT="$root/target/test-guest"
cargo build --release --quiet --manifest-path harness/Cargo.toml

# Each VM holds a handful of descriptors; raise the soft limit (root may raise the hard one).
need=$((4 * n + 256))
if (($(ulimit -n) < need)); then
	ulimit -n "$need" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
	echo "launch-many.sh: raised ulimit -n to $(ulimit -n)" >&2
fi

dir=$(mktemp -d /tmp/flick-launch-many.XXXXXX)
cleanup() {
	# The harness kills, reaps and deletes everything itself and then removes its pid list;
	# if it could not (killed), stop what is still ours: flick processes using this directory.
	if [[ -f $dir/pids ]]; then
		while read -r pid; do
			if grep -qF "$dir" "/proc/$pid/cmdline" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
		done <"$dir/pids"
	fi
	rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$root/harness/target/release/flick-bench" launch-many "$n" --dir "$dir" \
	--flick "$flick" --guest "$root/target/test-guest/testguest.elf" "${args[@]}"
