#!/usr/bin/env python3
"""Host side of the test guest's virtio-blk checks.

    blk-pattern.py verify IMAGE SEED FIRST COUNT   exit 0 if sectors [FIRST, FIRST+COUNT) of
                                                   IMAGE hold the guest's pattern for SEED
    blk-pattern.py write IMAGE SEED FIRST COUNT    write that pattern (as tg.blk=write would)
    blk-pattern.py crc IMAGE FIRST COUNT           print crc=0x... as tg.blk=read prints it

Pattern: 64-bit little-endian word j (0..63) of sector s is
mix64(seed * 0x9e3779b97f4a7c15 + s * 64 + j) mod 2^64, mix64 being splitmix64's finaliser.
The checksum is CRC-32 as zlib.crc32 computes it, over the bytes of the sectors.
"""
import struct
import sys
import zlib

M = (1 << 64) - 1
SECTOR = 512


def mix64(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
    return z ^ (z >> 31)


def pattern(seed, first, count):
    base = seed * 0x9E3779B97F4A7C15
    return b"".join(
        struct.pack("<64Q", *(mix64((base + s * 64 + j) & M) for j in range(64)))
        for s in range(first, first + count)
    )


def read(image, first, count):
    with open(image, "rb") as f:
        f.seek(first * SECTOR)
        return f.read(count * SECTOR)


def main(argv):
    if len(argv) == 6 and argv[1] in ("verify", "write"):
        image, seed, first, count = argv[2], int(argv[3], 0), int(argv[4], 0), int(argv[5], 0)
        want = pattern(seed, first, count)
        if argv[1] == "write":
            with open(image, "r+b") as f:
                f.seek(first * SECTOR)
                f.write(want)
            return 0
        got = read(image, first, count)
        for s in range(count):
            if got[s * SECTOR:(s + 1) * SECTOR] != want[s * SECTOR:(s + 1) * SECTOR]:
                print("mismatch at sector %d" % (first + s))
                return 1
        print("pattern ok sectors=%d-%d" % (first, first + count - 1))
        return 0
    if len(argv) == 5 and argv[1] == "crc":
        image, first, count = argv[2], int(argv[3], 0), int(argv[4], 0)
        print("crc=0x%x" % zlib.crc32(read(image, first, count)))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
