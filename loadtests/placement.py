"""Which CPUs a benchmark run's processes may use (the server's on some, the client side's on others), and how the
kernel schedules them.

A server name given to ``loadtests.bench --servers`` may carry a placement after ``@``:

    eddy@0/1        the server on CPU 0; the load generators and the harness on CPU 1
    eddy-p2@0/1     Eddy with ``--processes 2``: both workers on CPU 0 (forked after the pinning, they inherit it)
    eddy@0-1/all    the server on CPUs 0 and 1; the client side anywhere

Without ``@`` nothing is pinned: the server and the client side may use every CPU the harness started with. The
server is pinned before it starts (``sched_setaffinity`` in the child, before ``exec``), so every process it forks
inherits the set; the load generators and the harness pin every thread they have (threads started later inherit
it). What the kernel then reports for each process (``observed``, and the scheduling policy: ``observed_policies``)
goes into the results, so a placement that did not take is seen, not assumed. The client side may be made
``SCHED_BATCH`` tasks (``batch_scheduling``), so that a woken client never preempts the server.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: The CPUs the harness may use as it starts (``taskset`` around the harness narrows "all").
STARTED_WITH = frozenset(os.sched_getaffinity(0))

CPUs = frozenset[int] | None  # None: not pinned (every CPU of STARTED_WITH)


def parse_cpus(text: str) -> CPUs:
    """``"0"``, ``"0-1"``, ``"0,2-3"`` → a set of CPU numbers; ``"all"`` or ``""`` → None (not pinned)."""
    text = text.strip()
    if text in ("", "all"):
        return None
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    unknown = cpus - STARTED_WITH
    if unknown:
        raise ValueError(f"CPUs {format_cpus(frozenset(unknown))} are not available (have {format_cpus(STARTED_WITH)})")
    return frozenset(cpus)


def format_cpus(cpus: CPUs) -> str:
    """The inverse of :func:`parse_cpus`: ``{0, 1, 3}`` → ``"0-1,3"``, None → ``"all"``."""
    if cpus is None:
        return "all"
    parts, ordered = [], sorted(cpus)
    start = previous = ordered[0]
    for cpu in [*ordered[1:], None]:
        if cpu is not None and cpu == previous + 1:
            previous = cpu
            continue
        parts.append(str(start) if start == previous else f"{start}-{previous}")
        if cpu is not None:
            start = previous = cpu
    return ",".join(parts)


@dataclass(frozen=True)
class Placement:
    """Where one run's server (and its forks) and its client side (load generators, harness) may run."""

    server: CPUs = None
    clients: CPUs = None

    @classmethod
    def parse(cls, text: str) -> Placement:
        """``"0/1"`` → server on CPU 0, clients on CPU 1; ``"0"`` → server on CPU 0, clients not pinned."""
        server, _, clients = text.partition("/")
        return cls(parse_cpus(server), parse_cpus(clients))

    @property
    def pinned(self) -> bool:
        return self.server is not None or self.clients is not None

    def __str__(self) -> str:
        return f"{format_cpus(self.server)}/{format_cpus(self.clients)}"


def split_label(label: str) -> tuple[str, Placement]:
    """``"eddy-p2@0/1"`` → ``("eddy-p2", Placement(server={0}, clients={1}))``; no ``@`` → not pinned."""
    name, _, where = label.partition("@")
    return name, Placement.parse(where) if where else Placement()


def pin_this_process(cpus: CPUs) -> list[int]:
    """Allow every thread of this process on ``cpus`` only (None: every CPU); return the affinity now observed."""
    target = STARTED_WITH if cpus is None else cpus
    for task in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(task), target)
        except ProcessLookupError:  # a thread that just ended
            pass
    return sorted(os.sched_getaffinity(0))


def pin_before_exec(cpus: CPUs) -> None:
    """In a child between fork and exec (``preexec_fn``): the program and all it forks run on ``cpus``."""
    os.sched_setaffinity(0, STARTED_WITH if cpus is None else cpus)


def observed(pid: int) -> dict[str, str]:
    """The CPUs each process of a tree may run on, as the kernel reports them: ``{pid: "0"}`` (psutil)."""
    return for_each_process(pid, lambda process: format_cpus(frozenset(process.cpu_affinity())))


def batch_scheduling(pids: list[int]) -> None:
    """Every thread of each process in ``pids`` becomes a ``SCHED_BATCH`` task: woken, it never preempts the task
    running on its CPU (``loadtests.bench.CLIENTS_BATCH``); threads started later inherit the policy."""
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.sched_setscheduler(int(tid), os.SCHED_BATCH, os.sched_param(0))


def observed_policies(pid: int) -> dict[str, str]:
    """The scheduling policy of each process of a tree, as the kernel reports it: ``{pid: "SCHED_OTHER"}``."""
    return for_each_process(pid, lambda process: policy_of(process.pid))


def policy_of(pid: int) -> str:
    """``SCHED_OTHER``, ``SCHED_BATCH``…: the scheduling policy of process ``pid`` (its main thread), by name."""
    policy = os.sched_getscheduler(pid)
    return POLICY_NAMES.get(policy, str(policy))


#: Scheduling policy numbers by name (``os.SCHED_*``).
POLICY_NAMES = {getattr(os, name): name for name in ("SCHED_OTHER", "SCHED_BATCH", "SCHED_IDLE", "SCHED_FIFO", "SCHED_RR")}


def for_each_process(pid: int, read: Callable[[Any], str]) -> dict[str, str]:
    """``read(process)`` for each process of the tree under ``pid`` (psutil), by pid; one that ended is left out."""
    import psutil

    root = psutil.Process(pid)
    tree = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            tree[str(process.pid)] = read(process)
        except (OSError, psutil.Error):  # it ended meanwhile
            pass
    return tree
