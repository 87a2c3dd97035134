"""One contract suite, run against every storage backend.

memory and SQLite (a real file) always; MongoDB when EDDY_TEST_MONGODB_URI points at a replica set.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid

import pytest

from storage import EventDraft, StorageError, open_storage, publication_key
from storage.base import EventLog
from tests.support import MONGODB_KINDS, mongodb_test_url

BACKENDS = ["memory", "sqlite", *MONGODB_KINDS]


@pytest.fixture(params=BACKENDS)
def make_storage(request, tmp_path, io_loop):
    """A factory: ``await make_storage(history_size=..., history_ttl=...)`` → an opened store, closed after the test."""
    opened = []

    def url() -> str:
        if request.param == "memory":
            return "memory://"
        if request.param == "sqlite":
            return f"sqlite:///{tmp_path}/contract.db"
        return mongodb_test_url(request.param)

    async def make(**options):
        store = open_storage(url(), **options)
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        io_loop.run_sync(store.close)


def draft(n: int = 0, tenant: str = "acme", channel: str = "orders", **kwargs) -> EventDraft:
    return EventDraft(tenant=tenant, channel=channel, event="n", data={"n": n}, **kwargs)


async def collect(iterator, count: int, timeout: float = 5.0) -> list:
    async def take():
        out = []
        async for item in iterator:
            out.append(item)
            if len(out) == count:
                return out
        return out
    return await asyncio.wait_for(take(), timeout)


@pytest.mark.gen_test
async def test_positions_grow_and_ids_are_positions(make_storage):
    store = await make_storage()
    start = await store.last_position()
    before = time.time()
    events = [await store.append(draft(n)) for n in range(5)]
    positions = [e.position for e in events]
    assert positions == sorted(positions) and len(set(positions)) == 5 and positions[0] > start
    assert all(e.id == str(e.position) for e in events)
    assert all(before - 1 <= e.timestamp <= time.time() + 1 for e in events)
    assert await store.last_position() == positions[-1]


@pytest.mark.gen_test
async def test_data_round_trips(make_storage):
    store = await make_storage()
    values = [None, 0, -1.5, "ação ✓ 日本", [1, [2, {"x": None}]], {"nested": {"deep": [True, False]}}]
    for value in values:
        await store.append(EventDraft("t", "c", "v", value))
    page = await store.history("t", "c", limit=10)
    assert [e.data for e in page.events] == values
    assert all(e.event == "v" and e.channel == "c" and e.tenant == "t" for e in page.events)


@pytest.mark.gen_test
async def test_history_is_per_tenant_and_channel_and_pages(make_storage):
    store = await make_storage()
    mine = [await store.append(draft(n)) for n in range(5)]
    await store.append(draft(99, tenant="globex"))
    await store.append(draft(98, channel="other"))
    await store.append(EventDraft("acme", "orders", "typing", None, ephemeral=True))
    page = await store.history("acme", "orders")
    assert [e.position for e in page.events] == [e.position for e in mine]
    assert page.lost is False
    assert [e.data["n"] for e in (await store.history("acme", "orders", after=mine[1].position, limit=2)).events] == [2, 3]
    assert (await store.history("acme", "orders", after=mine[-1].position)).events == []
    assert [e.data["n"] for e in (await store.history("globex", "orders")).events] == [99]
    assert (await store.history("nobody", "orders")).events == []


@pytest.mark.gen_test
async def test_trimming_by_size_reports_lost(make_storage):
    store = await make_storage(history_size=3)
    events = [await store.append(draft(n)) for n in range(8)]
    for _ in range(100):  # backends may trim off the hot path
        page = await store.history("acme", "orders", after=events[0].position)
        if page.lost:
            break
        await asyncio.sleep(0.02)
    # Eight events in a channel that keeps three: the oldest are gone, and history says so.
    # (A backend may keep a few more than three between its trims, never the oldest ones.)
    kept = [e.data["n"] for e in page.events]
    assert page.lost is True and kept[0] > 1, kept
    assert kept == list(range(kept[0], 8))  # what is kept is the newest, without a hole
    latest = await store.history("acme", "orders", after=events[-2].position)
    assert latest.lost is False and [e.data["n"] for e in latest.events] == [7]


@pytest.mark.gen_test
async def test_size_trim_eventually_marks_lost(make_storage):
    store = await make_storage(history_size=2)
    events = [await store.append(draft(n)) for n in range(250)]
    page = await store.history("acme", "orders", after=events[0].position)
    assert page.lost is True
    assert [e.data["n"] for e in page.events][-2:] == [248, 249]
    assert (await store.history("acme", "orders", after=events[-3].position)).lost is False


@pytest.mark.gen_test
async def test_expired_events_are_not_returned(make_storage):
    store = await make_storage(history_ttl=0.3)
    old = await store.append(draft(1))
    await asyncio.sleep(0.5)
    new = await store.append(draft(2))
    page = await store.history("acme", "orders")
    assert [e.position for e in page.events] == [new.position]
    assert page.lost is True  # something after 0 expired
    assert (await store.history("acme", "orders", after=old.position)).lost is False


@pytest.mark.gen_test
async def test_idempotency_key(make_storage):
    store = await make_storage()
    first = await store.append(draft(1, idempotency_key="k1"))
    again = await store.append(draft(2, idempotency_key="k1"))
    other_tenant = await store.append(draft(3, tenant="globex", idempotency_key="k1"))
    assert again == first and again.data == {"n": 1}
    assert other_tenant.position != first.position
    assert len((await store.history("acme", "orders")).events) == 1
    both = await asyncio.gather(*(store.append(draft(n, idempotency_key="race")) for n in range(10)))
    assert len({e.position for e in both}) == 1


@pytest.mark.gen_test
async def test_watch_replays_then_follows_live_in_order(make_storage):
    store = await make_storage()
    start = await store.last_position()
    existing = [await store.append(draft(n)) for n in range(3)]
    feed = store.watch(start)
    first = await collect(feed, 3)
    assert [e.position for e in first] == [e.position for e in existing]

    async def produce():
        await asyncio.sleep(0.05)
        await store.append(draft(10, tenant="globex"))
        await store.append(EventDraft("acme", "orders", "typing", {"u": 1}, ephemeral=True))
        await store.append(draft(11))

    producer = asyncio.ensure_future(produce())
    live = await collect(feed, 3)
    await producer
    assert [(e.tenant, e.ephemeral) for e in live] == [("globex", False), ("acme", True), ("acme", False)]
    assert [e.position for e in live] == sorted(e.position for e in live)
    await feed.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_concurrent_appends_reach_two_watchers_exactly_once(make_storage):
    store = await make_storage()
    start = await store.last_position()
    feeds = [store.watch(start), store.watch(start)]
    readers = [asyncio.ensure_future(collect(feed, 200, timeout=20)) for feed in feeds]
    stored = await asyncio.gather(*(store.append(draft(n, channel=f"c{n % 7}")) for n in range(200)))
    first, second = await asyncio.gather(*readers)
    positions = [e.position for e in first]
    assert positions == sorted(e.position for e in stored)
    assert len(set(positions)) == 200
    assert [e.position for e in second] == positions
    for feed in feeds:
        await feed.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_watch_batches_is_the_feed_in_groups(make_storage):
    """The same events as watch, in order, each once; events stored before the read come as one group where the
    backend reads its feed in batches (SQLite), one at a time otherwise."""
    store = await make_storage()
    start = await store.last_position()
    stored = await asyncio.gather(*(store.append(draft(n, channel=f"c{n % 3}")) for n in range(30)))
    feed = store.watch_batches(start)
    groups = []
    while sum(map(len, groups)) < 30:
        groups.append(await asyncio.wait_for(feed.__anext__(), 5))
    assert [e.position for group in groups for e in group] == sorted(e.position for e in stored)
    assert all(groups)
    if type(store).watch_batches is not EventLog.watch_batches:  # a backend that reads its feed in batches
        assert len(groups) == 1
    await feed.aclose()


@pytest.mark.gen_test
async def test_close_ends_a_pending_watch_and_later_calls_fail(make_storage):
    store = await make_storage()
    feed = store.watch(await store.last_position())
    pending = asyncio.ensure_future(feed.__anext__())
    await asyncio.sleep(0.05)
    await store.close()
    with pytest.raises((StorageError, StopAsyncIteration)):
        await asyncio.wait_for(pending, 5)
    with pytest.raises(StorageError):
        await store.append(draft())
    with pytest.raises(StorageError):
        await store.history("acme", "orders")


@pytest.mark.gen_test
async def test_reopen_keeps_durable_events(make_storage, request):
    if "memory" in request.node.name:
        pytest.skip("memory:// is not durable by design")
    store = await make_storage()
    stored = [await store.append(draft(n, channel=f"durable-{uuid.uuid4().hex[:6]}")) for n in range(3)]
    await store.close()
    await store.open()
    page = await store.history("acme", stored[0].channel)
    assert [e.position for e in page.events] == [stored[0].position]
    after = await store.append(draft(9))
    assert after.position > stored[-1].position


@pytest.mark.gen_test
async def test_presence_entries_expire_and_are_scoped(make_storage):
    from storage import PresenceEntry

    store = await make_storage()
    now = time.time()
    await store.save_presence([
        PresenceEntry("acme", "room", "ana", "c1", "online", now + 60),
        PresenceEntry("acme", "room", "ana", "c2", "away", now + 60),
        PresenceEntry("acme", "room", "bia", "c3", "online", now + 0.2),
        PresenceEntry("globex", "room", "zed", "c4", "online", now + 60),
    ])
    entries = await store.presence("acme", "room")
    assert sorted((e.user_id, e.connection_id, e.status) for e in entries) == [
        ("ana", "c1", "online"), ("ana", "c2", "away"), ("bia", "c3", "online")]
    await store.save_presence([PresenceEntry("acme", "room", "ana", "c2", "busy", now + 60)])  # replace
    await store.remove_presence("c1", [("acme", "room")])
    await asyncio.sleep(0.3)
    entries = await store.presence("acme", "room")
    assert [(e.connection_id, e.status) for e in entries] == [("c2", "busy")]  # bia expired
    assert [e.user_id for e in await store.presence("globex", "room")] == ["zed"]


@pytest.mark.gen_test
async def test_read_receipts_keep_the_newest_per_user(make_storage):
    from storage import ReadReceipt

    store = await make_storage()
    await store.save_read("acme", "conv", ReadReceipt("ana", "10", 1.0))
    await store.save_read("acme", "conv", ReadReceipt("bia", "11", 2.0))
    await store.save_read("acme", "conv", ReadReceipt("ana", "12", 3.0))
    await store.save_read("globex", "conv", ReadReceipt("zed", "1", 1.0))
    reads = sorted(await store.reads("acme", "conv"), key=lambda r: r.user_id)
    assert [(r.user_id, r.message_id, r.read_at) for r in reads] == [("ana", "12", 3.0), ("bia", "11", 2.0)]
    assert [r.user_id for r in await store.reads("globex", "conv")] == ["zed"]


@pytest.mark.gen_test
async def test_scheduled_events_claims_leases_and_cancel(make_storage):
    store = await make_storage()
    now = time.time()
    later = await store.schedule(draft(1), now + 60)
    due_second = await store.schedule(draft(2), now - 1)
    due_first = await store.schedule(draft(3), now - 2)
    other_tenant = await store.schedule(draft(4, tenant="globex"), now - 3)
    assert [i.id for i in await store.scheduled("acme")] == [due_first.id, due_second.id, later.id]
    assert [i.id for i in await store.scheduled("acme", "nowhere")] == []

    claimed = await store.claim_due("a", now, lease=0.3, limit=2)
    assert [i.id for i in claimed] == [other_tenant.id, due_first.id]  # oldest due first, any tenant
    assert claimed[1].draft.data == {"n": 3}
    assert [i.id for i in await store.claim_due("b", now, lease=30, limit=10)] == [due_second.id]
    assert await store.cancel_scheduled("acme", due_first.id) is False  # being published by "a"
    assert await store.cancel_scheduled("globex", due_second.id) is None  # not that tenant's
    await asyncio.sleep(0.35)  # "a" died: its lease ran out
    retaken = await store.claim_due("c", time.time(), lease=30, limit=10)
    assert [i.id for i in retaken] == [other_tenant.id, due_first.id]
    await store.complete_scheduled([i.id for i in retaken])
    assert [i.id for i in await store.scheduled("acme")] == [due_second.id, later.id]
    assert await store.cancel_scheduled("acme", later.id) is True
    assert await store.cancel_scheduled("acme", later.id) is None
    # A retried schedule with the same idempotency key is stored once.
    first = await store.schedule(draft(5, idempotency_key="remind-42"), now + 600)
    again = await store.schedule(draft(5, idempotency_key="remind-42"), now + 600)
    assert first.id == again.id
    assert len([i for i in await store.scheduled("acme") if i.id == first.id]) == 1
    # Once its publication commits, an event is no longer listed, even before it is completed.
    await store.append(dataclasses.replace(first.draft, idempotency_key=publication_key(first.id)))
    assert first.id not in [i.id for i in await store.scheduled("acme")]


@pytest.mark.gen_test
async def test_scheduled_pages_lookups_counts_and_parking(make_storage):
    store = await make_storage()
    now = time.time()
    items = [await store.schedule(draft(n), now + 60 + n) for n in range(5)]
    await store.schedule(draft(9, tenant="globex"), now + 1)
    first = await store.scheduled("acme", limit=2)
    assert [i.id for i in first] == [i.id for i in items[:2]]
    rest = await store.scheduled("acme", after=(first[-1].deliver_at, first[-1].id), limit=10)
    assert [i.id for i in rest] == [i.id for i in items[2:]]
    assert (await store.get_scheduled("acme", items[0].id)).draft.data == {"n": 0}
    assert await store.get_scheduled("globex", items[0].id) is None
    assert await store.count_scheduled("acme") == 5 and await store.count_scheduled("globex") == 1
    # A parked event is never claimed again, stays listed, and can be cancelled.
    bad = await store.schedule(draft(7), now - 10)
    assert [i.id for i in await store.claim_due("a", now, lease=0.01, limit=10)] == [bad.id]
    await store.park_scheduled([bad.id])
    await asyncio.sleep(0.02)
    assert await store.claim_due("b", time.time(), lease=30, limit=10) == []
    assert bad.id in [i.id for i in await store.scheduled("acme")]
    assert await store.cancel_scheduled("acme", bad.id) is True


EVERY_FIELD = EventDraft(tenant="acme", channel="desk:7", event="ticket.moved", data={"n": [1, {"ok": True}]},
                         idempotency_key="k-7", ephemeral=True, meta={"late": False, "late_ms": 3})


def test_every_field_of_a_draft_is_covered():
    """The round-trip tests below name every field; a new EventDraft field must be added to EVERY_FIELD."""
    unset = [f.name for f in dataclasses.fields(EventDraft) if getattr(EVERY_FIELD, f.name) == f.default]
    assert unset == []


@pytest.mark.gen_test
@pytest.mark.parametrize("ephemeral", [True, False])
async def test_every_draft_field_round_trips_through_append_history_and_watch(make_storage, ephemeral):
    store = await make_storage()
    draft_in = dataclasses.replace(EVERY_FIELD, ephemeral=ephemeral)
    feed = store.watch(await store.last_position())
    stored = await store.append(draft_in)
    [watched] = await collect(feed, 1)
    kept = (await store.history("acme", "desk:7")).events
    assert kept == ([] if ephemeral else [stored])  # ephemeral events never reach history
    for event in (stored, watched, *kept):
        assert {f.name: getattr(event, f.name) for f in dataclasses.fields(EventDraft)} \
            == dataclasses.asdict(draft_in), event


@pytest.mark.gen_test
@pytest.mark.parametrize("ephemeral", [True, False])
async def test_every_draft_field_round_trips_through_scheduling(make_storage, ephemeral):
    """Issue 15: a scheduled event of a `history = false` channel lost `ephemeral` (SQLite, MongoDB)."""
    store = await make_storage()
    draft_in = dataclasses.replace(EVERY_FIELD, ephemeral=ephemeral)
    item = await store.schedule(draft_in, time.time() - 1)
    assert (await store.get_scheduled("acme", item.id)).draft == draft_in
    assert [i.draft for i in await store.scheduled("acme")] == [draft_in]
    [claimed] = await store.claim_due("me", time.time(), lease=30, limit=10)
    assert claimed.draft == draft_in


@pytest.mark.gen_test
async def test_the_epoch_is_kept_by_the_store_and_new_for_a_new_store(make_storage, request, tmp_path):
    store = await make_storage()
    epoch = await store.epoch()
    assert isinstance(epoch, str) and 0 < len(epoch) <= 32
    assert await store.epoch() == epoch
    if request.node.callspec.params["make_storage"] == "sqlite":
        await store.close()
        reopened = await make_storage()  # the same file
        assert await reopened.epoch() == epoch
    fresh = open_storage("memory://")
    await fresh.open()
    assert await fresh.epoch() != epoch
