#!/usr/bin/env bash
# Fuzzes flick's API with schemathesis, driven by Firecracker's own OpenAPI file: every
# generated request must get an answer that is not a server error (no 5xx), and flick must still
# be alive and answer `GET /` afterwards, with no panic in its log.
#
#   scripts/api-fuzz.sh FIRECRACKER_OPENAPI_YAML [--max-examples N] [--flick PATH]
#
# FIRECRACKER_OPENAPI_YAML is `src/firecracker/swagger/firecracker.yaml` from a checkout of
# Firecracker's sources (not shipped with flick, so this check is not part of scripts/test.sh).
# flick serves pre-boot (nothing configured); schemathesis talks HTTP over TCP to a socat bridge
# to flick's unix socket. Installs schemathesis (pip) and socat (apt) when missing.
# See docs/security.md ("API robustness").
set -euo pipefail
cd "$(dirname "$0")/.."

spec=${1:-}
if [[ -z $spec || ! -f $spec ]]; then
	echo "usage: scripts/api-fuzz.sh FIRECRACKER_OPENAPI_YAML [--max-examples N] [--flick PATH]" >&2
	exit 2
fi
shift
max_examples=100
flick=
while (($#)); do
	case $1 in
	--max-examples) max_examples=${2:?}; shift ;;
	--flick) flick=${2:?}; shift ;;
	*) echo "api-fuzz: unknown argument $1" >&2; exit 2 ;;
	esac
	shift
done
if [[ -z $flick ]]; then
	cargo build --release --quiet
	flick=$PWD/target/release/flick
fi
command -v socat >/dev/null || { apt-get update -qq && apt-get install -y -qq socat >/dev/null; }
command -v schemathesis >/dev/null || pip install -q schemathesis

spec=$(realpath "$spec")
flick=$(realpath "$flick")
work=$(mktemp -d /tmp/flick-api-fuzz.XXXXXX)
pids=()
cleanup() {
	for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

# Both run inside the scratch directory: fuzzed requests name relative paths (log and metrics
# files flick creates) and schemathesis keeps a cache in its working directory.
cd "$work"
"$flick" --api-sock "$work/api.sock" >"$work/flick.out" 2>"$work/flick.err" </dev/null &
flick_pid=$!
pids+=("$flick_pid")
for _ in $(seq 200); do [[ -S $work/api.sock ]] && break; sleep 0.01; done
[[ -S $work/api.sock ]] || { echo "api-fuzz: flick did not create its socket" >&2; exit 1; }
port=$((20000 + RANDOM % 20000))
socat "TCP-LISTEN:$port,bind=127.0.0.1,reuseaddr,fork" "UNIX-CONNECT:$work/api.sock" &
pids+=("$!")
sleep 0.3

echo "== schemathesis $(schemathesis --version | awk '{print $NF}') on $(basename "$spec") against $flick" >&2
status=0
schemathesis run "$spec" --url "http://127.0.0.1:$port" --checks not_a_server_error \
	--max-examples "$max_examples" --workers 1 --request-timeout 10 \
	--report junit --report-dir "$work/report" | tee "$work/schemathesis.txt" || status=$?

alive=$(curl -s -o /dev/null -w '%{http_code}' --unix-socket "$work/api.sock" http://localhost/ || true)
if ! kill -0 "$flick_pid" 2>/dev/null || [[ $alive != 200 ]]; then
	echo "api-fuzz: FAILED: flick is gone or does not answer GET / (got '$alive')" >&2
	cat "$work/flick.err" >&2
	exit 1
fi
if grep -q panicked "$work/flick.err"; then
	echo "api-fuzz: FAILED: flick panicked:" >&2
	cat "$work/flick.err" >&2
	exit 1
fi
if ((status)); then
	echo "api-fuzz: FAILED: schemathesis found server errors (see above)" >&2
	exit 1
fi
echo "api-fuzz: passed: no 5xx, flick alive and answering, no panic" >&2
