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
import contextlib
import logging
import socket
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

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
    with pytest.raises(ValueError, match="feed_lease=0.0"):
        MongoStorage(f"mongodb://localhost:{mongo.port}/eddytest?feed_lease=0")


def test_only_the_mongo_backend_imports_a_driver():
    import ast
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    offenders = []
    for path in sorted(p for package in ("service", "handlers", "storage") for p in (root / package).rglob("*.py")):
        if path == root / "storage" / "mongo.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            offenders += [f"{path.relative_to(root)}: {n}" for n in names if n.split(".")[0] in {"pymongo", "motor", "bson"}]
    assert offenders == []
    # Motor is imported only when a URL asks for it.
    check = "import sys; from storage.mongo import MongoStorage; MongoStorage('mongodb://h/db'); print('motor' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], cwd=root, capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


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


def app_change(n: int, operation: str = "insert", coll: str = "tickets", **fields) -> dict:
    """Change ``n`` of the application's collections, with resume token ``app-000n``."""
    return {"_id": {"_data": f"app-{n:04d}"}, "operationType": operation, "ns": {"db": "eddytest", "coll": coll},
            "documentKey": {"_id": n}, **fields}


async def take_lease(mongo: MockMongo, token: dict | None, term: int = 1) -> dict:
    """Answer the feed's lease request as a free lease; returns the request's command document."""
    request = await mongo.receive("findAndModify")
    assert request.doc["findAndModify"] == "eddy_checkpoints" and request.doc["upsert"] is True
    holder = request.doc["update"][0]["$set"]["holder"]
    # Free when it is ours or its time (on the server's clock) has passed; the term grows when it changes hands.
    assert request.doc["query"]["$or"] == [{"holder": holder}, {"$expr": {"$lte": ["$until", "$$NOW"]}}]
    assert request.doc["update"][0]["$set"]["until"] == {"$add": ["$$NOW", 10_000]}
    value = {"_id": request.doc["query"]["_id"], "holder": holder, "term": term}
    request.reply({"value": {**value, "token": token} if token else value})
    return request.doc


@pytest.mark.gen_test(timeout=30)
async def test_application_changes_become_events_once_resuming_from_the_checkpoint(mongo, store):
    mappings = [{"collection": "tickets", "operation": "update", "event": "ticket.completed",
                 "channel": "tickets", "tenant_field": "empresaId", "when": {"status": "Completed"}}]
    await store.follow_collections(mappings)
    lease = await take_lease(mongo, token={"_data": "app-0041"}, term=3)
    aggregate = await mongo.receive("aggregate")
    stage = aggregate.doc["pipeline"][0]["$changeStream"]
    assert aggregate.doc["aggregate"] == 1  # the whole database: one stream for every mapped collection
    assert stage["startAfter"] == {"_data": "app-0041"} and stage["fullDocument"] == "updateLookup"
    assert aggregate.doc["pipeline"][1] == {"$match": {"ns.coll": {"$in": ["tickets"]},
                                                        "operationType": {"$in": ["update"]}}}
    ticket = {"_id": ObjectId(), "empresaId": 7, "status": "Completed", "plate": "ABC1D23"}
    completed = {**app_change(42, "update"), "documentKey": {"_id": ticket["_id"]}, "fullDocument": ticket,
                 "updateDescription": {"updatedFields": {"status": "Completed"}, "removedFields": []}}
    aggregate.reply(cursor([completed], first=True, namespace="eddytest.$cmd.aggregate"))
    insert, _ = await commit_transaction(mongo, 50, expect_find=True)
    (document,) = insert.doc["documents"]
    assert (document["tenant"], document["channel"], document["event"]) == ("7", "tickets", "ticket.completed")
    assert document["data"] == {"_id": str(ticket["_id"]), "empresaId": 7, "status": "Completed", "plate": "ABC1D23"}
    assert document["idempotency_key"].endswith("app-0042")  # the same on every instance: stored once
    # After the append committed: the checkpoint, written only while this instance holds the lease (and extending it).
    (saved,) = (await mongo.receive("update")).doc["updates"]
    assert saved["q"] == {"_id": "collections:tickets", "holder": lease["update"][0]["$set"]["holder"], "term": 3}
    (stage,) = saved["u"]
    assert stage["$set"]["token"] == {"$literal": {"_data": "app-0042"}}
    assert stage["$set"]["until"] == {"$add": ["$$NOW", 10_000]}


