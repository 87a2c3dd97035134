"""Eddy side by side with peers: fan-out throughput, delivery latency, server CPU and memory.

    python -m loadtests.bench [--sockets 1000,2000,5000,10000] [--rate R] [--burst M] [--duration S]
                              [--servers eddy,eddy-socketio,seed003,socketio,websockets] [--repeats K] [--smoke]
                              [--charts] [--versus SERVER]

For each socket count, repeat and server (the order of servers rotates between
repeats), the harness:

1. starts the server as a subprocess: Eddy (``python -m service serve`` on a
   temporary SQLite file, per-address and REST limits raised, one user per
   socket; ``eddy-socketio``: the same Eddy with its Socket.IO dialect, every socket in one
   room), or a peer from ``loadtests/peers/`` (seed 003 on Starlette/uvicorn,
   python-socketio on uvicorn, plain ``websockets``), or **the floor**
   (``loadtests/peers/floor.py``: one prepared frame, one bare ``os.write()`` per
   socket, nothing else), against which every server is reported as a ratio
   measured in the same repeat (``× the floor``: > 1 is slower or heavier);
2. connects N WebSocket subscribers to one channel/room from ``--clients``
   load-generator processes (default 2, multiprocessing, each a uvloop event loop
   with a minimal RFC 6455 client: a raw ``asyncio.Protocol`` that parses server
   frames and answers pings; for Socket.IO it speaks the Engine.IO v4 WebSocket
   transport itself — ``0{…}`` open, ``40`` connect, ``2``→``3`` pings,
   ``42["event",…]`` events — so every server is measured by the same client
   code at the same cost. python-socketio's ``AsyncClient`` needs aiohttp, which
   is not installed, and runs its own tasks per connection: it is not used);
3. publishes, in three phases (Eddy and the uvicorn peers by HTTP POST from a pool
   of keep-alive connections, ``websockets`` by its publisher socket):
   **solo** — ``--solo`` events one at a time, each once the previous one reached
   every socket (one event's fan-out with nothing queued: the "one event to 10,000
   sockets within 100 ms" figure); **steady** — ``rate × duration`` events at
   ``--rate`` per second; **burst** — ``--burst`` events sent at once;
4. has every subscriber record, per event, receive time − server ``timestamp``
   (delivery latency; the server's clock at millisecond resolution, truncated, so
   up to 1 ms high) and receive time − the publisher's send time carried in
   ``data.sent`` (end to end, including queueing ahead of the server's timestamp);
   lost = expected − received, counted per socket and event (duplicates apart);
5. samples the server's CPU (psutil ``cpu_times``, user + system, the process and
   its children) around each phase and its RSS every 0.2 s, and the load
   generators' CPU, so a saturated client side is visible.

Deliveries/s is the burst's deliveries over the time from its first publish to
its last arrival. Raw results go to ``loadtests/results/bench-<timestamp>.json``
(or ``--out``); ``--charts`` writes PNG charts to ``docs/benchmarks/``.
``--smoke`` is 50 sockets for a few seconds on every server (or those of ``--servers``), no charts.
``--profile DIR`` records each server with py-spy during the phases (set
``BENCH_PY_SPY_FLAGS=--native`` for C frames), or with ``perf`` when ``BENCH_PERF`` holds its subcommand and
flags (``"stat -e task-clock,context-switches"``, ``"record -g"``; ``-a`` for the whole machine), into
``DIR/<server>-<sockets>-<phases>-r<repeat>.perf``. ``--servers`` also accepts the
experiments ``eddy-uvloop``, ``eddy-nogc``, ``eddy-nosched`` and ``eddy-mem``: Eddy's code unchanged, run on
uvloop, with the cyclic GC disabled, with the scheduled-event check hourly, or on the in-memory store; and
``eddy-normal``: Eddy with SQLite ``synchronous=normal`` (no fsync per commit); and ``eddy-base``: Eddy from the
source tree in ``$BENCH_BASE_TREE`` (before/after a change in one run); and ``eddy-p2``: Eddy with
``--processes 2``; and ``floor-ack``: the floor answering its publisher before each loop, as Eddy's ``201``
does. ``--profile-phases solo`` profiles only the solo phase (where a lone event's time goes).
The client side (the harness and the load generators) runs as ``SCHED_BATCH`` tasks, so that a woken client never
preempts the server it measures, as clients on other machines cannot (see :data:`CLIENTS_BATCH`);
``BENCH_CLIENTS_BATCH=0`` runs it as ordinary tasks, as the runs before this default did (the server always is one).

Any server name may carry a CPU placement (``loadtests/placement.py``): ``eddy@0/1`` runs the server and every
process it forks on CPU 0, and the load generators and the harness on CPU 1; without ``@`` nothing is pinned.
Each run records the placement, the affinity the kernel reports for every server process and load generator,
the number of server processes and how many sockets each holds. ``--versus eddy@0/1`` adds every server × that
one, per repeat (as the floor table does against the floor).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import json
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from loadtests.placement import (
    STARTED_WITH,
    Placement,
    batch_scheduling,
    format_cpus,
    observed,
    observed_policies,
    pin_before_exec,
    pin_this_process,
    policy_of,
    split_label,
)
from service.cli import raise_open_file_limit

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "loadtests" / "results"
CHARTS = ROOT / "docs" / "benchmarks"
SECRET = "bench-secret-bench-secret-bench-secret-0"
CHANNEL = "bench"
EVENT = "pedido_criado"
ALL_SERVERS = ("eddy", "eddy-socketio", "seed003", "socketio", "websockets", "floor")
#: The server every other one is measured against: one bare ``os.write()`` per socket per event.
FLOOR = "floor"
#: The floor answering its publisher before each event's loop, as an HTTP server's 201 does (an experiment).
FLOOR_ACK = "floor-ack"
#: Eddy's Socket.IO dialect for the benchmark: every socket in the room "bench"; each emit carries the peer's
#: {event, timestamp, data} envelope (the namespace's event_data template), so both are measured alike.
SOCKETIO_CONFIG = """
[[socketio.namespaces]]
name = "/"
rooms = ["bench"]
event_data = { event = "{event}", timestamp = "{timestamp}", data = "{data}" }
"""
#: The rest of each event's data (seed 003's order fields); ``seq`` and ``sent`` are added per event.
PAYLOAD = {"status_atual": "pendente", "cliente": "Nome do Cliente", "valor_total": "1000.00"}
QUANTILES = 1001  # points of each run's latency quantile function kept in the JSON (for CDF charts)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# A minimal WebSocket client (both the load-generator processes and the websockets publisher use it)
# ---------------------------------------------------------------------------------------------------------------

def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame. The mask key is zero (XOR leaves the payload as is): valid, and costs nothing."""
    length = len(payload)
    if length < 126:
        header = bytes((0x80 | opcode, 0x80 | length))
    elif length <= 0xFFFF:
        header = bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + length.to_bytes(8, "big")
    return header + b"\0\0\0\0" + payload


