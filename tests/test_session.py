"""The session core without sockets: a real Eddy (SQLite file, watcher, hub) and a fake transport.

The replay seam (history, then live, no gap and no duplicate), its send bound, the merged order of several
channels, and the per-signal limits are checked here directly; the transports only adapt them.
"""

from __future__ import annotations

import asyncio

import pytest

from service.auth import Identity
from service.frames import FrameError, PreparedMessage
from service.replay import Replay
from service.session import Joined, Session

TENANT = "acme"


class FakeTransport:
    """Records what the session queues; ``drained`` runs a hook and answers ``drains``."""

    kind = "fake"
    remote_ip = "192.0.2.1"

    def __init__(self) -> None:
        self.log: list[object] = []
        self.drain_calls = 0
        self.drains = True
        self.on_drain = None
        self.closed_with: tuple[int, str] | None = None

    def queue(self, message: PreparedMessage) -> None:
        self.log.append(message)

    def write_outbox(self) -> None:
        pass

    async def drained(self) -> bool:
        self.drain_calls += 1
        if self.on_drain is not None:
            await self.on_drain()
        return self.drains

    def close(self, code: int, reason: str) -> None:
        self.closed_with = (code, reason)

    def positions(self) -> list[int]:
        return [m.position for m in self.log if isinstance(m, PreparedMessage) and m.position is not None]


def open_session(eddy, transport: FakeTransport | None = None, user: str = "u") -> tuple[Session, FakeTransport]:
    """An open, authenticated session on ``transport`` (a new one by default)."""
    transport = transport or FakeTransport()
    session = Session(eddy, transport)
    session.identity = Identity(user, TENANT)
    session.open()
    return session, transport


async def append(eddy, channel: str, n: int, size: int = 10) -> list[int]:
    positions = []
    for i in range(n):
        positions.append((await eddy.append(TENANT, channel, "e", {"i": i, "pad": "x" * size})).position)
    await eddy.watcher.passed(positions[-1], timeout=5)
    return positions


