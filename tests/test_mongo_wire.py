"""MongoDB backend at the wire level: the real drivers, through our code, against mockupdb.

No MongoDB server runs on these machines; mockupdb speaks the wire protocol
and lets each test see and answer every command the driver sends. Each test
plays the server's part of one scenario: the transaction an append sends,
the change stream the watcher opens, a resume after a network error, and a
recovery after the stream's history is lost.

Every test runs on both drivers: PyMongo's asyncio client (the default) and
Motor (``?driver=motor``). PyMongo's client runs on the event loop itself (no
thread pool), so mockupdb's blocking ``receives()`` always waits in an
executor thread while the loop keeps driving the client.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest
from bson import ObjectId, Timestamp
from mockupdb import Matcher, MockupDB

from storage import EventDraft, StorageUnavailable
from storage.mongo import CollectionMapping, MongoStorage

#: Commands answered with a plain ok without the test looking at them.
ROUTINE = {"createIndexes", "endSessions", "killCursors", "abortTransaction"}
STEP = 5.0


class MockMongo:
    """A mockupdb server posing as the primary of replica set rs0, reached through one driver."""

    def __init__(self, driver: str = "pymongo") -> None:
        self.driver = driver
        self.server = MockupDB(max_wire_version=21)
        self.port = self.server.run()
        host = f"localhost:{self.port}"
        primary = {"ismaster": True, "isWritablePrimary": True, "helloOk": True, "setName": "rs0", "hosts": [host],
                   "me": host, "primary": host, "minWireVersion": 0, "maxWireVersion": 21,
                   "logicalSessionTimeoutMinutes": 30, "maxBsonObjectSize": 16 * 1024 * 1024,
                   "maxMessageSizeBytes": 48_000_000, "maxWriteBatchSize": 100_000}
        for name in ("ismaster", "isMaster", "hello"):
            self.server.autoresponds(name, primary)
        self.server.autoresponds(Matcher(), lambda request: request.command_name in ROUTINE and request.ok())

    @property
    def url(self) -> str:
        return f"mongodb://localhost:{self.port}/eddytest?replicaSet=rs0&max_await_ms=50&driver={self.driver}"

    async def receive(self, command: str):
        """The next request; it must be ``command`` (mockupdb blocks, so it waits in a thread)."""
        loop = asyncio.get_running_loop()
        request = await asyncio.wait_for(loop.run_in_executor(None, lambda: self.server.receives(timeout=STEP)),
                                         STEP + 1)
        assert request.command_name == command, f"expected {command}, got {request.command_name}: {request.doc}"
        return request

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(params=["pymongo", "motor"])
def driver(request) -> str:
    return request.param


@pytest.fixture
def mongo(driver):
    server = MockMongo(driver)
    yield server
    server.stop()


@pytest.fixture
def store(mongo, io_loop):
    storage = MongoStorage(mongo.url)
    io_loop.run_sync(storage.open)
    yield storage
    io_loop.run_sync(storage.close)


def stored(position: int, channel: str = "orders", **extra) -> dict:
    return {"_id": position, "position": position, "tenant": "acme", "channel": channel, "event": "created",
            "timestamp": 1_700_000_000.0 + position, "ephemeral": False, "data": {"n": position}, **extra}


def change(position: int) -> dict:
    return {"_id": {"_data": f"token-{position:04d}"}, "operationType": "insert",
            "ns": {"db": "eddytest", "coll": "eddy_events"}, "documentKey": {"_id": position},
            "fullDocument": stored(position)}


def cursor(batch: list, first: bool = False, cursor_id: int = 42, namespace: str = "eddytest.eddy_events") -> dict:
    # A replica set stamps every answer with its operation time; change streams need it.
    return {"cursor": {"id": cursor_id, "ns": namespace, "firstBatch" if first else "nextBatch": batch},
            "operationTime": Timestamp(1_700_000_000, 1)}


async def watching_after_event_1(mongo: MockMongo, store: MongoStorage):
    """A feed from position 0 that has opened its stream, caught up (nothing) and handed over event 1."""
    feed = store.watch(after=0)
    first = asyncio.ensure_future(feed.__anext__())
    (await mongo.receive("aggregate")).reply(cursor([], first=True))
    (await mongo.receive("find")).reply(cursor([], first=True, cursor_id=0))
    (await mongo.receive("getMore")).reply(cursor([change(1)]))
    assert (await asyncio.wait_for(first, STEP)).position == 1
    return feed


async def commit_transaction(mongo: MockMongo, seq: int, *, expect_find: bool = False, found: list | None = None):
    """Play the server's side of one append transaction; returns the insert request."""
    if expect_find:
        find = await mongo.receive("find")
        assert find.doc["startTransaction"] is True and find.doc["readConcern"] == {"level": "snapshot"}
        find.reply(cursor(found or [], first=True, cursor_id=0))
    counter = await mongo.receive("findAndModify")
    counter.reply({"value": {"_id": "events", "seq": seq}})
    insert = await mongo.receive("insert")
    insert.reply({"n": len(insert.docs[0]["documents"]) if insert.docs else 1})
    commit = await mongo.receive("commitTransaction")
    assert commit.doc["writeConcern"] == {"w": "majority"}
    commit.reply({})
    return insert, counter


