#!/usr/bin/env bash
# Runs flick's whole test suite: formatting, lints, unit tests and the integration tests that
# boot guests on KVM, for flick (with its fixture crate tests/fixtures) and for the benchmark
# harness in harness/. Installs the few Debian packages the tests use when they are missing
# (tests never install anything themselves).
#
# A test that cannot run on this host prints a `[SKIP] <test>: <reason>` line and passes; the
# summary at the end counts and lists them. Under CI (`CI` set) skipping is a failure.
#
#   scripts/test.sh            everything
#   scripts/test.sh -- ARGS    extra arguments for `cargo test` (e.g. a test name filter)
#
# Then the two QEMU lanes, each the same way: the aarch64 lane after the nested one
# (scripts/aarch64-lane.sh, docs/aarch64.md; FLICK_AARCH64_LANE=0 skips it outside CI), and the
# hardware-virtualization lane (scripts/nested-lane.sh, docs/nested-lane.md): the
# integration tests again, inside an L1 Linux under QEMU TCG on KVM-AMD. In CI it always runs and
# any problem, setting it up included, fails the run. Elsewhere FLICK_NESTED_LANE=0 skips it, and
# so does a host where it cannot be set up; a skip is announced and counted in the last line.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each part of the suite is announced by `part`, which also times it; the summary lists the times.
parts_start=$SECONDS
part_name=
part_start=$SECONDS
part_times=()
part() {
    if [[ -n "$part_name" ]]; then
        part_times+=("$(printf '%5d s  %s' $((SECONDS - part_start)) "$part_name")")
    fi
    part_name=$1
    part_start=$SECONDS
    [[ -z "$part_name" ]] || echo "== $part_name" >&2
}

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

# Tools read from /dev/null (cargo's compiler probe does); if it has become a regular file
# (some program replaced it), restore the device and say so.
if [[ ! -c /dev/null ]]; then
    echo "test.sh: /dev/null is not the null device on this host; recreating it" >&2
    rm -f /dev/null && mknod -m 666 /dev/null c 1 3
fi

if [[ ! -e /dev/kvm ]]; then
    if [[ -n "${CI:-}" ]]; then
        echo "test.sh: /dev/kvm is missing; CI requires KVM" >&2
        exit 1
    fi
    echo "test.sh: /dev/kvm is missing; KVM tests will be skipped" >&2
fi

part "guest artifacts (Linux kernel + rootfs; built once, then cached)"
artifacts=$(scripts/guest-artifacts.sh)
eval "$artifacts"
export FLICK_KERNEL_VMLINUX FLICK_KERNEL_BZIMAGE FLICK_ROOTFS_EXT4 FLICK_INITRAMFS

log_dir=$(mktemp -d)
trap 'rm -rf "$log_dir"' EXIT

part "cargo fmt --check (flick, tests/fixtures, harness)"
cargo fmt --all --check
cargo fmt --manifest-path harness/Cargo.toml --check
part "cargo clippy (flick, tests/fixtures, harness)"
cargo clippy --all-targets --quiet -- -D warnings
cargo clippy --manifest-path harness/Cargo.toml --all-targets --quiet -- -D warnings

part "layering (scripts/check-layering.sh)"
scripts/check-layering.sh

part "generic code builds for aarch64 (cargo check --lib --target aarch64-unknown-linux-gnu)"
aarch64_skipped=
if rustup target list --installed 2>/dev/null | grep -qx aarch64-unknown-linux-gnu ||
    rustup target add aarch64-unknown-linux-gnu >&2; then
    cargo check --lib --quiet --target aarch64-unknown-linux-gnu
    part "aarch64 unit tests of the architecture module and devices (qemu-user)"
    for tool in qemu-aarch64-static:qemu-user-static aarch64-linux-gnu-gcc:gcc-aarch64-linux-gnu; do
        command -v "${tool%%:*}" >/dev/null 2>&1 ||
            apt-get install -y -qq --no-install-recommends "${tool##*:}" >&2 || true
    done
    [[ -e /usr/aarch64-linux-gnu/lib/libc.a ]] ||
        apt-get install -y -qq --no-install-recommends libc6-dev-arm64-cross >&2 || true
    if command -v qemu-aarch64-static >/dev/null && command -v aarch64-linux-gnu-gcc >/dev/null; then
        # Static, in the target directory the aarch64 lane builds in, so the two share work.
        CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/aarch64-static" \
            CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
            CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER=qemu-aarch64-static \
            cargo test --lib --quiet --target aarch64-unknown-linux-gnu -- arch:: devices::
    else
        aarch64_skipped="[SKIP] aarch64 unit tests: qemu-user-static or gcc-aarch64-linux-gnu missing"
        echo "$aarch64_skipped" >&2
    fi
else
    aarch64_skipped="[SKIP] aarch64 check: rustup cannot add the aarch64-unknown-linux-gnu target here"
    echo "$aarch64_skipped" >&2
fi

part "cargo test"
shift_args=()
if [[ "${1:-}" == "--" ]]; then shift; shift_args=("$@"); fi
status=0
cargo test --all-targets "${shift_args[@]}" 2>&1 | tee "$log_dir/flick.log" || status=$?

part "cargo test (harness)"
target_dir=$(cd "${CARGO_TARGET_DIR:-target}" && pwd)
FLICK_BIN="$target_dir/debug/flick" cargo test --manifest-path harness/Cargo.toml 2>&1 \
    | tee "$log_dir/harness.log" || status=$?

