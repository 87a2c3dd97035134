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

from websockets.asyncio.server import ServerConnection, broadcast, serve

from loadtests.peers import iso_timestamp

CLIENTS: set[ServerConnection] = set()


async def handler(websocket: ServerConnection) -> None:
    if websocket.request.path == "/publish":
        async for raw in websocket:
            body = json.loads(raw)
            message = {"event": body["event"], "timestamp": iso_timestamp(time.time()), "data": body.get("data")}
            broadcast(CLIENTS, json.dumps(message))
        return
    CLIENTS.add(websocket)
    try:
        await websocket.send(json.dumps({"type": "connected", "timestamp": iso_timestamp(time.time())}))
        await websocket.wait_closed()
    finally:
        CLIENTS.discard(websocket)


async def run(host: str, port: int) -> None:
    async with serve(handler, host, port) as server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8003)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(run(args.host, args.port))
    else:
        uvloop.run(run(args.host, args.port))


if __name__ == "__main__":
    main()