def test_the_driver_is_chosen_by_the_url(mongo, store, driver):
    # PyMongo's own asyncio client unless the URL asks for Motor; our option never reaches the driver.
    expected = {"pymongo": "pymongo.asynchronous.", "motor": "motor."}[driver]
    assert type(store._client).__module__.startswith(expected)
    assert "driver=" not in store.url and MongoStorage(mongo.url.replace(f"&driver={driver}", "")).driver.name == "pymongo"
    with pytest.raises(ValueError, match="driver='mongoengine'"):
        MongoStorage(f"mongodb://localhost:{mongo.port}/eddytest?driver=mongoengine")


@pytest.mark.gen_test(timeout=30)
async def test_append_is_one_transaction_numbering_from_the_counter(mongo, store):
    appended = asyncio.ensure_future(store.append(EventDraft("acme", "orders", "created", {"n": 1, "big": 2**62})))
    counter = await mongo.receive("findAndModify")
    assert counter.doc["findAndModify"] == "eddy_counters"
    assert counter.doc["update"] == {"$inc": {"seq": 1}} and counter.doc["upsert"] is True
    assert counter.doc["startTransaction"] is True and counter.doc["autocommit"] is False
    counter.reply({"value": {"_id": "events", "seq": 7}})
    insert = await mongo.receive("insert")
    assert insert.doc["insert"] == "eddy_events" and insert.doc["txnNumber"] == counter.doc["txnNumber"]
    (document,) = insert.doc["documents"]
    assert document["_id"] == document["position"] == 7
    assert {k: document[k] for k in ("tenant", "channel", "event", "ephemeral", "data")} == {
        "tenant": "acme", "channel": "orders", "event": "created", "ephemeral": False,
        "data": {"n": 1, "big": 2**62}}
    assert document["expire_at"].timestamp() > document["timestamp"] + store.history_ttl  # TTL backstop
    insert.reply({"n": 1})
    commit = await mongo.receive("commitTransaction")
    assert commit.doc["writeConcern"] == {"w": "majority"} and commit.doc["txnNumber"] == counter.doc["txnNumber"]
    commit.reply({})
    event = await asyncio.wait_for(appended, STEP)
    assert (event.position, event.id, event.data) == (7, "7", {"n": 1, "big": 2**62})


@pytest.mark.gen_test(timeout=30)
async def test_concurrent_appends_share_one_transaction_and_keys_are_checked_inside_it(mongo, store):
    drafts = [EventDraft("acme", "orders", "e", {"n": n}, idempotency_key=f"k{n % 2}") for n in range(3)] + [
        EventDraft("acme", "orders", "e", {"n": 9}, ephemeral=True)]
    appended = asyncio.ensure_future(asyncio.gather(*(store.append(d) for d in drafts)))
    # k1 was stored by an earlier request: its event comes back, nothing new for it.
    earlier = stored(3, idempotency_key="k1")
    insert, counter = await commit_transaction(mongo, 12, expect_find=True, found=[earlier])
    assert counter.doc["update"] == {"$inc": {"seq": 2}}  # k0 once (drafts 0 and 2) and the ephemeral one
    documents = insert.doc["documents"]
    assert [d["position"] for d in documents] == [11, 12]
    assert documents[0]["idempotency_key"] == "k0" and documents[1]["ephemeral"] is True
    assert documents[1]["expire_at"].timestamp() == pytest.approx(documents[1]["timestamp"] + 60, abs=0.01)
    events = await asyncio.wait_for(appended, STEP)
    assert [e.position for e in events] == [11, 3, 11, 12]
    assert store.transactions == 1


