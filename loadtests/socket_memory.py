"""Python heap per idle WebSocket on the server, and where it is allocated (tracemalloc).

    python -m loadtests.socket_memory [--sockets 2000] [--top 20] [--tree DIR]

Runs Eddy in this process on a temporary SQLite file, opens ``--sockets`` idle
``/ws/<channel>/stream`` connections with raw asyncio clients (one user and
token each, as the bench does), and compares two tracemalloc snapshots: before
and after the sockets. Allocations made by the clients (asyncio streams and
transports, which Tornado's server does not use, and this file) are left out, so the figure is the server's Python heap per
socket; RSS adds the allocator's slack and the kernel's socket buffers are not
counted at all (``make bench`` reports RSS per socket beside the floor's).
``--tree`` measures another Eddy source tree (``git archive <commit>`` unpacked),
so the steps of a change can be compared one by one.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tempfile
import tracemalloc
from base64 import b64encode

SECRET = "socket-memory-secret-socket-memory-secret"


async def measure(sockets: int, top: int) -> None:
    import jwt

    from service.app import Eddy
    from service.config import Settings

    settings = Settings.from_env(storage=f"sqlite:///{tempfile.mkdtemp()}/eddy.db", jwt_secret=SECRET,
                                 max_connections_per_ip=10 * sockets + 100)
    eddy = Eddy(settings)
    await eddy.start()
    server = eddy.make_app().listen(0, "127.0.0.1")
    port = next(iter(server._sockets.values())).getsockname()[1]
    clients = []

    async def connect(n: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        token = jwt.encode({"sub": f"u{n}", "tenant": "bench"}, SECRET, algorithm="HS256")
        key = b64encode(os.urandom(16)).decode()
        writer.write(f"GET /ws/orders/stream?access_token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                     f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        await reader.readuntil(b"\r\n\r\n")
        await reader.read(4096)  # the connected frame
        clients.append(writer)

    for n in range(50):  # warm: first-use caches and pools are not per-socket costs
        await connect(n)
    await asyncio.sleep(0.5)
    gc.collect()
    tracemalloc.start(16)
    before = tracemalloc.take_snapshot()
    for n in range(50, 50 + sockets):
        await connect(n)
    await asyncio.sleep(0.5)
    gc.collect()
    after = tracemalloc.take_snapshot()
    # The clients use asyncio streams and transports, the server (Tornado's IOStream) never does.
    clients_out = [tracemalloc.Filter(False, pattern) for pattern in (
        "*/asyncio/streams.py", "*/asyncio/selector_events.py", "*/asyncio/transports.py", __file__,
        tracemalloc.__file__)]
    diff = after.filter_traces(clients_out).compare_to(before.filter_traces(clients_out), "traceback")
    print(f"{sockets:,} idle sockets: {sum(d.size_diff for d in diff) / sockets:,.0f} B of server Python heap each")
    for entry in diff[:top]:
        frame = entry.traceback[-1]
        print(f"{entry.size_diff / sockets:8,.0f} B  {entry.count_diff / sockets:5.1f} objects  "
              f"{frame.filename.rsplit('/', 2)[-1]}:{frame.lineno}")
    for writer in clients:
        writer.close()
    await eddy.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sockets", type=int, default=2000)
    parser.add_argument("--top", type=int, default=20, help="allocation sites to list, largest first")
    parser.add_argument("--tree", default=None, help="measure the Eddy source tree in this directory")
    args = parser.parse_args(argv)
    if args.tree:
        sys.path.insert(0, os.path.abspath(args.tree))
        for name in [m for m in sys.modules if m.split(".")[0] in ("service", "handlers", "storage")]:
            del sys.modules[name]
    from service.cli import raise_open_file_limit

    raise_open_file_limit()
    asyncio.run(measure(args.sockets, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
