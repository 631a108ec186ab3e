#!/usr/bin/env python3
"""Host side of the test guest's virtio-net checks (run where the tap device is).

    net-peer.py echo ADDR [--port 7] [--count 20] [--size 64] [--timeout 1]
        UDP echo round trips with tg.net=serve; every payload is checked.
        Prints "echo: ok=<k>/<n> min_us=<a> avg_us=<b> max_us=<c>", exit 0 if all came back.
    net-peer.py stop ADDR [--port 7] [--timeout 1]
        sends "tg-stop", which ends tg.net=serve (after echoing it). Exit 0 if echoed.
    net-peer.py sink [--port 9] [--idle 1] [--wait 10] [--ready FILE]
        counts the datagrams of tg.net=bench's transmit phase until --idle seconds pass
        without one (after the first; at most --wait seconds before it).
        Prints "sink: frames=<n> bytes=<b> us=<first to last> lost=<n> reordered=<n>"
        (from the sequence number in the first 4 payload bytes). --ready: file created
        once the socket is bound.
    net-peer.py blast ADDR [--port 9] [--size 1400] [--watch FILE] [--text T] [--seconds 30]
        sends datagrams as fast as it can for tg.net=bench's receive phase, until FILE
        contains T (repeatable; default "netbench: rx frames" or "netbench: rx timeout")
        or --seconds pass. Prints "blast: frames=<n>".
"""
import argparse
import os
import socket
import struct
import sys
import time


def cmd_echo(a):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(a.timeout)
    ok, rtts = 0, []
    for i in range(a.count):
        size = a.size if a.size >= 0 else 1 + (i * 97) % 1400
        payload = bytes((i + j) & 0xFF for j in range(size))
        t0 = time.perf_counter()
        s.sendto(payload, (a.addr, a.port))
        try:
            while True:
                data, peer = s.recvfrom(65536)
                if peer == (a.addr, a.port):
                    break
        except socket.timeout:
            print(f"echo: #{i} size={size} timeout", file=sys.stderr)
            continue
        rtt = (time.perf_counter() - t0) * 1e6
        if data != payload:
            print(f"echo: #{i} size={size} payload mismatch ({len(data)} bytes)", file=sys.stderr)
            continue
        ok += 1
        rtts.append(rtt)
    if rtts:
        print(f"echo: ok={ok}/{a.count} min_us={min(rtts):.0f} avg_us={sum(rtts) / len(rtts):.0f} "
              f"max_us={max(rtts):.0f}")
    else:
        print(f"echo: ok=0/{a.count}")
    return 0 if ok == a.count else 1


def cmd_stop(a):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(a.timeout)
    s.sendto(b"tg-stop", (a.addr, a.port))
    try:
        data, _ = s.recvfrom(65536)
    except socket.timeout:
        print("stop: no echo")
        return 1
    print("stop: ok" if data == b"tg-stop" else "stop: bad echo")
    return 0 if data == b"tg-stop" else 1


def cmd_sink(a):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.bind(("0.0.0.0", a.port))
    if a.ready:
        open(a.ready, "w").close()
    frames = nbytes = reordered = 0
    first = last = None
    seen = set()
    expect = 0
    s.settimeout(a.wait)
    while True:
        try:
            data = s.recv(65536)
        except socket.timeout:
            break
        now = time.perf_counter()
        if first is None:
            first = now
            s.settimeout(a.idle)
        last = now
        frames += 1
        nbytes += len(data)
        if len(data) >= 4:
            seq = struct.unpack(">I", data[:4])[0]
            if seq < expect:
                reordered += 1
            expect = seq + 1
            seen.add(seq)
    lost = (max(seen) + 1 - len(seen)) if seen else 0
    us = int((last - first) * 1e6) if first is not None else 0
    print(f"sink: frames={frames} bytes={nbytes} us={us} lost={lost} reordered={reordered}")
    return 0 if frames else 1


def cmd_blast(a):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    payload = bytes(i & 0xFF for i in range(a.size))
    end = time.monotonic() + a.seconds
    frames = 0
    texts = [t.encode() for t in (a.text or ["netbench: rx frames", "netbench: rx timeout"])]
    while time.monotonic() < end:
        for _ in range(64):
            try:
                s.sendto(payload, (a.addr, a.port))
                frames += 1
            except (BlockingIOError, OSError):
                time.sleep(0.0005)  # neighbour resolution pending, or a full queue
        if a.watch and os.path.exists(a.watch):
            with open(a.watch, "rb") as f:
                seen = f.read()
            if any(t in seen for t in texts):
                break
    print(f"blast: frames={frames}")
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("echo")
    e.add_argument("addr")
    e.add_argument("--port", type=int, default=7)
    e.add_argument("--count", type=int, default=20)
    e.add_argument("--size", type=int, default=64, help="payload bytes; -1: varying 1..1400")
    e.add_argument("--timeout", type=float, default=1.0)
    st = sub.add_parser("stop")
    st.add_argument("addr")
    st.add_argument("--port", type=int, default=7)
    st.add_argument("--timeout", type=float, default=1.0)
    k = sub.add_parser("sink")
    k.add_argument("--port", type=int, default=9)
    k.add_argument("--idle", type=float, default=1.0)
    k.add_argument("--wait", type=float, default=10.0)
    k.add_argument("--ready")
    b = sub.add_parser("blast")
    b.add_argument("addr")
    b.add_argument("--port", type=int, default=9)
    b.add_argument("--size", type=int, default=1400)
    b.add_argument("--watch")
    b.add_argument("--text", action="append", help="repeatable; default: the two final rx lines")
    b.add_argument("--seconds", type=float, default=30.0)
    a = p.parse_args()
    return {"echo": cmd_echo, "stop": cmd_stop, "sink": cmd_sink, "blast": cmd_blast}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