@pytest.mark.gen_test(timeout=30)
async def test_deletes_carry_the_pre_image_and_missing_pre_images_are_reported_once(mongo, store, caplog):
    caplog.set_level(logging.INFO, "eddy.storage.mongo")
    mappings = [{"collection": coll, "operation": "delete", "event": f"{coll}.gone", "channel": coll + ":{loja}",
                 "tenant_field": "empresaId", "tenant": "default"} for coll in ("pedidos", "carrinhos")]
    mappings.append({"collection": "tickets", "operation": "insert", "event": "ticket.created", "channel": "tickets",
                     "tenant": "parking"})
    await store.follow_collections(mappings)
    check = await mongo.receive("listCollections")  # only collections mapped for deletes need pre-images
    assert check.doc["filter"] == {"name": {"$in": ["carrinhos", "pedidos"]}}
    check.reply(cursor([{"name": "pedidos", "type": "collection",
                         "options": {"changeStreamPreAndPostImages": {"enabled": True}}},
                        {"name": "carrinhos", "type": "collection", "options": {}}],
                       first=True, cursor_id=0, namespace="eddytest.$cmd.listCollections"))
    await take_lease(mongo, token=None)
    # The first stream fails; the feed starts again, without repeating the start-up check.
    (await mongo.receive("aggregate")).command_err(code=2, errmsg="BadValue")
    await take_lease(mongo, token=None)
    aggregate = await mongo.receive("aggregate")
    assert aggregate.doc["pipeline"][0]["$changeStream"]["fullDocumentBeforeChange"] == "whenAvailable"
    order = {"_id": 9, "empresaId": 7, "loja": "centro", "total": 42}
    deleted = {**app_change(9, "delete", "pedidos"), "fullDocumentBeforeChange": order}
    aggregate.reply(cursor([deleted], first=True, namespace="eddytest.$cmd.aggregate"))
    insert, _ = await commit_transaction(mongo, 60, expect_find=True)
    (document,) = insert.doc["documents"]
    assert (document["tenant"], document["channel"], document["event"]) == ("7", "pedidos:centro", "pedidos.gone")
    assert document["data"] == order
    (await mongo.receive("update")).reply({"n": 1, "nModified": 1})
    warnings = [r.getMessage() for r in caplog.records if "pre-images" in r.getMessage()]
    assert warnings == ["collection carrinhos has no pre-images: its delete events carry only the document key. "
                        'Enable them with: db.runCommand({collMod: "carrinhos", changeStreamPreAndPostImages: '
                        "{enabled: true}})"]


# Two instances, one collection feed: the lease and its takeover -----------------------------------------------


def evaluate(expression, document: dict, now: datetime):
    """An aggregation expression, as the server evaluates the few operators the lease uses."""
    if isinstance(expression, str):
        if expression == "$$NOW":
            return now
        return document.get(expression[1:]) if expression.startswith("$") else expression
    if isinstance(expression, list):
        return [evaluate(e, document, now) for e in expression]
    if not isinstance(expression, dict):
        return expression
    if len(expression) != 1 or not next(iter(expression)).startswith("$"):
        return {k: evaluate(v, document, now) for k, v in expression.items()}
    ((operator, argument),) = expression.items()
    if operator == "$literal":
        return argument
    values = evaluate(argument, document, now)
    if operator == "$add":
        times = [v for v in values if isinstance(v, datetime)]
        milliseconds = sum(v for v in values if not isinstance(v, datetime))
        return times[0] + timedelta(milliseconds=milliseconds) if times else milliseconds
    if operator == "$ifNull":
        return next((v for v in values if v is not None), None)
    if operator == "$eq":
        return values[0] == values[1]
    if operator == "$lte":  # null sorts before every date
        return values[0] is None or (values[1] is not None and values[0] <= values[1])
    if operator == "$cond":
        return values[1] if values[0] else values[2]
    raise AssertionError(f"operator {operator} not expected")


