"""What an idle Eddy costs, and how fast another process's event reaches a socket (issue 19).

Two measurements, each on real ``eddy serve`` processes and a temporary SQLite file:

- **idle**: start ``eddy serve`` (once alone, once with ``--processes 2``), let it settle, then
  count the CPU ticks (``utime + stime`` from ``/proc/<pid>/stat``, 100 per second) each
  process uses in ``--idle-seconds`` with no socket and no traffic. ``memory://`` is shown as
  the reference of a server with no change feed to follow.
- **cross-process**: two ``eddy serve`` processes on one file; a WebSocket on process B and
  one on process A join one channel; events are POSTed to A at ``--rate`` per second and
  each socket records arrival − the publisher's send time carried in the event. B's socket
  measures the cross-process path (A's commit → B's watcher wakes), A's the local one.

    python -m loadtests.idle_wakeup --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jwt
import orjson
import psutil
from tornado.websocket import websocket_connect

from .post_to_frame import ROOT, SECRET, percentile, post_events, wait_ready

TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def start_server(port: int, storage: str, *extra: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDDY_")}
    env |= {"EDDY_JWT_SECRET": SECRET, "PYTHONPATH": str(ROOT), "EDDY_LOG_LEVEL": "warning"}
    return subprocess.Popen([sys.executable, "-m", "service", "serve", "--port", str(port), "--address",
                             "127.0.0.1", "--storage", storage, *extra], env=env)


def stop_server(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    server.wait(15)


def cpu_ticks(pid: int) -> int:
    """utime + stime of one process, in clock ticks (fields 14 and 15 of /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


async def idle_ticks(port: int, storage: str, processes: int, settle: float, seconds: float) -> list[int]:
    """Ticks used in ``seconds`` by each worker of an idle ``eddy serve`` (the parent last when it forks)."""
    server = start_server(port, storage, "--processes", str(processes))
    try:
        await wait_ready(port)
        await asyncio.sleep(settle)
        pids = [server.pid]
        if processes > 1:
            pids = [child.pid for child in psutil.Process(server.pid).children()] + [server.pid]
            assert len(pids) == processes + 1, f"expected {processes} workers, found {pids[:-1]}"
        before = [cpu_ticks(pid) for pid in pids]
        await asyncio.sleep(seconds)
        return [cpu_ticks(pid) - ticks for pid, ticks in zip(pids, before, strict=True)]
    finally:
        stop_server(server)


async def cross_process_latency(ports: tuple[int, int], storage: str, events: int, rate: float) -> dict[str, list[float]]:
    """Milliseconds from POST (to A) to frame, on a socket of A (local) and of B (cross-process)."""
    servers = [start_server(port, storage) for port in ports]
    try:
        for port in ports:
            await wait_ready(port)
        token = jwt.encode({"sub": "bench", "tenant": "bench"}, SECRET, algorithm="HS256")
        sockets = {}
        for name, port in zip(("local", "cross"), ports, strict=True):
            sockets[name] = await websocket_connect(f"ws://127.0.0.1:{port}/ws/bench/stream?access_token={token}")
            await sockets[name].read_message()  # connected
        latencies: dict[str, list[float]] = {name: [] for name in sockets}

        async def read(name: str) -> None:
            while len(latencies[name]) < events:
                message = await sockets[name].read_message()
                if message is None:
                    raise ConnectionError(f"{name} socket closed")
                frame = orjson.loads(message)
                if frame.get("type") == "event":
                    latencies[name].append((time.time() - frame["data"]["sent"]) * 1000)

        readers = [asyncio.ensure_future(read(name)) for name in sockets]
        await post_events(ports[0], token, events, rate)
        await asyncio.wait_for(asyncio.gather(*readers), 30)
        for socket in sockets.values():
            socket.close()
        return latencies
    finally:
        for server in servers:
            stop_server(server)


def summary(values: list[float]) -> str:
    return f"p50 {statistics.median(values):6.2f} ms  p99 {percentile(values, 0.99):6.2f} ms  max {max(values):6.2f} ms"


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_idle:
            for label, storage, processes in (("sqlite", f"sqlite:///{tmp}/idle.db", 1),
                                              ("sqlite --processes 2", f"sqlite:///{tmp}/idle2.db", 2),
                                              ("memory://", "memory://", 1)):
                runs = [await idle_ticks(args.port, storage, processes, args.settle, args.idle_seconds)
                        for _ in range(args.runs)]
                worst = [max(run[:processes]) for run in runs]  # the busiest worker of each run
                print(f"idle {label:<22} ticks in {args.idle_seconds:.0f} s per worker (parent last), runs: "
                      f"{' / '.join(str(run) for run in runs)}  busiest worker median {statistics.median(worst):.0f}"
                      f" = {statistics.median(worst) / TICKS_PER_SECOND / args.idle_seconds:.2%} of a core",
                      flush=True)
        if not args.skip_latency:
            p50s: dict[str, list[float]] = {"local": [], "cross": []}
            p99s: dict[str, list[float]] = {"local": [], "cross": []}
            for run in range(args.runs):
                latencies = await cross_process_latency((args.port, args.port + 1), f"sqlite:///{tmp}/x{run}.db",
                                                        args.events, args.rate)
                for name, values in latencies.items():
                    p50s[name].append(statistics.median(values))
                    p99s[name].append(percentile(values, 0.99))
                    print(f"run {run + 1} {name:<5} ({len(values)} events): {summary(values)}", flush=True)
            for name in ("local", "cross"):
                print(f"{name:<5} median of {args.runs}: p50 {statistics.median(p50s[name]):.2f} ms"
                      f"  p99 {statistics.median(p99s[name]):.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds after /readyz before counting")
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0, help="events per second in the latency run")
    parser.add_argument("--port", type=int, default=8911)
    parser.add_argument("--skip-idle", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