@pytest.mark.gen_test(timeout=30)
async def test_watch_opens_the_stream_then_catches_up_then_follows_it(mongo, store):
    feed = store.watch(after=5)
    first = asyncio.ensure_future(feed.__anext__())
    aggregate = await mongo.receive("aggregate")
    stage, match = aggregate.doc["pipeline"]
    assert "$changeStream" in stage and "resumeAfter" not in stage["$changeStream"]
    assert match == {"$match": {"operationType": "insert"}}
    aggregate.reply(cursor([], first=True))
    catch_up = await mongo.receive("find")  # after the stream is open: nothing can fall between the two
    assert catch_up.doc["filter"] == {"position": {"$gt": 5}} and catch_up.doc["sort"] == {"position": 1}
    catch_up.reply(cursor([stored(6), stored(7)], first=True, cursor_id=0))
    assert (await asyncio.wait_for(first, STEP)).position == 6
    assert (await asyncio.wait_for(feed.__anext__(), STEP)).position == 7
    following = asyncio.ensure_future(feed.__anext__())
    more = await mongo.receive("getMore")
    assert more.doc["maxTimeMS"] == 50  # short waits: latency, not throughput
    more.reply(cursor([change(7), change(8)]))  # 7 again: the seam between catch-up and stream
    event = await asyncio.wait_for(following, STEP)
    assert (event.position, event.data, event.channel) == (8, {"n": 8}, "orders")
    # An idle stream: the counter says whether something committed that the stream has not shown yet.
    idle = asyncio.ensure_future(feed.__anext__())
    (await mongo.receive("getMore")).reply(cursor([]))
    (await mongo.receive("find")).reply(cursor([{"_id": "events", "seq": 9}], first=True, cursor_id=0))
    fill = await mongo.receive("find")
    assert fill.doc["filter"] == {"position": {"$gt": 8}}
    fill.reply(cursor([stored(9)], first=True, cursor_id=0))
    assert (await asyncio.wait_for(idle, STEP)).position == 9
    await feed.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_a_hole_in_positions_is_filled_from_the_collection(mongo, store):
    feed = store.watch(after=8)
    first = asyncio.ensure_future(feed.__anext__())
    (await mongo.receive("aggregate")).reply(cursor([], first=True))
    (await mongo.receive("find")).reply(cursor([], first=True, cursor_id=0))
    (await mongo.receive("getMore")).reply(cursor([change(10)]))
    fill = await mongo.receive("find")
    assert fill.doc["filter"] == {"position": {"$gt": 8, "$lt": 10}}
    fill.reply(cursor([stored(9)], first=True, cursor_id=0))
    assert (await asyncio.wait_for(first, STEP)).position == 9
    assert (await asyncio.wait_for(feed.__anext__(), STEP)).position == 10
    await feed.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_network_error_mid_stream_resumes_with_the_last_token(mongo, store):
    feed = await watching_after_event_1(mongo, store)
    second = asyncio.ensure_future(feed.__anext__())
    (await mongo.receive("getMore")).hangup()  # the connection drops mid-stream
    resumed = await mongo.receive("aggregate")
    assert resumed.doc["pipeline"][0]["$changeStream"]["resumeAfter"] == {"_data": "token-0001"}
    resumed.reply(cursor([change(2)], first=True, cursor_id=43))
    event = await asyncio.wait_for(second, STEP)
    assert event.position == 2
    await feed.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_a_new_watch_from_where_the_last_stopped_reuses_its_token(mongo, store):
    feed = await watching_after_event_1(mongo, store)
    broken = asyncio.ensure_future(feed.__anext__())
    # Not resumable by the driver: the watch ends with StorageUnavailable and the watcher calls watch again.
    (await mongo.receive("getMore")).command_err(code=2, errmsg="BadValue")
    with pytest.raises(StorageUnavailable):
        await asyncio.wait_for(broken, STEP)
    again = store.watch(after=1)
    step = asyncio.ensure_future(again.__anext__())
    aggregate = await mongo.receive("aggregate")
    assert aggregate.doc["pipeline"][0]["$changeStream"]["resumeAfter"] == {"_data": "token-0001"}
    aggregate.reply(cursor([], first=True))
    (await mongo.receive("find")).reply(cursor([], first=True, cursor_id=0))
    (await mongo.receive("getMore")).reply(cursor([change(2)]))
    assert (await asyncio.wait_for(step, STEP)).position == 2
    await again.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_history_lost_is_recovered_from_the_collection_and_logged(mongo, store, caplog):
    caplog.set_level(logging.WARNING, "eddy.storage.mongo")
    feed = await watching_after_event_1(mongo, store)
    recovered = asyncio.ensure_future(feed.__anext__())
    (await mongo.receive("getMore")).command_err(code=286, errmsg="ChangeStreamHistoryLost")
    reopened = await mongo.receive("aggregate")
    assert "resumeAfter" not in reopened.doc["pipeline"][0]["$changeStream"]  # the token is useless now
    reopened.reply(cursor([], first=True, cursor_id=44))
    catch_up = await mongo.receive("find")
    assert catch_up.doc["filter"] == {"position": {"$gt": 1}}
    catch_up.reply(cursor([stored(2), stored(3)], first=True, cursor_id=0))
    assert (await asyncio.wait_for(recovered, STEP)).position == 2
    assert (await asyncio.wait_for(feed.__anext__(), STEP)).position == 3
    assert any("code 286" in r.getMessage() and "after position 1" in r.getMessage() for r in caplog.records)
    await feed.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_history_reads_the_channel_after_a_position_and_reports_trims(mongo, store):
    page = asyncio.ensure_future(store.history("acme", "orders", after=4, limit=2))
    find = await mongo.receive("find")
    assert find.doc["filter"]["position"] == {"$gt": 4} and find.doc["filter"]["ephemeral"] is False
    assert find.doc["limit"] == 2 and find.doc["sort"] == {"position": 1}
    find.reply(cursor([stored(5), stored(6)], first=True, cursor_id=0))
    trimmed = await mongo.receive("find")
    assert trimmed.doc["find"] == "eddy_trimmed"
    trimmed.reply(cursor([{"_id": "acme\x00orders", "through": 4}], first=True, cursor_id=0))
    (await mongo.receive("find")).reply(cursor([], first=True, cursor_id=0))  # nothing expired
    result = await asyncio.wait_for(page, STEP)
    assert [e.position for e in result.events] == [5, 6] and result.lost is False


