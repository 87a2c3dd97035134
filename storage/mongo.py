"""MongoDB storage: the production backend and the scale-out path.

Every Eddy instance watches the same ``events`` collection through a change
stream, so an event inserted by any instance reaches every socket on every
instance. The driver stays behind this module: PyMongo's own asyncio client
(``pymongo.AsyncMongoClient``) by default, Motor with ``?driver=motor`` in the
storage URL for deployments pinned to it. The few calls where the two differ
live in :class:`Driver` and :class:`MotorDriver`; everything else is written
once against the API they share.

Positions
    A client resuming with ``since`` gets history "after position p", so
    positions must grow in *commit* order across every writer, or a client
    could read past an event that commits later with a smaller position.
    ObjectIds and client clocks do not give that. Here every batch of appends
    is one transaction that increments a single counter document and inserts
    the events numbered from it. Two writers touching the counter conflict,
    and MongoDB retries the loser after the winner committed, so positions are
    handed out in commit order and are *dense*: 1, 2, 3, ... with no holes
    (an aborted transaction gives its numbers back). Density is what makes the
    change feed checkable: when the stream shows position p, every position
    below p has committed and can be read from the collection.

Change feed
    ``watch(after)`` opens the change stream first, then reads the collection
    after ``after`` (the catch-up), then follows the stream, skipping positions
    it has handed over and filling any hole from the collection. When the
    stream is idle it compares the counter with the last position handed over,
    so nothing waits for the next insert to be noticed. After a network error
    the driver resumes with the last resume token; a new ``watch`` from the
    position the last one reached reuses that token; a lost token
    (``ChangeStreamHistoryLost``, code 286) or an invalidated stream is
    recovered from the collection by position and logged.

Writes are group-committed: appends made while a transaction is in flight
go together in the next one, so a burst costs a few transactions, not one
per event.

Application collections (``[[collections]]``) become events on one instance
at a time: the holder of a lease kept in the store (:class:`FeedLease`),
which another instance takes over when the holder goes silent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import bson
import orjson
from bson.objectid import ObjectId
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, ReturnDocument
from pymongo.errors import DuplicateKeyError, OperationFailure, PyMongoError
from pymongo.read_concern import ReadConcern
from pymongo.write_concern import WriteConcern

from .base import (
    EPHEMERAL_TTL,
    PARKED_OWNER,
    PARKED_UNTIL,
    Event,
    EventDraft,
    History,
    PresenceEntry,
    ReadReceipt,
    ScheduledEvent,
    Storage,
    StorageError,
    StorageUnavailable,
    new_epoch,
    publication_key,
    scheduled_id_for,
)

log = logging.getLogger("eddy.storage.mongo")

#: Error codes after which a change stream cannot be resumed from its token.
HISTORY_LOST = 286
FATAL_STREAM_ERRORS = {HISTORY_LOST, 280, 260}
#: Most appends one transaction carries.
BATCH_LIMIT = 500
#: Seconds between sweeps for events past their age.
SWEEP_INTERVAL = 30.0
#: Trim a channel by size after this many appends to it in this process.
TRIM_EVERY = 100
#: The TTL index removes events on its own this long after the sweep should have (a backstop).
TTL_BACKSTOP = 3600.0
#: Options of ours in the URL, removed before the driver sees it.
OWN_OPTIONS = {"eddy_prefix", "max_await_ms", "transaction_timeout", "driver", "feed_lease"}
_COUNTER_ID = "events"
_EPOCH_ID = "epoch"


@contextmanager
def driver_errors() -> Iterator[None]:
    """The driver's failures (network, server selection, server errors) as :class:`StorageUnavailable`."""
    try:
        yield
    except PyMongoError as exc:
        raise StorageUnavailable(f"MongoDB unavailable: {exc}") from exc


class Driver:
    """PyMongo's asyncio API (``AsyncMongoClient``): the default driver.

    Only the calls where Motor differs are here: how a client is made and
    closed, how a session starts, and the two calls (``watch``, ``aggregate``)
    that PyMongo awaits and Motor returns at once. Collections, cursors,
    sessions and change streams are otherwise used the same way on both.
    """

    name: ClassVar[str] = "pymongo"

    def client(self, url: str, **options: Any) -> Any:
        return AsyncMongoClient(url, **options)

    async def close(self, client: Any) -> None:
        await client.close()

    async def session(self, client: Any) -> Any:
        """A session, to be entered with ``async with``."""
        return client.start_session()

    async def watch(self, target: Any, pipeline: list[Any], **options: Any) -> Any:
        """An open change stream on a collection or database, to be entered with ``async with``."""
        return await target.watch(pipeline, **options)

    async def aggregate(self, collection: Any, pipeline: list[Any]) -> Any:
        """A cursor over the pipeline's results, for ``async for``."""
        return await collection.aggregate(pipeline)


