#!/usr/bin/env python3
"""Writes the hand-made seed inputs of the fuzz targets into fuzz/seeds/<target>/.

Each seed is a well-formed input in the target's layout (see the comment at the top of each
target): real API requests, a valid config file, a driver setting up queues with valid
requests. Run from anywhere; rewrites the seeds in place.
"""
import json
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")


def put(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def request(method, path, body=b"", extra=""):
    head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n{extra}"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


BODIES = {
    ("PUT", "/machine-config"): {"vcpu_count": 2, "mem_size_mib": 256, "smt": False},
    ("PATCH", "/machine-config"): {"vcpu_count": 1},
    ("PUT", "/boot-source"): {"kernel_image_path": "/k", "boot_args": "console=ttyS0 reboot=k"},
    ("PUT", "/drives/rootfs"): {"drive_id": "rootfs", "path_on_host": "/r.ext4",
                                "is_root_device": True, "is_read_only": False,
                                "rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}},
    ("PATCH", "/drives/rootfs"): {"drive_id": "rootfs", "path_on_host": "/s.ext4"},
    ("PUT", "/network-interfaces/eth0"): {"iface_id": "eth0", "host_dev_name": "tap0",
                                          "guest_mac": "06:00:ac:10:00:02"},
    ("PATCH", "/network-interfaces/eth0"): {"iface_id": "eth0", "rx_rate_limiter": {
        "ops": {"size": 10, "refill_time": 1000, "one_time_burst": 5}}},
    ("PUT", "/actions"): {"action_type": "InstanceStart"},
    ("PATCH", "/vm"): {"state": "Paused"},
    ("PUT", "/logger"): {"log_path": "/tmp/log", "level": "Debug", "show_level": True},
    ("PUT", "/metrics"): {"metrics_path": "/tmp/metrics"},
    ("PUT", "/entropy"): {"rate_limiter": {"bandwidth": {"size": 100, "refill_time": 10}}},
    ("PUT", "/snapshot/create"): {"snapshot_path": "/s", "mem_file_path": "/m",
                                  "snapshot_type": "Full"},
    ("PUT", "/snapshot/load"): {"snapshot_path": "/s", "mem_backend": {
        "backend_type": "File", "backend_path": "/m"}, "resume_vm": True,
        "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap1"}]},
    ("PUT", "/serial"): {"serial_out_path": "/tmp/serial"},
    ("PUT", "/vsock"): {"guest_cid": 3, "uds_path": "/v.sock"},
}
METHODS = ["GET", "PUT", "PATCH", "POST", "DELETE", "HEAD"]


def http_and_route():
    gets = ["/", "/version", "/vm/config", "/machine-config", "/metrics",
            "http://localhost/machine-config?x=1", "/balloon"]
    for i, ((method, path), body) in enumerate(BODIES.items()):
        b = json.dumps(body).encode()
        put("http_request", f"{i:02}", bytes([0x40, 0]) + request(method, path, b))
        put("api_route", f"{i:02}", bytes([METHODS.index(method)]) + path.encode() + b"\n" + b)
    for i, path in enumerate(gets):
        put("http_request", f"get{i}", bytes([0x40, 7]) + request("GET", path))
        put("api_route", f"get{i}", bytes([0]) + path.encode() + b"\n")
    pipelined = (request("GET", "/") + request("PUT", "/actions", b'{"action_type": "FlushMetrics"}')
                 + request("GET", "/version", extra="Connection: close\r\n"))
    put("http_request", "pipelined", bytes([0x10, 0]) + pipelined)
    put("http_request", "expect", bytes([0x10, 3]) + request(
        "PUT", "/machine-config", b'{"vcpu_count": 1, "mem_size_mib": 128}',
        extra="Expect: 100-continue\r\n"))
    put("http_request", "http10", bytes([1, 0]) + b"GET / HTTP/1.0\r\n\r\n")
    put("http_request", "chunked", bytes([1, 0]) + request(
        "PUT", "/actions", extra="Transfer-Encoding: chunked\r\n"))
    put("api_route", "custom", bytes([0xff]) + b"OPTIONS /\n")


def config():
    full = {
        "boot-source": {"kernel_image_path": "/k", "boot_args": "console=ttyS0", "initrd_path": "/i"},
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 256, "smt": False,
                           "huge_pages": "2M", "cpu_template": "None", "cpu_profile": "host"},
        "drives": [{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": True,
                    "is_read_only": False, "cache_type": "Writeback", "io_engine": "Sync",
                    "partuuid": "0eaa91a0-01"}],
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0",
                                "guest_mac": "06:00:AC:10:00:02", "mtu": 1500,
                                "tx_rate_limiter": {"bandwidth": {"size": 1, "refill_time": 1}}}],
        "logger": {"level": "Info", "log_path": "/tmp/log"},
        "metrics": {"metrics_path": "/tmp/m"},
        "serial": {"serial_out_path": "/tmp/s"},
        "entropy": {},
        "balloon": {"amount_mib": 0, "deflate_on_oom": False},
    }
    put("config_file", "full.json", json.dumps(full, indent=2))
    put("config_file", "minimal.json", json.dumps({"boot-source": {"kernel_image_path": "/k"}}))
    put("config_file", "empty.json", "{}")


def desc(addr, length, flags, nxt):
    return struct.pack("<QIHH", addr, length, flags, nxt)


def ring(avail_heads):
    return struct.pack("<HH", 0, len(avail_heads)) + b"".join(struct.pack("<H", h) for h in avail_heads)


