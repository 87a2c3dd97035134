"""Storage faults and crashes: keep working, lose nothing, repeat nothing.

- the SQLite file is locked by another writer: publishing answers 503 with
  Retry-After, /readyz goes red, sockets stay open; when the lock goes, what
  the other writer stored arrives and a retried publish is stored once;
- the change feed fails while another process keeps writing: the watcher backs
  off and catches up, in order, with no duplicate;
- ``kill -9`` of the server while publishers and subscribers run: after a
  restart, clients resuming from their last ids end with exactly the stored events.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from collections.abc import AsyncIterator

import orjson
import pytest

from service.app import Eddy
from service.config import Settings
from storage import Event, EventDraft, StorageUnavailable, open_storage
from tests.processes import EddyProcess
from tests.support import SECRET, Client, http, json_of, make_token, publish


def summary(published: int, delivered: list[str], expected: list[str]) -> tuple[int, int]:
    lost = len(set(expected) - set(delivered))
    duplicated = len(delivered) - len(set(delivered))
    print(f"published={published} delivered={len(delivered)} lost={lost} duplicated={duplicated}")
    return lost, duplicated


async def joined(port: int, token: str, *channels: str, since: dict[str, str] | None = None) -> Client:
    client = await Client.connect(port, "/ws", token)
    assert (await client.recv())["type"] == "connected"
    for ref, channel in enumerate(channels):
        frame = {"type": "join", "channel": channel, "ref": ref}
        if since and channel in since:
            frame["since"] = since[channel]
        assert (await client.request(frame))["type"] == "ack"
    return client


# A file locked by another writer ------------------------------------------------

@pytest.fixture
def settings(tmp_path) -> Settings:
    # A short busy timeout: a locked file is reported in 0.2 s instead of 5.
    return Settings(storage=f"sqlite:///{tmp_path}/eddy.db?busy_timeout=0.2", jwt_secret=SECRET,
                    keepalive_interval=0, ping_interval=0, ping_timeout=0)


@pytest.mark.gen_test(timeout=60)
async def test_locked_file_503_readyz_red_sockets_open_then_nothing_lost(http_server, http_port, tmp_path):
    token = make_token("backend")
    client = await joined(http_port, token, "orders", "alerts")
    first = await publish(http_port, "orders", "created", {"n": 1}, token)
    assert (await client.recv_type("event"))["id"] == first["id"]

    # Another process is writing and keeps the lock. It waits its turn for the lock: Eddy's own brief transactions
    # (the scheduler's check for due events, four times a second) may hold it at this moment.
    holder = sqlite3.connect(tmp_path / "eddy.db", isolation_level=None, timeout=5)
    holder.execute("BEGIN EXCLUSIVE")
    refused = await http(http_port, "POST", "/api/events",
                         {"channel": "orders", "event": "created", "data": {"n": 2}, "idempotency_key": "order-2"},
                         token)
    assert refused.code == 503 and refused.headers["Retry-After"] == "1"
    assert refused.headers["Content-Type"] == "application/problem+json"
    assert json_of(refused)["code"] == "STORAGE_UNAVAILABLE"
    ready = await http(http_port, "GET", "/readyz")
    assert ready.code == 503 and json_of(ready)["checks"]["storage"].startswith("unavailable")
    # The socket and its other subscription live on through the outage.
    assert (await client.request({"type": "ping", "timestamp": "t"}))["type"] == "pong"
    # The other writer stores two events, then lets go.
    for n in (3, 4):
        holder.execute(
            "INSERT INTO events (tenant, channel, event, data, timestamp, ephemeral) VALUES (?, ?, ?, ?, ?, 0)",
            ("acme", "orders", "created", orjson.dumps({"n": n}).decode(), time.time()))
    holder.execute("COMMIT")
    holder.close()

    # The publisher retries with the same key: stored once, after the other writer's events.
    retried = [await http(http_port, "POST", "/api/events", {"channel": "orders", "event": "created",
                                                             "data": {"n": 2}, "idempotency_key": "order-2"}, token)
               for _ in range(2)]
    assert [r.code for r in retried] == [201, 201] and json_of(retried[0])["id"] == json_of(retried[1])["id"]
    assert (await http(http_port, "GET", "/readyz")).code == 200
    delivered = [first["id"]] + [(await client.recv_type("event"))["id"] for _ in range(3)]
    assert await client.no_frame_within(0.3)  # and nothing twice
    page = json_of(await http(http_port, "GET", "/api/channels/orders/events?after=0", token=token))
    expected = [e["id"] for e in page["events"]]
    assert [e["data"]["n"] for e in page["events"]] == [1, 3, 4, 2]
    assert summary(4, delivered, expected) == (0, 0) and delivered == expected


# The change feed fails while another process writes --------------------------------

class FlakyFeed:
    """A real SQLite store whose change feed and ping fail while ``down`` is set."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.down = False
        self.failures = 0

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    async def ping(self) -> None:
        if self.down:
            raise StorageUnavailable("injected: the store does not answer")
        await self.inner.ping()

    async def watch_batches(self, after: int) -> AsyncIterator[list[Event]]:
        if self.down:
            raise StorageUnavailable("injected: the store does not answer")
        async for batch in self.inner.watch_batches(after):
            if self.down:
                self.failures += 1
                raise StorageUnavailable("injected: the feed broke")
            yield batch