def matches(query: dict, document: dict, now: datetime) -> bool:
    """Equality, ``$or`` and ``$expr``: the query language the lease and checkpoint writes use."""
    for field, wanted in query.items():
        if field == "$or":
            if not any(matches(q, document, now) for q in wanted):
                return False
        elif field == "$expr":
            if not evaluate(wanted, document, now):
                return False
        elif document.get(field) != wanted:
            return False
    return True


def updated(update, document: dict, now: datetime) -> dict:
    if isinstance(update, list):  # an update pipeline of $set stages
        for stage in update:
            ((name, fields),) = stage.items()
            assert name == "$set", stage
            document = {**document, **{k: evaluate(v, document, now) for k, v in fields.items()}}
        return document
    assert set(update) == {"$unset"}, update
    return {k: v for k, v in document.items() if k not in update["$unset"]}


class SharedReplicaSet:
    """One replica set's state behind several mockupdb endpoints (one per Eddy instance).

    It answers what the collection feed and its appends send, the way the
    server would: lease and checkpoint writes with their queries and update
    pipelines evaluated on the server's clock, transactions applied at commit
    (with the unique idempotency index), and the database change stream over
    ``changes``. A *frozen* instance gets no answer at all, as when its
    process hangs or its network drops: its requests are held.
    """

    def __init__(self, driver: str) -> None:
        self.driver = driver
        self.lock = threading.RLock()
        self.changes: list[dict] = []
        self.events: list[dict] = []
        self.seq = 0
        self.checkpoint: dict | None = None
        #: (instance, term, monotonic time) of every lease taken; refused attempts per instance.
        self.grants: list[tuple[str, int, float]] = []
        self.refused: Counter[str] = Counter()
        #: (instance, startAfter token) of every change stream opened.
        self.streams: list[tuple[str, dict | None]] = []
        self.frozen_at: dict[str, float] = {}
        self.held: dict[str, list] = {}
        #: (instance, n, "before" or "after"): freeze that instance at its n-th commitTransaction.
        self.freeze_at_commit: tuple[str, int, str] | None = None
        self.unexpected: list[dict] = []
        self._commits: Counter[str] = Counter()
        self._transactions: dict[tuple, dict] = {}
        self._cursors: dict[int, int] = {}
        self.endpoints: list[MockMongo] = []

    def endpoint(self, instance: str) -> MockMongo:
        mongo = MockMongo(self.driver)
        mongo.server.autoresponds(lambda request: self.answer(instance, request))
        self.endpoints.append(mongo)
        return mongo

    def add_changes(self, *numbers: int) -> None:
        with self.lock:
            self.changes.extend(app_change(n, fullDocument={"_id": n, "plate": f"P{n}"}) for n in numbers)

    def thaw(self, instance: str) -> None:
        with self.lock:
            del self.frozen_at[instance]
            for request in self.held.pop(instance, []):
                self.answer(instance, request)

    def answer(self, instance: str, request) -> bool:
        if request.command_name in ("ismaster", "isMaster", "hello"):
            return False  # the endpoint's own hello responder
        with self.lock:
            if instance in self.frozen_at:
                self.held.setdefault(instance, []).append(request)
                return True
            handler = getattr(self, "on_" + request.command_name, None)
            if handler is None:
                self.unexpected.append(request.doc)
                request.command_err(code=59, errmsg=f"no such command {request.command_name}")
            else:
                handler(instance, request, datetime.now(UTC))
            return True

    def on_findAndModify(self, instance, request, now) -> None:
        doc = request.doc
        if doc["findAndModify"] == "eddy_counters":
            transaction = self._transaction(doc)
            transaction["inc"] += doc["update"]["$inc"]["seq"]
            request.reply({"value": {"_id": "events", "seq": self.seq + transaction["inc"]}})
            return
        assert doc["findAndModify"] == "eddy_checkpoints" and doc["upsert"], doc
        current = self.checkpoint
        if current is not None and not matches(doc["query"], current, now):
            self.refused[instance] += 1  # the upsert collides with the existing document
            request.command_err(code=11000, errmsg="E11000 duplicate key error collection: eddytest.eddy_checkpoints")
            return
        self.checkpoint = updated(doc["update"], current or {"_id": doc["query"]["_id"]}, now)
        if current is None or current.get("term") != self.checkpoint["term"]:
            self.grants.append((instance, self.checkpoint["term"], time.monotonic()))
        request.reply({"value": self.checkpoint})

    def on_update(self, instance, request, now) -> None:
        (statement,) = request.doc["updates"]
        assert request.doc["update"] == "eddy_checkpoints", request.doc
        hit = self.checkpoint is not None and matches(statement["q"], self.checkpoint, now)
        if hit:
            self.checkpoint = updated(statement["u"], self.checkpoint, now)
        request.reply({"n": int(hit), "nModified": int(hit)})

    def on_find(self, instance, request, now) -> None:
        assert request.doc["find"] == "eddy_events", request.doc
        found = [e for e in self.events if matches(request.doc["filter"], e, now)]
        request.reply(cursor(found, first=True, cursor_id=0))

    def on_insert(self, instance, request, now) -> None:
        self._transaction(request.doc)["inserts"].extend(request.doc["documents"])
        request.reply({"n": len(request.doc["documents"])})

    def on_commitTransaction(self, instance, request, now) -> None:
        self._commits[instance] += 1
        rule = self.freeze_at_commit
        if rule is not None and rule[:2] == (instance, self._commits[instance]) and rule[2] == "before":
            self.frozen_at[instance] = time.monotonic()
            self.held[instance] = [request]
            return
        transaction = self._transactions.pop(self._key(request.doc), {"inc": 0, "inserts": []})
        keys = {e.get("idempotency_key") for e in self.events}
        if any(d.get("idempotency_key") in keys for d in transaction["inserts"]):
            request.command_err(code=11000, errmsg="E11000 duplicate key error index: idempotency")
            return
        self.seq += transaction["inc"]
        self.events.extend(transaction["inserts"])
        request.reply({})
        if rule is not None and rule[:2] == (instance, self._commits[instance]):
            self.frozen_at[instance] = time.monotonic()

    def on_abortTransaction(self, instance, request, now) -> None:
        self._transactions.pop(self._key(request.doc), None)
        request.ok()

    def on_aggregate(self, instance, request, now) -> None:
        stage = request.doc["pipeline"][0]["$changeStream"]
        token = stage.get("startAfter") or stage.get("resumeAfter")
        tokens = [c["_id"] for c in self.changes]
        start = tokens.index(token) + 1 if token is not None else len(self.changes)
        self.streams.append((instance, token))
        cursor_id = 100 + len(self.streams)
        self._cursors[cursor_id] = len(self.changes)
        request.reply(cursor(self.changes[start:], first=True, cursor_id=cursor_id,
                             namespace="eddytest.$cmd.aggregate"))

    def on_getMore(self, instance, request, now) -> None:
        cursor_id = request.doc["getMore"]
        if self._cursors[cursor_id] == len(self.changes):  # nothing new: answer after maxTimeMS, as a server does
            threading.Timer(request.doc.get("maxTimeMS", 50) / 1000, self._more, (instance, request)).start()
        else:
            self._more(instance, request)

    def _more(self, instance, request) -> None:
        with self.lock:
            if instance in self.frozen_at:
                self.held.setdefault(instance, []).append(request)
                return
            cursor_id = request.doc["getMore"]
            batch, self._cursors[cursor_id] = self.changes[self._cursors[cursor_id]:], len(self.changes)
            with contextlib.suppress(OSError):  # the instance has closed this connection meanwhile
                request.reply(cursor(batch, cursor_id=cursor_id, namespace="eddytest.$cmd.aggregate"))

    def on_killCursors(self, instance, request, now) -> None:
        request.ok()

    on_endSessions = on_createIndexes = on_killCursors

    def _key(self, doc: dict) -> tuple:
        return bytes(doc["lsid"]["id"]), doc["txnNumber"]

    def _transaction(self, doc: dict) -> dict:
        return self._transactions.setdefault(self._key(doc), {"inc": 0, "inserts": []})


