"""Soak: hold N sockets with steady traffic for M minutes and report the server's memory every minute.

Flat memory is the target. Not run in CI.

    python -m loadtests.soak --sockets 2000 --minutes 10 --rate 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jwt
import orjson
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

from service.cli import raise_open_file_limit

ROOT = Path(__file__).resolve().parent.parent
SECRET = "soak-secret-soak-secret-soak-secret-soak"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def soak(port: int, server_pid: int, sockets: int, minutes: float, rate: float) -> bool:
    http = AsyncHTTPClient(max_clients=4)
    for _ in range(100):
        try:
            await http.fetch(f"http://127.0.0.1:{port}/readyz")
            break
        except Exception:
            await asyncio.sleep(0.1)
    received = [0] * sockets
    baseline_rss = rss_kib(server_pid)
    connections = []
    for n in range(sockets):
        token = jwt.encode({"sub": f"user-{n}", "tenant": "soak"}, SECRET, algorithm="HS256")
        connection = await websocket_connect(f"ws://127.0.0.1:{port}/ws/feed/stream?access_token={token}",
                                             max_message_size=1 << 20)
        await connection.read_message()
        connections.append(connection)
    idle_rss = rss_kib(server_pid)
    per_socket = (idle_rss - baseline_rss) / sockets
    print(f"{sockets} sockets open; server RSS {baseline_rss / 1024:.1f} MiB before, {idle_rss / 1024:.1f} MiB after:"
          f" {per_socket:.1f} KiB per idle socket", flush=True)

    async def reader(index: int, connection) -> None:
        while (message := await connection.read_message()) is not None:
            if '"type":"event"' in message:
                received[index] += 1

    readers = [asyncio.ensure_future(reader(i, c)) for i, c in enumerate(connections)]
    publisher_token = jwt.encode({"sub": "publisher", "tenant": "soak"}, SECRET, algorithm="HS256")
    published = 0
    started = time.monotonic()
    next_report = started + 60
    minute = 0
    while time.monotonic() - started < minutes * 60:
        body = orjson.dumps({"channel": "feed", "event": "tick", "data": {"n": published, "pad": "x" * 200}})
        await http.fetch(HTTPRequest(f"http://127.0.0.1:{port}/api/events", method="POST", body=body,
                                     headers={"Authorization": f"Bearer {publisher_token}"}))
        published += 1
        await asyncio.sleep(max(0.0, started + published / rate - time.monotonic()))
        if time.monotonic() >= next_report:
            minute += 1
            next_report += 60
            print(f"minute {minute:>2}: server RSS {rss_kib(server_pid) / 1024:7.1f} MiB  published {published:>6}  "
                  f"delivered {sum(received):>9}", flush=True)
    await asyncio.sleep(2)
    for connection in connections:
        connection.close()
    await asyncio.gather(*readers, return_exceptions=True)
    expected = published * sockets
    lost = expected - sum(received)
    print(f"published={published} sockets={sockets} delivered={sum(received)} expected={expected} lost={lost} "
          f"final RSS {rss_kib(server_pid) / 1024:.1f} MiB")
    return lost == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sockets", type=int, default=2000)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--rate", type=float, default=5.0, help="events per second to all sockets")
    parser.add_argument("--port", type=int, default=8895)
    args = parser.parse_args()
    raise_open_file_limit()
    with tempfile.TemporaryDirectory() as tmp:
        env = os.environ | {"EDDY_JWT_SECRET": SECRET, "PYTHONPATH": str(ROOT), "EDDY_LOG_LEVEL": "warning",
                            "EDDY_MAX_CONNECTIONS_PER_USER": "10",
                            # every socket comes from this one address (the default per-address cap is for real clients)
                            "EDDY_MAX_CONNECTIONS_PER_IP": "1000000"}
        server = subprocess.Popen([sys.executable, "-m", "service", "serve", "--port", str(args.port),
                                   "--address", "127.0.0.1", "--storage", f"sqlite:///{tmp}/eddy.db"], env=env)
        try:
            ok = asyncio.run(soak(args.port, server.pid, args.sockets, args.minutes, args.rate))
        finally:
            server.terminate()
            server.wait(20)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
