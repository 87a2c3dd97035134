"""handlers/detached.py: an open WebSocket drops what only its handshake needed, and still works.

If a Tornado release renames what it rests on, the first test fails: update
``HANDSHAKE_ONLY`` or ``STREAM_QUEUES`` (the last test shows that sockets keep working meanwhile).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import os
import socket
import sys

import pytest

from handlers import detached
from handlers.websocket import EventSocket
from tests.support import Client, make_token


@pytest.fixture
def opened(monkeypatch):
    """The server-side handlers of the sockets opened in the test, with what forget_handshake returned."""
    seen: list[tuple[EventSocket, bool, bool]] = []
    forget = detached.forget_handshake

    def spy(handler, also=()):
        was_supported = detached.supported(handler)
        seen.append((handler, was_supported, forget(handler, also)))
        return seen[-1][2]

    monkeypatch.setattr(detached, "forget_handshake", spy)
    return seen


async def still_works(port: int, user: str) -> Client:
    client = await Client.connect(port, "/ws", make_token(user), query="?since=0")
    assert (await client.recv())["type"] == "connected"
    assert await client.request({"type": "ping", "timestamp": "t"}) == {"type": "pong", "timestamp": "t"}
    assert (await client.request({"type": "join", "channel": "orders", "ref": 1}))["type"] == "ack"
    return client


def queues(handler: EventSocket) -> list[object]:
    stream = handler.ws_connection.stream
    return [stream._write_futures, stream._write_buffer._buffers]


@pytest.mark.gen_test
async def test_tornado_still_has_what_forget_handshake_needs(http_server, http_port, opened):
    client = await still_works(http_port, "alice")
    [(handler, was_supported, done)] = opened
    assert was_supported and done, "Tornado's RequestHandler changed: update handlers/detached.HANDSHAKE_ONLY"
    state = vars(handler)
    assert not set(detached.HANDSHAKE_ONLY) & set(state)
    # Tornado's guard against HTTP methods on a WebSocket still holds, from the class now.
    for name in ("write", "finish", "set_header", "set_status", "flush", "redirect", "set_cookie"):
        assert name not in state
        with pytest.raises(RuntimeError, match="not supported for Web Sockets"):
            getattr(handler, name)("x")
    assert isinstance(handler, EventSocket) and type(handler).__name__ == "EventSocket"
    assert handler.request.connection is None and handler.request.server_connection is None
    assert len(handler.request.headers) == 0 and handler.request.query == "" and "access_token" not in handler.request.uri
    assert sys.getsizeof(state) <= 464  # a small table; 1,584 bytes with Tornado's seven raisers in it
    assert [type(queue) for queue in queues(handler)] == [detached.LazyDeque] * 2
    client.close()


@pytest.mark.gen_test(timeout=10)
@pytest.mark.settings(ping_interval=0.2, ping_timeout=0.2)
async def test_write_queues_hold_a_deque_only_while_they_have_items(http_server, http_port, opened):
    """Pings go through IOStream.write: its queues fill and empty, and hold no deque once empty."""
    client = await still_works(http_port, "carol")
    [(handler, _, _)] = opened
    await asyncio.sleep(0.5)  # pinged (and answered by the client) twice
    assert not handler.ws_connection.is_closing()
    assert [queue._items for queue in queues(handler)] == [None, None]
    client.close()


@pytest.mark.gen_test(timeout=20)
async def test_a_backlog_the_kernel_refuses_queues_and_drains_in_order(http_server, http_port, opened):
    """A client that does not read: IOStream queues what the kernel refuses, and sends all of it in order later."""
    loop = asyncio.get_running_loop()
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", http_port))
    raw.setblocking(False)
    key = base64.b64encode(os.urandom(16)).decode()
    await loop.sock_sendall(raw, (f"GET /ws?access_token={make_token('dave')} HTTP/1.1\r\nHost: x\r\n"
                                  f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    received = b""
    while b"\r\n\r\n" not in received:
        received += await loop.sock_recv(raw, 65536)
    [(handler, _, done)] = opened
    assert done
    stream = handler.ws_connection.stream
    chunks: list[bytes] = []
    writes = []
    while not stream._write_buffer and len(chunks) < 400:  # until the kernel's buffers are full
        chunks.append(bytes([len(chunks) % 256]) * 65536)
        writes.append(stream.write(chunks[-1]))
    assert len(queues(handler)[0]) > 0 and len(stream._write_buffer) > 0, "the kernel took it all: nothing queued"
    received = received.split(b"\r\n\r\n", 1)[1]
    expected = b"".join(chunks)
    async with asyncio.timeout(10):
        while expected not in received:
            received += await loop.sock_recv(raw, 1 << 20)
        await asyncio.gather(*writes)
    assert [queue._items for queue in queues(handler)] == [None, None]
    raw.close()


@pytest.mark.gen_test
async def test_a_tornado_without_those_attributes_leaves_the_handler_as_it_was(http_server, http_port, opened,
                                                                              monkeypatch):
    monkeypatch.setattr(detached, "HANDSHAKE_ONLY", (*detached.HANDSHAKE_ONLY, "_renamed_by_a_future_tornado"))
    client = await still_works(http_port, "bob")
    [(handler, was_supported, done)] = opened
    assert not was_supported and not done
    assert [type(queue) for queue in queues(handler)] == [collections.deque] * 2
    client.close()
    assert "write" in vars(handler) and "_headers" in vars(handler)  # Tornado's own state, untouched
    assert handler.request.connection is not None
    assert len(handler.request.headers) == 0  # the request's public fields are cleared all the same