@pytest.mark.gen_test(timeout=30)
async def test_claims_are_conditional_updates(mongo, store):
    claim = asyncio.ensure_future(store.claim_due("worker-a", 1000.0, 30.0, 5))
    request = await mongo.receive("findAndModify")
    assert request.doc["query"] == {"deliver_at": {"$lte": 1000.0}, "claimed_until": {"$lte": 1000.0}}
    assert request.doc["update"] == {"$set": {"owner": "worker-a", "claimed_until": 1030.0}}
    request.reply({"value": {"_id": "s1", "tenant": "acme", "channel": "tickets", "event": "ticket.expiringSoon",
                             "data": {"id": 1}, "deliver_at": 999.0, "created_at": 900.0}})
    (await mongo.receive("findAndModify")).reply({"value": None})  # nothing else is due
    (item,) = await asyncio.wait_for(claim, STEP)
    assert (item.id, item.draft.event, item.draft.data) == ("s1", "ticket.expiringSoon", {"id": 1})


@pytest.mark.gen_test(timeout=30)
async def test_a_refused_connection_is_storage_unavailable(driver):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    storage = MongoStorage(f"mongodb://localhost:{port}/eddytest?replicaSet=rs0&serverSelectionTimeoutMS=300"
                           f"&driver={driver}")
    with pytest.raises(StorageUnavailable):
        await storage.open()


