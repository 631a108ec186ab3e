#!/usr/bin/env python3
"""Summarises the system calls each flick thread role makes, from `strace -ff -e raw=ioctl` output.

Usage: scripts/seccomp-trace.py DIR
where DIR holds the per-thread files of `strace -ff -qq -e raw=ioctl -e signal=none -o DIR/t`
run over the integration test binaries. A thread's role comes from the name it gives itself
(flick_api, flick_api_conn, flick_vcpuN), or is `vmm` for a flick process's first thread and
`teardown` for the CLONE_VM child that thread starts at exit. Calls are counted from the
thread's own seccomp() call on (before it, the thread runs under the filter it inherited:
those calls are counted for the role of the thread that created it). Prints, per role, each
system call with its count and, for ioctl, the request numbers seen.
"""
import collections
import os
import re
import sys

CALL = re.compile(r"^(?:\[pid\s+\d+\] )?([a-z_0-9]+)\((.*)")
CLONE_RET = re.compile(r"= (\d+)$")
NAME = re.compile(r'prctl\(PR_SET_NAME, "([^"]+)"')

def main(directory):
    files = {}
    for name in os.listdir(directory):
        tid = int(name.rsplit(".", 1)[1])
        with open(os.path.join(directory, name), errors="replace") as f:
            files[tid] = f.read().splitlines()
    # Children of every thread: (child tid, is thread, clone line).
    parent = {}
    for tid, lines in files.items():
        for line in lines:
            if line.startswith(("clone(", "clone3(")):
                m = CLONE_RET.search(line)
                if m:
                    parent[int(m.group(1))] = (tid, "CLONE_THREAD" in line, "CLONE_VM" in line)
    flick_main = set()
    for tid, lines in files.items():
        for line in lines:
            if line.startswith("execve(") and "/flick\"" in line.split(",")[0] and line.endswith("= 0"):
                flick_main.add(tid)
    def process_of(tid):
        while tid not in flick_main:
            if tid not in parent or not parent[tid][1]:
                return None
            tid = parent[tid][0]
        return tid
    roles = {}
    for tid in files:
        if tid in flick_main:
            roles[tid] = "vmm"
        elif tid in parent and not parent[tid][1] and parent[tid][0] in flick_main and parent[tid][2]:
            roles[tid] = "teardown"
        elif process_of(tid) is not None:
            roles[tid] = "thread"
    counts = collections.defaultdict(collections.Counter)
    ioctls = collections.defaultdict(collections.Counter)
    for tid, role in roles.items():
        lines = files[tid]
        if role == "vmm":
            start = max(i for i, l in enumerate(lines) if l.startswith("execve("))
            lines = lines[start:]
        name = None
        installed = role == "thread" and False
        inherited_role = None
        if tid in parent:
            p = parent[tid][0]
            inherited_role = roles.get(p)
        for line in lines:
            m = NAME.search(line)
            if m and role == "thread":
                name = m.group(1)
            m = CALL.match(line)
            if not m:
                continue
            call, args = m.groups()
            if call == "seccomp" and "SECCOMP_SET_MODE_FILTER" in args:
                installed = True
                continue
            this = role if role != "thread" else (name or "thread")
            this = re.sub(r"flick_vcpu\d+", "vcpu", this)
            this = {"flick_api": "api", "flick_api_conn": "api"}.get(this, this)
            if not installed and this != "api" or (this == "api" and name == "flick_api" and not installed):
                # Before its own filter: the creating thread's filter applies.
                this = "(%s before own filter, inherits from %s)" % (this, inherited_role)
            counts[this][call] += 1
            if call == "ioctl":
                req = args.split(",")[1].strip()
                ioctls[this][req] += 1
    for role in sorted(counts):
        print("==", role)
        for call, n in sorted(counts[role].items()):
            extra = ""
            if call == "ioctl":
                extra = " " + " ".join("%s(%d)" % kv for kv in sorted(ioctls[role].items()))
            print("  %-20s %6d%s" % (call, n, extra))

if __name__ == "__main__":
    main(sys.argv[1])
