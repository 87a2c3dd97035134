"""SQLite specifics: group commit, another process's appends and how they wake the feed, a locked database."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from pathlib import Path

import pytest

from storage import EventDraft, RecordRefused, StorageUnavailable, open_storage

ROOT = Path(__file__).resolve().parent.parent

APPENDER = """
import asyncio, sys
from storage import EventDraft, open_storage
from storage.doorbell import Doorbell
if "--no-ring" in sys.argv:  # a process that commits and never rings: the wake-up path is broken
    Doorbell.ring = lambda self: None
async def main(url, count):
    store = open_storage(url)
    await store.open()
    for n in range(count):
        await store.append(EventDraft("acme", "orders", "remote", {"n": n}))
    await store.close()
asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path}/eddy.db"


@pytest.mark.gen_test
async def test_concurrent_appends_share_transactions(url):
    store = open_storage(url)
    await store.open()
    before = store.transactions
    events = await asyncio.gather(*(store.append(EventDraft("t", "c", "e", {"n": n})) for n in range(100)))
    assert len({e.position for e in events}) == 100
    assert store.transactions - before < 100 / 4  # group commit batched them
    await store.close()


def nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.gen_test
async def test_one_bad_record_never_fails_its_neighbours_in_a_group_commit(url):
    """Issue 15 (High): data nested ~300 deep failed every write batched with it (another tenant's too)."""
    store = open_storage(url)
    await store.open()
    before = store.transactions
    results = await asyncio.gather(
        *(store.append(EventDraft("other", "c", "e", {"n": n})) for n in range(20)),
        store.append(EventDraft("attacker", "c", "e", nested(300))),
        store.schedule(EventDraft("attacker", "c", "e", nested(300)), 0.0),
        *(store.append(EventDraft("other", "c", "e", {"n": n})) for n in range(20, 40)),
        return_exceptions=True,
    )
    assert store.transactions - before < 10  # they did share transactions
    assert all(isinstance(r, RecordRefused) for r in results[20:22]), results[20:22]
    good = results[:20] + results[22:]
    assert not any(isinstance(r, BaseException) for r in good), good
    page = await store.history("other", "c", limit=100)
    assert [e.data["n"] for e in page.events] == list(range(40))
    assert (await store.history("attacker", "c")).events == [] and await store.scheduled("attacker") == []
    await store.close()


@pytest.mark.gen_test(timeout=60)
async def test_watch_sees_another_process_appends(url):
    store = open_storage(url)
    await store.open()
    start = await store.last_position()
    feed = store.watch(start)
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", APPENDER, url, "50", cwd=ROOT,
                                                 env={"PYTHONPATH": str(ROOT)})
    received = []
    async def take():
        async for event in feed:
            received.append(event)
            if len(received) == 50:
                return
    await asyncio.wait_for(take(), 30)
    assert await asyncio.wait_for(child.wait(), 30) == 0
    assert [e.data["n"] for e in received] == list(range(50))
    assert all(e.event == "remote" for e in received)
    await feed.aclose()
    await store.close()


async def remote_appends(url: str, store, count: int, *flags: str) -> list:
    """Append ``count`` events from another process; return the events ``store.watch`` yields (10 s at most)."""
    feed = store.watch(await store.last_position())
    received = []

    async def take():
        async for event in feed:
            received.append(event)
            if len(received) == count:
                return

    taking = asyncio.ensure_future(take())
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", APPENDER, url, str(count), *flags, cwd=ROOT,
                                                 env={"PYTHONPATH": str(ROOT)})
    assert await asyncio.wait_for(child.wait(), 30) == 0
    try:
        await asyncio.wait_for(taking, 10)
    finally:
        await feed.aclose()
    return received


@pytest.mark.parametrize("options, flags, inotify", [
    ("safety_poll=600", (), True),  # only the doorbell can wake this feed
    ("safety_poll=0.5", ("--no-ring",), True),  # the ring is missed: the safety poll still finds the events
    ("safety_poll=600&poll_interval=0.01", ("--no-ring",), False),  # no inotify here: the feed polls fast
], ids=["the-doorbell-wakes-the-feed", "a-missed-ring-is-caught-by-the-safety-poll", "without-inotify-it-polls"])
@pytest.mark.gen_test(timeout=60)
async def test_another_process_commit_reaches_the_feed(url, monkeypatch, options, flags, inotify):
    if not inotify:
        monkeypatch.setattr("storage.doorbell.INotify", None)
    store = open_storage(f"{url}?{options}")
    await store.open()
    received = await remote_appends(url, store, 3, *flags)
    assert [e.data["n"] for e in received] == [0, 1, 2]
    await store.close()


