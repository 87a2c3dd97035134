"""Every stream that carries events has Nagle's algorithm off (TCP_NODELAY), as asyncio, Go and Node's ``ws`` do.

Tornado leaves it on; with it on, an event's bytes written while earlier ones are unacknowledged wait for the
client's ACK, which a client with nothing to send delays (40 ms and more). Loopback acknowledges too quickly to
show the delay, so this checks the socket option on the server's side of each transport, for real clients
(the Engine.IO WebSocket's check is in ``tests/test_engineio.py``, which has its settings).
"""

from __future__ import annotations

import asyncio
import gc
import socket

import pytest
import websockets
from tornado.iostream import IOStream

from tests.support import make_token


def server_side_nodelay(client_port: int) -> int:
    """TCP_NODELAY of the server's end of the connection from ``client_port`` (the test runs the server)."""
    # type(), not isinstance(): the heap holds weak proxies, which isinstance() dereferences (and a dead one raises).
    for stream in (o for o in gc.get_objects() if type(o) is IOStream):
        sock = stream.socket
        try:
            if sock is not None and sock.getpeername()[1] == client_port:
                return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        except OSError:  # a closed or unconnected socket
            continue
    raise AssertionError(f"no server stream for the client port {client_port}")


async def sse_client(port: int, token: str) -> tuple[asyncio.StreamWriter, int]:
    """A raw HTTP/1.1 SSE request, read up to its first message."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /sse?channels=room&access_token={token} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert b" 200 " in head.split(b"\r\n")[0] and b"text/event-stream" in head
    assert b"connected" in await asyncio.wait_for(reader.readuntil(b"\n\n"), 5)
    return writer, writer.get_extra_info("sockname")[1]


@pytest.mark.gen_test(timeout=30)
async def test_websocket_and_sse_streams_send_at_once(http_server, http_port, eddy):
    async with websockets.connect(f"ws://127.0.0.1:{http_port}/ws/room/stream?access_token={make_token()}") as ws:
        await ws.recv()  # connected
        assert server_side_nodelay(ws.transport.get_extra_info("sockname")[1]) == 1
        writer, port = await sse_client(http_port, make_token("bob"))
        assert server_side_nodelay(port) == 1
        writer.close()
