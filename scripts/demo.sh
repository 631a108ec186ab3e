#!/usr/bin/env bash
# Builds what is missing and boots a microVM with flick, printing what happened.
#
#   scripts/demo.sh            boot the test guest (milliseconds) on 2 vCPUs
#   scripts/demo.sh --linux    boot the project's Linux kernel + busybox initramfs (builds them
#                              first, ~5 minutes once) and run programs in its user space
#                              (flick.init=check: busybox echo, a pipe, signals, a file), then
#                              reboot; on a PVM host this takes tens of seconds (kernel code is
#                              emulated there), see docs/linux-guest.md
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

mode=testguest
case "${1:-}" in
    --linux) mode=linux ;;
    ""|--test-guest) ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "demo.sh: unknown option $1" >&2; exit 2 ;;
esac

for tool in make:make gcc:gcc; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || {
        apt-get update -qq && apt-get install -y -qq --no-install-recommends "${tool##*:}" >&2
    }
done

echo "== building flick (release)" >&2
flick=$(scripts/build-release.sh)
work=$(mktemp -d /tmp/flick-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT

if [[ $mode == testguest ]]; then
    echo "== building the test guest" >&2
    make -s -C resources/guest/test-guest OUT="$root/target/test-guest"
    cat >"$work/vm.json" <<JSON
{
  "boot-source": {"kernel_image_path": "$root/target/test-guest/testguest.elf",
                  "boot_args": "tg.count=3"},
  "machine-config": {"vcpu_count": 2, "mem_size_mib": 128}
}
JSON
else
    echo "== building the Linux guest artifacts (cached after the first run)" >&2
    eval "$(scripts/guest-artifacts.sh)"
    cat >"$work/vm.json" <<JSON
{
  "boot-source": {"kernel_image_path": "$FLICK_KERNEL_VMLINUX",
                  "initrd_path": "$FLICK_INITRAMFS",
                  "boot_args": "console=ttyS0 reboot=k panic=1 i8042.nokbd i8042.noaux flick.init=check"},
  "machine-config": {"vcpu_count": 1, "mem_size_mib": 256}
}
JSON
fi

echo "== config" >&2
cat "$work/vm.json" >&2
echo "== booting: flick --no-api --config-file vm.json --boot-timer" >&2
start=$(date +%s%N)
set +e
"$flick" --no-api --config-file "$work/vm.json" --boot-timer --level Info </dev/null |
    tee "$work/console"
code=${PIPESTATUS[0]}
set -e
end=$(date +%s%N)
echo "== flick exited with code $code after $(( (end - start) / 1000000 )) ms (spawn to exit)" >&2
if [[ $mode == linux ]]; then
    echo "== Linux user space (init's READY line and what flick.init=check ran):" >&2
    grep -E '^(READY|CHECK) ' "$work/console" >&2 || echo "   (none: user space did not run)" >&2
fi
exit $code