@pytest.mark.gen_test(timeout=30)
async def test_an_idle_feed_does_not_read_the_file(url, monkeypatch):
    store = open_storage(url + "?safety_poll=600")
    await store.open()
    reads = []
    original = store._feed_after
    monkeypatch.setattr(store, "_feed_after", lambda after: reads.append(after) or original(after))
    feed = store.watch(await store.last_position())
    waiting = asyncio.ensure_future(feed.__anext__())
    await asyncio.sleep(0.5)
    assert len(reads) == 1  # the first read, then nothing until a commit
    event = await store.append(EventDraft("acme", "orders", "local"))
    assert (await asyncio.wait_for(waiting, 5)).position == event.position  # a local commit wakes it at once
    await feed.aclose()
    await store.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_local_commit_reaches_the_feed_without_a_read_and_a_gap_is_read(url, tmp_path, monkeypatch):
    """The writer hands this process's watchers what it committed: no read before it, one after (its own ring).
    Another process's commit in between is found by reading the file, in position order."""
    store = open_storage(url + "?safety_poll=600")
    await store.open()
    reads = []
    original = store._feed_after
    monkeypatch.setattr(store, "_feed_after", lambda after: reads.append(after) or original(after))
    batches: list[tuple[int, list]] = []  # (reads so far, batch), taken as a watcher does: at once, in a loop

    async def consume() -> None:
        async for batch in store.watch_batches(await store.last_position()):
            batches.append((len(reads), batch))

    consumer = asyncio.ensure_future(consume())
    await asyncio.sleep(0.2)
    assert len(reads) == 1
    local = await store.append(EventDraft("acme", "orders", "local", {"n": [1, 2.5, "três"]}, meta={"by": "me"}))
    await asyncio.sleep(0.3)
    ((reads_before, (handed,)),) = batches
    assert reads_before == 1  # no read before it
    assert len(reads) == 2  # one after it, for its own ring
    assert handed == (await store.history("acme", "orders")).events[-1]  # as a read of the file returns it
    assert handed.position == local.position and handed.data is not local.data
    # Another process commits (and does not ring), then this one: the hand-off would skip a position.
    other = sqlite3.connect(tmp_path / "eddy.db", isolation_level=None)
    other.execute("INSERT INTO events (tenant, channel, event, data, timestamp) VALUES ('acme', 'orders', "
                  "'remote', '{}', 0)")
    other.close()
    after_gap = await store.append(EventDraft("acme", "orders", "local-2"))
    await asyncio.sleep(0.3)
    received = [event for _, batch in batches[1:] for event in batch]
    assert [e.event for e in received] == ["remote", "local-2"] and received[-1].position == after_gap.position
    consumer.cancel()
    await store.close()


@pytest.mark.gen_test(timeout=30)
async def test_locked_database_is_unavailable_then_recovers(url, tmp_path, io_loop):
    store = open_storage(url + "?busy_timeout=0.2")
    await store.open()
    await store.append(EventDraft("t", "c", "before"))
    blocker = sqlite3.connect(tmp_path / "eddy.db", isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN EXCLUSIVE")
    with pytest.raises(StorageUnavailable):
        await store.append(EventDraft("t", "c", "during"))
    blocker.execute("ROLLBACK")
    blocker.close()
    after = await store.append(EventDraft("t", "c", "after"))
    page = await store.history("t", "c")
    assert [e.event for e in page.events] == ["before", "after"]
    assert after.position == page.events[-1].position
    await store.close()


def test_url_must_name_a_file():
    for bad in ("sqlite://", "sqlite:///", "sqlite:///:memory:"):
        with pytest.raises(ValueError):
            open_storage(bad)


@pytest.mark.gen_test
async def test_trim_counters_are_bounded_and_a_forgotten_channel_is_trimmed(url, monkeypatch):
    """Issue 15 (Low): per-channel counters were never freed; bounded, a channel whose counter goes is trimmed."""
    import storage.sqlite

    monkeypatch.setattr(storage.sqlite, "TRIMMED_CHANNELS", 5)
    store = open_storage(url, history_size=50)
    await store.open()
    for n in range(60):  # trimmed to 50 at the 50th append, then 10 more: 60 kept until the next trim
        await store.append(EventDraft("t", "busy", "e", {"n": n}))
    for channel in range(10):
        await store.append(EventDraft("t", f"c{channel}", "e", None))
    assert len(store._appends_since_trim) == 5
    for _ in range(100):
        page = await store.history("t", "busy", limit=100)
        if len(page.events) == 50:
            break
        await asyncio.sleep(0.02)
    assert [e.data["n"] for e in page.events] == list(range(10, 60)) and page.lost
    await store.close()


@pytest.mark.parametrize("query, level", [("", 2), ("?synchronous=full", 2), ("?synchronous=normal", 1)])
@pytest.mark.gen_test
async def test_synchronous_is_full_unless_asked(url, query, level):
    store = open_storage(url + query)
    await store.open()
    assert store._writer.execute("PRAGMA synchronous").fetchone()[0] == level  # 2 FULL, 1 NORMAL
    await store.close()


def test_synchronous_takes_full_or_normal_only(url):
    with pytest.raises(ValueError, match="synchronous"):
        open_storage(url + "?synchronous=off")


@pytest.mark.gen_test
async def test_a_check_for_due_events_takes_the_write_lock_only_when_one_is_due(url):
    """The scheduler asks four times a second; with nothing due, the check is a read (no write transaction, so no
    write lock taken from the other processes on the file)."""
    import time

    store = open_storage(url)
    await store.open()
    try:
        later = await store.schedule(EventDraft("acme", "orders", "later", {}), time.time() + 3600)
        before = store.transactions
        for _ in range(3):
            assert await store.claim_due("me", time.time(), 30, 10) == []
        assert store.transactions == before
        due = await store.schedule(EventDraft("acme", "orders", "due", {}), time.time() - 1)
        claimed = await store.claim_due("me", time.time(), 30, 10)
        assert [item.id for item in claimed] == [due.id] and later.id != due.id
        assert store.transactions == before + 2  # the schedule, then the claim
        assert await store.claim_due("other", time.time(), 30, 10) == []  # claimed: leased to "me"
    finally:
        await store.close()