if [[ ! -c /dev/null ]]; then
    echo "test.sh: FAILED: a test replaced /dev/null with a regular file" >&2
    rm -f /dev/null && mknod -m 666 /dev/null c 1 3
    status=1
fi

part "fuzz smoke (scripts/fuzz.sh smoke; docs/fuzzing.md)"
fuzz_skipped=
fuzz_rc=0
scripts/fuzz.sh smoke || fuzz_rc=$?
case $fuzz_rc in
    0) ;;
    3) fuzz_skipped="[SKIP] fuzz smoke: the nightly toolchain or cargo-fuzz is not available here" ;;
    *) status=1 ;;
esac

part "nested lane: integration tests inside an L1 Linux on KVM-AMD (scripts/nested-lane.sh)"
lane_skipped=
if [[ -z "${CI:-}" && "${FLICK_NESTED_LANE:-1}" == 0 ]]; then
    lane_skipped="FLICK_NESTED_LANE=0"
elif ((${#shift_args[@]})) && [[ -z "${CI:-}" ]]; then
    lane_skipped="cargo test arguments given; run scripts/nested-lane.sh yourself"
else
    lane_rc=0
    scripts/nested-lane.sh || lane_rc=$?
    case $lane_rc in
        0) ;;
        3)
            if [[ -n "${CI:-}" ]]; then
                echo "test.sh: the nested lane could not be set up; CI requires it" >&2
                status=1
            else
                lane_skipped="it could not be set up on this host (see above)"
            fi
            ;;
        *)
            echo "test.sh: nested lane FAILED" >&2
            status=1
            ;;
    esac
fi
if [[ -n "$lane_skipped" ]]; then
    echo "==================================================================" >&2
    echo "== SKIPPED: nested lane (KVM-AMD under QEMU TCG): $lane_skipped" >&2
    echo "==================================================================" >&2
fi

part "aarch64 lane: flick on arm64 KVM inside QEMU TCG with EL2 (scripts/aarch64-lane.sh)"
arm_lane_skipped=
if [[ -z "${CI:-}" && "${FLICK_AARCH64_LANE:-1}" == 0 ]]; then
    arm_lane_skipped="FLICK_AARCH64_LANE=0"
elif ((${#shift_args[@]})) && [[ -z "${CI:-}" ]]; then
    arm_lane_skipped="cargo test arguments given; run scripts/aarch64-lane.sh yourself"
else
    arm_lane_rc=0
    scripts/aarch64-lane.sh || arm_lane_rc=$?
    case $arm_lane_rc in
        0) ;;
        3)
            if [[ -n "${CI:-}" ]]; then
                echo "test.sh: the aarch64 lane could not be set up; CI requires it" >&2
                status=1
            else
                arm_lane_skipped="it could not be set up on this host (see above)"
            fi
            ;;
        *)
            echo "test.sh: aarch64 lane FAILED" >&2
            status=1
            ;;
    esac
fi
if [[ -n "$arm_lane_skipped" ]]; then
    echo "==================================================================" >&2
    echo "== SKIPPED: aarch64 lane (arm64 KVM under QEMU TCG): $arm_lane_skipped" >&2
    echo "==================================================================" >&2
fi

part ""
echo "test.sh: time per part (whole suite $((SECONDS - parts_start)) s):" >&2
printf '  %s\n' "${part_times[@]}" >&2

skipped=$(grep -ho '\[SKIP\] .*' "$log_dir/flick.log" "$log_dir/harness.log" || true)
for extra in "$aarch64_skipped" "${lane_skipped:+[SKIP] nested lane: $lane_skipped}" \
    "${arm_lane_skipped:+[SKIP] aarch64 lane: $arm_lane_skipped}"; do
    if [[ -n "$extra" ]]; then
        skipped=$(printf '%s\n%s' "$extra" "$skipped" | sed '/^$/d')
    fi
done
if [[ -n "$skipped" ]]; then
    echo "test.sh: $(wc -l <<<"$skipped") tests SKIPPED (cargo counts them as passed):" >&2
    sed 's/^/  /' <<<"$skipped" >&2
    [[ -z "${CI:-}" ]] || status=1
fi
not_run=$(grep -ho '\[NOT-RUN\] .*' "$log_dir/flick.log" || true)
if [[ -n "$not_run" ]]; then
    echo "test.sh: $(wc -l <<<"$not_run") tests NOT RUN: they need a program no package provides (reported, not a failure):" >&2
    sed 's/^/  /' <<<"$not_run" >&2
fi
known=$(grep -ho '\[KNOWN-ISSUE\] .*' "$log_dir/flick.log" || true)
if [[ -n "$known" ]]; then
    echo "test.sh: $(wc -l <<<"$known") tests NOT RUN because of a known, documented issue:" >&2
    sed 's/^/  /' <<<"$known" >&2
fi
if [[ -n "$fuzz_skipped" ]]; then
    echo "test.sh: $fuzz_skipped (reported, not a failure: the fuzzers need tools CI may lack)" >&2
elif [[ -z "$skipped" ]]; then
    echo "test.sh: no test was skipped" >&2
fi
if ((status)); then
    echo "test.sh: FAILED" >&2
else
    echo "test.sh: passed" >&2
fi
exit "$status"
