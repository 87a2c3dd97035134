"""Seed 003 rebuilt: an order-broadcast ``ConnectionManager`` that awaits each socket in turn.

Seed 003 (``app/websocket/pedidos.py``) is written for FastAPI. FastAPI is not
installed here; FastAPI's ``WebSocket``, routing and request handling *are*
Starlette's (FastAPI subclasses ``starlette.applications.Starlette`` and re-exports
``starlette.websockets.WebSocket``), so this module is the same design on
Starlette, served by uvicorn (uvloop, its default WebSocket implementation):

* ``ConnectionManager`` keeps the accepted sockets and ``broadcast`` awaits
  ``send_text(json.dumps(message))`` on each socket in turn, as the seed does
  (the seed serializes once per recipient; kept);
* ``/ws/pedidos?token=…`` accepts, sends a ``connected`` frame and answers
  ``ping`` frames, as the seed's endpoint does;
* ``POST /pedidos`` stands for the seed's ``criar_pedido`` endpoint: it
  broadcasts the event with a server timestamp and answers after the broadcast.

The seed's ``timestamp`` is ``datetime.now().isoformat()``; here it is UTC with
milliseconds (the benchmark's common format) and the seed's flat fields move
under ``data``, so the broadcast carries ``event``, ``timestamp`` and ``data``.

    python -m loadtests.peers.seed003 --port 8001
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from loadtests.peers import iso_timestamp

logger = logging.getLogger(__name__)


class ConnectionManager:
    """All active WebSocket connections, and a broadcast to every one of them."""

    def __init__(self) -> None:
        self.active_connections: set[WebSocket] = set()

    async def connect(self, websocket: WebSocket) -> None:
        await websocket.accept()
        self.active_connections.add(websocket)

    def disconnect(self, websocket: WebSocket) -> None:
        self.active_connections.discard(websocket)

    async def send_personal_message(self, message: dict, websocket: WebSocket) -> None:
        try:
            await websocket.send_text(json.dumps(message))
        except Exception as exc:
            logger.error("personal message failed: %s", exc)

    async def broadcast(self, message: dict) -> None:
        if not self.active_connections:
            return
        disconnected = []
        for connection in self.active_connections.copy():
            try:
                await connection.send_text(json.dumps(message))
            except Exception as exc:
                logger.warning("broadcast to a client failed: %s", exc)
                disconnected.append(connection)
        for connection in disconnected:
            self.disconnect(connection)


manager = ConnectionManager()


async def websocket_pedidos(websocket: WebSocket) -> None:
    await manager.connect(websocket)
    try:
        await manager.send_personal_message(
            {"type": "connected", "message": "Conectado ao sistema de eventos de pedidos",
             "timestamp": iso_timestamp(time.time())}, websocket)
        while True:
            data = await websocket.receive_text()
            try:
                message = json.loads(data)
            except json.JSONDecodeError:
                continue
            if message.get("type") == "ping":
                await manager.send_personal_message({"type": "pong", "timestamp": message.get("timestamp")}, websocket)
    except WebSocketDisconnect:
        pass
    except Exception as exc:
        logger.error("websocket error: %s", exc)
    finally:
        manager.disconnect(websocket)


async def criar_pedido(request: Request) -> JSONResponse:
    body = await request.json()
    message = {"type": body["event"], "event": body["event"], "timestamp": iso_timestamp(time.time()),
               "data": body.get("data")}
    await manager.broadcast(message)
    return JSONResponse({"ok": True, "recipients": len(manager.active_connections)}, status_code=201)


app = Starlette(routes=[
    WebSocketRoute("/ws/pedidos", websocket_pedidos),
    Route("/pedidos", criar_pedido, methods=["POST"]),
])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
