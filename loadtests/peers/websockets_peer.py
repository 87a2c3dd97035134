"""Plain ``websockets`` peer (asyncio API): ``websockets.broadcast()`` to every subscriber.

* ``ws://host:port/`` — a subscriber: gets a ``connected`` frame, then every event;
* ``ws://host:port/publish`` — a publisher socket: each text frame
  ``{"event": …, "data": …}`` is stamped with the server time and broadcast once
  (``broadcast`` frames the message once and writes it to every connection
  without awaiting any of them).

``websockets`` serves only WebSocket handshakes (no HTTP POST), so a publisher
socket is its idiomatic publishing path.

    python -m loadtests.peers.websockets_peer --port 8003
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from websockets.asyncio.server import ServerConnection, broadcast, serve

from loadtests.peers import iso_timestamp

CLIENTS: set[ServerConnection] = set()


def stamped(raw: str | bytes) -> str:
    """The broadcast message for a publisher's ``{"event": …, "data": …}``, stamped with the server time."""
    body = json.loads(raw)
    return json.dumps({"event": body["event"], "timestamp": iso_timestamp(time.time()), "data": body.get("data")})


def connected() -> str:
    return json.dumps({"type": "connected", "timestamp": iso_timestamp(time.time())})


async def handler(websocket: ServerConnection) -> None:
    if websocket.request.path == "/publish":
        async for raw in websocket:
            broadcast(CLIENTS, stamped(raw))
        return
    CLIENTS.add(websocket)
    try:
        await websocket.send(connected())
        await websocket.wait_closed()
    finally:
        CLIENTS.discard(websocket)


async def run(handler: Callable[[ServerConnection], Awaitable[None]], host: str, port: int,
              **options: Any) -> None:
    async with serve(handler, host, port, **options) as server:
        await server.serve_forever()


def main(handler: Callable[[ServerConnection], Awaitable[None]] = handler, doc: str | None = __doc__,
         **options: Any) -> None:
    """Parse ``--port``/``--host`` and serve ``handler`` on uvloop (asyncio's loop when uvloop is missing)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8003)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(run(handler, args.host, args.port, **options))
    else:
        uvloop.run(run(handler, args.host, args.port, **options))


if __name__ == "__main__":
    main()
