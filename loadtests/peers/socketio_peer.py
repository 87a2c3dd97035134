"""Socket.IO peer: python-socketio's ``AsyncServer`` (ASGI) on uvicorn, every client in one room.

Clients connect on ``/socket.io/`` (any transport; the benchmark uses the
WebSocket transport), are put in the room ``bench``, and receive every event as
``42["event", {"event": …, "timestamp": …, "data": …}]``. ``POST /emit`` with
``{"event": …, "data": …}`` stamps the server time and ``sio.emit``s it to the
room (python-socketio encodes the packet once and queues it on each client).

    python -m loadtests.peers.socketio_peer --port 8002
"""

from __future__ import annotations

import argparse
import time

import socketio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from loadtests.peers import iso_timestamp

ROOM = "bench"

sio = socketio.AsyncServer(async_mode="asgi")


@sio.event
async def connect(sid, environ, auth=None):
    await sio.enter_room(sid, ROOM)


async def emit(request: Request) -> JSONResponse:
    body = await request.json()
    message = {"event": body["event"], "timestamp": iso_timestamp(time.time()), "data": body.get("data")}
    await sio.emit("event", message, room=ROOM)
    return JSONResponse({"ok": True}, status_code=201)


app = socketio.ASGIApp(sio, other_asgi_app=Starlette(routes=[Route("/emit", emit, methods=["POST"])]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
