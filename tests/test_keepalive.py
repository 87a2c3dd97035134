"""The keepalive sweep (handlers/keepalive.py) over real sockets: Tornado's ping schedule, to the tick.

Raw clients record when each server PING arrives, counted from the moment they
read the 101 (the server starts a socket's keepalive as it opens it), and
answer them or not.
"""

from __future__ import annotations

import asyncio
import os
import struct
from base64 import b64encode

import pytest

from handlers import keepalive
from tests.support import make_token

INTERVAL = 1.0
#: How late a ping may arrive (the event loop's own lateness on a busy box); the first sweep was 0.13 s late.
SLACK = 0.08


class RawSocket:
    """A WebSocket client that answers a server ping only when told to, and notes when each one came."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, opened: float) -> None:
        self.reader, self.writer, self.opened = reader, writer, opened
        self.pings: list[float] = []

    @classmethod
    async def connect(cls, port: int, user: str) -> RawSocket:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = b64encode(os.urandom(16)).decode()
        writer.write(f"GET /ws?access_token={make_token(user)} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                     f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        assert b" 101 " in await reader.readuntil(b"\r\n\r\n")
        return cls(reader, writer, asyncio.get_running_loop().time())

    async def frame(self) -> tuple[int, bytes]:
        head = await self.reader.readexactly(2)
        size = head[1] & 0x7F
        if size == 126:
            size = struct.unpack("!H", await self.reader.readexactly(2))[0]
        return head[0] & 0x0F, await self.reader.readexactly(size)

    def pong(self, payload: bytes) -> None:
        mask = os.urandom(4)
        self.writer.write(bytes([0x8A, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    async def run(self, answer: int, until: float) -> tuple[int, bytes] | None:
        """Read until ``until`` (loop time), answering the first ``answer`` pings; the close frame if one came."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                async with asyncio.timeout(until - loop.time()):
                    opcode, payload = await self.frame()
            except TimeoutError:
                return None
            if opcode == 0x9:
                self.pings.append(loop.time() - self.opened)
                if len(self.pings) <= answer:
                    self.pong(payload)
            elif opcode == 0x8:
                return opcode, payload


@pytest.mark.gen_test(timeout=15)
@pytest.mark.settings(ping_interval=INTERVAL, ping_timeout=INTERVAL)
async def test_every_socket_is_pinged_on_its_own_schedule_never_late(http_server, http_port):
    """Sockets opened 0.1 s apart are each pinged every interval from their own open, as Tornado's task does.

    (A sweep that woke at most every quarter interval pinged the later sockets 0.13 s late, into the busy
    spell of clients that answer pings only while their application reads, and closed them.)
    """
    clients = []
    for n in range(3):
        clients.append(await RawSocket.connect(http_port, f"schedule-{n}"))
        await asyncio.sleep(0.1)
    end = asyncio.get_running_loop().time() + 3 * INTERVAL + 0.5
    assert await asyncio.gather(*(client.run(answer=99, until=end) for client in clients)) == [None] * 3
    for client in clients:
        assert len(client.pings) == 3, client.pings
        for n, at in enumerate(client.pings, 1):
            assert n * INTERVAL - 0.02 <= at <= n * INTERVAL + SLACK, client.pings
        client.writer.close()


@pytest.mark.gen_test(timeout=15)
@pytest.mark.settings(ping_interval=INTERVAL, ping_timeout=0.5)
async def test_an_unanswered_ping_closes_after_the_timeout(http_server, http_port, eddy):
    """The first ping answered, the second not: closed 'ping timed out' one timeout after the second ping."""
    client = await RawSocket.connect(http_port, "late")
    close = await client.run(answer=1, until=asyncio.get_running_loop().time() + 3 * INTERVAL + 1)
    assert close is not None, client.pings
    closed_at = asyncio.get_running_loop().time() - client.opened
    assert close[1][2:] == b"ping timed out"
    assert len(client.pings) == 2, client.pings
    assert 2 * INTERVAL + 0.5 - 0.02 <= closed_at <= 2 * INTERVAL + 0.5 + SLACK
    client.writer.close()


@pytest.mark.gen_test(timeout=15)
@pytest.mark.settings(ping_interval=INTERVAL, ping_timeout=INTERVAL)
async def test_closed_sockets_leave_the_sweep(http_server, http_port, app):
    """A closed socket is dropped at its turn: the sweep holds nothing once every socket is gone."""
    sweep = keepalive.sweep_for(app)
    assert sweep is not None
    client = await RawSocket.connect(http_port, "gone")
    await asyncio.sleep(0.05)
    assert len(sweep) == 1
    client.writer.close()
    await asyncio.sleep(INTERVAL + 0.1)
    assert len(sweep) == 0
