"""The floor: the least a server can do to fan one event out to every socket.

For each event it writes one prepared WebSocket frame to every subscriber with a
bare ``os.write()`` on the socket's file descriptor, and does nothing else: no
storage, no per-socket queue, no Python per socket beyond that loop. Handshakes
are the ``websockets`` library's (with its keepalive pings off, so nothing else
runs per socket). A server cannot deliver faster than this on the same machine,
so ``loadtests.bench`` reports every server as a ratio to it.

* ``ws://host:port/`` — a subscriber: gets a ``connected`` frame, then every event;
* ``ws://host:port/publish`` — a publisher socket: each text frame
  ``{"event": …, "data": …}`` is stamped with the server time, framed once, written.

With ``FLOOR_ACK=1`` in its environment (the bench's ``floor-ack``) it first answers the publisher with a
one-word frame, as an HTTP server's ``201`` answers a POST before its fan-out: on a box where the publisher
shares the server's cores, that wakes the publisher during the loop. An experiment, not the floor.

    python -m loadtests.peers.floor --port 8004
"""

from __future__ import annotations

import os

from websockets.asyncio.server import ServerConnection
from websockets.frames import Frame, Opcode

from loadtests.peers.websockets_peer import connected, main, stamped

#: The file descriptors of the subscribers' sockets.
SOCKETS: set[int] = set()
#: Answer the publisher before each event's loop (see the module's docstring).
ACK = bool(os.environ.get("FLOOR_ACK"))


async def handler(websocket: ServerConnection) -> None:
    assert websocket.request is not None  # the handshake is done
    if websocket.request.path == "/publish":
        async for raw in websocket:
            frame = Frame(Opcode.TEXT, stamped(raw).encode()).serialize(mask=False)
            if ACK:
                await websocket.send("ok")
            for fd in SOCKETS:
                try:
                    os.write(fd, frame)
                except OSError:  # a full or closed socket misses the event (the bench counts it lost)
                    pass
        return
    await websocket.send(connected())
    fd = websocket.transport.get_extra_info("socket").fileno()
    SOCKETS.add(fd)
    try:
        await websocket.wait_closed()
    finally:
        SOCKETS.discard(fd)


if __name__ == "__main__":
    main(handler, __doc__, ping_interval=None, compression=None)
