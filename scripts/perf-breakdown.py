#!/usr/bin/env python3
"""Where a box's CPU went, from a system-wide `perf record -a -g` file.

Each sample is put in one class by its call chain: user space when it was taken in user
mode, otherwise by the first kind of kernel work its chain shows (disk, TCP, io_uring,
scheduling, memory, files). Prints the box's split and each thread group's, in per cent
of all samples, idle included. Usage: perf-breakdown.py PERF_DATA
"""
import collections
import re
import subprocess
import sys

CLASSES = [
    ("disk", r"fsync|blk_|iowrite16|ext4|submit_bio|virtblk|writeback|flush_end_io|filemap_fdatawrite"),
    ("tcp", r"tcp_|ip_|net_rx|__dev_queue_xmit|sock_|inet_|nf_|ipt_|skb|__netif|napi"),
    ("io_uring", r"io_uring|io_submit|io_cq|io_wq|tctx_task|io_poll|io_timeout|io_async"),
    ("sched", r"schedule|finish_task_switch|try_to_wake_up|futex|membarrier|ttwu|enqueue_task|dequeue_task"),
    ("memory", r"page_fault|handle_mm_fault|clear_page|folio_zero|madvise|do_anonymous"),
    ("files", r"vfs_|openat|getdents|statx|newfstat|filemap_read|flock|pread|pwrite|path_openat|__fput"),
]
ORDER = ["user"] + [name for name, _ in CLASSES] + ["kernel other", "idle"]


def thread_group(comm):
    """Threads numbered per process (io_uring workers, kworkers) are one group."""
    if comm.startswith("swapper"):
        return "idle"
    for prefix in ("iou-wrk", "kworker", "shard-", "ksoftirqd"):
        if comm.startswith(prefix):
            return prefix.rstrip("-") + "*"
    return comm


def classify(comm, frames):
    """frames: (symbol, is_kernel) from the sample's leaf to its root."""
    if comm.startswith("swapper"):
        return "idle"
    if frames and not frames[0][1]:
        return "user"
    chain = " ".join(symbol for symbol, kernel in frames if kernel)
    for name, pattern in CLASSES:
        if re.search(pattern, chain):
            return name
    return "kernel other"


def samples(path):
    out = subprocess.run(
        ["perf", "script", "-i", path, "-F", "comm,ip,sym,dso"],
        check=True, capture_output=True, text=True,
    ).stdout
    for block in out.split("\n\n"):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        comm = lines[0].split()[0]
        frames = []
        for line in lines[1:]:
            parts = line.split()
            if len(parts) >= 2:
                frames.append((parts[1], "kernel.kallsyms" in parts[-1]))
        yield comm, frames


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    counts = collections.Counter()
    total = 0
    for comm, frames in samples(sys.argv[1]):
        counts[(thread_group(comm), classify(comm, frames))] += 1
        total += 1
    if total == 0:
        sys.exit("no samples")
    box = collections.Counter()
    groups = collections.Counter()
    for (group, cls), n in counts.items():
        box[cls] += n
        groups[group] += n
    pct = lambda n: f"{100 * n / total:.1f}%"
    print(f"{total} samples; per cent of all samples on every core, idle included")
    print("box: " + ", ".join(f"{cls} {pct(box[cls])}" for cls in ORDER if box[cls]))
    for group, n in groups.most_common(10):
        split = ", ".join(f"{cls} {pct(counts[(group, cls)])}" for cls in ORDER if counts[(group, cls)])
        print(f"  {group:18s} {pct(n):>6s}  ({split})")


if __name__ == "__main__":
    main()