class MotorDriver(Driver):
    """Motor (``?driver=motor``): deprecated since 2025-05-14 in favour of PyMongo's asyncio API.

    Kept for deployments pinned to it while it gets fixes. Motor runs every
    call on a thread pool; its change stream opens when entered.
    """

    name = "motor"

    def client(self, url: str, **options: Any) -> Any:
        from motor.motor_asyncio import AsyncIOMotorClient  # imported only when chosen

        return AsyncIOMotorClient(url, **options)

    async def close(self, client: Any) -> None:
        client.close()

    async def session(self, client: Any) -> Any:
        return await client.start_session()

    async def watch(self, target: Any, pipeline: list[Any], **options: Any) -> Any:
        return target.watch(pipeline, **options)

    async def aggregate(self, collection: Any, pipeline: list[Any]) -> Any:
        return collection.aggregate(pipeline)


DRIVERS: dict[str, Driver] = {driver.name: driver for driver in (Driver(), MotorDriver())}


def _instant(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


def _key(*parts: str) -> str:
    return "\x00".join(parts)


def _encodable(data: Any) -> bool:
    try:
        bson.encode({"data": data})
        return True
    except (bson.errors.InvalidDocument, OverflowError, TypeError):
        return False


def _store_data(document: dict[str, Any], data: Any) -> None:
    """Data is kept as native BSON so the application can query it; JSON only when BSON cannot hold it."""
    if _encodable(data):
        document["data"] = data
    else:  # e.g. integers beyond 64 bits, or keys an older server refuses
        document["data_json"] = orjson.dumps(data).decode()


def _load_data(document: dict[str, Any]) -> Any:
    if "data_json" in document:
        return orjson.loads(document["data_json"])
    return document.get("data")


def _to_event(document: dict[str, Any]) -> Event:
    return Event(
        position=document["position"],
        tenant=document["tenant"],
        channel=document["channel"],
        event=document["event"],
        data=_load_data(document),
        timestamp=document["timestamp"],
        ephemeral=document.get("ephemeral", False),
        idempotency_key=document.get("idempotency_key"),
        meta=document.get("meta"),
    )


def _to_scheduled(document: dict[str, Any]) -> ScheduledEvent:
    draft = EventDraft(document["tenant"], document["channel"], document["event"], _load_data(document),
                       idempotency_key=document.get("idempotency_key"), ephemeral=document.get("ephemeral", False),
                       meta=document.get("meta"))
    return ScheduledEvent(document["_id"], draft, document["deliver_at"], document["created_at"])


class MongoStorage(Storage):
    """The storage contract on a MongoDB replica set (change streams need one)."""

    #: What follows the application's collections, once ``follow_collections`` started it.
    collection_follower: CollectionFollower | None = None

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(**options)
        parts = urlsplit(url)
        if parts.scheme not in ("mongodb", "mongodb+srv"):
            raise ValueError(f"expected mongodb://host/db?replicaSet=rs0, got {url!r}")
        ours = {k: v for k, v in parse_qsl(parts.query) if k in OWN_OPTIONS}
        theirs = [(k, v) for k, v in parse_qsl(parts.query) if k not in OWN_OPTIONS]
        self.url = urlunsplit(parts._replace(query=urlencode(theirs)))
        self.database_name = parts.path.lstrip("/") or "eddy"
        self.prefix = ours.get("eddy_prefix", "eddy_")
        #: How long one getMore of the change stream waits for new events: short, for latency.
        self.max_await_ms = int(ours.get("max_await_ms", 250))
        self.transaction_timeout = float(ours.get("transaction_timeout", 10.0))
        #: Seconds the collection-feed lease lasts without renewal: a dead holder is replaced within 4/3 of it.
        self.feed_lease = float(ours.get("feed_lease", 10.0))
        if not self.feed_lease > 0:
            raise ValueError(f"feed_lease={self.feed_lease} in the storage URL: expected a positive number of seconds")
        driver = ours.get("driver", "pymongo")
        if driver not in DRIVERS:
            raise ValueError(f"driver={driver!r} in the storage URL: expected one of {sorted(DRIVERS)}")
        self.driver = DRIVERS[driver]
        self.transactions = 0
        self._client: Any = None
        self._pending: list[tuple[EventDraft, asyncio.Future[Event]]] = []
        self._wake_writer = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._appends_since_trim: dict[tuple[str, str], int] = {}
        #: (position, resume token) where the last watch stopped: a new watch from there resumes the stream.
        self._resume: tuple[int, Any] | None = None
        self._epoch: str | None = None

    # Lifecycle -------------------------------------------------------------

    async def open(self) -> None:
        if self._client is not None:
            return
        # Fail fast when the server is gone (the driver's default waits 30 s); a URL option wins.
        timeout = {} if "serverselectiontimeoutms" in self.url.lower() else {"serverSelectionTimeoutMS": 5000}
        self._client = self.driver.client(self.url, tz_aware=True, **timeout)
        database = self._client[self.database_name]
        majority = WriteConcern("majority")
        self.events = database.get_collection(self.prefix + "events", write_concern=majority)
        self.counters = database.get_collection(self.prefix + "counters", write_concern=majority)
        self.trimmed = database.get_collection(self.prefix + "trimmed")
        self.presence_entries = database.get_collection(self.prefix + "presence")
        self.read_receipts = database.get_collection(self.prefix + "reads")
        self.schedule_entries = database.get_collection(self.prefix + "scheduled", write_concern=majority)
        self.checkpoints = database.get_collection(self.prefix + "checkpoints", write_concern=majority)
        try:
            await self._create_indexes()
        except PyMongoError as exc:
            await self.driver.close(self._client)
            self._client = None
            raise StorageUnavailable(f"MongoDB unavailable: {exc}") from exc
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._write_batches(), name="eddy-mongo-writer"),
                       loop.create_task(self._sweep_periodically(), name="eddy-mongo-sweeper")]

    async def _create_indexes(self) -> None:
        await self.events.create_index([("position", ASCENDING)], unique=True)
        await self.events.create_index([("tenant", ASCENDING), ("channel", ASCENDING), ("position", ASCENDING)],
                                       partialFilterExpression={"ephemeral": False}, name="history")
        await self.events.create_index([("tenant", ASCENDING), ("idempotency_key", ASCENDING)], unique=True,
                                       partialFilterExpression={"idempotency_key": {"$type": "string"}},
                                       name="idempotency")
        await self.events.create_index([("expire_at", ASCENDING)], expireAfterSeconds=0)
        await self.events.create_index([("timestamp", ASCENDING)], partialFilterExpression={"ephemeral": False},
                                       name="age")
        await self.presence_entries.create_index([("tenant", ASCENDING), ("channel", ASCENDING)])
        await self.presence_entries.create_index([("expire_at", ASCENDING)], expireAfterSeconds=0)
        await self.schedule_entries.create_index([("deliver_at", ASCENDING)])
        await self.schedule_entries.create_index(
            [("tenant", ASCENDING), ("channel", ASCENDING), ("deliver_at", ASCENDING)])

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _, future in self._pending:
            if not future.done():
                future.set_exception(StorageUnavailable("MongoDB storage closed"))
        self._pending = []
        if self._client is not None:
            await self.driver.close(self._client)
            self._client = None

    def _check_open(self) -> None:
        if self._client is None:
            raise StorageUnavailable("MongoDB storage is not open")

    # Appends: group commit through one transaction per batch ---------------

    async def append(self, draft: EventDraft) -> Event:
        self._check_open()
        future: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._pending.append((draft, future))
        self._wake_writer.set()
        return await future

    async def _write_batches(self) -> None:
        while True:
            await self._wake_writer.wait()
            self._wake_writer.clear()
            while self._pending:
                batch, self._pending = self._pending[:BATCH_LIMIT], self._pending[BATCH_LIMIT:]
                try:
                    async with asyncio.timeout(self.transaction_timeout):
                        events = await self._commit([d for d, _ in batch])
                except (PyMongoError, TimeoutError) as exc:
                    failure = StorageUnavailable(f"MongoDB write failed: {exc}")
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(failure)
                    continue
                except Exception as exc:  # a bug must not strand the callers
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(StorageError(f"append failed: {exc!r}"))
                    continue
                for (_, future), event in zip(batch, events, strict=True):
                    if not future.done():
                        future.set_result(event)
                self._count_for_trim(events)

    async def _commit(self, drafts: list[EventDraft]) -> list[Event]:
        """Store ``drafts`` in one transaction; returns one event per draft (an earlier one for a used key)."""
        assert self._client is not None
        async with await self.driver.session(self._client) as session:
            result: list[Event] = await session.with_transaction(
                lambda s: self._insert_batch(drafts, s),
                read_concern=ReadConcern("snapshot"),
                write_concern=WriteConcern("majority"),
            )
        self.transactions += 1
        return result

    async def _insert_batch(self, drafts: list[EventDraft], session: Any) -> list[Event]:
        keys = {(d.tenant, d.idempotency_key) for d in drafts if d.idempotency_key is not None}
        known: dict[tuple[str, str], Event] = {}
        if keys:
            query = {"$or": [{"tenant": tenant, "idempotency_key": key} for tenant, key in sorted(keys)]}
            async for document in self.events.find(query, session=session):
                event = _to_event(document)
                known[(event.tenant, event.idempotency_key)] = event  # type: ignore[index]
        # The first draft with an unused key is stored; later ones with that key get its event.
        fresh: list[EventDraft] = []
        taken: set[tuple[str, str]] = set()
        for draft in drafts:
            key = (draft.tenant, draft.idempotency_key)
            if draft.idempotency_key is None:
                fresh.append(draft)
            elif key not in known and key not in taken:
                taken.add(key)  # type: ignore[arg-type]
                fresh.append(draft)
        stored: list[Event] = []
        if fresh:
            counter = await self.counters.find_one_and_update(
                {"_id": _COUNTER_ID}, {"$inc": {"seq": len(fresh)}}, upsert=True,
                return_document=ReturnDocument.AFTER, session=session)
            first = counter["seq"] - len(fresh) + 1
            now = self.now()
            stored = [Event(first + offset, d.tenant, d.channel, d.event, d.data, now, d.ephemeral,
                            d.idempotency_key, d.meta) for offset, d in enumerate(fresh)]
            await self.events.insert_many([self._document(e) for e in stored], ordered=True, session=session)
        new_events = iter(stored)
        result: list[Event] = []
        for draft in drafts:
            key = (draft.tenant, draft.idempotency_key)
            if draft.idempotency_key is not None and key in known:
                result.append(known[key])
            else:
                event = next(new_events)
                if draft.idempotency_key is not None:
                    taken.discard(key)
                    known[key] = event  # type: ignore[index]
                result.append(event)
        return result

    def _document(self, event: Event) -> dict[str, Any]:
        keep = EPHEMERAL_TTL if event.ephemeral else self.history_ttl + TTL_BACKSTOP
        document: dict[str, Any] = {
            "_id": event.position,
            "position": event.position,
            "tenant": event.tenant,
            "channel": event.channel,
            "event": event.event,
            "timestamp": event.timestamp,
            "ephemeral": event.ephemeral,
            "expire_at": _instant(event.timestamp + keep),
        }
        _store_data(document, event.data)
        if event.idempotency_key is not None:
            document["idempotency_key"] = event.idempotency_key
        if event.meta is not None:
            document["meta"] = event.meta
        return document

    # History and trimming --------------------------------------------------

    async def history(self, tenant: str, channel: str, *, after: int = 0, limit: int = 100) -> History:
        self._check_open()
        oldest_allowed = self.now() - self.history_ttl
        with driver_errors():
            cursor = self.events.find(
                {"tenant": tenant, "channel": channel, "ephemeral": False, "position": {"$gt": after},
                 "timestamp": {"$gte": oldest_allowed}},
            ).sort("position", ASCENDING).limit(max(limit, 0))
            events = [_to_event(d) async for d in cursor] if limit > 0 else []
            trimmed = await self.trimmed.find_one({"_id": _key(tenant, channel)})
            expired = await self.events.find_one(
                {"tenant": tenant, "channel": channel, "ephemeral": False, "timestamp": {"$lt": oldest_allowed}},
                sort=[("position", DESCENDING)], projection={"position": 1})
        through = max((trimmed or {}).get("through", 0), (expired or {}).get("position", 0))
        return History(events=events, lost=after < through)

    def _count_for_trim(self, events: list[Event]) -> None:
        for event in events:
            if event.ephemeral:
                continue
            key = (event.tenant, event.channel)
            self._appends_since_trim[key] = self._appends_since_trim.get(key, 0) + 1
            if self._appends_since_trim[key] >= min(TRIM_EVERY, self.history_size):
                self._appends_since_trim[key] = 0
                asyncio.get_running_loop().create_task(self._trim_channel(*key))

    async def _trim_channel(self, tenant: str, channel: str) -> None:
        try:
            beyond = await self.events.find_one(
                {"tenant": tenant, "channel": channel, "ephemeral": False},
                sort=[("position", DESCENDING)], skip=self.history_size, projection={"position": 1})
            if beyond is not None:
                await self._delete_through(tenant, channel, beyond["position"])
        except PyMongoError as exc:
            log.warning("trimming %s/%s failed (will retry later): %s", tenant, channel, exc)

    async def _delete_through(self, tenant: str, channel: str, through: int) -> None:
        """Record the trim first, so a reader never sees events missing without ``lost``."""
        await self.trimmed.update_one({"_id": _key(tenant, channel)}, {"$max": {"through": through}}, upsert=True)
        await self.events.delete_many({"tenant": tenant, "channel": channel, "ephemeral": False,
                                       "position": {"$lte": through}})

    async def _sweep_periodically(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                await self._sweep(self.now())
            except PyMongoError as exc:
                log.warning("sweeping expired events failed (will retry): %s", exc)

    async def _sweep(self, now: float) -> None:
        pipeline = [{"$match": {"ephemeral": False, "timestamp": {"$lt": now - self.history_ttl}}},
                    {"$group": {"_id": {"tenant": "$tenant", "channel": "$channel"}, "through": {"$max": "$position"}}}]
        async for group in await self.driver.aggregate(self.events, pipeline):
            await self._delete_through(group["_id"]["tenant"], group["_id"]["channel"], group["through"])

    # The change feed -------------------------------------------------------

    async def last_position(self) -> int:
        self._check_open()
        counter = await self._call(self.counters.find_one({"_id": _COUNTER_ID}))
        return int(counter["seq"]) if counter else 0

    async def epoch(self) -> str:
        """Kept beside the position counter, written by whichever process asks first: fresh collections, new epoch."""
        if self._epoch is None:
            self._check_open()
            document = await self._call(self.counters.find_one_and_update(
                {"_id": _EPOCH_ID}, {"$setOnInsert": {"value": new_epoch()}}, upsert=True,
                return_document=ReturnDocument.AFTER))
            self._epoch = str(document["value"])
        return self._epoch

    async def _events_between(self, after: int, before: int | None = None) -> list[Event]:
        bounds: dict[str, int] = {"$gt": after}
        if before is not None:
            bounds["$lt"] = before
        return [_to_event(d) async for d in self.events.find({"position": bounds}).sort("position", ASCENDING)]

    async def watch(self, after: int) -> AsyncIterator[Event]:
        self._check_open()
        last = after
        token = self._resume[1] if self._resume is not None and self._resume[0] == after else None
        try:
            while True:
                options: dict[str, Any] = {"max_await_time_ms": self.max_await_ms}
                if token is not None:
                    options["resume_after"] = token
                try:
                    pipeline = [{"$match": {"operationType": "insert"}}]
                    async with await self.driver.watch(self.events, pipeline, **options) as stream:
                        # The stream is open: whatever commits from here on is in it; the rest is in the collection.
                        for event in await self._events_between(last):
                            yield event
                            last = event.position
                        while stream.alive:
                            change = await stream.try_next()
                            token = stream.resume_token
                            if change is None:
                                if await self.last_position() > last:  # committed but not (yet) shown by the stream
                                    for event in await self._events_between(last):
                                        yield event
                                        last = event.position
                                continue
                            event = _to_event(change["fullDocument"])
                            if event.position <= last:
                                continue
                            if event.position > last + 1:
                                for missing in await self._events_between(last, event.position):
                                    yield missing
                                    last = missing.position
                                if last + 1 != event.position:
                                    log.error("events %d..%d are gone from the collection before being watched",
                                              last + 1, event.position - 1)
                            yield event
                            last = event.position
                            self._resume = (last, token)
                        log.warning("change stream invalidated after position %d; recovering from the collection",
                                    last)
                        token = None
                except OperationFailure as exc:
                    if exc.code not in FATAL_STREAM_ERRORS:
                        raise
                    log.warning("change stream cannot resume (%s, code %s); recovering from the events collection "
                                "after position %d", exc.details.get("codeName") if exc.details else "", exc.code,
                                last)
                    token = None
        except PyMongoError as exc:
            self._resume = (last, token) if token is not None else None
            raise StorageUnavailable(f"MongoDB change stream failed: {exc}") from exc

    async def ping(self) -> None:
        self._check_open()
        assert self._client is not None
        await self._call(self._client.admin.command("ping"))

    # Presence and read receipts --------------------------------------------

    async def save_presence(self, entries: list[PresenceEntry]) -> None:
        self._check_open()
        if not entries:
            return
        from pymongo import ReplaceOne

        requests = [ReplaceOne({"_id": _key(e.tenant, e.channel, e.connection_id)},
                               {**dataclasses.asdict(e), "expire_at": _instant(e.expires_at)}, upsert=True)
                    for e in entries]
        await self._call(self.presence_entries.bulk_write(requests, ordered=False))

    async def remove_presence(self, connection_id: str, channels: list[tuple[str, str]]) -> None:
        self._check_open()
        if channels:
            ids = [_key(tenant, channel, connection_id) for tenant, channel in channels]
            await self._call(self.presence_entries.delete_many({"_id": {"$in": ids}}))

    async def presence(self, tenant: str, channel: str) -> list[PresenceEntry]:
        self._check_open()
        query = {"tenant": tenant, "channel": channel, "expires_at": {"$gt": self.now()}}
        fields = {f.name for f in dataclasses.fields(PresenceEntry)}
        documents = await self._call(self.presence_entries.find(query).to_list(None))
        return [PresenceEntry(**{k: v for k, v in d.items() if k in fields}) for d in documents]

    async def save_read(self, tenant: str, channel: str, receipt: ReadReceipt) -> None:
        self._check_open()
        document = {"tenant": tenant, "channel": channel, **dataclasses.asdict(receipt)}
        await self._call(self.read_receipts.replace_one({"_id": _key(tenant, channel, receipt.user_id)},
                                                         document, upsert=True))

    async def reads(self, tenant: str, channel: str) -> list[ReadReceipt]:
        self._check_open()
        documents = await self._call(self.read_receipts.find({"tenant": tenant, "channel": channel}).to_list(None))
        return [ReadReceipt(d["user_id"], d["message_id"], d["read_at"]) for d in documents]

    # Scheduled events --------------------------------------------------------

    async def schedule(self, draft: EventDraft, deliver_at: float) -> ScheduledEvent:
        self._check_open()
        item = ScheduledEvent(scheduled_id_for(draft), draft, deliver_at, self.now())
        document: dict[str, Any] = {"_id": item.id, "tenant": draft.tenant, "channel": draft.channel,
                                    "event": draft.event, "deliver_at": deliver_at, "created_at": item.created_at,
                                    "owner": None, "claimed_until": 0.0}
        _store_data(document, draft.data)
        if draft.idempotency_key is not None:
            document["idempotency_key"] = draft.idempotency_key
        if draft.ephemeral:
            document["ephemeral"] = True
        if draft.meta is not None:
            document["meta"] = draft.meta
        try:
            await self.schedule_entries.insert_one(document)
        except DuplicateKeyError:
            existing = await self._call(self.schedule_entries.find_one({"_id": item.id}))
            return _to_scheduled(existing) if existing else item
        except PyMongoError as exc:
            raise StorageUnavailable(f"MongoDB write failed: {exc}") from exc
        return item

    async def scheduled(self, tenant: str, channel: str | None = None, *,
                        after: tuple[float, str] | None = None, limit: int | None = None) -> list[ScheduledEvent]:
        self._check_open()
        query: dict[str, Any] = {"tenant": tenant}
        if channel is not None:
            query["channel"] = channel
        if after is not None:
            query["$or"] = [{"deliver_at": {"$gt": after[0]}}, {"deliver_at": after[0], "_id": {"$gt": after[1]}}]
        documents = await self._call(self.schedule_entries.find(query).sort([("deliver_at", 1), ("_id", 1)])
                                     .limit(limit or 0).to_list(None))
        items = [_to_scheduled(d) for d in documents]
        if not items:
            return []
        keys = [publication_key(i.id) for i in items]
        published = set(await self._call(self.events.distinct(
            "idempotency_key", {"tenant": tenant, "idempotency_key": {"$in": keys}})))
        return [i for i in items if publication_key(i.id) not in published]

    async def get_scheduled(self, tenant: str, scheduled_id: str) -> ScheduledEvent | None:
        self._check_open()
        document = await self._call(self.schedule_entries.find_one({"_id": scheduled_id, "tenant": tenant}))
        return _to_scheduled(document) if document is not None else None

    async def count_scheduled(self, tenant: str) -> int:
        self._check_open()
        return await self._call(self.schedule_entries.count_documents({"tenant": tenant}))

    async def cancel_scheduled(self, tenant: str, scheduled_id: str) -> bool | None:
        self._check_open()
        now = self.now()
        deleted = await self._call(self.schedule_entries.delete_one(
            {"_id": scheduled_id, "tenant": tenant,
             "$or": [{"claimed_until": {"$lte": now}}, {"claimed_until": PARKED_UNTIL}]}))
        if deleted.deleted_count:
            return True
        exists = await self._call(self.schedule_entries.find_one({"_id": scheduled_id, "tenant": tenant}))
        return None if exists is None else False

    async def claim_due(self, owner: str, now: float, lease: float, limit: int) -> list[ScheduledEvent]:
        self._check_open()
        claimed = []
        for _ in range(limit):
            # One conditional update per event: atomic, so two instances never hold the same claim.
            document = await self._call(self.schedule_entries.find_one_and_update(
                {"deliver_at": {"$lte": now}, "claimed_until": {"$lte": now}},
                {"$set": {"owner": owner, "claimed_until": now + lease}},
                sort=[("deliver_at", ASCENDING), ("_id", ASCENDING)], return_document=ReturnDocument.AFTER))
            if document is None:
                break
            claimed.append(_to_scheduled(document))
        return claimed

    async def complete_scheduled(self, scheduled_ids: list[str]) -> None:
        self._check_open()
        if scheduled_ids:
            await self._call(self.schedule_entries.delete_many({"_id": {"$in": scheduled_ids}}))

    async def park_scheduled(self, scheduled_ids: list[str]) -> None:
        self._check_open()
        if scheduled_ids:
            await self._call(self.schedule_entries.update_many(
                {"_id": {"$in": scheduled_ids}}, {"$set": {"owner": PARKED_OWNER, "claimed_until": PARKED_UNTIL}}))

    # Application collections -------------------------------------------------

    async def follow_collections(self, tables: list[dict[str, Any]]) -> None:
        self._check_open()
        mappings = [CollectionMapping.from_table(t) for t in tables]
        self.collection_follower = CollectionFollower(self, mappings, self.feed_lease)
        self._tasks.append(asyncio.get_running_loop().create_task(self.collection_follower.run(),
                                                                  name="eddy-mongo-collections"))

    # Helpers -------------------------------------------------------------------

    @staticmethod
    async def _call(operation: Any) -> Any:
        """Await a driver call; its failures become :class:`StorageUnavailable`."""
        with driver_errors():
            return await operation


# Watching the application's own collections ------------------------------------

_FIELD = re.compile(r"\{([A-Za-z0-9_.]+)\}")
_OPERATIONS = {"insert", "update", "replace", "delete"}


def _field(document: dict[str, Any], dotted: str) -> Any:
    value: Any = document
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _jsonable(value: Any) -> Any:
    """BSON values an application stores, as JSON an event can carry."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, ObjectId):
        return str(value)
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, bson.decimal128.Decimal128):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    return value


@dataclasses.dataclass(frozen=True)
class CollectionMapping:
    """One ``[[collections]]`` table: which changes of which collection become which event."""

    collection: str
    operation: str
    event: str
    channel: str
    tenant_field: str = ""
    tenant: str = ""
    #: For updates: fields that must *become* these values in this change (e.g. status = "Completed").
    when: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_table(cls, table: dict[str, Any]) -> CollectionMapping:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(table) - known
        if unknown:
            raise ValueError(f"[[collections]]: unknown keys {sorted(unknown)}")
        for name in ("collection", "operation", "event", "channel"):
            if not isinstance(table.get(name), str) or not table[name]:
                raise ValueError(f"[[collections]]: {name} is required (a string)")
        if table["operation"] not in _OPERATIONS:
            raise ValueError(f"[[collections]]: operation must be one of {sorted(_OPERATIONS)}")
        if not (table.get("tenant_field") or table.get("tenant")):
            raise ValueError("[[collections]]: give tenant_field (a document field) or tenant (a fixed tenant)")
        if not isinstance(table.get("when", {}), dict):
            raise ValueError("[[collections]]: when is a table of field = value")
        return cls(**table)

    def draft_for(self, change: dict[str, Any]) -> EventDraft | None:
        """The event this change means under this mapping, or None when it does not apply."""
        if change.get("operationType") != self.operation or change.get("ns", {}).get("coll") != self.collection:
            return None
        document = change.get("fullDocument") or change.get("fullDocumentBeforeChange") or {}
        if self.operation == "update":
            updated = (change.get("updateDescription") or {}).get("updatedFields", {})
            if any(updated.get(name, object()) != value for name, value in self.when.items()):
                return None
        elif any(_field(document, name) != value for name, value in self.when.items()):
            return None
        if not document:
            document = dict(change.get("documentKey") or {})
        tenant = str(_field(document, self.tenant_field)) if self.tenant_field else self.tenant
        if self.tenant_field and _field(document, self.tenant_field) is None:
            if not self.tenant:
                log.warning("%s change without %s: no event", self.collection, self.tenant_field)
                return None
            tenant = self.tenant
        channel = _FIELD.sub(lambda m: str(_jsonable(_field(document, m.group(1)))), self.channel)
        data = _jsonable(document)
        # The resume token is the same on every instance: one event per change, however many watch.
        key = f"change:{self.collection}:{self.operation}:{self.event}:{change['_id']['_data']}"
        return EventDraft(tenant, channel, self.event, data, idempotency_key=key)


class FeedLease:
    """The right to run the collection feed: held by one instance at a time.

    The lease lives in the feed's checkpoint document (``holder``, ``term``,
    ``until``) and is stamped with the *server's* clock (``$$NOW``), so the
    instances' own clocks never have to agree. An instance takes it when it is
    free or its ``until`` has passed; the term grows each time it changes
    hands. The holder extends it with every checkpoint it writes and at least
    every third of its length, and every such write is conditional on holder
    and term: a holder that stops answering loses the lease ``length``
    seconds after its last write, a standby (trying every third of the
    length) takes it within ``length * 4/3`` of that write, and a former
    holder that wakes up can neither move the checkpoint nor keep following,
    because its first write matches nothing and it steps down.
    """

    def __init__(self, checkpoints: Any, key: str, length: float) -> None:
        self.checkpoints = checkpoints
        self.key = key
        self.length = length
        #: Unique per process and feed: host, pid and a random part.
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        #: The term held, or None while this instance is a standby.
        self.term: int | None = None

    @property
    def renew_every(self) -> float:
        return self.length / 3

    def _until(self) -> dict[str, Any]:
        return {"$add": ["$$NOW", int(self.length * 1000)]}

    async def acquire(self) -> dict[str, Any] | None:
        """Take the lease if it is free, expired or ours; returns the checkpoint document, or None if held."""
        free = {"_id": self.key, "$or": [{"holder": self.holder}, {"$expr": {"$lte": ["$until", "$$NOW"]}}]}
        same_holder = {"$eq": ["$holder", self.holder]}
        take = [{"$set": {"holder": self.holder, "until": self._until(),
                          "term": {"$cond": [same_holder, "$term", {"$add": [{"$ifNull": ["$term", 0]}, 1]}]}}}]
        try:
            document = await self.checkpoints.find_one_and_update(free, take, upsert=True,
                                                                  return_document=ReturnDocument.AFTER)
        except DuplicateKeyError:  # the document exists and another instance holds it
            self.term = None
            return None
        self.term = int(document["term"])
        return dict(document)

    async def renew(self, token: Any = None) -> bool:
        """Extend the lease, saving ``token`` as the checkpoint when given; False when the lease is no longer ours."""
        if self.term is None:
            return False
        fields: dict[str, Any] = {"until": self._until()}
        if token is not None:
            fields.update(token={"$literal": token}, at="$$NOW")
        result = await self.checkpoints.update_one({"_id": self.key, "holder": self.holder, "term": self.term},
                                                   [{"$set": fields}])
        if result.matched_count == 0:
            self.term = None
        return self.term is not None

    async def forget_token(self) -> None:
        """Drop the checkpoint, so the feed follows from now (its changes since then are out of the oplog)."""
        await self.checkpoints.update_one({"_id": self.key, "holder": self.holder, "term": self.term},
                                          {"$unset": {"token": ""}})

    async def release(self) -> None:
        """Let a standby take over at once (on a clean shutdown)."""
        if self.term is not None:
            await self.checkpoints.update_one({"_id": self.key, "holder": self.holder, "term": self.term},
                                              [{"$set": {"until": "$$NOW"}}])
            self.term = None


class CollectionFollower:
    """MongoDB's :class:`~storage.base.CollectionFeed`: changes in the application's collections become Eddy events,
    on the one instance holding the lease.

    Every instance runs a feed; the one holding :class:`FeedLease` follows a
    change stream on the database from the checkpointed resume token, the
    others wait to take over. Each change becomes an append whose idempotency
    key is derived from the change's resume token (the same on every
    instance), and the token is checkpointed only after that append
    committed: a holder that dies between the two leaves the change to its
    successor, which stores it once.
    """

    def __init__(self, storage: MongoStorage, mappings: list[CollectionMapping], lease_length: float) -> None:
        self.storage = storage
        self.mappings = mappings
        self.checkpoint_id = "collections:" + ",".join(sorted({m.collection for m in mappings}))
        self.lease = FeedLease(storage.checkpoints, self.checkpoint_id, lease_length)

    def pipeline(self) -> list[dict[str, Any]]:
        return [{"$match": {"ns.coll": {"$in": sorted({m.collection for m in self.mappings})},
                            "operationType": {"$in": sorted({m.operation for m in self.mappings})}}}]

    async def run(self) -> None:
        await self._check_pre_images()
        backoff = 0.1
        try:
            while True:
                try:
                    checkpoint = await self.lease.acquire()
                    if checkpoint is None:
                        await asyncio.sleep(self.lease.renew_every)
                        continue
                    log.info("collection feed %s: following (lease term %d)", self.checkpoint_id, self.lease.term)
                    if await self._follow(checkpoint.get("token")):
                        log.warning("collection feed %s: the lease passed to another instance; standing by",
                                    self.checkpoint_id)
                    backoff = 0.1
                except (PyMongoError, StorageError) as exc:
                    log.warning("collection feed error (%s); retrying in %.1fs", exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            with suppress(PyMongoError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await self.lease.release()

    async def _check_pre_images(self) -> None:
        """Say once, at start-up, which collections mapped for deletes lack pre-images, and how to enable them."""
        names = sorted({m.collection for m in self.mappings if m.operation == "delete"})
        if not names:
            return
        database = self.storage._client[self.storage.database_name]
        try:
            reply = await database.command({"listCollections": 1, "filter": {"name": {"$in": names}}})
        except PyMongoError as exc:
            log.warning("could not check pre-images of %s: %s", ", ".join(names), exc)
            return
        options = {c["name"]: c.get("options") or {} for c in reply["cursor"]["firstBatch"]}
        for name in names:
            if not (options.get(name, {}).get("changeStreamPreAndPostImages") or {}).get("enabled"):
                log.warning("collection %s has no pre-images: its delete events carry only the document key. "
                            "Enable them with: db.runCommand({collMod: %s, changeStreamPreAndPostImages: "
                            "{enabled: true}})", name, orjson.dumps(name).decode())

    async def _follow(self, token: Any) -> bool:
        """Follow the stream from ``token`` while the lease is ours: True when it is not, False when the stream ended."""
        database = self.storage._client[self.storage.database_name]
        options: dict[str, Any] = {"full_document": "updateLookup", "full_document_before_change": "whenAvailable",
                                   "max_await_time_ms": self.storage.max_await_ms}
        if token is not None:
            options["start_after"] = token
        loop = asyncio.get_running_loop()
        renewed = loop.time()
        try:
            async with await self.storage.driver.watch(database, self.pipeline(), **options) as stream:
                while stream.alive:
                    change = await stream.try_next()
                    if change is not None:
                        await self._publish(change)
                    elif loop.time() - renewed < self.lease.renew_every:
                        continue
                    # The checkpoint follows the append: a change is never marked done before it is stored.
                    if not await self.lease.renew(stream.resume_token):
                        return True
                    renewed = loop.time()
        except OperationFailure as exc:
            if exc.code not in FATAL_STREAM_ERRORS:
                raise
            # The oplog no longer holds where we stopped: those changes cannot be turned into events.
            log.error("collection changes since the last checkpoint are lost to Eddy (oplog rolled over, code %s); "
                      "following from now", exc.code)
            await self.lease.forget_token()
        return False

    async def _publish(self, change: dict[str, Any]) -> None:
        for mapping in self.mappings:
            draft = mapping.draft_for(change)
            if draft is not None:
                await self.storage.append(draft)
