"""The keepalive sweep (handlers/keepalive.py) over real sockets: Tornado's ping schedule, to the tick.

Raw clients record when each server PING arrives, counted from the moment they
read the 101 (the server starts a socket's keepalive as it opens it), and
answer them or not.
"""

from __future__ import annotations

import asyncio

import pytest

from handlers import keepalive
from tests.support import RawSocket

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
