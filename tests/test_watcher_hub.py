"""The watcher's recovery and the hub's fan-out, without sockets."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from service.frames import PreparedMessage
from service.hub import Hub
from service.watcher import Watcher
from storage import Event, EventDraft, StorageUnavailable
from storage.memory import MemoryStorage


class Recorder:
    """A subscriber that keeps what it is given."""

    def __init__(self) -> None:
        self.messages: list[PreparedMessage] = []

    def deliver(self, message: PreparedMessage) -> None:
        self.messages.append(message)

    def close(self, code=None, reason=None) -> None:
        pass

    def write_outbox(self) -> None:
        pass  # deliver() keeps messages in hand; there is no socket to write

    @property
    def ids(self) -> list[int]:
        import orjson

        return [int(orjson.loads(m.payload)["id"]) for m in self.messages]


class FlakyStorage(MemoryStorage):
    """Fails its change feed after every ``every`` events, ``times`` times, and replays
    a few already-delivered events when resumed (as a backend at a seam might)."""

    def __init__(self, every: int, times: int) -> None:
        super().__init__()
        self.every, self.failures_left, self.watch_calls = every, times, 0

    async def watch(self, after: int):
        self.watch_calls += 1
        yielded = 0
        async for event in super().watch(max(0, after - 2)):  # replay two old ones
            yield event
            yielded += 1
            if self.failures_left and yielded >= self.every:
                self.failures_left -= 1
                raise StorageUnavailable("connection reset")


async def wait_for(condition, timeout: float = 5.0) -> None:
    async def poll():
        while not condition():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(poll(), timeout)


@pytest.mark.gen_test
async def test_watcher_resumes_after_errors_without_loss_or_duplicates():
    storage = FlakyStorage(every=7, times=5)
    await storage.open()
    hub = Hub()
    recorder = Recorder()
    hub.subscribe(("acme", "orders"), recorder)
    watcher = Watcher(storage, hub, initial_backoff=0.001, max_backoff=0.01)
    watcher.start(after=0)

    async def producer():
        for n in range(100):
            await storage.append(EventDraft("acme", "orders", "n", {"n": n}))
            if n % 10 == 0:
                await asyncio.sleep(0.005)

    await producer()
    await wait_for(lambda: len(recorder.messages) >= 100)
    await asyncio.sleep(0.05)
    assert recorder.ids == list(range(1, 101))
    assert watcher.failures == 5 and storage.watch_calls == 6
    assert watcher.position == 100 and watcher.connected
    await watcher.stop()
    assert not watcher.running


@pytest.mark.gen_test
async def test_watcher_backs_off_while_storage_is_down_then_catches_up():
    storage = MemoryStorage()
    await storage.open()
    hub = Hub()
    recorder = Recorder()
    hub.subscribe(("t", "c"), recorder)
    watcher = Watcher(storage, hub, initial_backoff=0.01, max_backoff=0.05)
    await storage.append(EventDraft("t", "c", "before"))
    watcher.start()  # from the current end: "before" is history, not live
    await asyncio.sleep(0.05)

    await storage.close()  # the outage: the feed raises, pings fail
    await wait_for(lambda: watcher.last_error is not None)
    assert not watcher.connected
    failures_during_outage = watcher.failures
    await asyncio.sleep(0.2)
    assert watcher.failures > failures_during_outage  # still retrying, with backoff

    await storage.open()
    for n in range(3):
        await storage.append(EventDraft("t", "c", "after", {"n": n}))
    await wait_for(lambda: len(recorder.messages) == 3)
    assert recorder.ids == [2, 3, 4]
    await wait_for(lambda: watcher.connected)
    await watcher.stop()


def test_hub_encodes_once_and_shares_the_frame_by_tenant():
    from storage import Event

    hub = Hub()
    acme = [Recorder() for _ in range(3)]
    globex = Recorder()
    for r in acme:
        hub.subscribe(("acme", "tickets"), r)
    hub.subscribe(("globex", "tickets"), globex)
    event = Event(position=1, tenant="acme", channel="tickets", event="ticket.created", data={"a": 1}, timestamp=0.0)
    assert hub.publish(event) == 3
    assert globex.messages == []
    first = acme[0].messages[0]
    assert all(r.messages[0] is first for r in acme)  # one object, encoded once
    assert first.websocket_frame is first.websocket_frame  # framed once
    assert first.websocket_frame[0] == 0x81 and first.websocket_frame.endswith(first.payload)

    hub.unsubscribe(("acme", "tickets"), acme[0])
    assert hub.subscriber_count(("acme", "tickets")) == 2
    hub.disconnect(acme[1], [("acme", "tickets")])
    assert hub.subscriber_count(("acme", "tickets")) == 1


def test_one_broken_subscriber_does_not_starve_the_others():
    from storage import Event

    class Broken(Recorder):
        def deliver(self, message):
            raise RuntimeError("bug in a transport")

    hub = Hub()
    good = Recorder()
    hub.subscribe(("t", "c"), Broken())
    hub.subscribe(("t", "c"), good)
    hub.publish(Event(position=1, tenant="t", channel="c", event="e", data=None, timestamp=0.0))
    assert good.ids == [1]


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_websocket_frame_lengths(size):
    from service.frames import websocket_text_frame

    frame = websocket_text_frame(b"a" * size)
    assert frame[0] == 0x81
    if size < 126:
        assert frame[1] == size and len(frame) == size + 2
    elif size <= 0xFFFF:
        assert frame[1] == 126 and int.from_bytes(frame[2:4], "big") == size and len(frame) == size + 4
    else:
        assert frame[1] == 127 and int.from_bytes(frame[2:10], "big") == size and len(frame) == size + 10


def test_hub_lists_a_tenants_slowest_consumers_and_counts_no_protocol_events():
    class Queued(Recorder):
        def __init__(self, connection_id: str, queued: int) -> None:
            super().__init__()
            self.connection_id = connection_id
            self.queued = queued

        def queued_bytes(self) -> int:
            return self.queued

    hub = Hub()
    slow, fast, quiet, other = Queued("slow", 9000), Queued("fast", 0), Recorder(), Queued("globex", 10**6)
    for subscriber in (slow, fast, quiet):
        hub.subscribe(("acme", "tenant"), subscriber)
    hub.subscribe(("acme", "orders"), slow)
    hub.subscribe(("globex", "tenant"), other)
    # The tenant's connections that report a queue, most queued first; never another tenant's.
    assert [(e["connection_id"], e["queued_bytes"]) for e in hub.slowest("acme")] == [("slow", 9000), ("fast", 0)]
    assert [e["connection_id"] for e in hub.slowest("acme", limit=1)] == ["slow"]
    assert [e["connection_id"] for e in hub.slowest("globex")] == ["globex"]

    def event(name: str, position: int) -> Event:
        return Event(position, "acme", "orders", name, {"user_id": "bob"}, 0.0)

    for position, name in enumerate(["order.created", "$typing", "$presence", "$read", "order.paid"], start=1):
        hub.publish(event(name, position))
    assert dict(hub.channel_events.items()) == {("acme", "orders"): 2}  # what the feed shows: not typing, presence, reads
    assert hub.events_published == 5 and len(slow.messages) == 5


def test_fan_out_counters_are_bounded():
    """Issue 15 (Low): the hub counted every channel name ever published to, for ever."""
    from service.hub import COUNTED_CHANNELS, Hub
    from storage import Event

    hub = Hub()
    for n in range(COUNTED_CHANNELS + 100):
        hub.publish(Event(n + 1, "acme", f"c{n}", "e", None, 0.0))
    hub.publish(Event(COUNTED_CHANNELS + 200, "acme", "c0", "e", None, 0.0))  # c0 was forgotten; counted anew
    counted = dict(hub.channel_events.items())
    assert len(counted) == COUNTED_CHANNELS
    assert counted[("acme", "c0")] == 1 and ("acme", "c100") not in counted and counted[("acme", "c101")] == 1


class Outbox(Recorder):
    """A subscriber with an outbox, like a transport: queues frames, asks the hub to flush, counts its writes."""

    def __init__(self, hub: Hub) -> None:
        super().__init__()
        self.hub, self.outbox, self.writes = hub, [], []

    def deliver(self, message: PreparedMessage) -> None:
        super().deliver(message)
        self.outbox.append(message)
        if len(self.outbox) == 1:
            self.hub.write_soon(self)

    def write_outbox(self) -> None:
        self.writes.append([orjson.loads(m.payload).get("id", "signal") for m in self.outbox])
        self.outbox = []


def _event(position: int) -> Event:
    return Event(position=position, tenant="t", channel="c", event="e", data=None, timestamp=0.0)


@pytest.mark.gen_test
async def test_a_lone_event_is_written_during_its_fan_out_and_a_burst_is_coalesced():
    hub = Hub()
    sockets = [Outbox(hub) for _ in range(3)]
    for socket in sockets:
        hub.subscribe(("t", "c"), socket)
    hub.publish(_event(1))
    # Written as the loop reached each socket: the first does not wait for the last to be queued.
    assert [s.writes for s in sockets] == [[["1"]]] * 3
    # A second fan-out in the same loop iteration is part of a burst: it waits for the iteration's write.
    hub.publish(_event(2))
    assert [s.writes for s in sockets] == [[["1"]]] * 3
    await asyncio.sleep(0)
    assert [s.writes for s in sockets] == [[["1"], ["2"]]] * 3
    # A group the feed handed over together is a burst even after a quiet gap: one write per socket.
    await asyncio.sleep(0.01)
    for position in (3, 4, 5):
        hub.publish(_event(position), alone=False)
    assert [s.writes[2:] for s in sockets] == [[]] * 3
    await asyncio.sleep(0)
    assert [s.writes[2:] for s in sockets] == [[["3", "4", "5"]]] * 3


class FakeLane:
    """A lane that takes a lone event (``accepts``) or declines it, and records what it took."""

    def __init__(self, accepts: bool) -> None:
        self.accepts, self.taken = accepts, []

    @classmethod
    def write_all(cls, lanes, message: PreparedMessage) -> list:
        for lane in lanes:
            if lane.accepts:
                lane.taken.append(orjson.loads(message.payload)["id"])
        return [lane for lane in lanes if not lane.accepts]


@pytest.mark.gen_test
async def test_a_lone_event_goes_through_the_lane_and_the_rest_through_deliver():
    hub = Hub()
    taking, declining, laneless = Outbox(hub), Outbox(hub), Outbox(hub)
    lanes = FakeLane(True), FakeLane(False)
    hub.subscribe(("t", "c"), taking, lanes[0])
    hub.subscribe(("t", "c"), declining, lanes[1])
    hub.subscribe(("t", "c"), laneless)
    hub.publish(_event(1))
    assert lanes[0].taken == ["1"] and taking.writes == []  # the lane wrote it; deliver was not called
    assert declining.writes == [["1"]] and laneless.writes == [["1"]]
    # A burst never takes a lane: its events are coalesced, one write per socket.
    await asyncio.sleep(0)
    hub.publish(_event(2), alone=False)
    hub.publish(_event(3), alone=False)
    await asyncio.sleep(0)
    assert lanes[0].taken == ["1"] and taking.writes == [["2", "3"]]
    # Typing and presence skip their sender, which only the subscriber knows: never through a lane.
    await asyncio.sleep(0)
    typing = Event(4, "t", "c", "$typing", {"user_id": "someone"}, 0.0)
    hub.publish(typing)
    assert lanes[0].taken == ["1"] and taking.writes[-1] == ["signal"]
    # Subscribing again replaces the lane.
    await asyncio.sleep(0)
    hub.subscribe(("t", "c"), taking)
    hub.publish(_event(5))
    assert lanes[0].taken == ["1"] and taking.writes[-1] == ["5"]

class OtherLane(FakeLane):
    """A lane of another class: the hub hands each class its own lanes."""

    calls = 0

    @classmethod
    def write_all(cls, lanes, message: PreparedMessage) -> list:
        OtherLane.calls += 1
        return super().write_all(lanes, message)


@pytest.mark.gen_test
async def test_a_channels_lanes_follow_its_membership_between_lone_events():
    hub = Hub()
    first, second, third = Outbox(hub), Outbox(hub), Outbox(hub)
    lanes = FakeLane(True), FakeLane(True), OtherLane(True)
    hub.subscribe(("t", "c"), first, lanes[0])
    hub.subscribe(("t", "c"), second, lanes[1])
    hub.publish(_event(1))
    assert [lane.taken for lane in lanes] == [["1"], ["1"], []]
    # A member that leaves is not written to.
    await asyncio.sleep(0)
    hub.unsubscribe(("t", "c"), first)
    hub.publish(_event(2))
    assert [lane.taken for lane in lanes] == [["1"], ["1", "2"], []]
    # One that joins, with a lane of another class, is.
    await asyncio.sleep(0)
    hub.subscribe(("t", "c"), third, lanes[2])
    OtherLane.calls = 0
    hub.publish(_event(3))
    assert [lane.taken for lane in lanes] == [["1"], ["1", "2", "3"], ["3"]] and OtherLane.calls == 1
    # Another channel's membership leaves this one's lanes as they are.
    await asyncio.sleep(0)
    hub.subscribe(("t", "other"), first, lanes[0])
    hub.publish(_event(4))
    assert [lane.taken for lane in lanes] == [["1"], ["1", "2", "3", "4"], ["3", "4"]]
    assert first.writes == second.writes == third.writes == []
