"""The keepalive sweep (handlers/keepalive.py) over real sockets: Tornado's ping schedule, to the tick.

Raw clients record when each server PING arrives, counted from the moment they
read the 101 (the server starts a socket's keepalive as it opens it), and
answer them or not.
"""

from __future__ import annotations

import asyncio

import pytest

from handlers import keepalive
from tests.support import RawSocket, only_session

INTERVAL = 1.0
#: How late a ping may arrive (the event loop's own lateness on a busy box); the first sweep was 0.13 s late.
SLACK = 0.08


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


@pytest.mark.gen_test(timeout=15)
@pytest.mark.settings(ping_interval=0.5, ping_timeout=0.5)
async def test_a_ping_on_an_idle_stream_is_one_send_through_the_lane(http_server, http_port, eddy, monkeypatch):
    """The sweep's ping is two bytes in one ``send()``: no ``IOStream.write``, and the lane stays clear."""
    from tornado.iostream import IOStream

    writes = []
    original = IOStream.write
    monkeypatch.setattr(IOStream, "write", lambda self, data: writes.append(bytes(data)) or original(self, data))
    client = await RawSocket.connect(http_port, "idle")
    socket = only_session(eddy).transport
    assert await client.run(answer=2, until=asyncio.get_running_loop().time() + 1.3) is None
    assert len(client.pings) == 2, client.pings
    assert keepalive.PING_FRAME not in writes
    assert socket.lane.clear and not socket.ws_connection.is_closing()  # both pongs came back in time
    client.writer.close()


@pytest.mark.gen_test(timeout=30)
@pytest.mark.settings(ping_interval=0.5, ping_timeout=5, max_buffered_bytes=64 << 20)
async def test_a_ping_waits_behind_bytes_queued_on_the_stream(http_server, http_port, eddy):
    """While the stream holds bytes the kernel did not take, the ping goes through the stream, after them.

    A ping sent past them would land inside the queued frame on the wire and corrupt it.
    """
    from service.frames import websocket_text_frame

    client = await RawSocket.connect(http_port, "queued")
    assert (await client.frame())[0] == 0x1  # connected
    socket = only_session(eddy).transport
    stream = socket.ws_connection.stream
    frames = [websocket_text_frame(bytes([65 + n % 26]) * 60_000) for n in range(200)]  # 12 MB, unread for now
    for frame in frames:
        stream.write(frame)
    assert stream._total_write_index != stream._total_write_done_index, "the kernel took everything"
    await asyncio.sleep(0.7)  # the ping is due at 0.5 s
    got = [await client.frame() for _ in range(len(frames) + 1)]
    assert [opcode for opcode, _ in got] == [0x1] * len(frames) + [0x9]
    assert all(payload == bytes([65 + n % 26]) * 60_000 for n, (_, payload) in enumerate(got[:-1]))
    client.writer.close()
