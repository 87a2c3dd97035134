"""Where an Eddy server's busy time went, from py-spy's raw stacks (``loadtests.bench --profile DIR``).

    python -m loadtests.bench --sockets 5000 --servers eddy --repeats 1 --solo 20 \\
        --profile /tmp/prof --profile-phases solo          # BENCH_PY_SPY_FLAGS=--native for C frames
    python -m loadtests.profile_summary /tmp/prof/eddy-5000-solo-r1.txt

Each sampled stack goes to the first step of a lone event's path it belongs to (POST, the durable
commit, the watcher's read, the fan-out's Python, its ``send()`` system calls, ...). Samples of idle
threads (executor threads waiting for work, the event loop in ``epoll_wait``) are counted apart, so
the shares are of busy time.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

#: (step, markers): a stack belongs to the first step one of whose markers it contains.
STEPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("idle (waiting threads, epoll_wait)", ("_queue_SimpleQueue_get", "epoll_wait")),
    ("cyclic GC", ("gc_collect_main",)),
    ("SQLite: the group commit (insert, fsync) on the writer thread", ("_run_batch",)),
    ("SQLite: the watcher's feed read on the reader thread", ("_feed_after",)),
    ("Tornado's per-socket ping timers", ("periodic_ping",)),
    ("fan-out: send() system calls", ("Hub._write_pending;EventSocket.write_outbox;sock_send",
                                      "EventSocket.write_outbox;sock_send", "deliver_now;sock_send",
                                      "IOStream.write_to_fd;sock_send")),
    ("fan-out: Python (hub, filters, outbox)", ("Hub.publish", "Hub._write_pending", "Hub.write_soon",
                                               "EventSocket.write_outbox", "BaseIOStream._handle_write")),
    ("POST /api/events (HTTP, token, append)", ("handlers/http.py", "HTTP1Connection", "HTTP1ServerConnection")),
    ("the rest of the event loop (callbacks, timers, selector)", ("_run_once",)),
)
OTHER = "other"


def python_path(stack: str) -> str:
    """The stack as ``A;B;C`` of function names only (no files, lines or libraries)."""
    return ";".join(frame.split(" (", 1)[0] for frame in stack.split(";"))


def step_of(stack: str) -> str:
    names = python_path(stack)
    for step, markers in STEPS:
        if any(marker in names or marker in stack for marker in markers):
            return step
    return OTHER


def summarize(path: Path) -> tuple[Counter[str], int]:
    samples: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            samples[step_of(stack)] += int(count)
    return samples, sum(samples.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profiles", nargs="+", type=Path, help="py-spy raw output files (collapsed stacks)")
    args = parser.parse_args()
    idle = STEPS[0][0]
    for path in args.profiles:
        samples, total = summarize(path)
        busy = total - samples[idle]
        print(f"\n{path.name}: {total:,} samples, {busy:,} busy")
        print("| share of busy samples | step |\n| ---: | --- |")
        for step, count in samples.most_common():
            if step != idle:
                print(f"| {100 * count / busy:.1f} % | {step} |")


if __name__ == "__main__":
    main()