@pytest.mark.gen_test(timeout=30)
async def test_application_changes_become_events_once_resuming_from_the_checkpoint(mongo, store):
    mappings = [{"collection": "tickets", "operation": "update", "event": "ticket.completed",
                 "channel": "tickets", "tenant_field": "empresaId", "when": {"status": "Completed"}}]
    await store.follow_collections(mappings)
    checkpoint = await mongo.receive("find")
    assert checkpoint.doc["find"] == "eddy_checkpoints"
    checkpoint.reply(cursor([{"_id": "collections:tickets", "token": {"_data": "app-0041"}}], first=True, cursor_id=0))
    aggregate = await mongo.receive("aggregate")
    stage = aggregate.doc["pipeline"][0]["$changeStream"]
    assert aggregate.doc["aggregate"] == 1  # the whole database: one stream for every mapped collection
    assert stage["startAfter"] == {"_data": "app-0041"} and stage["fullDocument"] == "updateLookup"
    assert aggregate.doc["pipeline"][1] == {"$match": {"ns.coll": {"$in": ["tickets"]},
                                                        "operationType": {"$in": ["update"]}}}
    ticket = {"_id": ObjectId(), "empresaId": 7, "status": "Completed", "plate": "ABC1D23"}
    completed = {"_id": {"_data": "app-0042"}, "operationType": "update", "ns": {"db": "eddytest", "coll": "tickets"},
                 "documentKey": {"_id": ticket["_id"]}, "fullDocument": ticket,
                 "updateDescription": {"updatedFields": {"status": "Completed"}, "removedFields": []}}
    aggregate.reply(cursor([completed], first=True, namespace="eddytest.$cmd.aggregate"))
    insert, _ = await commit_transaction(mongo, 50, expect_find=True)
    (document,) = insert.doc["documents"]
    assert (document["tenant"], document["channel"], document["event"]) == ("7", "tickets", "ticket.completed")
    assert document["data"] == {"_id": str(ticket["_id"]), "empresaId": 7, "status": "Completed", "plate": "ABC1D23"}
    assert document["idempotency_key"].endswith("app-0042")  # the same on every instance: stored once
    saved = await mongo.receive("update")
    assert saved.doc["updates"][0]["u"]["$set"]["token"] == {"_data": "app-0042"}
    saved.reply({"n": 1})


def test_collection_mappings_for_the_seed_documents():
    created = CollectionMapping.from_table({"collection": "tickets", "operation": "insert", "event": "ticket.created",
                                           "channel": "tickets", "tenant": "parking"})
    completed = CollectionMapping.from_table({"collection": "tickets", "operation": "update", "channel": "tickets",
                                             "event": "ticket.completed", "tenant": "parking",
                                             "when": {"status": "Completed"}})
    cancelled = CollectionMapping.from_table({"collection": "pedidos", "operation": "delete", "channel": "pedidos",
                                             "event": "pedido_cancelado", "tenant_field": "loja", "tenant": "x"})
    ns = {"db": "app", "coll": "tickets"}
    insert = {"_id": {"_data": "1"}, "operationType": "insert", "ns": ns, "fullDocument": {"_id": 1, "status": "Open"}}
    renamed = {"_id": {"_data": "2"}, "operationType": "update", "ns": ns, "fullDocument": {"_id": 1, "status": "Open"},
               "updateDescription": {"updatedFields": {"plate": "X"}}}
    done = {**renamed, "_id": {"_data": "3"}, "updateDescription": {"updatedFields": {"status": "Completed"}}}
    assert created.draft_for(insert).event == "ticket.created" and created.draft_for(done) is None
    assert completed.draft_for(renamed) is None  # status did not become Completed
    assert completed.draft_for(done).event == "ticket.completed"
    gone = {"_id": {"_data": "4"}, "operationType": "delete", "ns": {"db": "app", "coll": "pedidos"},
            "documentKey": {"_id": 5}}
    draft = cancelled.draft_for(gone)  # no pre-image: the fixed tenant and the document key
    assert (draft.tenant, draft.event, draft.data) == ("x", "pedido_cancelado", {"_id": 5})
    with pytest.raises(ValueError, match="operation"):
        CollectionMapping.from_table({"collection": "t", "operation": "upsert", "event": "e", "channel": "c",
                                      "tenant": "t"})
    with pytest.raises(ValueError, match="tenant"):
        CollectionMapping.from_table({"collection": "t", "operation": "insert", "event": "e", "channel": "c"})


def test_the_documented_collection_mappings_are_valid():
    import re
    import tomllib
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "MONGODB.md").read_text()
    (block,) = re.findall(r"```toml\n(.*?)```", text, re.S)
    tables = tomllib.loads(block)["collections"]
    assert [CollectionMapping.from_table(t).event for t in tables] == [
        "ticket.created", "ticket.completed", "pedido_cancelado"]
