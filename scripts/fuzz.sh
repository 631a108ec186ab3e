#!/usr/bin/env bash
# Runs flick's cargo-fuzz targets (fuzz/, see docs/fuzzing.md) with the nightly toolchain.
#
#   scripts/fuzz.sh smoke            every target for FUZZ_SMOKE_SECONDS (20) each; fails on a crash
#   scripts/fuzz.sh long [SECONDS]   every target for SECONDS (600) each
#   scripts/fuzz.sh run TARGET [SECONDS]
#   scripts/fuzz.sh list
#
# Each target starts from its seeds (fuzz/seeds/TARGET, committed, including every input that
# once crashed) and its working corpus (fuzz/corpus/TARGET, not committed, grows across runs).
# A crash leaves its input in fuzz/artifacts/TARGET/; replay it with
#   cargo +nightly fuzz run TARGET fuzz/artifacts/TARGET/crash-...
# Installs cargo-fuzz (cargo install, cached in ~/.cargo/bin) and the nightly toolchain (rustup)
# when missing, and says so loudly when it cannot.
set -euo pipefail
cd "$(dirname "$0")/.."

die() {
    echo "fuzz.sh: ERROR: $*" >&2
    exit 1
}

# cannot WHAT: the tools are missing and cannot be installed here: exit 3 (not a crash).
cannot() {
    echo "fuzz.sh: CANNOT RUN: $*" >&2
    exit 3
}

ensure_tools() {
    if ! rustup run nightly rustc --version >/dev/null 2>&1; then
        echo "fuzz.sh: installing the nightly toolchain (cargo-fuzz needs it)" >&2
        rustup toolchain install nightly --profile minimal >&2 ||
            cannot "no nightly toolchain and rustup cannot install one"
    fi
    if ! cargo fuzz --version >/dev/null 2>&1; then
        echo "fuzz.sh: installing cargo-fuzz (cargo install cargo-fuzz)" >&2
        cargo install cargo-fuzz >&2 ||
            cannot "cargo install cargo-fuzz failed"
    fi
}

targets() {
    sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^flick-fuzz$'
}

# run TARGET SECONDS: fuzzes one target; prints its summary line; fails on a crash.
run() {
    local target=$1 seconds=$2 log status=0
    mkdir -p "fuzz/corpus/$target" "fuzz/artifacts/$target"
    log=$(mktemp)
    # -rss_limit_mb and -timeout turn memory blow-ups and hangs into findings too.
    (cd fuzz && cargo +nightly fuzz run "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -print_final_stats=1 -rss_limit_mb=2048 -timeout=10) \
        >"$log" 2>&1 || status=$?
    # The targets' scratch drive files (two per fuzz process; the processes have ended).
    rm -f /dev/shm/flick-fuzz-*.img "${TMPDIR:-/tmp}"/flick-fuzz-*.img
    local execs cov
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)
    if ((status)); then
        echo "fuzz.sh: $target FAILED after ${execs:-?} executions (exit $status); last lines:" >&2
        grep -E 'panicked|ERROR|SUMMARY|Test unit written|artifact' "$log" | head -20 >&2 || true
        tail -5 "$log" >&2
        rm -f "$log"
        return 1
    fi
    printf 'fuzz.sh: %-15s %4ss  %10s executions  %s\n' "$target" "$seconds" "${execs:-?}" "$cov" >&2
    rm -f "$log"
}

all() {
    local seconds=$1 failed=()
    echo "== building the fuzz targets (cargo +nightly fuzz build)" >&2
    (cd fuzz && cargo +nightly fuzz build) >&2 || die "the fuzz targets do not build"
    for target in $(targets); do
        run "$target" "$seconds" || failed+=("$target")
    done
    if ((${#failed[@]})); then
        die "crash or failure in: ${failed[*]} (inputs in fuzz/artifacts/)"
    fi
    echo "fuzz.sh: no crash in $(targets | wc -l) targets" >&2
}

case "${1:-}" in
    smoke) ensure_tools; all "${FUZZ_SMOKE_SECONDS:-20}" ;;
    long) ensure_tools; all "${2:-600}" ;;
    run) [[ -n "${2:-}" ]] || die "usage: scripts/fuzz.sh run TARGET [SECONDS]"
        ensure_tools; run "$2" "${3:-60}" ;;
    list) targets ;;
    *) sed -n '3,7p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
