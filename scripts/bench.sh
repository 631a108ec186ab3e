#!/usr/bin/env bash
# Launch benchmark: a flick microVM against QEMU microvm, OCI containers (crun, runc, podman),
# namespaces (unshare) and a plain fork+exec, on this host.
#
#   scripts/bench.sh [--runs N] [--vmm NAME=/path/to/vmm]... [--only a,b,...] [--with-linux]
#                    [--linux-runs N] [--warmup N] [--no-smaps] [--settle S] [--out DIR] [--flick PATH]
#
# Installs what it needs from Debian (busybox-static, util-linux, crun, runc, qemu-system-x86,
# fonts-dejavu-core; podman is optional: if it cannot be installed, that variant is skipped),
# builds flick (release; --flick PATH benchmarks that binary instead), the test guest and the
# harness (harness/, a separate Cargo package), then runs `flick-bench compare`. Results go to
# target/bench/<UTC timestamp>/ (or --out DIR): results.json, results.md and launch.png.
# Variants: `flick-bench variants`. flick-linux is slow (on a PVM host Linux needs tens of
# seconds to reach init) and runs only with --with-linux or when --only names it.
#
# Host change: crun 1.8 refuses a hybrid cgroup layout (v1 controllers plus an empty cgroup2 at
# /sys/fs/cgroup/unified). For the run, this script mounts the v1 hugetlb controller at
# /sys/fs/cgroup/hugetlb (which crun then accepts) and unmounts it on exit, Ctrl-C included.
# See docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

only=""
with_linux=0
flick=""
args=()
while (($#)); do
	case $1 in
	--only | --runs | --vmm | --out | --linux-runs | --warmup | --settle | --flick)
		[[ $# -ge 2 ]] || { echo "bench.sh: $1 needs a value" >&2; exit 2; }
		case $1 in
		--only) only=$2 ;;
		--flick) flick=$(readlink -f "$2") ;;
		esac
		[[ $1 == --flick ]] || args+=("$1" "$2")
		shift ;;
	--with-linux | --no-smaps) args+=("$1") ;;
	-h | --help) usage; exit 0 ;;
	*) echo "bench.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
	esac
	shift
done

# Is variant $1 selected?
want() {
	if [[ -z $only ]]; then
		[[ $1 != flick-linux ]] || ((with_linux))
	else
		[[ ",$only," == *",$1,"* ]]
	fi
}

apt_updated=0
# install [--optional] PACKAGE...: installs the packages that are missing.
install() {
	local optional=0
	if [[ $1 == --optional ]]; then optional=1; shift; fi
	local p missing=()
	for p in "$@"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
	done
	((${#missing[@]})) || return 0
	if ((!apt_updated)); then
		apt-get update -qq >&2 || true
		apt_updated=1
	fi
	echo "== installing ${missing[*]}" >&2
	if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2; then
		if ((optional)); then
			echo "bench.sh: could not install ${missing[*]}: that variant will be reported as skipped" >&2
			return 0
		fi
		echo "bench.sh: apt-get install ${missing[*]} failed" >&2
		exit 1
	fi
}

install busybox-static util-linux make gcc binutils fonts-dejavu-core
if want crun || want runc; then install runc; fi
if want crun; then install crun; fi
if want qemu-microvm; then install qemu-system-x86; fi
if want podman; then install --optional podman; fi

if [[ -z $flick ]]; then
	echo "== building flick (release)" >&2
	flick=$(scripts/build-release.sh)
fi
echo "== building the test guest" >&2
make -s -C resources/guest/test-guest OUT="$root/target/test-guest"
echo "== building the harness (harness/)" >&2
cargo build --release --quiet --manifest-path harness/Cargo.toml

# crun and the hybrid cgroup layout (see the header). Undone by the EXIT trap.
hugetlb=/sys/fs/cgroup/hugetlb
mounted_hugetlb=0
created_hugetlb=0
undo() {
	if ((mounted_hugetlb)); then
		# Container cgroups are removed by crun itself; take out any left by a killed run.
		find "$hugetlb" -mindepth 1 -depth -type d -name 'flickbench-*' -exec rmdir {} + 2>/dev/null || true
		umount "$hugetlb" && mounted_hugetlb=0 || echo "bench.sh: could not unmount $hugetlb" >&2
	fi
	if ((created_hugetlb)) && ((!mounted_hugetlb)); then
		rmdir "$hugetlb" 2>/dev/null && created_hugetlb=0 || true
	fi
}
trap undo EXIT
trap 'exit 130' INT TERM
if want crun && command -v crun >/dev/null &&
	[[ $(stat -fc %T /sys/fs/cgroup/unified 2>/dev/null) == cgroup2fs ]] &&
	[[ $(stat -fc %T /sys/fs/cgroup 2>/dev/null) == tmpfs ]] &&
	! mountpoint -q "$hugetlb"; then
	if [[ ! -e $hugetlb ]]; then
		mkdir "$hugetlb" && created_hugetlb=1
	fi
	if mount -t cgroup -o hugetlb cgroup "$hugetlb" 2>/dev/null; then
		mounted_hugetlb=1
		echo "== mounted the cgroup v1 hugetlb controller at $hugetlb for crun (unmounted on exit)" >&2
	else
		echo "bench.sh: could not mount the hugetlb controller; crun runs in a private mount namespace instead" >&2
		undo
	fi
fi

echo "== host: $(uptime)" >&2
"$root/harness/target/release/flick-bench" compare --repo "$root" \
	--flick "$flick" --guest-dir "$root/target/test-guest" "${args[@]}"