async def until(condition, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


@pytest.mark.gen_test
async def test_join_with_since_acknowledges_then_replays_then_goes_live(eddy):
    stored = await append(eddy, "room", 5)
    session, transport = open_session(eddy)
    joined = await session.join("room", since=stored[1], ready=lambda result: transport.log.append(result))
    assert joined == Joined("room", None)
    assert transport.log[0] == joined  # the acknowledgement comes before any replayed event
    assert transport.positions() == stored[2:]
    live = await append(eddy, "room", 1)
    await until(lambda: transport.positions()[-1] == live[0])
    assert transport.positions() == stored[2:] + live
    session.closed()


@pytest.mark.gen_test
@pytest.mark.settings(max_buffered_bytes=200)
async def test_live_events_during_a_replay_are_held_and_released_once_without_gap(eddy):
    stored = await append(eddy, "room", 20)
    session, transport = open_session(eddy)
    written_during_replay: list[int] = []

    async def publish_while_replaying() -> None:
        if len(written_during_replay) < 3:
            written_during_replay.extend(await append(eddy, "room", 1))
            # Delivered by the watcher to the session meanwhile: held, not queued yet.
            assert written_during_replay[-1] not in transport.positions()

    transport.on_drain = publish_while_replaying
    await session.join("room", since=0)
    assert transport.drain_calls >= 3  # the replay waited for the transport within the bound
    assert transport.positions() == stored + written_during_replay  # every event once, in order
    assert not session.holding
    session.closed()


class FakeLane:
    """A transport's lane for lone events: takes each one it is offered, into the transport's log."""

    def __init__(self, transport: FakeTransport) -> None:
        self.transport, self.writes = transport, 0

    @classmethod
    def write_all(cls, lanes, message: PreparedMessage) -> list:
        for lane in lanes:
            lane.writes += 1
            lane.transport.log.append(message)
        return []


@pytest.mark.gen_test
@pytest.mark.settings(max_buffered_bytes=200)
async def test_a_held_channel_skips_the_lane_and_takes_it_again_once_live(eddy):
    stored = await append(eddy, "room", 20)
    transport = FakeTransport()
    transport.lane = lane = FakeLane(transport)  # type: ignore[attr-defined]
    session, _ = open_session(eddy, transport)
    written_during_replay: list[int] = []

    async def publish_while_replaying() -> None:
        if len(written_during_replay) < 3:
            written_during_replay.extend(await append(eddy, "room", 1))
            assert written_during_replay[-1] not in transport.positions()  # held, not written by the lane

    transport.on_drain = publish_while_replaying
    await session.join("room", since=0)
    assert lane.writes == 0
    assert transport.positions() == stored + written_during_replay
    live = await append(eddy, "room", 1)
    await until(lambda: transport.positions()[-1] == live[0])
    assert lane.writes == 1  # live again: the lone event took the lane
    session.closed()


@pytest.mark.gen_test
@pytest.mark.settings(max_buffered_bytes=2000)
async def test_a_replay_to_a_client_that_does_not_read_stops_within_the_bound(eddy):
    """SSE with since=0 used to buffer the whole history; now a replay waits for the client, or stops."""
    await append(eddy, "room", 100, size=100)
    session, transport = open_session(eddy)
    transport.drains = False  # the transport gave up on this client (closed as a slow consumer)
    await session.join("room", since=0)
    queued = sum(len(m.payload) for m in transport.log if isinstance(m, PreparedMessage))
    assert transport.drain_calls == 1
    assert queued <= 1000 + 200  # half the bound, plus the event that crossed it
    session.closed()


@pytest.mark.gen_test
async def test_replay_of_several_channels_is_merged_in_position_order(eddy):
    positions = []
    for n in range(30):
        positions += await append(eddy, f"c{n % 3}", 1)
    identity = Identity("u", TENANT)

    async def read(key, after, limit):
        return await eddy.history(identity, key[1], after=after, limit=limit)

    replay = Replay(read, [(TENANT, "c0"), (TENANT, "c1"), (TENANT, "c2")], positions[4], page_size=4)
    assert await replay.start() == {}
    seen = [event.position async for batch in replay.batches() for event in batch]
    assert seen == positions[5:]
    assert max(replay.sent.values()) == positions[-1]


@pytest.mark.gen_test
@pytest.mark.settings(history_size=3)
async def test_trimmed_history_refuses_the_join_and_leaves_no_subscription(eddy):
    stored = await append(eddy, "room", 10)
    session, transport = open_session(eddy)
    with pytest.raises(FrameError) as refused:
        await session.join("room", since=stored[0])
    assert refused.value.code == "HISTORY_LOST"
    assert (TENANT, "room") not in session.channels and not session.holding
    session.closed()


@pytest.mark.gen_test
async def test_presence_frames_are_rate_limited_like_typing(eddy):
    session, _ = open_session(eddy)
    await session.join("room")
    for _ in range(10):
        await session.presence("away")
    with pytest.raises(FrameError) as limited:
        await session.presence("online")
    assert limited.value.code == "RATE_LIMITED"
    session.closed()


@pytest.mark.gen_test
@pytest.mark.settings(max_connections_per_user=2)
async def test_the_per_user_cap_closes_the_oldest_connection(eddy):
    sessions, transports = zip(*(open_session(eddy) for _ in range(3)), strict=True)
    assert transports[0].closed_with == (4029, "too many connections for this user")
    assert transports[1].closed_with is None and transports[2].closed_with is None
    for session in sessions:
        session.closed()


@pytest.mark.gen_test
async def test_a_resume_with_ids_of_another_epoch_is_refused(eddy):
    """Ids only compare within one store: a since of another epoch (a recreated store) is HISTORY_LOST."""
    stored = await append(eddy, "room", 3)
    session, transport = open_session(eddy)
    with pytest.raises(FrameError) as refused:
        await session.join("room", since=stored[0], epoch="an-older-store")
    assert refused.value.code == "HISTORY_LOST"
    await session.join("room", since=stored[0], epoch=eddy.epoch)
    assert transport.positions() == stored[1:]
    session.closed()