def memory(parts):
    """Guest memory image: {address: bytes}."""
    size = max(a + len(b) for a, b in parts.items())
    img = bytearray(size)
    for a, b in parts.items():
        img[a:a + len(b)] = b
    return bytes(img)


NEXT, WRITE = 1, 2
QUEUE16 = struct.pack("<HIIIB", 16, 0x000, 0x100, 0x200, 0)  # size, desc, avail, used, event idx


def block_memory():
    # read 2 sectors of sector 1, write 1 sector at sector 3, flush, get id, unknown type
    descs = (desc(0x300, 16, NEXT, 1) + desc(0x400, 1024, NEXT | WRITE, 2) + desc(0x380, 1, WRITE, 0)
             + desc(0x310, 16, NEXT, 4) + desc(0x800, 512, NEXT, 5) + desc(0x381, 1, WRITE, 0)
             + desc(0x320, 16, NEXT, 7) + desc(0x382, 1, WRITE, 0)
             + desc(0x330, 16, NEXT, 9) + desc(0x900, 20, NEXT | WRITE, 10) + desc(0x383, 1, WRITE, 0)
             + desc(0x340, 16, NEXT, 12) + desc(0x384, 1, WRITE, 0))
    headers = b"".join(struct.pack("<IIQ", t, 0, s) for t, s in [(0, 1), (1, 3), (4, 0), (8, 0), (99, 0)])
    return memory({0x000: descs, 0x100: ring([0, 3, 6, 8, 11]), 0x300: headers, 0x3ff: b"\0"})


def virtio():
    mem = block_memory()
    # execute mode: header at 0x300 (read, sector 1), data, status
    chain = (struct.pack("<IIB", 0x300, 16, NEXT) + struct.pack("<IIB", 0x400, 1024, NEXT | WRITE)
             + struct.pack("<IIB", 0x380, 1, WRITE))
    put("virtio_block", "execute_read", bytes([0, 3]) + chain + mem)
    put("virtio_block", "execute_read_only", bytes([2, 3]) + chain + mem)
    put("virtio_block", "queue", bytes([1, 0, 0, 0, 1]) + QUEUE16 + mem)
    put("virtio_block", "queue_limited", bytes([7, 3, 0x00, 0x02, 2]) + QUEUE16 + mem)

    # net: rx queue at 0x000/0x100/0x200 with two 2 KiB buffers, tx queue at 0x400/0x500/0x600
    # with one frame at 0x800.
    frame = bytes(12) + bytes(range(60))
    rx = desc(0x1000, 2048, WRITE, 0) + desc(0x1800, 2048, WRITE, 0)
    tx = desc(0x800, 12, NEXT, 1) + desc(0x80c, 60, 0, 0)
    mem = memory({0x000: rx, 0x100: ring([0, 1]), 0x400: tx, 0x500: ring([0]), 0x800: frame})
    txq = struct.pack("<HIIIB", 16, 0x400, 0x500, 0x600, 0)
    frames = struct.pack("<H", len(frame)) + frame + struct.pack("<H", 30) + bytes(30)
    for name, flags, events in [("rxtx", 1, bytes([0, 1, 3, 0])), ("reset", 4, bytes([4, 5, 1, 2]))]:
        put("virtio_net", name, bytes([flags]) + struct.pack("<H", 3) + bytes(6) + QUEUE16 + txq
            + bytes([2]) + frames + bytes([len(events)]) + events + mem)

    # mmio: a driver's whole setup of a drive, then a notification
    def op(code, offset, value):
        return struct.pack("<BHQ", code, offset, value)

    def setup(queues):
        ops = [op(0x42, 0x000, 0), op(0x42, 0x008, 0), op(0x40, 0x070, 1), op(0x40, 0x070, 3),
               op(0x40, 0x014, 1), op(0x42, 0x010, 0), op(0x40, 0x024, 1), op(0x40, 0x020, 1),
               op(0x40, 0x070, 0xb)]
        for i, (d, a, u) in enumerate(queues):
            ops += [op(0x40, 0x030, i), op(0x40, 0x038, 16), op(0x40, 0x080, d), op(0x40, 0x090, a),
                    op(0x40, 0x0a0, u), op(0x40, 0x044, 1)]
        ops += [op(0x40, 0x070, 0xf), op(0x04, 0, 0), op(0x15, 0, 0), op(0x0d, 0, 0),
                op(0x42, 0x060, 0), op(0x40, 0x064, 1), op(0x42, 0x100, 0), op(0x06, 0, 0)]
        return ops

    ops = setup([(0x000, 0x100, 0x200)])
    put("virtio_mmio", "block", bytes([0]) + struct.pack("<Q", 0xd000_0000) + bytes([len(ops)])
        + b"".join(ops) + block_memory())
    ops = setup([(0x000, 0x100, 0x200), (0x400, 0x500, 0x600)])
    put("virtio_mmio", "net", bytes([1]) + struct.pack("<Q", 0xd000_1000) + bytes([len(ops)])
        + b"".join(ops) + mem)


http_and_route()
config()
virtio()


def snapshot():
    # A hand-made payload (mode 1: framed by the target); real state files taken from a
    # running guest sit next to it as snapshot_state/real-*.
    payload = {"snapshot_id": 1, "arch": "x86_64",
               "machine": {"vcpu_count": 1, "mem_size_mib": 64, "smt": False, "conservative_cpu": False},
               "boot": {"kernel": "/k", "args": "console=ttyS0", "initrd": None},
               "ram": [[0, 67108864]], "vm": {}, "vcpus": [], "serial": {}, "devices": []}
    put("snapshot_state", "handmade", b"\x01" + json.dumps(payload).encode())


snapshot()
