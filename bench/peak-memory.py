#!/usr/bin/env python3
"""Peak memory of a process and its children, sampled every 100 ms.

Summing each process's own peak RSS (VmHWM) counts twice what an agent and its
engine process share (the binary's pages, the libraries) and adds peaks that never
coexisted (a probe at start-up, a load). This samples the proportional set size
(Pss, shared pages split among the processes mapping them) of the whole tree at
once and keeps the largest sum; the same sampler measures the reference tool, so
both sides are counted alike.

    bench/peak-memory.py PID OUT    runs until PID ends or this gets SIGTERM,
                                    then writes "PEAK_PSS_KIB" to OUT
"""
import os
import signal
import sys
import time


def children(pid):
    # Each thread lists the children it started; the agent starts engines from any.
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return found


def tree(pid):
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo.extend(children(p))
    return pids


def pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def main():
    pid, out = int(sys.argv[1]), sys.argv[2]
    peak = 0
    running = True

    def stop(*_):
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    while running and os.path.exists(f"/proc/{pid}"):
        peak = max(peak, sum(pss_kib(p) for p in tree(pid)))
        time.sleep(0.1)
    with open(out, "w") as f:
        f.write(f"{peak}\n")


if __name__ == "__main__":
    main()
