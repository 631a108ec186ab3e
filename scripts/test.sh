#!/usr/bin/env bash
# Runs flick's whole test suite: formatting, lints, unit tests and the integration tests that
# boot guests on KVM. Installs the few Debian packages the tests use when they are missing.
#
#   scripts/test.sh            everything
#   scripts/test.sh -- ARGS    extra arguments for `cargo test` (e.g. a test name filter)
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for tool in make:make gcc:gcc ld:binutils curl:curl setpriv:util-linux unshare:util-linux \
            python3:python3 \
            dnsmasq:dnsmasq-base \
            ip:iproute2; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool##*:}")
done
if ((${#need[@]})); then
    echo "test.sh: installing ${need[*]}" >&2
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi

if [[ ! -e /dev/kvm ]]; then
    if [[ -n "${CI:-}" ]]; then
        echo "test.sh: /dev/kvm is missing; CI requires KVM" >&2
        exit 1
    fi
    echo "test.sh: /dev/kvm is missing; KVM tests will be skipped" >&2
fi

echo "== guest artifacts (Linux kernel + rootfs; built once, then cached)" >&2
artifacts=$(scripts/guest-artifacts.sh)
eval "$artifacts"
export FLICK_KERNEL_VMLINUX FLICK_KERNEL_BZIMAGE FLICK_ROOTFS_EXT4 FLICK_INITRAMFS

echo "== cargo fmt --check" >&2
cargo fmt --check
echo "== cargo clippy" >&2
cargo clippy --all-targets --quiet -- -D warnings
echo "== cargo test" >&2
shift_args=()
if [[ "${1:-}" == "--" ]]; then shift; shift_args=("$@"); fi
cargo test --all-targets "${shift_args[@]}"