def upgrade_request(host: str, port: int, path: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()


PHASES = ("solo", "steady", "burst")


class Recorder:
    """Per load-generator process: what arrived, when, for which event.

    Events are numbered 1..total; ``bounds[i]`` is the last seq of phase ``i``
    (solo, steady, burst).
    """

    def __init__(self, bounds: list[int]) -> None:
        self.total = total = bounds[-1]
        self.phase_of = bytearray(total + 1)
        first = 1
        for phase, last in enumerate(bounds):
            for seq in range(first, last + 1):
                self.phase_of[seq] = phase
            first = last + 1
        phases = len(bounds)
        self.latency = [array.array("d") for _ in range(phases)]  # ms vs server timestamp
        self.e2e = [array.array("d") for _ in range(phases)]      # ms vs publisher send time
        self.count = [0] * phases
        self.duplicates = 0
        self.unexpected = 0
        self.last = [0.0] * phases
        self.per_seq = [0] * (total + 1)        # per seq: deliveries
        self.max_arrival = [0.0] * (total + 1)  # per seq: the last socket's arrival
        self.min_arrival = [0.0] * (total + 1)  # per seq: the first socket's arrival
        self.server_ts = [0.0] * (total + 1)    # per seq: the server timestamp
        self.sent = [0.0] * (total + 1)         # per seq: the publisher's send time
        self._ts_cache: dict[str, float] = {}

    def record(self, sub: Subscriber, message: dict[str, Any], data: dict[str, Any]) -> None:
        now = time.time()
        seq = data["seq"]
        if not 0 < seq <= self.total:
            self.unexpected += 1
            return
        seen = sub.seen
        if seen[seq]:
            self.duplicates += 1
            return
        seen[seq] = 1
        stamp = message["timestamp"]
        ts = self._ts_cache.get(stamp)
        if ts is None:
            ts = self._ts_cache[stamp] = datetime.fromisoformat(stamp).timestamp()
        phase = self.phase_of[seq]
        self.latency[phase].append((now - ts) * 1000.0)
        self.e2e[phase].append((now - data["sent"]) * 1000.0)
        self.count[phase] += 1
        self.last[phase] = now
        self.per_seq[seq] += 1
        if not self.min_arrival[seq]:
            self.min_arrival[seq] = now
        if now > self.max_arrival[seq]:
            self.max_arrival[seq] = now
            self.server_ts[seq] = ts
            self.sent[seq] = data["sent"]


class Subscriber(asyncio.Protocol):
    """One WebSocket subscriber: handshake, frame parsing, pings; events go to the recorder.

    ``mode`` is ``json`` (a JSON object per text frame: Eddy, seed 003, websockets),
    ``engineio`` (Socket.IO over the Engine.IO v4 WebSocket transport) or
    ``publisher`` (answers pings, ignores text).
    """

    def __init__(self, request: bytes, mode: str, recorder: Recorder | None, total: int) -> None:
        self.request = request
        self.mode = mode
        self.recorder = recorder
        self.seen = bytearray(total + 1)
        self.transport: asyncio.Transport | None = None
        self.handshaking = True
        self.buffer = b""
        self.fragments: list[bytes] | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed before ready: {exc}"))

    def send_text(self, payload: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(client_frame(0x1, payload))

    def _fail(self, why: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(why))
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.handshaking:
            self.buffer += data
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.buffer[:end], self.buffer[end + 4:]
            self.buffer = b""
            if not head.startswith(b"HTTP/1.1 101"):
                return self._fail(head.split(b"\r\n", 1)[0].decode(errors="replace"))
            self.handshaking = False
            if self.mode == "publisher":
                self.ready.set_result(None)
            if not data:
                return
        buffer = self.buffer + data if self.buffer else data
        size = len(buffer)
        i = 0
        while size - i >= 2:
            first = buffer[i]
            length = buffer[i + 1] & 0x7F
            start = i + 2
            if length == 126:
                if size - i < 4:
                    break
                length = int.from_bytes(buffer[i + 2:i + 4], "big")
                start = i + 4
            elif length == 127:
                if size - i < 10:
                    break
                length = int.from_bytes(buffer[i + 2:i + 10], "big")
                start = i + 10
            end = start + length
            if end > size:
                break
            payload = buffer[start:end]
            i = end
            opcode = first & 0x0F
            if opcode == 0x1 or opcode == 0x2:
                if first & 0x80:
                    self.on_text(payload)
                else:
                    self.fragments = [payload]
            elif opcode == 0x0 and self.fragments is not None:
                self.fragments.append(payload)
                if first & 0x80:
                    whole, self.fragments = b"".join(self.fragments), None
                    self.on_text(whole)
            elif opcode == 0x9:  # ping
                self.transport.write(client_frame(0xA, payload))
            elif opcode == 0x8:  # close: echo it and let the server close the TCP connection
                if not self.closed:
                    self.transport.write(client_frame(0x8, payload[:2]))
                self._fail("closed by the server")
        self.buffer = buffer[i:] if i < size else b""

    def on_text(self, payload: bytes) -> None:
        mode = self.mode
        if mode == "json":
            if payload[:1] != b"{":
                return
            message = orjson.loads(payload)
            data = message.get("data")
            if type(data) is dict and "seq" in data:
                self.recorder.record(self, message, data)
            elif not self.ready.done() and message.get("type") == "connected":
                self.ready.set_result(None)
        elif mode == "engineio":
            kind = payload[:2]
            if kind == b"42":
                message = orjson.loads(payload[2:])[1]
                self.recorder.record(self, message, message["data"])
            elif payload == b"2":
                self.send_text(b"3")
            elif kind == b"40":
                if not self.ready.done():
                    self.ready.set_result(None)
            elif payload[:1] == b"0":
                self.send_text(b"40")
        elif mode == "publisher" and payload == b"2":
            self.send_text(b"3")


async def open_subscriber(host: str, port: int, path: str, mode: str, recorder: Recorder | None, total: int,
                          timeout: float = 30.0) -> Subscriber:
    loop = asyncio.get_running_loop()
    request = upgrade_request(host, port, path)
    _, sub = await asyncio.wait_for(
        loop.create_connection(lambda: Subscriber(request, mode, recorder, total), host, port), timeout)
    try:
        await asyncio.wait_for(sub.ready, timeout)
    except BaseException:
        if sub.transport is not None:
            sub.transport.abort()
        raise
    return sub


# ---------------------------------------------------------------------------------------------------------------
# Load-generator processes
# ---------------------------------------------------------------------------------------------------------------

class LoadGenerator:
    """The state of one load-generator process, driven by commands from the harness over a pipe."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.subs: list[Subscriber] = []
        self.recorder: Recorder | None = None
        self.done = asyncio.get_running_loop().create_future()

    async def connect(self, host: str, port: int, paths: list[str], mode: str, bounds: list[int],
                      concurrency: int) -> dict[str, Any]:
        self.recorder = Recorder(bounds)
        total = bounds[-1]
        self.subs = []
        errors: list[str] = []
        gate = asyncio.Semaphore(concurrency)
        started = time.monotonic()

        async def one(path: str) -> None:
            async with gate:
                for attempt in range(4):
                    try:
                        self.subs.append(await open_subscriber(host, port, path, mode, self.recorder, total))
                        return
                    except (TimeoutError, OSError, ConnectionError) as exc:
                        if attempt == 3:
                            errors.append(f"{type(exc).__name__}: {exc}")
                        await asyncio.sleep(0.2 * (attempt + 1))

        await asyncio.gather(*(one(path) for path in paths))
        return {"connected": len(self.subs), "errors": errors[:5], "error_count": len(errors),
                "seconds": time.monotonic() - started}

    def status(self) -> dict[str, Any]:
        r = self.recorder
        alive = sum(1 for sub in self.subs if not sub.closed)
        return {"count": list(r.count) if r else [0] * len(PHASES), "alive": alive,
                "per_seq": r.per_seq if r else []}

    def report(self) -> dict[str, Any]:
        r = self.recorder
        assert r is not None
        return {
            "count": list(r.count), "duplicates": r.duplicates, "unexpected": r.unexpected,
            "last": list(r.last),
            "latency": [a.tobytes() for a in r.latency], "e2e": [a.tobytes() for a in r.e2e],
            "max_arrival": r.max_arrival, "min_arrival": r.min_arrival, "server_ts": r.server_ts, "sent": r.sent,
            "alive": sum(1 for sub in self.subs if not sub.closed),
            "cpu": sum(os.times()[:2]),
        }

    def close(self) -> dict[str, Any]:
        for sub in self.subs:
            if sub.transport is not None:
                sub.transport.abort()  # RST: no TIME_WAIT left behind for the next run's ports
        self.subs = []
        self.recorder = None
        return {"ok": True}

    async def handle(self, message: dict[str, Any]) -> None:
        command = message.pop("cmd")
        ident = message.pop("id", None)
        try:
            if command == "connect":
                reply = await self.connect(**message)
            elif command == "status":
                reply = self.status()
            elif command == "report":
                reply = self.report()
            elif command == "close":
                reply = self.close()
            elif command == "cpu":
                reply = {"cpu": sum(os.times()[:2])}
            elif command == "pin":
                reply = {"cpus": format_cpus(frozenset(pin_this_process(message["cpus"])))}
            elif command == "exit":
                self.close()
                reply = {"ok": True}
                if not self.done.done():
                    self.done.set_result(None)
            else:
                reply = {"error": f"unknown command {command}"}
        except Exception as exc:  # report, do not die: the harness decides
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        reply["id"] = ident
        try:
            self.conn.send(reply)
        except (OSError, ValueError) as exc:
            print(f"load generator: cannot answer {command}: {exc}", file=sys.stderr, flush=True)


def load_generator_main(conn) -> None:
    raise_open_file_limit()
    import threading

    import uvloop

    async def main() -> None:
        generator = LoadGenerator(conn)
        loop = asyncio.get_running_loop()

        def read_commands() -> None:  # a thread: the pipe stays blocking, the loop never waits on it
            while True:
                try:
                    message = conn.recv()
                except (EOFError, OSError):  # the harness is gone
                    message = {"cmd": "exit"}
                loop.call_soon_threadsafe(lambda m=message: loop.create_task(generator.handle(m)))
                if message.get("cmd") == "exit":
                    return

        threading.Thread(target=read_commands, daemon=True).start()
        await generator.done

    uvloop.run(main())


class GeneratorHandle:
    """The harness's end of one load-generator process."""

    def __init__(self, context) -> None:
        import threading
        self.lock = threading.Lock()
        self.sent = 0
        self.conn, child = context.Pipe()
        self.process = context.Process(target=load_generator_main, args=(child,), daemon=True)
        self.process.start()
        child.close()

    def _roundtrip(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        with self.lock:  # one command at a time per process
            self.sent += 1
            message["id"] = self.sent
            self.conn.send(message)
            deadline = time.monotonic() + timeout
            while True:
                if not self.conn.poll(max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"load generator did not answer {message['cmd']} within {timeout:g} s")
                reply = self.conn.recv()
                if reply.get("id") == message["id"]:  # skip a late answer to a command that timed out
                    return reply

    async def call(self, cmd: str, timeout: float = 120.0, **kwargs: Any) -> dict[str, Any]:
        reply = await asyncio.get_running_loop().run_in_executor(None, self._roundtrip, {"cmd": cmd, **kwargs},
                                                                 timeout)
        if "error" in reply:
            raise RuntimeError(f"load generator: {reply['error']}")
        return reply

    def stop(self) -> None:
        try:
            self.conn.send({"cmd": "exit"})
            self.conn.recv()
        except (OSError, EOFError):
            pass
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()


# ---------------------------------------------------------------------------------------------------------------
# Servers and publishers
# ---------------------------------------------------------------------------------------------------------------

def code_fingerprint() -> str:
    """A hash of Eddy's server code as this run starts it (the tree may change under a long benchmark)."""
    import hashlib
    digest = hashlib.sha256()
    for folder in ("service", "handlers", "storage"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            digest.update(str(path.relative_to(ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def git_head() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def make_token(sub: str) -> str:
    import jwt
    return jwt.encode({"sub": sub, "tenant": "bench"}, SECRET, algorithm="HS256")


#: Experiments with a documented setting changed, not in the default list: Eddy on another storage URL.
STORAGE_VARIANTS = {
    "eddy-normal": "?synchronous=normal",  # survives a crash of the process, not a power loss
}
#: Experiments, not in the default list: Eddy's code unchanged, one line run before ``eddy serve``.
EXPERIMENTS = {
    "eddy-uvloop": "import asyncio, uvloop; asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())",
    "eddy-nogc": "import gc; gc.disable()",
    "eddy-nosched": "import os; os.environ['EDDY_SCHEDULE_INTERVAL'] = '3600'",  # the scheduled-event check hourly
    "eddy-mem": "i = sys.argv.index('--storage'); sys.argv[i + 1] = 'memory://'",  # no store threads, no fsync
}
#: Eddy with ``--processes N``: N workers forked after binding, sharing one listening socket (the kernel hands each
#: new connection to whichever worker accepts it first); each worker fans out to its own sockets.
PROCESS_VARIANTS = {"eddy-p2": 2}
#: ``eddy-base``: Eddy from another source tree (``BENCH_BASE_TREE``, e.g. ``git archive main`` unpacked in a
#: temporary directory), so a change and the code before it are measured side by side in the same run.
BASE_TREE_VARIABLE = "BENCH_BASE_TREE"


def base_tree() -> Path:
    tree = os.environ.get(BASE_TREE_VARIABLE)
    if not tree or not (Path(tree) / "service").is_dir():
        raise SystemExit(f"eddy-base needs {BASE_TREE_VARIABLE}=<a directory holding another Eddy's source tree>")
    return Path(tree)


@dataclass
class ServerSpec:
    name: str
    module: str
    mode: str                  # subscriber mode
    publish: str               # "http" or "ws"
    publish_path: str
    label: str
    #: Variables the server's environment gets beside the harness's own (an experiment's switch).
    environment: dict[str, str] = field(default_factory=dict)

    @property
    def processes(self) -> int:
        """Server processes that accept sockets (Eddy's ``--processes``; 1 for everything else)."""
        return PROCESS_VARIANTS.get(self.name, 1)

    def command(self, port: int, tmp: str) -> list[str]:
        storage = f"sqlite:///{tmp}/eddy.db{STORAGE_VARIANTS.get(self.name, '')}"
        serve = ["serve", "--port", str(port), "--address", "127.0.0.1", "--storage", storage]
        if self.name in PROCESS_VARIANTS:
            return [sys.executable, "-m", "service", *serve, "--processes", str(self.processes)]
        if self.name in ("eddy", "eddy-base") or self.name in STORAGE_VARIANTS:
            return [sys.executable, "-m", "service", *serve]
        if self.name == "eddy-socketio":
            config = Path(tmp) / "socketio.toml"
            config.write_text(SOCKETIO_CONFIG)
            return [sys.executable, "-m", "service", *serve, "--config", str(config)]
        if self.name in EXPERIMENTS:  # the same Eddy, unchanged, with one line run before it
            return [sys.executable, "-c", f"import sys; {EXPERIMENTS[self.name]}; sys.argv[0] = 'eddy'; "
                    "from service.cli import main; main()", *serve]
        return [sys.executable, "-m", self.module, "--port", str(port)]

    @property
    def tree(self) -> Path:
        """The source tree the server runs from (its working directory and ``PYTHONPATH``)."""
        return base_tree() if self.name == "eddy-base" else ROOT

    def env(self) -> dict[str, str]:
        env = dict(os.environ, PYTHONPATH=str(self.tree), PYTHONUNBUFFERED="1", **self.environment)
        if self.name.startswith("eddy"):
            env.update(EDDY_JWT_SECRET=SECRET, EDDY_LOG_LEVEL="warning",
                       # thousands of sockets from one address (the load generator), and publish bursts
                       EDDY_MAX_CONNECTIONS_PER_IP="1000000", EDDY_REST_RATE="100000", EDDY_REST_BURST="100000")
        return env

    def paths(self, start: int, stop: int) -> list[str]:
        if self.name == "eddy-socketio":  # the token on the handshake; CONNECT ("40") carries none
            return [f"/socket.io/?EIO=4&transport=websocket&access_token={make_token(f'u{i}')}"
                    for i in range(start, stop)]
        if self.name.startswith("eddy"):  # one user per socket, each with its own token, as real clients
            return [f"/ws/{CHANNEL}/stream?access_token={make_token(f'u{i}')}" for i in range(start, stop)]
        if self.name == "seed003":
            return [f"/ws/pedidos?token=t{i}" for i in range(start, stop)]
        if self.name == "socketio":
            return ["/socket.io/?EIO=4&transport=websocket"] * (stop - start)
        return ["/"] * (stop - start)

    def publish_body(self, seq: int) -> bytes:
        data = {"seq": seq, "sent": time.time(), "pedido_id": seq, **PAYLOAD}
        if self.name.startswith("eddy"):
            return orjson.dumps({"channel": CHANNEL, "event": EVENT, "data": data})
        return orjson.dumps({"event": EVENT, "data": data})


SPECS = {
    "eddy": ServerSpec("eddy", "service", "json", "http", "/api/events", "Eddy (Tornado, SQLite)"),
    "eddy-socketio": ServerSpec("eddy-socketio", "service", "engineio", "http", "/api/events",
                                "Eddy's Socket.IO dialect (the same hub, WebSocket transport)"),
    **{name: ServerSpec(name, "service", "json", "http", "/api/events", f"experiment: {line}")
       for name, line in EXPERIMENTS.items()},
    **{name: ServerSpec(name, "service", "json", "http", "/api/events", f"experiment: storage URL …{query}")
       for name, query in STORAGE_VARIANTS.items()},
    **{name: ServerSpec(name, "service", "json", "http", "/api/events", f"Eddy with --processes {count}")
       for name, count in PROCESS_VARIANTS.items()},
    "eddy-base": ServerSpec("eddy-base", "service", "json", "http", "/api/events",
                            f"Eddy from ${BASE_TREE_VARIABLE} (the code before a change)"),
    "seed003": ServerSpec("seed003", "loadtests.peers.seed003", "json", "http", "/pedidos",
                          "seed 003 (Starlette/uvicorn, await per socket)"),
    "socketio": ServerSpec("socketio", "loadtests.peers.socketio_peer", "engineio", "http", "/emit",
                           "python-socketio (ASGI/uvicorn)"),
    "websockets": ServerSpec("websockets", "loadtests.peers.websockets_peer", "json", "ws", "/publish",
                             "websockets.broadcast (uvloop)"),
    FLOOR: ServerSpec(FLOOR, "loadtests.peers.floor", "json", "ws", "/publish",
                      "the floor: one prepared frame, one bare os.write() per socket"),
    FLOOR_ACK: ServerSpec(FLOOR_ACK, "loadtests.peers.floor", "json", "ws", "/publish",
                          "experiment: the floor answering its publisher before each loop (as a 201)",
                          environment={"FLOOR_ACK": "1"}),
}


class HttpConnection:
    """A keep-alive HTTP/1.1 connection for POSTs (Content-Length bodies only)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, host: str, port: int) -> HttpConnection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, f"{host}:{port}")

    async def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
                      ) -> tuple[int, bytes]:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}", f"Content-Length: {len(body)}",
                 "Content-Type: application/json"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        answer = await self.reader.readexactly(length) if length else b""
        return status, answer

    def close(self) -> None:
        self.writer.close()


class Publisher:
    """Publishes events to one server: HTTP POSTs from a pool of keep-alive connections, or a publisher socket."""

    def __init__(self, spec: ServerSpec, port: int, pool_size: int = 64) -> None:
        self.spec = spec
        self.port = port
        self.pool_size = pool_size
        self.idle: list[tuple[HttpConnection, float]] = []  # (connection, when it was last used)
        self.opened = 0
        self.available = asyncio.Condition()
        self.socket: Subscriber | None = None
        self.headers = ({"Authorization": f"Bearer {make_token('publisher')}"} if spec.name.startswith("eddy")
                        else {})
        self.pending: set[asyncio.Task[None]] = set()
        self.failures: list[str] = []
        self.statuses: dict[int, int] = {}

    async def start(self) -> None:
        if self.spec.publish == "ws":
            self.socket = await open_subscriber("127.0.0.1", self.port, self.spec.publish_path, "publisher", None, 0)

    async def _connection(self, fresh: bool) -> HttpConnection:
        async with self.available:
            while not self.idle and self.opened >= self.pool_size:
                await self.available.wait()
            if self.idle:
                connection, since = self.idle.pop()
                # Servers close idle keep-alive connections (uvicorn after 5 s, Tornado after 10 s), and a busy
                # server may do it with our request already in its buffer: reuse only recently used ones.
                if not fresh and time.monotonic() - since < 1.0:
                    return connection
                connection.close()
                self.opened -= 1
            self.opened += 1
        try:
            return await HttpConnection.open("127.0.0.1", self.port)
        except OSError:
            async with self.available:
                self.opened -= 1
                self.available.notify()
            raise

    async def _post(self, seq: int) -> None:
        body = self.spec.publish_body(seq)
        for attempt in range(2):
            connection = await self._connection(fresh=attempt > 0)
            try:
                status, answer = await connection.request("POST", self.spec.publish_path, body, self.headers)
                break
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                # Closed by the server before it read the request: retry once on a new connection.
                connection.close()
                async with self.available:
                    self.opened -= 1
                    self.available.notify()
                if attempt == 1:
                    self.failures.append(f"seq {seq}: {type(exc).__name__}: {exc}")
                    return
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status >= 300 and len(self.failures) < 20:
            self.failures.append(f"seq {seq}: HTTP {status} {answer[:200]!r}")
        async with self.available:
            self.idle.append((connection, time.monotonic()))
            self.available.notify()

    async def publish(self, seq: int) -> None:
        """Send one event without waiting for its answer (a slow server must not slow the offered rate)."""
        if self.socket is not None:
            self.socket.send_text(self.spec.publish_body(seq))
            return
        # Take a connection now, so publishing order is the order of seqs at the server's door.
        task = asyncio.get_running_loop().create_task(self._post(seq))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)
        await asyncio.sleep(0)

    async def drain(self, timeout: float) -> None:
        if self.pending:
            await asyncio.wait(set(self.pending), timeout=timeout)

    def close(self) -> None:
        for task in self.pending:
            task.cancel()
        for connection, _ in self.idle:
            connection.close()
        if self.socket is not None and self.socket.transport is not None:
            self.socket.transport.abort()


def die_with_parent() -> None:
    """In a server child, before exec: SIGTERM when the harness dies (even by SIGKILL). Linux only."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class ServerProcess:
    def __init__(self, spec: ServerSpec, port: int, tmp: str, placement: Placement) -> None:
        self.spec, self.port, self.tmp, self.placement = spec, port, tmp, placement
        self.log_path = Path(tmp) / f"{spec.name}.log"
        self.popen: subprocess.Popen | None = None
        self.ps = None
        self.rss_peak = 0
        self.rss_samples: list[tuple[float, int]] = []

    async def start(self, timeout: float = 30.0) -> None:
        import psutil
        log_file = open(self.log_path, "wb")
        self.popen = subprocess.Popen(self.spec.command(self.port, self.tmp), env=self.spec.env(), cwd=self.spec.tree,
                                      stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                      preexec_fn=self._before_exec)
        log_file.close()
        self.ps = psutil.Process(self.popen.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited with {self.popen.returncode}: {self.log_tail()}")
            try:
                if self.spec.name.startswith("eddy"):
                    connection = await HttpConnection.open("127.0.0.1", self.port)
                    status, _ = await asyncio.wait_for(connection.request("GET", "/readyz"), 2)
                    connection.close()
                    if status == 200:
                        return await self._wait_for_workers(deadline)
                else:
                    _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                    writer.close()
                    return
            except (TimeoutError, OSError, asyncio.IncompleteReadError):
                pass
            await asyncio.sleep(0.1)
        raise TimeoutError(f"{self.spec.name} did not start: {self.log_tail()}")

    def _before_exec(self) -> None:
        """In the server's child, before exec: die with the harness; run (and fork) on the placement's CPUs, as an
        ordinary task (not the harness's ``SCHED_BATCH``, which a child inherits)."""
        die_with_parent()
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        pin_before_exec(self.placement.server)

    async def _wait_for_workers(self, deadline: float) -> None:
        """With ``--processes N``, until every worker answers (the first one's /readyz says nothing of the rest)."""
        if self.spec.processes == 1:
            return
        headers = {"Authorization": f"Bearer {make_token('publisher')}"}
        answered: set[int] = set()
        while len(answered) < self.spec.processes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(answered)} of {self.spec.processes} workers answered: {self.log_tail()}")
            connection = await HttpConnection.open("127.0.0.1", self.port)  # a new connection: any worker's
            status, body = await asyncio.wait_for(connection.request("GET", "/api/stats", headers=headers), 2)
            connection.close()
            if status == 200:
                answered.add(orjson.loads(body)["process"]["pid"])
            await asyncio.sleep(0.02)

    def sockets_per_process(self) -> dict[str, int]:
        """Established connections on the server's port held by each server process (who accepted them)."""
        import psutil
        counts = {}
        for process in self._processes():
            try:
                connections = process.net_connections(kind="tcp")
            except psutil.Error:
                continue
            counts[str(process.pid)] = sum(1 for c in connections
                                           if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == self.port)
        return counts

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def _processes(self):
        try:
            return [self.ps, *self.ps.children(recursive=True)]
        except Exception:
            return [self.ps]

    def cpu_split(self) -> tuple[float, float]:
        """(user, system) CPU seconds of the server and its children."""
        user = system = 0.0
        for process in self._processes():
            try:
                times = process.cpu_times()
                user += times.user
                system += times.system
            except Exception:
                pass
        return user, system

    def cpu(self) -> float:
        return sum(self.cpu_split())

    def rss(self) -> int:
        total = 0
        for process in self._processes():
            try:
                total += process.memory_info().rss
            except Exception:
                pass
        return total

    def memory_by_process(self) -> dict[str, dict[str, float]]:
        """RSS, PSS and USS of each server process, MiB. Forked workers share the parent's pages: RSS counts them
        in every process, PSS splits them between the sharers (so PSS adds up to the tree's real footprint)."""
        memory = {}
        for process in self._processes():
            try:
                full = process.memory_full_info()
            except Exception:
                continue
            memory[str(process.pid)] = {key: round(getattr(full, key) / 2**20, 1) for key in ("rss", "pss", "uss")}
        return memory

    async def sample_rss(self, interval: float = 0.2) -> None:
        while True:
            value = self.rss()
            self.rss_peak = max(self.rss_peak, value)
            await asyncio.sleep(interval)

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(15)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)


# ---------------------------------------------------------------------------------------------------------------
# One run: one server, one socket count
# ---------------------------------------------------------------------------------------------------------------

def percentile(values, q: float) -> float | None:
    import numpy as np
    if len(values) == 0:
        return None
    return float(np.percentile(values, q))


@dataclass
class RunConfig:
    sockets: int
    rate: float
    duration: float
    burst: int
    solo: int
    stall: float
    connect_concurrency: int
    profile_dir: str | None = None
    profile_phases: tuple[str, ...] = PHASES
    settle: float = 1.0  # seconds of quiet after starting the server and after connecting

    def counts(self) -> tuple[int, int, int]:
        """Events of the solo, steady and burst phases."""
        return self.solo, max(1, round(self.rate * self.duration)), self.burst


@dataclass
class Context:
    generators: list[GeneratorHandle]
    next_port: int
    tmp: str
    runs: list[dict[str, Any]] = field(default_factory=list)


async def wait_for(generators: list[GeneratorHandle], phase: int, expected: int, stall: float, cap: float,
                   seq: int | None = None) -> bool:
    """Poll the load generators until ``expected`` deliveries of ``phase`` (or of event ``seq``) arrived.

    Gives up (False) when nothing moved for ``stall`` seconds or after ``cap`` seconds.
    """
    started = last_progress = time.monotonic()
    last_count = -1
    while True:
        statuses = await asyncio.gather(*(g.call("status") for g in generators))
        count = sum(s["per_seq"][seq] if seq is not None else s["count"][phase] for s in statuses)
        now = time.monotonic()
        if count >= expected:
            return True
        if count != last_count:
            last_count, last_progress = count, now
        if now - last_progress > stall or now - started > cap:
            return False
        await asyncio.sleep(0.02 if seq is not None else 0.05)


async def loadgen_cpu(generators: list[GeneratorHandle]) -> float:
    return sum(r["cpu"] for r in await asyncio.gather(*(g.call("cpu") for g in generators)))


def port_taken(port: int) -> bool:
    """True when another program listens on ``port`` (it would answer in place of the server under test)."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


async def one_run(ctx: Context, label: str, config: RunConfig, repeat: int) -> dict[str, Any]:
    """Measure one server (``label``: a name from SPECS, with its placement after ``@`` if any) at one size."""
    name, placement = split_label(label)
    spec = SPECS[name]
    while port_taken(ctx.next_port):  # another benchmark on this machine, say
        ctx.next_port += 1
    port = ctx.next_port
    ctx.next_port += 1
    n = config.sockets
    solo_events, steady_events, burst_events = config.counts()
    bounds = [solo_events, solo_events + steady_events, solo_events + steady_events + burst_events]
    result: dict[str, Any] = {"server": label, "spec": spec.name, "sockets": n, "repeat": repeat,
                              "rate": config.rate, "duration": config.duration, "solo_events": solo_events,
                              "steady_events": steady_events, "burst_events": burst_events, "port": port,
                              "placement": str(placement), "server_processes": spec.processes,
                              "load_average": os.getloadavg()[0]}
    if spec.name.startswith("eddy"):
        result["eddy_code"] = code_fingerprint()
    tmp = tempfile.mkdtemp(prefix=f"{spec.name}-", dir=ctx.tmp)
    server = ServerProcess(spec, port, tmp, placement)
    publisher: Publisher | None = None
    sampler: asyncio.Task[None] | None = None
    profiler: subprocess.Popen | None = None
    generators = ctx.generators
    try:
        # The client side first (this harness and the load generators; unpinned runs undo an earlier run's pins),
        # then the server, pinned before it starts so that every process it forks inherits its CPUs.
        harness_cpus = format_cpus(frozenset(pin_this_process(placement.clients)))
        if CLIENTS_BATCH:
            batch_scheduling([os.getpid(), *(g.process.pid for g in generators)])
        result["clients_batch"] = CLIENTS_BATCH
        pins = await asyncio.gather(*(g.call("pin", cpus=placement.clients) for g in generators))
        result["affinity"] = {"harness": harness_cpus, "load_generators": [pin["cpus"] for pin in pins]}
        result["policies"] = {"harness": policy_of(os.getpid()),
                              "load_generators": [policy_of(g.process.pid) for g in generators]}
        await server.start()
        await asyncio.sleep(config.settle / 2)
        result["rss_idle"] = server.rss()
        result["memory_idle_mib"] = server.memory_by_process()
        result["pss_idle_mib"] = sum(m["pss"] for m in result["memory_idle_mib"].values())
        server.rss_peak = result["rss_idle"]
        sampler = asyncio.get_running_loop().create_task(server.sample_rss())

        # Connect the subscribers, split over the load generators.
        share = [n // len(generators) + (1 if i < n % len(generators) else 0) for i in range(len(generators))]
        edges = [sum(share[:i]) for i in range(len(generators) + 1)]
        t_connect = time.monotonic()
        replies = await asyncio.gather(*(
            g.call("connect", host="127.0.0.1", port=port, paths=spec.paths(edges[i], edges[i + 1]),
                   mode=spec.mode, bounds=bounds, concurrency=config.connect_concurrency, timeout=900.0)
            for i, g in enumerate(generators)))
        connected = sum(r["connected"] for r in replies)
        result["connected"] = connected
        result["connect_seconds"] = time.monotonic() - t_connect
        result["connect_errors"] = [e for r in replies for e in r["errors"]]
        if connected < n:
            raise RuntimeError(f"only {connected} of {n} sockets connected: {result['connect_errors'][:3]}")
        assert server.popen is not None
        result["affinity"]["server"] = observed(server.popen.pid)  # every process of the tree, now all started
        result["policies"]["server"] = observed_policies(server.popen.pid)
        result["sockets_per_process"] = server.sockets_per_process()  # before the publisher's connections
        publisher = Publisher(spec, port)
        await publisher.start()
        await asyncio.sleep(config.settle)
        result["rss_connected"] = server.rss()
        split0 = server.cpu_split()
        phase_starts: list[float] = []

        async def measure(phase: int, publish) -> None:
            """Run one phase; record its start time and the server's and load generators' CPU seconds."""
            nonlocal profiler
            name = PHASES[phase]
            if config.profile_dir and name in config.profile_phases and profiler is None:
                profiler = start_profiler(server, config, spec, f"{'+'.join(config.profile_phases)}-r{repeat + 1}")
            cpu0, gen0 = server.cpu(), await loadgen_cpu(generators)
            phase_starts.append(time.time())
            mono = time.monotonic()
            complete = await publish()
            result[f"{name}_publish_seconds"] = time.monotonic() - mono
            await publisher.drain(timeout=max(5.0, config.stall))
            result[f"{name}_complete"] = complete
            result[f"{name}_cpu_s"] = server.cpu() - cpu0
            result[f"loadgen_cpu_{name}_s"] = await loadgen_cpu(generators) - gen0
            if profiler is not None and name == config.profile_phases[-1]:
                stop_profiler(profiler)
                profiler = None

        async def solo() -> bool:
            # One event at a time, the next once every socket has the previous one: the time an event takes to
            # reach all N sockets with nothing queued ahead of it.
            complete = True
            for seq in range(1, bounds[0] + 1):
                await publisher.publish(seq)
                complete &= await wait_for(generators, 0, n, config.stall, cap=120, seq=seq)
                await asyncio.sleep(0.2)
            return complete

        async def steady() -> bool:
            mono0 = time.monotonic()
            for i, seq in enumerate(range(bounds[0] + 1, bounds[1] + 1)):
                delay = mono0 + i / config.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await publisher.publish(seq)
            return await wait_for(generators, 1, steady_events * n, config.stall, cap=600)

        async def burst() -> bool:
            for seq in range(bounds[1] + 1, bounds[2] + 1):
                await publisher.publish(seq)
            return await wait_for(generators, 2, burst_events * n, config.stall, cap=600)

        await measure(0, solo)
        await asyncio.sleep(config.settle / 2)
        await measure(1, steady)
        await asyncio.sleep(config.settle / 2)
        await measure(2, burst)
        split1 = server.cpu_split()
        result["cpu_user_s"], result["cpu_system_s"] = split1[0] - split0[0], split1[1] - split0[1]
        result["publish_statuses"] = {str(k): v for k, v in publisher.statuses.items()}
        result["publish_failures"] = publisher.failures[:10]

        reports = await asyncio.gather(*(g.call("report") for g in generators))
        summarize_run(result, reports, phase_starts, bounds, n)
        result["rss_peak"] = max(server.rss_peak, server.rss())
        result["ok"] = True
    except Exception as exc:
        result["ok"] = False
        result["error"] = f"{type(exc).__name__}: {exc}"
        log(f"{spec.name} @ {n}: FAILED {result['error']}")
    finally:
        if profiler is not None:
            stop_profiler(profiler)
        if sampler is not None:
            sampler.cancel()
        if publisher is not None:
            publisher.close()
        for g in generators:
            try:
                await g.call("close")
            except Exception:
                pass
        server.stop()
        result["server_log"] = server.log_tail()
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def summarize_run(result: dict[str, Any], reports: list[dict[str, Any]], starts: list[float], bounds: list[int],
                  n: int) -> None:
    import numpy as np

    first = 1
    for phase, name in enumerate(PHASES):
        start, seqs = starts[phase], range(first, bounds[phase] + 1)
        first = bounds[phase] + 1
        events = len(seqs)
        latency = np.concatenate([np.frombuffer(r["latency"][phase], dtype="d") for r in reports])
        e2e = np.concatenate([np.frombuffer(r["e2e"][phase], dtype="d") for r in reports])
        received = sum(r["count"][phase] for r in reports)
        last = max((r["last"][phase] for r in reports if r["count"][phase]), default=start)
        span = max(last - start, 1e-9)
        result[f"{name}_received"] = int(received)
        result[f"{name}_expected"] = events * n
        result[f"{name}_lost"] = events * n - int(received)
        result[f"{name}_seconds"] = span
        result[f"{name}_deliveries_per_s"] = received / span
        for label, values in (("latency", latency), ("e2e", e2e)):
            for q in (50, 90, 99):
                result[f"{name}_{label}_p{q}_ms"] = percentile(values, q)
            result[f"{name}_{label}_max_ms"] = float(values.max()) if len(values) else None
        if len(latency):
            result[f"{name}_latency_quantiles_ms"] = [round(float(v), 3) for v in
                                                      np.quantile(latency, np.linspace(0, 1, QUANTILES))]
        # Per event: from the server timestamp to its last socket (one event's fan-out to all sockets).
        spans, from_publish = [], []
        for seq in seqs:
            arrival = max(r["max_arrival"][seq] for r in reports)
            stamp = max(r["server_ts"][seq] for r in reports)
            sent = max(r["sent"][seq] for r in reports)
            if arrival and stamp:
                spans.append((arrival - stamp) * 1000.0)
                from_publish.append((arrival - sent) * 1000.0)
        result[f"{name}_event_to_last_socket_ms"] = [round(v, 2) for v in spans]
        result[f"{name}_event_to_last_socket_p50_ms"] = percentile(spans, 50)
        result[f"{name}_event_to_last_socket_max_ms"] = max(spans) if spans else None
        result[f"{name}_publish_to_last_socket_ms"] = [round(v, 2) for v in from_publish]
        result[f"{name}_publish_to_last_socket_p50_ms"] = percentile(from_publish, 50)
    # A lone event's path in three legs (solo phase): the publish until the server stamps it (Eddy: POST and the
    # store's accept), the stamp until the first socket has it (Eddy: the durable commit, the watcher's wake-up,
    # the first send()), and the first socket until the last (the fan-out loop and the readers).
    legs: dict[str, list[float]] = {"publish_to_stamp": [], "stamp_to_first_socket": [], "first_to_last_socket": []}
    for seq in range(1, bounds[0] + 1):
        first_arrival = min((r["min_arrival"][seq] for r in reports if r["min_arrival"][seq]), default=0.0)
        last_arrival = max(r["max_arrival"][seq] for r in reports)
        stamp = max(r["server_ts"][seq] for r in reports)
        sent = max(r["sent"][seq] for r in reports)
        if first_arrival and stamp:
            legs["publish_to_stamp"].append((stamp - sent) * 1000.0)
            legs["stamp_to_first_socket"].append((first_arrival - stamp) * 1000.0)
            legs["first_to_last_socket"].append((last_arrival - first_arrival) * 1000.0)
    for leg, values in legs.items():
        result[f"solo_{leg}_p50_ms"] = percentile(values, 50)
    # One event to all N sockets, nothing queued: N deliveries over the server-timestamp → last-socket time.
    solo_ms = result["solo_event_to_last_socket_p50_ms"]
    result["solo_deliveries_per_s"] = n / (solo_ms / 1000) if solo_ms else None
    result["duplicates"] = sum(r["duplicates"] for r in reports)
    result["unexpected"] = sum(r["unexpected"] for r in reports)
    result["lost"] = sum(result[f"{name}_lost"] for name in PHASES)
    result["alive_at_end"] = sum(r["alive"] for r in reports)
    deliveries = sum(result[f"{name}_received"] for name in PHASES)
    cpu = sum(result[f"{name}_cpu_s"] for name in PHASES)
    result["deliveries"] = deliveries
    result["cpu_s"] = cpu
    result["cpu_s_per_1k_sockets"] = cpu / (n / 1000)
    result["cpu_us_per_delivery"] = cpu / deliveries * 1e6 if deliveries else None
    result["burst_cpu_us_per_delivery"] = (result["burst_cpu_s"] / result["burst_received"] * 1e6
                                           if result["burst_received"] else None)
    # The client side's own cost, beside the server's: a saturated load generator shows here.
    loadgen = sum(result[f"loadgen_cpu_{name}_s"] for name in PHASES)
    result["loadgen_cpu_us_per_delivery"] = loadgen / deliveries * 1e6 if deliveries else None
    result["loadgen_burst_cores"] = result["loadgen_cpu_burst_s"] / result["burst_seconds"]
    result["server_burst_cores"] = result["burst_cpu_s"] / result["burst_seconds"]


#: Extra py-spy flags (``BENCH_PY_SPY_FLAGS="--native"``, say).
PY_SPY_EXTRA = os.environ.get("BENCH_PY_SPY_FLAGS", "").split()
#: The harness and the load generators run as ``SCHED_BATCH`` tasks (``BENCH_CLIENTS_BATCH=0``: as ordinary ones).
#: On loopback a receiver's TCP work runs inside the server's ``send()``, which wakes the receiver; the kernel often
#: places it on the server's own core, and an ordinary task woken there preempts the server, hundreds of times in one
#: event's loop. Clients on other machines cannot. A batch task is never woken into preempting a running task, and
#: still gets its fair share of the CPU, so the clients' work is the same and every server is measured the same way.
CLIENTS_BATCH = os.environ.get("BENCH_CLIENTS_BATCH", "1") != "0"


#: perf instead of py-spy: its subcommand and flags (``BENCH_PERF="stat -e task-clock,context-switches"``,
#: ``BENCH_PERF="record -g -F 2000"``; with ``-a``, the whole machine rather than the server's process).
PERF_ARGS = os.environ.get("BENCH_PERF", "").split()


def start_profiler(server: ServerProcess, config: RunConfig, spec: ServerSpec, label: str) -> subprocess.Popen | None:
    """py-spy (if installed), or ``perf`` with ``BENCH_PERF``'s arguments, records the server during the profiled
    phases; SIGINT makes either write its output."""
    out = Path(config.profile_dir) / f"{spec.name}-{config.sockets}-{label}"
    out.parent.mkdir(parents=True, exist_ok=True)
    if PERF_ARGS:
        target = [] if "-a" in PERF_ARGS else ["-p", str(server.popen.pid)]
        return subprocess.Popen(["perf", *PERF_ARGS, *target, "-o", f"{out}.perf"], stdout=subprocess.DEVNULL,
                                stderr=open(f"{out}.log", "wb"))
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        log("py-spy not found: no profile")
        return None
    return subprocess.Popen([py_spy, "record", "--pid", str(server.popen.pid), "--rate", "250", "--format", "raw", *PY_SPY_EXTRA,
                             "-o", f"{out}.txt"], stdout=subprocess.DEVNULL,
                            stderr=open(f"{out}.log", "wb"))


def stop_profiler(profiler: subprocess.Popen) -> None:
    profiler.send_signal(signal.SIGINT)
    try:
        profiler.wait(30)
    except subprocess.TimeoutExpired:
        profiler.kill()


# ---------------------------------------------------------------------------------------------------------------
# Aggregation, tables and charts
# ---------------------------------------------------------------------------------------------------------------

METRICS = ("solo_event_to_last_socket_p50_ms", "solo_publish_to_last_socket_p50_ms", "solo_deliveries_per_s",
           "steady_e2e_p50_ms", "burst_e2e_p50_ms", "burst_e2e_p99_ms", "burst_deliveries_per_s",
           "steady_deliveries_per_s", "steady_latency_p50_ms", "steady_latency_p99_ms", "burst_latency_p50_ms",
           "burst_latency_p99_ms", "steady_e2e_p99_ms", "steady_event_to_last_socket_p50_ms",
           "burst_event_to_last_socket_max_ms", "lost", "cpu_s_per_1k_sockets", "cpu_us_per_delivery",
           "burst_cpu_us_per_delivery", "rss_peak_mib", "rss_mib_per_1k_sockets", "loadgen_cpu_burst_s",
           "burst_seconds", "solo_publish_to_stamp_p50_ms", "solo_stamp_to_first_socket_p50_ms",
           "solo_first_to_last_socket_p50_ms", "rss_kib_per_socket", "loadgen_cpu_us_per_delivery",
           "loadgen_burst_cores", "server_burst_cores", "pss_idle_mib", "load_average",
           "unbatched_cpu_us_per_delivery")


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for run in runs:
        if run.get("ok"):
            run["rss_peak_mib"] = run["rss_peak"] / 2**20
            run["rss_mib_per_1k_sockets"] = (run["rss_peak"] - run["rss_idle"]) / 2**20 / (run["sockets"] / 1000)
            run["rss_kib_per_socket"] = (run["rss_peak"] - run["rss_idle"]) / 1024 / run["sockets"]
            # Lone and steady events apart from the burst, which costs far less per delivery (one send() per socket).
            unbatched = run["solo_received"] + run["steady_received"]
            run["unbatched_cpu_us_per_delivery"] = ((run["solo_cpu_s"] + run["steady_cpu_s"]) / unbatched * 1e6
                                                    if unbatched else None)
    keys = sorted({(r["sockets"], r["server"]) for r in runs})
    for sockets, server in keys:
        ok = [r for r in runs if r["sockets"] == sockets and r["server"] == server and r.get("ok")]
        failed = [r for r in runs if r["sockets"] == sockets and r["server"] == server and not r.get("ok")]
        entry: dict[str, Any] = {"runs": len(ok), "failed": len(failed)}
        for metric in METRICS:
            values = [r[metric] for r in ok if r.get(metric) is not None]
            if values:
                entry[metric] = statistics.median(values)
                entry[metric + "_all"] = values
        if ok:
            entry["lost_total"] = sum(r["lost"] for r in ok)
        summary.setdefault(str(sockets), {})[server] = entry
    return summary


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, (int,)) or (isinstance(value, float) and abs(value) >= 1000):
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def tables(summary: dict[str, dict[str, dict[str, Any]]], servers: list[str], runs: list[dict[str, Any]],
           versus: str | None = None) -> str:
    out = []
    for sockets in sorted(summary, key=int):
        rows = summary[sockets]
        out.append(f"\n### {int(sockets):,} sockets\n")
        out.append("| server | one event → all sockets ms: server ts / POST (solo p50) | deliveries/s (burst) | "
                   "steady p50 / p99 ms: server ts | steady p50 / p99 ms: publish | burst p50 / p99 ms: server ts | "
                   "burst p50 / p99 ms: publish | lost | server CPU s per 1k sockets | CPU µs / delivery | "
                   "peak RSS MiB | RSS MiB per 1k sockets |")
        out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for server in servers:
            e = rows.get(server)
            if not e or not e.get("runs"):
                out.append(f"| {server} | failed | | | | | | | | | | |")
                continue
            out.append(
                f"| {server} | {fmt(e.get('solo_event_to_last_socket_p50_ms'))} / "
                f"{fmt(e.get('solo_publish_to_last_socket_p50_ms'))} | {fmt(e.get('burst_deliveries_per_s'))} | "
                f"{fmt(e.get('steady_latency_p50_ms'))} / {fmt(e.get('steady_latency_p99_ms'))} | "
                f"{fmt(e.get('steady_e2e_p50_ms'))} / {fmt(e.get('steady_e2e_p99_ms'))} | "
                f"{fmt(e.get('burst_latency_p50_ms'))} / {fmt(e.get('burst_latency_p99_ms'))} | "
                f"{fmt(e.get('burst_e2e_p50_ms'))} / {fmt(e.get('burst_e2e_p99_ms'))} | "
                f"{e.get('lost_total', '–')} | "
                f"{fmt(e.get('cpu_s_per_1k_sockets'), 2)} | {fmt(e.get('cpu_us_per_delivery'))} | "
                f"{fmt(e.get('rss_peak_mib'))} | {fmt(e.get('rss_mib_per_1k_sockets'), 2)} |")
        eddy = rows.get("eddy")
        peers = [s for s in servers if not s.startswith("eddy") and not is_floor(s) and rows.get(s, {}).get("runs")]
        if eddy and eddy.get("runs") and peers:
            out.append("\nEddy's ratio to each peer (> 1 means Eddy is better):\n")
            out.append("| peer | one event → all sockets (server ts) peer ÷ Eddy | deliveries/s (burst) Eddy ÷ peer | "
                       "steady p99 (server ts) peer ÷ Eddy | burst p99 (publish) peer ÷ Eddy | "
                       "CPU per delivery peer ÷ Eddy | RSS per 1k sockets peer ÷ Eddy |")
            out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
            for server in peers:
                p = rows[server]
                out.append(
                    f"| {server} | "
                    f"{ratio(p.get('solo_event_to_last_socket_p50_ms'), eddy.get('solo_event_to_last_socket_p50_ms'))} | "
                    f"{ratio(eddy.get('burst_deliveries_per_s'), p.get('burst_deliveries_per_s'))} | "
                    f"{ratio(p.get('steady_latency_p99_ms'), eddy.get('steady_latency_p99_ms'))} | "
                    f"{ratio(p.get('burst_e2e_p99_ms'), eddy.get('burst_e2e_p99_ms'))} | "
                    f"{ratio(p.get('cpu_us_per_delivery'), eddy.get('cpu_us_per_delivery'))} | "
                    f"{ratio(p.get('rss_mib_per_1k_sockets'), eddy.get('rss_mib_per_1k_sockets'))} |")
        dialect, native, peer = rows.get("eddy-socketio"), rows.get("eddy"), rows.get("socketio")
        if dialect and dialect.get("runs") and native and native.get("runs"):
            out.append("\nEddy's Socket.IO dialect (targets: CPU per delivery ≤ 1.5× native; deliveries/s ≥ 4× "
                       "python-socketio):\n")
            out.append("| CPU µs per delivery: Socket.IO ÷ native | deliveries/s (burst): Socket.IO ÷ python-socketio |")
            out.append("| ---: | ---: |")
            versus_peer = ratio(dialect.get("burst_deliveries_per_s"), peer.get("burst_deliveries_per_s")) \
                if peer and peer.get("runs") else "–"
            out.append(f"| {ratio(dialect.get('cpu_us_per_delivery'), native.get('cpu_us_per_delivery'))} | "
                       f"{versus_peer} |")
    out.append(floor_table(runs, servers))
    if versus:
        out.append(floor_table(runs, servers, versus))
    out.append(solo_legs_table(summary, servers))
    out.append(repeats_table(runs, servers))
    return "\n".join(out)


#: The rows of the every-repeat table: (label, metric, digits, scale).
REPEAT_ROWS = (
    ("one event → last socket (solo p50), ms", "solo_event_to_last_socket_p50_ms", 1, 1.0),
    ("steady p99 (server ts), ms", "steady_latency_p99_ms", 0, 1.0),
    ("burst deliveries/s, k", "burst_deliveries_per_s", 0, 1e-3),
    ("server CPU per delivery (all phases), µs", "cpu_us_per_delivery", 1, 1.0),
    ("… of lone and steady events only, µs", "unbatched_cpu_us_per_delivery", 1, 1.0),
    ("… of the burst only, µs", "burst_cpu_us_per_delivery", 1, 1.0),
    ("RSS per socket, KiB", "rss_kib_per_socket", 1, 1.0),
    ("idle memory before sockets, PSS summed over the server's processes, MiB", "pss_idle_mib", 1, 1.0),
    ("server cores busy in the burst", "server_burst_cores", 2, 1.0),
    ("load generators' CPU per delivery, µs", "loadgen_cpu_us_per_delivery", 1, 1.0),
    ("load generators' cores busy in the burst", "loadgen_burst_cores", 2, 1.0),
    ("load average (1 min) as the run started", "load_average", 1, 1.0),
)


def repeats_table(runs: list[dict[str, Any]], servers: list[str]) -> str:
    """Every repeat and the median, per server, with where its processes ran and how its sockets split."""
    out = []
    for sockets in sorted({r["sockets"] for r in runs if r.get("ok")}):
        shown = [s for s in servers if any(r.get("ok") and r["server"] == s and r["sockets"] == sockets for r in runs)]
        by_server = {s: sorted((r for r in runs if r.get("ok") and r["server"] == s and r["sockets"] == sockets),
                               key=lambda r: r["repeat"]) for s in shown}
        out.append(f"\n### {sockets:,} sockets, every repeat → median (server@CPUs/load-generator CPUs)\n")
        out.append("| | " + " | ".join(shown) + " |")
        out.append("| --- |" + " ---: |" * len(shown))
        for label, metric, digits, scale in REPEAT_ROWS:
            cells = []
            for server in shown:
                values = [r[metric] * scale for r in by_server[server] if r.get(metric) is not None]
                cells.append(" / ".join(f"{v:.{digits}f}" for v in values)
                             + (f" → **{statistics.median(values):.{digits}f}**" if values else "–"))
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        out.append("| lost / duplicated | " + " | ".join(
            f"{sum(r['lost'] for r in by_server[s])} / {sum(r['duplicates'] for r in by_server[s])}" for s in shown) + " |")
        out.append("| server processes: sockets each | " + " | ".join(
            " / ".join(sockets_split(r) for r in by_server[s]) for s in shown) + " |")
        out.append("| CPUs observed: server processes / load generators, harness | " + " | ".join(
            affinity_summary(by_server[s]) for s in shown) + " |")
        out.append("| scheduled as: load generators and harness / server processes | " + " | ".join(
            policies_summary(by_server[s]) for s in shown) + " |")
    return "\n".join(out)


def policies_summary(runs: list[dict[str, Any]]) -> str:
    """``SCHED_BATCH / SCHED_OTHER``: the policies the kernel reported for the client side, then the server's
    processes, over ``runs`` (see :data:`CLIENTS_BATCH`)."""
    clients, servers = set(), set()
    for run in runs:
        policies = run.get("policies") or {}
        clients.update([policies.get("harness", "–"), *policies.get("load_generators", [])])
        servers.update((policies.get("server") or {"": "–"}).values())
    return f"{'+'.join(sorted(clients))} / {'+'.join(sorted(servers))}"


def sockets_split(run: dict[str, Any]) -> str:
    """``2,571 + 2,429``: the sockets each accepting server process held (the busiest first)."""
    counts = sorted((run.get("sockets_per_process") or {}).values(), reverse=True)[:run.get("server_processes", 1)]
    return " + ".join(f"{c:,}" for c in counts) or "–"


def affinity_summary(runs: list[dict[str, Any]]) -> str:
    """``0 / 1``: the distinct CPU sets the kernel reported, over every repeat, server side / client side."""
    server = sorted({cpus for r in runs for cpus in (r.get("affinity") or {}).get("server", {}).values()})
    clients = sorted({cpus for r in runs for cpus in [*(r.get("affinity") or {}).get("load_generators", []),
                                                      (r.get("affinity") or {}).get("harness")] if cpus})
    return f"{', '.join(server) or '–'} / {', '.join(clients) or '–'}"


def solo_legs_table(summary: dict[str, dict[str, dict[str, Any]]], servers: list[str]) -> str:
    """Where a lone event's time goes, per server: three legs of the solo phase (medians of repeats of p50s)."""
    out = [("\n### A lone event's path (solo phase, ms, median of repeats): publish → server timestamp → first socket"
            " → last socket\n"),
           "| sockets | server | publish → stamp | stamp → first socket | first → last socket | total (p50) |",
           "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for sockets in sorted(summary, key=int):
        for server in servers:
            e = summary[sockets].get(server) or {}
            if e.get("runs"):
                out.append(f"| {int(sockets):,} | {server} | {fmt(e.get('solo_publish_to_stamp_p50_ms'))} | "
                           f"{fmt(e.get('solo_stamp_to_first_socket_p50_ms'))} | "
                           f"{fmt(e.get('solo_first_to_last_socket_p50_ms'))} | "
                           f"{fmt(e.get('solo_publish_to_last_socket_p50_ms'))} |")
    return "\n".join(out)


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b <= 0:
        return "–"
    return f"{a / b:.2f}×"


#: What each server is compared on against the floor: (label, metric, True when higher is better).
FLOOR_METRICS = (
    ("one event → all sockets (solo p50)", "solo_event_to_last_socket_p50_ms", False),
    ("CPU per delivery", "cpu_us_per_delivery", False),
    ("steady p99 (server ts)", "steady_latency_p99_ms", False),
    ("burst deliveries/s", "burst_deliveries_per_s", True),
    ("RSS per socket", "rss_mib_per_1k_sockets", False),
)


def is_floor(label: str) -> bool:
    return split_label(label)[0] == FLOOR


def floor_for(label: str, labels: set[str]) -> str:
    """The floor a server is measured against: the floor run under the same placement, else the unpinned one."""
    placement = split_label(label)[1]
    same = [other for other in labels if is_floor(other) and split_label(other)[1] == placement]
    return same[0] if same else FLOOR


def repeat_ratios(runs: list[dict[str, Any]], sockets: int, server: str, reference: str) -> dict[str, list[float]]:
    """Per repeat, ``server``'s cost over ``reference``'s in that same repeat (> 1: slower or heavier).

    For deliveries/s, where more is better, the reference's figure over the server's, so > 1 still means worse.
    """
    def by_repeat(name: str) -> dict[int, dict[str, Any]]:
        return {r["repeat"]: r for r in runs if r.get("ok") and r["sockets"] == sockets and r["server"] == name}

    mine, theirs = by_repeat(server), by_repeat(reference)
    ratios: dict[str, list[float]] = {metric: [] for _, metric, _ in FLOOR_METRICS}
    for repeat in sorted(mine.keys() & theirs.keys()):
        for _, metric, higher_is_better in FLOOR_METRICS:
            value, reference_value = mine[repeat].get(metric), theirs[repeat].get(metric)
            if value and reference_value:
                ratios[metric].append(reference_value / value if higher_is_better else value / reference_value)
    return ratios


def floor_ratios(runs: list[dict[str, Any]], sockets: int, server: str) -> dict[str, list[float]]:
    """Per repeat, ``server`` × the floor run beside it (under the same placement if one ran)."""
    return repeat_ratios(runs, sockets, server, floor_for(server, {r["server"] for r in runs}))


def spread(values: list[float]) -> str:
    """``2.50× (1.15–3.70)``: the median and the range of per-repeat ratios."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}×"
    return f"{statistics.median(values):.2f}× ({min(values):.2f}–{max(values):.2f})"


def floor_table(runs: list[dict[str, Any]], servers: list[str], versus: str | None = None) -> str:
    """Every server × the floor (or × ``versus``), per socket count: each repeat's ratio to the run beside it."""
    reference = versus or FLOOR
    counts = sorted({r["sockets"] for r in runs if r.get("ok") and (r["server"] == versus or is_floor(r["server"]))})
    if not counts:
        return ""
    title = (f"× {versus} (per repeat, against its run in the same repeat" if versus else
             "× the floor (per repeat, against the floor run in the same repeat, under the same placement if one ran")
    out = [f"\n### {title}; median (min–max); > 1 = slower or heavier)\n",
           "| sockets | server | " + " | ".join(label for label, _, _ in FLOOR_METRICS) + " |",
           "| ---: | --- |" + " ---: |" * len(FLOOR_METRICS)]
    for sockets in counts:
        for server in servers:
            ratios = (repeat_ratios(runs, sockets, server, versus) if versus else floor_ratios(runs, sockets, server))
            if server != reference and not (versus is None and is_floor(server)) and any(ratios.values()):
                out.append(f"| {sockets:,} | {server} | "
                           + " | ".join(spread(ratios[metric]) for _, metric, _ in FLOOR_METRICS) + " |")
    return "\n".join(out)


def charts(summary: dict[str, dict[str, dict[str, Any]]], runs: list[dict[str, Any]], servers: list[str],
           cdf_sockets: int | None) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    CHARTS.mkdir(parents=True, exist_ok=True)
    written = []
    counts = sorted({r["sockets"] for r in runs if r.get("ok")})
    if not counts:
        return written
    if cdf_sockets not in counts:
        cdf_sockets = max((c for c in counts if c <= 5000), default=counts[-1])
    fig, ax = plt.subplots(figsize=(8, 5))
    for server in servers:
        curves = [r["steady_latency_quantiles_ms"] for r in runs
                  if r.get("ok") and r["server"] == server and r["sockets"] == cdf_sockets
                  and r.get("steady_latency_quantiles_ms")]
        if not curves:
            continue
        curve = np.mean(np.array(curves), axis=0)  # quantile functions averaged over repeats
        ax.plot(np.maximum(curve, 0.05), np.linspace(0, 1, len(curve)), label=f"{server} ({len(curves)} runs)")
    ax.set_xscale("log")
    ax.set_xlabel("delivery latency, ms (receive time − server timestamp; log scale)")
    ax.set_ylabel("fraction of deliveries")
    rate = next((r["rate"] for r in runs if r.get("ok")), None)
    ax.set_title(f"Delivery latency CDF, {cdf_sockets:,} sockets, steady {rate:g} events/s")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    path = CHARTS / "bench-latency-cdf.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(str(path))

    fig, ax = plt.subplots(figsize=(8, 5))
    for server in servers:
        xs, ys, lo, hi = [], [], [], []
        for count in counts:
            e = summary.get(str(count), {}).get(server)
            if not e or "burst_deliveries_per_s" not in e:
                continue
            values = e["burst_deliveries_per_s_all"]
            xs.append(count)
            ys.append(e["burst_deliveries_per_s"])
            lo.append(e["burst_deliveries_per_s"] - min(values))
            hi.append(max(values) - e["burst_deliveries_per_s"])
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=server)
    ax.axhline(100_000, color="grey", linestyle="--", linewidth=1, label="target 100,000/s")
    ax.set_xscale("log")
    ax.set_xticks(counts)
    ax.set_xticklabels([f"{c:,}" for c in counts])
    ax.set_xlabel("sockets on one channel")
    ax.set_ylabel("deliveries per second (burst; median, min–max)")
    ax.set_ylim(0, max([125_000] + [max(line.get_ydata()) * 1.25 for line in ax.get_lines() if len(line.get_ydata())]))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:,.0f}"))
    ax.set_title("Fan-out throughput vs sockets (one server process, 2-core host)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper center", ncol=3, fontsize="small")
    path = CHARTS / "bench-throughput.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(str(path))

    floor_counts = sorted({r["sockets"] for r in runs if r.get("ok") and is_floor(r["server"])})
    if floor_counts:
        fig, axes = plt.subplots(1, len(FLOOR_METRICS), figsize=(4 * len(FLOOR_METRICS), 4), sharey=True)
        for ax, (label, metric, _) in zip(axes, FLOOR_METRICS, strict=True):
            for server in servers:
                points = [(count, floor_ratios(runs, count, server)[metric]) for count in floor_counts]
                points = [(count, values) for count, values in points if values and not is_floor(server)]
                if points:
                    medians = [statistics.median(values) for _, values in points]
                    ax.errorbar([count for count, _ in points], medians, marker="o", capsize=3, label=server,
                                yerr=[[m - min(v) for m, (_, v) in zip(medians, points, strict=True)],
                                      [max(v) - m for m, (_, v) in zip(medians, points, strict=True)]])
            ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
            ax.set_xscale("log")
            ax.set_xticks(floor_counts)
            ax.set_xticklabels([f"{c:,}" for c in floor_counts])
            ax.set_title(label, fontsize="medium")
            ax.set_xlabel("sockets")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].set_ylabel("× the floor (median, min–max)")
        axes[0].legend(fontsize="small")
        path = CHARTS / "bench-floor-ratio.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(str(path))
    return written


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------

def display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def run_line(run: dict[str, Any]) -> str:
    return (f"one event → {run['sockets']:,} sockets {fmt(run.get('solo_event_to_last_socket_p50_ms'))} ms; "
            f"burst {fmt(run.get('burst_deliveries_per_s'))} deliveries/s; p50/p99 steady "
            f"{fmt(run.get('steady_latency_p50_ms'))}/{fmt(run.get('steady_latency_p99_ms'))} ms, burst "
            f"{fmt(run.get('burst_latency_p50_ms'))}/{fmt(run.get('burst_latency_p99_ms'))} ms; "
            f"lost {run['lost']}; server CPU {fmt(run.get('cpu_us_per_delivery'))} µs/delivery "
            f"(user {fmt(run['cpu_user_s'], 2)} s, system {fmt(run['cpu_system_s'], 2)} s); load generators "
            f"{fmt(run['loadgen_cpu_burst_s'], 2)} CPU s over the {fmt(run.get('burst_seconds'), 2)} s burst; "
            f"publish {run.get('publish_statuses')} {run.get('publish_failures') or ''}")


async def main_async(args: argparse.Namespace) -> int:
    servers = args.servers
    context = multiprocessing.get_context("spawn")
    generators = [GeneratorHandle(context) for _ in range(args.clients)]
    tmp = tempfile.mkdtemp(prefix="eddy-bench-")
    ctx = Context(generators, args.port, tmp)
    started = datetime.now(UTC)
    wall = time.monotonic()
    try:
        for sockets in args.sockets:
            config = RunConfig(sockets=sockets, rate=args.rate, duration=args.duration, burst=args.burst,
                               solo=args.solo, stall=args.stall, connect_concurrency=args.connect_concurrency,
                               profile_dir=args.profile, profile_phases=args.profile_phases,
                               settle=0.3 if args.smoke else 1.0)
            for repeat in range(args.repeats):
                shift = repeat % len(servers)
                for server in servers[shift:] + servers[:shift]:
                    log(f"{server} @ {sockets} sockets, repeat {repeat + 1}/{args.repeats}")
                    run = await one_run(ctx, server, config, repeat)
                    ctx.runs.append(run)
                    if run.get("ok"):
                        log("  " + run_line(run))
    finally:
        for g in generators:
            g.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    summary = summarize(ctx.runs)
    head = git_head()
    fingerprints = {r["eddy_code"] for r in ctx.runs if r.get("eddy_code")}
    if len(fingerprints) > 1:
        log(f"WARNING: Eddy's code changed during the benchmark ({', '.join(sorted(fingerprints))}): "
            "its runs are not comparable")
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out) if args.out else RESULTS / f"bench-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "started": started.isoformat(), "seconds": time.monotonic() - wall,
        "command": " ".join([Path(sys.executable).name, "-m", "loadtests.bench", *sys.argv[1:]]),
        "args": {k: v for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "cpus_available": format_cpus(STARTED_WITH),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "load_generator_processes": args.clients},
        "git_head": head, "eddy_code": sorted(fingerprints),
        "summary": summary, "runs": ctx.runs,
    }
    out.write_text(json.dumps(document, indent=1))
    print(tables(summary, servers, ctx.runs, args.versus))
    print(f"\nresults: {display(out)}")
    if args.charts:
        for path in charts(summary, ctx.runs, servers, args.cdf_sockets):
            print(f"chart: {display(Path(path))}")
    failed = [r for r in ctx.runs if not r.get("ok")]
    for run in failed:
        print(f"FAILED {run['server']} @ {run['sockets']}: {run['error']}", file=sys.stderr)
    return 1 if failed else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sockets", default="1000,2000,5000,10000", help="comma-separated socket counts")
    parser.add_argument("--rate", type=float, default=2.0, help="steady phase: events per second")
    parser.add_argument("--duration", type=float, default=10.0, help="steady phase: seconds")
    parser.add_argument("--burst", type=int, default=20, help="burst phase: events sent at once")
    parser.add_argument("--solo", type=int, default=5,
                        help="solo phase: events sent one at a time, each after the previous reached every socket")
    parser.add_argument("--servers", default=",".join(ALL_SERVERS),
                        help="comma-separated; NAME@S/L pins the server (and its forks) to CPUs S and the load "
                             "generators and harness to CPUs L, e.g. eddy@0/1,eddy-p2@0/1,floor@0/1,eddy-p2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=2, help="load-generator processes")
    parser.add_argument("--smoke", action="store_true", help="50 sockets, a few seconds, no charts")
    parser.add_argument("--charts", action="store_true", help="write PNG charts to docs/benchmarks/")
    parser.add_argument("--cdf-sockets", type=int, default=None, help="socket count of the latency CDF chart")
    parser.add_argument("--stall", type=float, default=15.0, help="give up on a phase after this long without progress")
    parser.add_argument("--connect-concurrency", type=int, default=50, help="handshakes in flight per load generator")
    parser.add_argument("--port", type=int, default=18700, help="first port; each run takes the next one")
    parser.add_argument("--from-json", default=None, metavar="FILE",
                        help="print the tables (and with --charts draw the charts) of an earlier results file")
    parser.add_argument("--versus", default=None, metavar="SERVER",
                        help="also print every server × this one (a name from --servers, placement included), per repeat")
    parser.add_argument("--out", default=None, help="results file (default loadtests/results/bench-<timestamp>.json)")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="record each server with py-spy during the measured phases (raw stacks into DIR)")
    parser.add_argument("--profile-phases", default=",".join(PHASES), metavar="PHASES",
                        help="which phases --profile records, in order (solo: a lone event's fan-out alone)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sockets, args.rate, args.duration, args.burst, args.solo, args.repeats = "50", 10.0, 2.0, 10, 3, 1
        args.charts = False
    args.sockets = [int(s) for s in str(args.sockets).split(",") if s]
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    args.profile_phases = tuple(p for p in PHASES if p in args.profile_phases.split(","))
    try:
        unknown = [s for s in args.servers if split_label(s)[0] not in SPECS]
    except ValueError as exc:
        parser.error(f"--servers: {exc}")
    if unknown:
        parser.error(f"unknown servers: {', '.join(unknown)} (known: {', '.join(SPECS)}, each with @CPUS/CPUS if pinned)")
    return args


def report(path: str, charts_too: bool, cdf_sockets: int | None, versus: str | None) -> int:
    """Tables (and charts) again from a results file, without measuring."""
    document = json.loads(Path(path).read_text())
    runs = document["runs"]
    order = [s for s in document["args"]["servers"]]
    summary = summarize(runs)
    print(tables(summary, order, runs, versus))
    if charts_too:
        for chart in charts(summary, runs, order, cdf_sockets):
            print(f"chart: {display(Path(chart))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return report(args.from_json, args.charts, args.cdf_sockets, args.versus)
    raise_open_file_limit()
    # SIGTERM (a test's timeout) unwinds like Ctrl-C, so servers and load generators are stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    import uvloop
    return uvloop.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