async def eventually(condition, timeout: float = STEP) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


LEASE = 1.0


@pytest.mark.parametrize("frozen", ["after", "before"])
@pytest.mark.gen_test(timeout=60)
async def test_a_standby_takes_over_the_collection_feed_from_a_silent_holder(driver, frozen, caplog):
    caplog.set_level(logging.INFO, "eddy.storage.mongo")
    rs = SharedReplicaSet(driver)
    mappings = [{"collection": "tickets", "operation": "insert", "event": "ticket.created", "channel": "tickets",
                 "tenant": "parking"}]
    instances = {name: MongoStorage(rs.endpoint(name).url + f"&feed_lease={LEASE}") for name in ("a", "b")}
    try:
        for store in instances.values():  # a first: it takes the lease, b stands by
            async with asyncio.timeout(STEP):
                await store.open()
                await store.follow_collections(mappings)
            await eventually(lambda: rs.streams)
        await eventually(lambda: rs.refused["b"] >= 2)
        rs.add_changes(1, 2, 3)
        await eventually(lambda: len(rs.events) == 3 and rs.checkpoint["token"] == {"_data": "app-0003"})
        # a stops answering at change 4: with its transaction in flight, or committed but not yet checkpointed.
        rs.freeze_at_commit = ("a", 4, frozen)
        rs.add_changes(4)
        await eventually(lambda: "a" in rs.frozen_at)
        rs.add_changes(5, 6)
        await eventually(lambda: rs.checkpoint["holder"] != instances["a"].collection_follower.lease.holder
                         and rs.checkpoint.get("token") == {"_data": "app-0006"}, timeout=4 * LEASE + STEP)

        assert [(name, term) for name, term, _ in rs.grants] == [("a", 1), ("b", 2)]
        # b waited for a's lease to run out on the server's clock, then a third of it at most (and slack for a busy box).
        assert rs.grants[1][2] - rs.frozen_at["a"] < LEASE * 4 / 3 + 2.0
        assert rs.streams == [("a", None), ("b", {"_data": "app-0003"})]  # b resumed from a's last checkpoint
        keys = [f"change:tickets:insert:ticket.created:app-{n:04d}" for n in range(1, 7)]
        assert [(e["position"], e["idempotency_key"]) for e in rs.events] == list(enumerate(keys, 1))  # none lost, none twice
        assert [e["data"] for e in rs.events] == [{"_id": n, "plate": f"P{n}"} for n in range(1, 7)]

        # a wakes up: its held request is answered now; it moves nothing and stands by.
        refused = rs.refused["a"]
        rs.thaw("a")
        await eventually(lambda: rs.refused["a"] > refused and instances["a"].collection_follower.lease.term is None)
        assert rs.checkpoint["holder"] == instances["b"].collection_follower.lease.holder
        assert rs.checkpoint["token"] == {"_data": "app-0006"} and len(rs.events) == 6 and rs.seq == 6
        if frozen == "after":  # its checkpoint write matched nothing: it knows the lease has moved
            assert any("passed to another instance" in r.getMessage() for r in caplog.records)
        assert not rs.unexpected
    finally:
        for name in list(rs.frozen_at):  # a frozen instance would wait forever for its closing requests' answers
            rs.thaw(name)
        for store in instances.values():
            async with asyncio.timeout(STEP):
                await store.close()
        for endpoint in rs.endpoints:
            endpoint.stop()


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
