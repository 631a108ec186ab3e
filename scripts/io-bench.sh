#!/usr/bin/env bash
# Disk and network throughput through flick, driven by the test guest's own virtio drivers,
# next to the host's raw numbers on the same file / the same TAP.
#
#   scripts/io-bench.sh            both
#   scripts/io-bench.sh blk|net    one of them
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
what=${1:-all}
flick=$(scripts/build-release.sh)
make -s -C resources/guest/test-guest OUT="$root/target/test-guest"
work=$(mktemp -d /tmp/flick-io.XXXXXX)
ns=flkio$$
cleanup() { ip netns del "$ns" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT INT TERM
echo "host load: $(cut -d' ' -f1-3 /proc/loadavg)"

run_guest() { # config-json-file
    "$flick" --no-api --config-file "$1" </dev/null 2>/dev/null
}

if [[ $what == all || $what == blk ]]; then
    disk=$work/disk.img
    dd if=/dev/urandom of="$disk" bs=1M count=64 status=none
    cat >"$work/blk.json" <<JSON
{"boot-source": {"kernel_image_path": "$root/target/test-guest/testguest.elf",
  "boot_args": "tg.smp=0 tg.quiet=1 tg.blk=bench tg.blk_ops=2000 tg.blk_mib=32"},
 "drives": [{"drive_id": "bench", "path_on_host": "$disk", "is_root_device": false,
             "is_read_only": false}],
 "machine-config": {"vcpu_count": 1, "mem_size_mib": 128}}
JSON
    echo "== virtio-blk through flick (64 MiB file, page cache warm)"
    run_guest "$work/blk.json" >/dev/null  # warm the page cache
    run_guest "$work/blk.json" | python3 -c '
import sys, re
for line in sys.stdin:
    m = re.match(r"blkbench: randread4k ops=(\d+) us=(\d+)", line)
    if m: print(f"  guest 4 KiB random read: {int(m[1])/(int(m[2])/1e6):10.0f} req/s")
    m = re.match(r"blkbench: seq(read|write) mib=(\d+) us=(\d+)", line)
    if m: print(f"  guest 1 MiB sequential {m[1]:5}: {int(m[2])*1.048576/(int(m[3])/1e6):8.1f} MB/s")
'
    echo "== host, same file, same request sizes (pread/pwrite from one thread)"
    python3 - "$disk" <<'PY'
import os, random, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
size = os.fstat(fd).st_size
n = 20000
t = time.perf_counter()
for _ in range(n):
    os.pread(fd, 4096, random.randrange(size // 4096) * 4096)
print(f"  host 4 KiB random read:  {n / (time.perf_counter() - t):10.0f} req/s")
mib = 32
t = time.perf_counter()
for i in range(mib):
    os.pread(fd, 1 << 20, i << 20)
print(f"  host 1 MiB sequential read : {mib * 1.048576 / (time.perf_counter() - t):8.1f} MB/s")
buf = os.urandom(1 << 20)
t = time.perf_counter()
for i in range(mib):
    os.pwrite(fd, buf, i << 20)
print(f"  host 1 MiB sequential write: {mib * 1.048576 / (time.perf_counter() - t):8.1f} MB/s")
PY
fi

if [[ $what == all || $what == net ]]; then
    ip netns add "$ns"
    ip netns exec "$ns" ip tuntap add tap0 mode tap
    ip netns exec "$ns" ip addr add 10.0.99.1/24 dev tap0
    ip netns exec "$ns" ip link set tap0 up
    bench_net() { # label extra-iface-json
        cat >"$work/net.json" <<JSON
{"boot-source": {"kernel_image_path": "$root/target/test-guest/testguest.elf",
  "boot_args": "tg.smp=0 tg.quiet=1 tg.ip=10.0.99.2 tg.peer=10.0.99.1 tg.net=bench tg.net_frames=20000 tg.net_size=1400"},
 "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:0a:00:63:02"$2}],
 "machine-config": {"vcpu_count": 1, "mem_size_mib": 128}}
JSON
        ip netns exec "$ns" "$flick" --no-api --config-file "$work/net.json" </dev/null 2>/dev/null |
            LABEL=$1 python3 -c '
import os, re, sys
label = os.environ["LABEL"]
for line in sys.stdin:
    m = re.match(r"netbench: tx frames=(\d+) bytes=(\d+) us=(\d+)", line)
    if m:
        s = int(m[3]) / 1e6
        print(f"  {label:<28} {int(m[1])/s:9.0f} frames/s {int(m[2])*8/s/1e6:8.1f} Mbit/s")
'
    }
    echo "== virtio-net guest -> host through flick (20000 UDP datagrams of 1400 bytes)"
    bench_net "unlimited" ""
    bench_net "tx limited to 5000 frames/s" ', "tx_rate_limiter": {"ops": {"size": 500, "refill_time": 100}}'
    bench_net "tx limited to 40 Mbit/s" ', "tx_rate_limiter": {"bandwidth": {"size": 500000, "refill_time": 100}}'
fi
