"""POST → frame latency for N sockets on one channel (the core issue's acceptance number).

Starts ``eddy serve`` on a temporary SQLite file, opens N sockets on one channel,
POSTs events at a steady rate, and reports the median and p99 of (frame arrival −
POST send time) over all deliveries. Each event carries its send time in ``data``.

    python -m loadtests.post_to_frame --sockets 100 --events 200 --rate 20
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
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

ROOT = Path(__file__).resolve().parent.parent
SECRET = "loadtest-secret-loadtest-secret-loadtest"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def wait_ready(port: int, timeout: float = 20) -> None:
    client = AsyncHTTPClient()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            await client.fetch(f"http://127.0.0.1:{port}/readyz", request_timeout=1)
            return
        except Exception:
            await asyncio.sleep(0.1)
    raise TimeoutError("eddy did not become ready")


async def post_events(port: int, token: str, events: int, rate: float) -> None:
    """POST ``events`` events to channel ``bench`` at ``rate`` per second, each carrying its send time."""
    http = AsyncHTTPClient()
    started = time.monotonic()
    for n in range(events):
        body = orjson.dumps({"channel": "bench", "event": "tick", "data": {"n": n, "sent": time.time()}})
        await http.fetch(HTTPRequest(f"http://127.0.0.1:{port}/api/events", method="POST", body=body,
                                     headers={"Authorization": f"Bearer {token}"}))
        await asyncio.sleep(max(0.0, started + (n + 1) / rate - time.monotonic()))


async def run(port: int, sockets: int, events: int, rate: float) -> dict[str, float]:
    token = jwt.encode({"sub": "bench", "tenant": "bench"}, SECRET, algorithm="HS256")
    await wait_ready(port)
    latencies: list[float] = []
    connections = []
    for _ in range(sockets):
        connection = await websocket_connect(f"ws://127.0.0.1:{port}/ws/bench/stream?access_token={token}")
        await connection.read_message()  # connected
        connections.append(connection)

    async def reader(connection) -> None:
        for _ in range(events):
            message = await connection.read_message()
            arrived = time.time()
            frame = orjson.loads(message)
            latencies.append((arrived - frame["data"]["sent"]) * 1000)

    readers = [asyncio.ensure_future(reader(c)) for c in connections]
    await post_events(port, token, events, rate)
    await asyncio.wait_for(asyncio.gather(*readers), 60)
    for connection in connections:
        connection.close()
    return {
        "deliveries": len(latencies),
        "p50_ms": statistics.median(latencies),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": max(latencies),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sockets", type=int, default=100)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0, help="events per second")
    parser.add_argument("--port", type=int, default=8897)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = os.environ | {"EDDY_JWT_SECRET": SECRET, "PYTHONPATH": str(ROOT), "EDDY_LOG_LEVEL": "warning"}
        server = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--port", str(args.port), "--address", "127.0.0.1",
             "--storage", f"sqlite:///{tmp}/eddy.db"], env=env,
        )
        try:
            result = asyncio.run(run(args.port, args.sockets, args.events, args.rate))
        finally:
            server.terminate()
            server.wait(10)
    print(f"sockets={args.sockets} events={args.events} rate={args.rate}/s deliveries={result['deliveries']}")
    print(f"POST->frame latency: p50={result['p50_ms']:.2f} ms  p99={result['p99_ms']:.2f} ms  max={result['max_ms']:.2f} ms")
    if result["deliveries"] != args.sockets * args.events:
        sys.exit("lost deliveries")


if __name__ == "__main__":
    main()
