"""Fan-out cost per delivery: Tornado's ``write_message`` vs Eddy's prepared frames.

One process runs an Eddy hub with N WebSocket connections (opened and drained
by a client subprocess, so its CPU is not counted). For each path it publishes
K events to all N sockets and reports the server's CPU time per delivery, the
median of several rounds, and the ratio between the two paths in the same run.

    python -m loadtests.fanout_paths --sockets 2000 --events 50 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import jwt
import tornado.httpserver
import tornado.websocket

from service.app import Eddy
from service.cli import raise_open_file_limit
from service.config import Settings
from service.session import Session
from storage import Event

ROOT = Path(__file__).resolve().parent.parent
SECRET = "fanout-secret-fanout-secret-fanout-secret"

CLIENT = r"""
import asyncio, base64, os, sys
async def one(port, token):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((f"GET /ws/bench/stream?access_token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer  # dropping the writer would close the socket
async def main(port, count, token):
    readers = []
    for i in range(count):
        readers.append(await one(port, token))
    print("ready", flush=True)
    async def drain(pair):
        while await pair[0].read(65536):
            pass
    await asyncio.gather(*(drain(pair) for pair in readers))
asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))
"""


def write_message_path(self: Session, message) -> None:
    """What a naive hub does: Tornado's write_message per socket (encode, frame, task)."""
    socket = self.transport
    if socket.ws_connection is None or socket.ws_connection.is_closing():
        return
    socket.write_message(message.payload)


def stream_write_path(self: Session, message) -> None:
    """The prepared frame through IOStream.write (a Future and a callback per socket): Eddy before the send() path."""
    connection = self.transport.ws_connection
    if connection is None or connection.is_closing():
        return
    connection.stream.write(message.websocket_frame)


PATHS = (("write_message", write_message_path), ("IOStream.write", stream_write_path),
         ("Eddy deliver", Session.deliver))


async def measure(eddy: Eddy, sockets: int, events: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Per path: CPU µs per delivery over a burst of ``events``, and the wall time of single-event fan-outs."""
    results = {name: {"cpu": [], "wall": []} for name, _ in PATHS}
    position = 0
    payload = {"order": 1234, "status": "pendente", "cliente": "Nome do Cliente", "valor_total": "1000.00"}

    def publish() -> None:
        nonlocal position
        position += 1
        eddy.hub.publish(Event(position, "bench", "bench", "pedido_criado", payload, time.time()))

    for _ in range(rounds):
        for name, deliver in PATHS:
            Session.deliver = deliver
            await asyncio.sleep(0.3)
            started = time.process_time()
            for _ in range(events):
                publish()
                # Let scheduled write tasks and socket writes run before the next event.
                for _ in range(3):
                    await asyncio.sleep(0)
            await asyncio.sleep(0.05)
            results[name]["cpu"].append((time.process_time() - started) / (events * sockets) * 1e6)
            for _ in range(3):  # one event alone, as a latency-bound fan-out sees it
                await asyncio.sleep(0.2)
                began = time.perf_counter()
                publish()
                for _ in range(3):
                    await asyncio.sleep(0)
                results[name]["wall"].append(time.perf_counter() - began)
    return results


async def open_fanout(port: int, sockets: int, client_script: str = CLIENT) -> tuple[Eddy, tornado.httpserver.HTTPServer,
                                                                                 subprocess.Popen[bytes]]:
    """An Eddy hub serving ``sockets`` open WebSockets on channel ("bench", "bench"), held by a client subprocess."""
    settings = Settings(storage="memory://", jwt_secret=SECRET, keepalive_interval=0, ping_interval=0,
                        ping_timeout=0, max_buffered_bytes=64 << 20,
                        # Every client socket uses the same token: without these, the per-user cap (10)
                        # would close all but ten of them and the fan-out would measure closed sockets.
                        max_connections_per_user=1 << 30, max_connections_per_ip=1 << 30)
    eddy = Eddy(settings)
    await eddy.start()
    server = tornado.httpserver.HTTPServer(eddy.make_app())
    server.listen(port, "127.0.0.1")
    token = jwt.encode({"sub": "bench", "tenant": "bench"}, SECRET, algorithm="HS256")
    client = subprocess.Popen([sys.executable, "-c", client_script, str(port), str(sockets), token],
                              stdout=subprocess.PIPE, stderr=open("/tmp/fanout-client.err", "wb"),
                              env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert client.stdout is not None
    loop = asyncio.get_running_loop()
    line = await loop.run_in_executor(None, client.stdout.readline)
    assert line.strip() == b"ready", line
    while eddy.hub.subscriber_count(("bench", "bench")) < sockets:
        if client.poll() is not None:
            raise RuntimeError("the client process exited")
        await asyncio.sleep(0.05)
    open_sockets = sum(1 for s in eddy.hub._channels[("bench", "bench")]
                       if s.transport.ws_connection is not None and not s.transport.ws_connection.is_closing())
    assert open_sockets == sockets, f"only {open_sockets} of {sockets} sockets are open"
    return eddy, server, client


async def close_fanout(eddy: Eddy, server: tornado.httpserver.HTTPServer, client: subprocess.Popen[bytes]) -> None:
    client.kill()
    server.stop()
    await eddy.stop()


async def main_async(args: argparse.Namespace) -> None:
    eddy, server, client = await open_fanout(args.port, args.sockets)
    original = Session.deliver
    try:
        results = await measure(eddy, args.sockets, args.events, args.rounds)
    finally:
        Session.deliver = original
        await close_fanout(eddy, server, client)
    print(f"sockets={args.sockets} events/burst={args.events} rounds={args.rounds}")
    print(f"{'path':<16}{'CPU µs/delivery':>17}{'deliveries/s/core':>19}{'one event to all (wall ms)':>28}")
    medians = {}
    for name, _ in PATHS:
        cpu = statistics.median(results[name]["cpu"])
        wall = statistics.median(results[name]["wall"]) * 1e3
        medians[name] = (cpu, wall)
        print(f"{name:<16}{cpu:>17.1f}{1e6 / cpu:>19,.0f}{wall:>28.1f}")
    eddy_cpu, eddy_wall = medians["Eddy deliver"]
    for name in ("write_message", "IOStream.write"):
        print(f"Eddy deliver vs {name}: {medians[name][0] / eddy_cpu:.2f}x less CPU, "
              f"{medians[name][1] / eddy_wall:.2f}x faster single-event fan-out")


def run(main_async: Callable[[argparse.Namespace], Awaitable[None]], description: str | None, *, sockets: int,
        events: int, rounds: int, port: int) -> None:
    """Parse ``--sockets --events --rounds --port`` (these defaults) and run ``main_async`` with them."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sockets", type=int, default=sockets)
    parser.add_argument("--events", type=int, default=events)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--port", type=int, default=port)
    args = parser.parse_args()
    raise_open_file_limit()
    asyncio.run(main_async(args))


def main() -> None:
    run(main_async, __doc__, sockets=2000, events=50, rounds=5, port=8896)


if __name__ == "__main__":
    main()