@pytest.fixture
def eddy(settings, io_loop):
    service = Eddy(settings, storage=FlakyFeed(open_storage(settings.storage)))
    io_loop.run_sync(service.start)
    yield service
    io_loop.run_sync(service.stop)


@pytest.mark.gen_test(timeout=60)
async def test_feed_outage_watcher_backs_off_and_catches_up(http_server, http_port, eddy, settings):
    other = open_storage(settings.storage)  # another Eddy process on the same file
    await other.open()
    token = make_token("viewer")
    client = await joined(http_port, token, "orders")
    draft = lambda n: EventDraft("acme", "orders", "created", {"n": n})  # noqa: E731
    published = [await other.append(draft(n)) for n in range(3)]
    delivered = [(await client.recv_type("event"))["id"] for _ in range(3)]

    eddy.storage.down = True
    during = [await other.append(draft(n)) for n in range(3, 23)]
    published += during
    await asyncio.sleep(0.3)
    assert eddy.storage.failures == 1 and eddy.watcher.failures >= 1
    ready = json_of(await http(http_port, "GET", "/readyz"))
    assert ready["checks"]["watcher"].startswith("retrying") and ready["checks"]["storage"].startswith("unavailable")
    assert (await client.request({"type": "ping"}))["type"] == "pong"

    eddy.storage.down = False
    delivered += [(await client.recv_type("event", timeout=10))["id"] for _ in range(20)]
    assert await client.no_frame_within(0.3)
    expected = [e.id for e in published]
    assert summary(len(published), delivered, expected) == (0, 0)
    assert delivered == expected  # in commit order
    assert (await http(http_port, "GET", "/readyz")).code == 200
    await other.close()


# kill -9 while publishers and subscribers run ----------------------------------------

@pytest.mark.gen_test(timeout=120)
async def test_kill_9_then_restart_clients_resume_with_exactly_the_stored_events(tmp_path):
    storage = f"sqlite:///{tmp_path}/crash.db"
    server = EddyProcess(tmp_path, storage)
    server.wait_ready()
    port = server.port
    token = make_token("crash")
    rng = random.Random(7)
    target, stop = 300, asyncio.Event()
    acknowledged: set[str] = set()
    received: dict[int, list[str]] = {i: [] for i in range(3)}
    reconnects = 0

    async def publisher() -> None:
        """Publishes 0..target-1, retrying each (same idempotency key) until acknowledged."""
        for n in range(target):
            while True:
                try:
                    response = await http(port, "POST", "/api/events", {
                        "channel": "orders", "event": "created", "data": {"n": n}, "idempotency_key": f"n-{n}"},
                        token)
                except Exception:  # refused or cut off by the kill: not acknowledged, so retried
                    response = None
                if response is not None and response.code == 201:
                    acknowledged.add(json_of(response)["id"])
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(rng.uniform(0, 0.01))

    async def subscriber(index: int) -> None:
        nonlocal reconnects
        mine = received[index]
        while not (stop.is_set() and len(mine) >= len(acknowledged)):
            try:
                client = await joined(port, token, "orders", since={"orders": mine[-1]} if mine else None)
                while True:
                    frame = await client.recv(timeout=2)
                    if frame["type"] == "event":
                        mine.append(frame["id"])
                    if stop.is_set() and len(mine) >= len(acknowledged):
                        return
            except Exception:  # refused while the server is down, dropped by the kill, timed out
                reconnects += 1
                await asyncio.sleep(0.1)

    subscribers = [asyncio.ensure_future(subscriber(i)) for i in range(3)]
    await asyncio.sleep(0.5)
    publishing = asyncio.ensure_future(publisher())
    while len(acknowledged) < 100:
        await asyncio.sleep(0.01)
    server.process.kill()  # SIGKILL: no shutdown, no reconnect frame, in the middle of everything
    server.process.wait(10)
    await asyncio.sleep(0.5)
    restarted = EddyProcess(tmp_path, storage, port=port)
    try:
        restarted.wait_ready()
        await asyncio.wait_for(publishing, 60)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*subscribers), 30)
        page = json_of(await http(port, "GET", "/api/channels/orders/events?after=0&limit=1000", token=token))
    finally:
        restarted.stop()
        server.stop()
    expected = [e["id"] for e in page["events"]]
    assert sorted(e["data"]["n"] for e in page["events"]) == list(range(target))  # each stored exactly once
    assert set(expected) == acknowledged
    for index, ids in received.items():
        assert summary(target, ids, expected) == (0, 0), f"subscriber {index}"
        assert ids == expected
    print(f"reconnects={reconnects}")
    assert reconnects >= 3  # every subscriber lost its server once
