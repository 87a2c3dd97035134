"""The embedded default store: one SQLite file, shareable by several Eddy processes.

``sqlite:///relative/eddy.db`` or ``sqlite:////absolute/eddy.db``, with optional
query options ``synchronous`` (``full``, the default: an acknowledged event
survives a power loss; ``normal``: it survives a crash of the process, not of
the machine; see docs/ARCHITECTURE.md), ``busy_timeout`` (seconds to wait for
another process's write lock, default 5), ``safety_poll`` (seconds between reads of the feed that no
wake-up asked for, default 2) and ``poll_interval`` (seconds between reads of
the feed where the system cannot listen for other processes' commits, default
0.005).

How a watcher learns of a commit: from this process's writer, which hands it
the events it just committed (so a local event reaches the hub without a read of
the file); from another process through the doorbell beside the file
(``storage/doorbell.py``, inotify); and, should a wake-up ever be missed, from
the safety poll.

Why it is safe to tail by position: SQLite admits one writer at a time and
assigns ``AUTOINCREMENT`` positions inside the write transaction, so positions
become visible in the order they were assigned. A reader that has seen
position N can never later find a committed N-1 it missed.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import orjson

from . import sqlite_file
from .base import (
    EPHEMERAL_TTL,
    PARKED_OWNER,
    PARKED_UNTIL,
    BoundedCounts,
    Event,
    EventDraft,
    History,
    PresenceEntry,
    ReadReceipt,
    RecordRefused,
    ScheduledEvent,
    Storage,
    StorageError,
    StorageUnavailable,
    claim_blocks_cancel,
    new_epoch,
    publication_key,
    scheduled_id_for,
)
from .doorbell import Doorbell

T = TypeVar("T")
log = logging.getLogger("eddy.storage.sqlite")

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL,
    channel TEXT NOT NULL,
    event TEXT NOT NULL,
    data BLOB NOT NULL,
    timestamp REAL NOT NULL,
    ephemeral INTEGER NOT NULL DEFAULT 0,
    idempotency_key TEXT,
    meta BLOB
);
CREATE INDEX IF NOT EXISTS events_by_channel ON events (tenant, channel, position) WHERE ephemeral = 0;
CREATE UNIQUE INDEX IF NOT EXISTS events_by_key ON events (tenant, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS presence (
    tenant TEXT NOT NULL,
    channel TEXT NOT NULL,
    connection_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    status TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (tenant, channel, connection_id)
);
CREATE TABLE IF NOT EXISTS reads (
    tenant TEXT NOT NULL,
    channel TEXT NOT NULL,
    user_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    read_at REAL NOT NULL,
    PRIMARY KEY (tenant, channel, user_id)
);
CREATE TABLE IF NOT EXISTS scheduled (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    channel TEXT NOT NULL,
    event TEXT NOT NULL,
    data BLOB NOT NULL,
    idempotency_key TEXT,
    deliver_at REAL NOT NULL,
    created_at REAL NOT NULL,
    claimed_by TEXT,
    claimed_until REAL NOT NULL DEFAULT 0,
    ephemeral INTEGER NOT NULL DEFAULT 0,
    meta BLOB
);
CREATE INDEX IF NOT EXISTS scheduled_by_due ON scheduled (deliver_at);
CREATE INDEX IF NOT EXISTS scheduled_by_tenant ON scheduled (tenant, channel, deliver_at);
CREATE TABLE IF NOT EXISTS store (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS trimmed (
    tenant TEXT NOT NULL,
    channel TEXT NOT NULL,
    through INTEGER NOT NULL,
    PRIMARY KEY (tenant, channel)
);
"""

COLUMNS = "position, tenant, channel, event, data, timestamp, ephemeral, idempotency_key, meta"
SCHEDULED_COLUMNS = "id, tenant, channel, event, data, idempotency_key, deliver_at, created_at, ephemeral, meta"
#: Columns added since the first release, with their definitions, per table: added to older files at open.
ADDED_COLUMNS = {"events": {"meta": "BLOB"},
                 "scheduled": {"ephemeral": "INTEGER NOT NULL DEFAULT 0", "meta": "BLOB"}}

#: Trim a channel by size after this many appends to it in this process.
TRIM_EVERY = 100
#: Channels whose appends this process counts for trimming at once (the oldest counted is trimmed and forgotten).
TRIMMED_CHANNELS = 10_000
#: Seconds between sweeps for expired and ephemeral events.
SWEEP_INTERVAL = 5.0
#: Rows a feed read returns at once.
FEED_BATCH = 1000


class _RecordFailed(Exception):
    """An operation of a batch failed on its own record: the batch is run again, each operation alone."""


class _Follower:
    """One running watch: woken after every commit that changed something (any process), and handed the events
    this process's writer committed, so that those need no read of the file."""

    __slots__ = ("handed", "rung", "wakeup")

    def __init__(self) -> None:
        self.wakeup = asyncio.Event()
        #: Events this process committed since the watch last looked, in position order (bounded: FEED_BATCH).
        self.handed: list[Event] = []
        #: Woken since the last read by something other than this process's writer (a ring, a poll, a close):
        #: what woke it may be in the file only.
        self.rung = False

    def ring(self) -> None:
        self.rung = True
        self.wakeup.set()

    def hand(self, inserted: list[Event]) -> None:
        """This process's writer committed ``inserted``: keep them for the watch, and wake it. A watch so far behind
        that the list would pass FEED_BATCH gets none (it reads the file)."""
        if len(self.handed) + len(inserted) > FEED_BATCH:
            self.handed.clear()
        else:
            self.handed += inserted
        self.wakeup.set()

    def take(self, after: int) -> list[Event] | None:
        """The handed events that follow ``after`` without a gap, or None when the file must be read: another
        process committed in between, some were dropped to bound the list, or there are none."""
        handed, self.handed = self.handed, []
        handed = [event for event in handed if event.position > after]
        if not handed or handed[0].position != after + 1 or handed[-1].position != after + len(handed):
            return None
        return handed


class _Failed:
    """The result of one operation of a batch that failed alone."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def _row_to_event(row: tuple) -> Event:
    position, tenant, channel, event, data, timestamp, ephemeral, key, meta = row
    return Event(position, tenant, channel, event, orjson.loads(data), timestamp, bool(ephemeral), key,
                 orjson.loads(meta) if meta is not None else None)


def _row_to_scheduled(row: tuple) -> ScheduledEvent:
    scheduled_id, tenant, channel, event, data, key, deliver_at, created_at, ephemeral, meta = row
    draft = EventDraft(tenant, channel, event, orjson.loads(data), idempotency_key=key, ephemeral=bool(ephemeral),
                       meta=orjson.loads(meta) if meta is not None else None)
    return ScheduledEvent(scheduled_id, draft, deliver_at, created_at)


class SQLiteStorage(Storage):
    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(**options)
        parts = urlsplit(url)
        path = sqlite_file(url)
        if path is None or str(path) == ":memory:":
            raise ValueError(f"expected sqlite:///path/to/file.db, got {url!r}")
        self.url = url
        self.path = path
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.poll_interval = float(query.get("poll_interval", 0.005))
        self.safety_poll = float(query.get("safety_poll", 2.0))
        self.busy_timeout = float(query.get("busy_timeout", 5.0))
        self.synchronous = query.get("synchronous", "full").upper()
        if self.synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be full or normal, got {query['synchronous']!r}")
        #: Transactions the writer committed; lets tests see group commit at work.
        self.transactions = 0
        self._writer_pool: ThreadPoolExecutor | None = None
        self._reader_pool: ThreadPoolExecutor | None = None
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._queue: asyncio.Queue[tuple[Callable[[sqlite3.Connection, float], Any], asyncio.Future[Any]]] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        #: The running watches (see :class:`_Follower`).
        self._followers: set[_Follower] = set()
        #: Events the writer inserted in the transaction it is running (the writer thread's alone).
        self._inserted: list[Event] = []
        self._doorbell: Doorbell | None = None
        #: Seconds a watcher waits for a wake-up before it reads the feed anyway.
        self._watch_timeout = self.poll_interval
        #: The writer connection's ``total_changes`` after the last batch.
        self._changes_seen = 0
        self._appends_since_trim: BoundedCounts[tuple[str, str]] = BoundedCounts(TRIMMED_CHANNELS)
        self._epoch: str | None = None
        self._closed = True

    # Lifecycle -------------------------------------------------------------

    async def open(self) -> None:
        if not self._closed:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer_pool = ThreadPoolExecutor(1, thread_name_prefix="eddy-sqlite-writer")
        self._reader_pool = ThreadPoolExecutor(1, thread_name_prefix="eddy-sqlite-reader")
        try:
            self._writer = await self._on(self._writer_pool, self._connect, True)
            self._reader = await self._on(self._reader_pool, self._connect, False)
        except sqlite3.Error as exc:
            self._shutdown_pools()
            raise StorageUnavailable(f"cannot open {self.path}: {exc}") from exc
        self._doorbell = Doorbell(self.path)
        listening = self._doorbell.listen(self._wake_watchers)
        self._watch_timeout = self.safety_poll if listening else self.poll_interval
        if not listening:
            log.warning("no inotify here: the change feed polls %s every %g s for other processes' commits",
                        self.path, self.poll_interval)
        self._queue = asyncio.Queue()
        self._closed = False
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._write_batches(), name="eddy-sqlite-writer"),
            loop.create_task(self._sweep_periodically(), name="eddy-sqlite-sweeper"),
        ]

    def _connect(self, create_schema: bool) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                                     check_same_thread=False)
        connection.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        if create_schema:
            # Two processes creating the same new file race for the switch to WAL,
            # which SQLite answers with "locked" without waiting: retry briefly.
            deadline = time.monotonic() + self.busy_timeout
            while True:
                try:
                    connection.execute("PRAGMA journal_mode = WAL")
                    connection.executescript(SCHEMA)
                    for table, added in ADDED_COLUMNS.items():  # a file made by an older release
                        columns = {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}
                        for column, definition in added.items():
                            if column not in columns:
                                connection.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
                    connection.execute("INSERT OR IGNORE INTO store (name, value) VALUES ('epoch', ?)",
                                       (new_epoch(),))
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() > deadline:
                        connection.close()
                        raise
                    time.sleep(0.02)
            # FULL: an acknowledged event survives power loss (fsync at every commit). NORMAL, in WAL mode:
            # it survives a crash of the process; the last commits may be lost with the machine's power.
            connection.execute(f"PRAGMA synchronous = {self.synchronous}")
        return connection

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        while self._queue is not None and not self._queue.empty():
            _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(StorageUnavailable("storage closed"))
        self._wake_watchers()  # so they notice the close
        if self._doorbell is not None:
            self._doorbell.close()
            self._doorbell = None
        for connection, pool in ((self._writer, self._writer_pool), (self._reader, self._reader_pool)):
            if connection is not None and pool is not None:
                await self._on(pool, connection.close)
        self._writer = self._reader = None
        self._shutdown_pools()

    def _shutdown_pools(self) -> None:
        for pool in (self._writer_pool, self._reader_pool):
            if pool is not None:
                pool.shutdown(wait=False)
        self._writer_pool = self._reader_pool = None

    async def _on(self, pool: ThreadPoolExecutor | None, function: Callable[..., T], *args: Any) -> T:
        if pool is None:
            raise StorageUnavailable("sqlite storage is closed")
        return await asyncio.get_running_loop().run_in_executor(pool, function, *args)

    def _check_open(self) -> None:
        if self._closed:
            raise StorageUnavailable("sqlite storage is closed")

    # Writing (group commit) ----------------------------------------------------

    async def _submit(self, operation: Callable[[sqlite3.Connection, float], T]) -> T:
        """Run ``operation(connection, now)`` in the next write transaction.

        Every write waiting when a transaction starts joins it, so with
        ``synchronous=FULL`` concurrent writers share one fsync instead of
        paying one each. An operation that fails on its record is rolled back
        alone and fails alone (:class:`RecordRefused` for its data; see
        :meth:`_run_batch`), so one tenant's bad write never fails another's. Only
        a fault of the store itself (the file cannot be locked, written or
        committed) fails the whole batch.
        """
        self._check_open()
        assert self._queue is not None
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((operation, future))
        return await future

    async def _write_batches(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                results, inserted = await self._on(self._writer_pool, self._run_batch, [op for op, _ in batch])
            except asyncio.CancelledError:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(StorageUnavailable("storage closed"))
                raise
            except Exception as exc:
                error = exc if isinstance(exc, StorageError) else StorageUnavailable(f"sqlite write failed: {exc}")
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            # The writers' answers first (a POST's 201 leaves before the fan-out), then the watchers.
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, _Failed):
                    future.set_exception(result.error)
                else:
                    future.set_result(result)
            self._announce_commit(inserted)

    def _run_batch(self, operations: list[Callable[[sqlite3.Connection, float], Any]]) -> tuple[list[Any], list[Event]]:
        """One transaction for the batch: each operation's result, and the events it inserted.

        When an operation fails on its record, the transaction is rolled back and run again with each
        operation in its own savepoint, so only that operation fails: the common batch pays for no savepoint,
        a batch with a bad record pays twice."""
        try:
            return self._run_transaction(operations, alone=False), self._inserted
        except _RecordFailed:
            return self._run_transaction(operations, alone=True), self._inserted

    def _run_transaction(self, operations: list[Callable[[sqlite3.Connection, float], Any]], *,
                         alone: bool) -> list[Any]:
        connection = self._writer
        assert connection is not None
        now = self.now()
        self._inserted = []
        run = self._run_alone if alone else self._run_together
        try:
            connection.execute("BEGIN IMMEDIATE")
            try:
                results = [run(connection, operation, now) for operation in operations]
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StorageUnavailable(f"sqlite write failed: {exc}") from exc
        self.transactions += 1
        return results

    @staticmethod
    def _run_together(connection: sqlite3.Connection, operation: Callable[[sqlite3.Connection, float], Any],
                      now: float) -> Any:
        """One operation of a batch, no savepoint: a failure on its record aborts the try (:class:`_RecordFailed`)."""
        try:
            return operation(connection, now)
        except sqlite3.OperationalError:
            raise  # the store itself (locked, disk full, I/O): the whole batch fails
        except Exception as exc:  # this record: run the batch again, each write alone
            raise _RecordFailed from exc

    @staticmethod
    def _run_alone(connection: sqlite3.Connection, operation: Callable[[sqlite3.Connection, float], Any],
                   now: float) -> Any:
        """One operation of a batch inside a savepoint; what it cannot store is undone and reported alone."""
        connection.execute("SAVEPOINT item")
        try:
            result = operation(connection, now)
        except sqlite3.OperationalError:
            raise  # the store itself (locked, disk full, I/O): the whole batch fails
        except Exception as exc:  # noqa: BLE001 - this record: unencodable data, too big, a constraint
            connection.execute("ROLLBACK TO item")
            connection.execute("RELEASE item")
            return _Failed(exc if isinstance(exc, StorageError) else RecordRefused(f"cannot store this record: {exc}"))
        connection.execute("RELEASE item")
        return result

    async def ping(self) -> None:
        """Answers only when the file can be read *and* written now (another process may hold the write lock)."""
        await self.last_position()
        await self._submit(lambda connection, now: None)

    async def append(self, draft: EventDraft) -> Event:
        event = await self._submit(lambda connection, now: self._insert_one(connection, draft, now))
        if not event.ephemeral:
            self._count_for_trim(event)
        return event

    def _insert_one(self, connection: sqlite3.Connection, draft: EventDraft, now: float) -> Event:
        if draft.idempotency_key is not None:
            row = connection.execute(
                f"SELECT {COLUMNS} FROM events WHERE tenant = ? AND idempotency_key = ?",
                (draft.tenant, draft.idempotency_key),
            ).fetchone()
            if row is not None:
                return _row_to_event(row)
        values = (draft.tenant, draft.channel, draft.event, orjson.dumps(draft.data), now, int(draft.ephemeral),
                  draft.idempotency_key, orjson.dumps(draft.meta) if draft.meta is not None else None)
        cursor = connection.execute(
            "INSERT INTO events (tenant, channel, event, data, timestamp, ephemeral, idempotency_key, meta)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", values)
        assert cursor.lastrowid is not None  # an INSERT always sets it
        # For this process's watchers: the event as a read of the file would return it (decoded from what was
        # stored, so it shares nothing with the caller's draft).
        self._inserted.append(_row_to_event((cursor.lastrowid, *values)))
        return Event(cursor.lastrowid, draft.tenant, draft.channel, draft.event, draft.data, now,
                     draft.ephemeral, draft.idempotency_key, draft.meta)

    # Trimming ----------------------------------------------------------------

    def _count_for_trim(self, event: Event) -> None:
        """Every few appends to a channel, trim it to ``history_size`` (in a later transaction).

        The counters are bounded (:data:`TRIMMED_CHANNELS`): a channel whose counter is forgotten to make room
        is trimmed then, so no channel escapes its size bound however many channels there are.
        """
        key = (event.tenant, event.channel)
        count, forgotten = self._appends_since_trim.add(key)
        if count >= min(TRIM_EVERY, self.history_size):
            self._appends_since_trim.set(key, 0)
            self._trim_soon(key)
        if forgotten is not None:
            self._trim_soon(forgotten)

    def _trim_soon(self, key: tuple[str, str]) -> None:
        trim = asyncio.ensure_future(self._submit(lambda connection, now: self._trim_channel(connection, *key)))
        trim.add_done_callback(lambda f: f.cancelled() or f.exception())  # best effort; the sweep retries

    def _trim_channel(self, connection: sqlite3.Connection, tenant: str, channel: str) -> None:
        """Keep the newest ``history_size`` events of one channel."""
        row = connection.execute(
            "SELECT position FROM events WHERE tenant = ? AND channel = ? AND ephemeral = 0"
            " ORDER BY position DESC LIMIT 1 OFFSET ?",
            (tenant, channel, self.history_size),
        ).fetchone()
        if row is not None:
            self._delete_through(connection, tenant, channel, row[0])

    @staticmethod
    def _delete_through(connection: sqlite3.Connection, tenant: str, channel: str, through: int) -> None:
        """Delete a channel's events up to ``through`` and remember that they are gone (for ``lost``)."""
        connection.execute(
            "INSERT INTO trimmed (tenant, channel, through) VALUES (?, ?, ?)"
            " ON CONFLICT (tenant, channel) DO UPDATE SET through = max(through, excluded.through)",
            (tenant, channel, through),
        )
        connection.execute(
            "DELETE FROM events WHERE tenant = ? AND channel = ? AND ephemeral = 0 AND position <= ?",
            (tenant, channel, through),
        )

    async def _sweep_periodically(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                await self._submit(self._sweep)
            except StorageError:
                pass  # retried at the next sweep

    def _sweep(self, connection: sqlite3.Connection, now: float) -> None:
        """Delete expired events (recording what was trimmed), old ephemeral events and expired presence."""
        expired = connection.execute(
            "SELECT tenant, channel, max(position) FROM events WHERE ephemeral = 0 AND timestamp < ?"
            " GROUP BY tenant, channel",
            (now - self.history_ttl,),
        ).fetchall()
        for tenant, channel, through in expired:
            self._delete_through(connection, tenant, channel, through)
        connection.execute("DELETE FROM events WHERE ephemeral = 1 AND timestamp < ?", (now - EPHEMERAL_TTL,))
        connection.execute("DELETE FROM presence WHERE expires_at < ?", (now,))

    # Presence and read receipts ------------------------------------------------

    async def save_presence(self, entries: list[PresenceEntry]) -> None:
        rows = [(e.tenant, e.channel, e.connection_id, e.user_id, e.status, e.expires_at) for e in entries]
        await self._write(
            "INSERT OR REPLACE INTO presence (tenant, channel, connection_id, user_id, status, expires_at)"
            " VALUES (?, ?, ?, ?, ?, ?)", rows,
        )

    async def remove_presence(self, connection_id: str, channels: list[tuple[str, str]]) -> None:
        await self._write(
            "DELETE FROM presence WHERE tenant = ? AND channel = ? AND connection_id = ?",
            [(tenant, channel, connection_id) for tenant, channel in channels],
        )

    async def presence(self, tenant: str, channel: str) -> list[PresenceEntry]:
        self._check_open()
        rows = await self._read(
            self._query,
            "SELECT tenant, channel, user_id, connection_id, status, expires_at FROM presence"
            " WHERE tenant = ? AND channel = ? AND expires_at > ?",
            (tenant, channel, self.now()),
        )
        return [PresenceEntry(*row) for row in rows]

    async def save_read(self, tenant: str, channel: str, receipt: ReadReceipt) -> None:
        await self._write(
            "INSERT OR REPLACE INTO reads (tenant, channel, user_id, message_id, read_at) VALUES (?, ?, ?, ?, ?)",
            [(tenant, channel, receipt.user_id, receipt.message_id, receipt.read_at)],
        )

    async def reads(self, tenant: str, channel: str) -> list[ReadReceipt]:
        self._check_open()
        rows = await self._read(
            self._query,
            "SELECT user_id, message_id, read_at FROM reads WHERE tenant = ? AND channel = ? ORDER BY read_at",
            (tenant, channel),
        )
        return [ReadReceipt(*row) for row in rows]

    # Scheduled events -----------------------------------------------------------

    async def schedule(self, draft: EventDraft, deliver_at: float) -> ScheduledEvent:
        self._check_open()
        item = ScheduledEvent(scheduled_id_for(draft), draft, deliver_at, self.now())

        def insert(connection: sqlite3.Connection) -> ScheduledEvent:
            connection.execute(
                f"INSERT OR IGNORE INTO scheduled ({SCHEDULED_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (item.id, draft.tenant, draft.channel, draft.event, orjson.dumps(draft.data), draft.idempotency_key,
                 deliver_at, item.created_at, int(draft.ephemeral),
                 orjson.dumps(draft.meta) if draft.meta is not None else None),
            )
            row = connection.execute(f"SELECT {SCHEDULED_COLUMNS} FROM scheduled WHERE id = ?", (item.id,)).fetchone()
            return _row_to_scheduled(row) if row is not None else item  # None: published meanwhile

        return await self._transaction(insert)

    async def scheduled(self, tenant: str, channel: str | None = None, *,
                        after: tuple[float, str] | None = None, limit: int | None = None) -> list[ScheduledEvent]:
        self._check_open()
        where, parameters = ("tenant = ?", (tenant,)) if channel is None else \
            ("tenant = ? AND channel = ?", (tenant, channel))
        if after is not None:
            where, parameters = f"{where} AND (deliver_at, id) > (?, ?)", (*parameters, *after)
        rows = await self._read(
            self._query,
            f"SELECT {SCHEDULED_COLUMNS} FROM scheduled WHERE {where} AND NOT EXISTS (SELECT 1 FROM events"
            " WHERE events.tenant = scheduled.tenant AND events.idempotency_key = ? || scheduled.id)"
            " ORDER BY deliver_at, id LIMIT ?", (*parameters, publication_key(""), -1 if limit is None else limit))
        return [_row_to_scheduled(row) for row in rows]

    async def get_scheduled(self, tenant: str, scheduled_id: str) -> ScheduledEvent | None:
        self._check_open()
        rows = await self._read(self._query, f"SELECT {SCHEDULED_COLUMNS} FROM scheduled WHERE id = ? AND tenant = ?",
                                (scheduled_id, tenant))
        return _row_to_scheduled(rows[0]) if rows else None

    async def count_scheduled(self, tenant: str) -> int:
        self._check_open()
        rows = await self._read(self._query, "SELECT count(*) FROM scheduled WHERE tenant = ?", (tenant,))
        return rows[0][0]

    async def cancel_scheduled(self, tenant: str, scheduled_id: str) -> bool | None:
        self._check_open()
        now = self.now()

        def cancel(connection: sqlite3.Connection) -> bool | None:
            row = connection.execute("SELECT claimed_until FROM scheduled WHERE id = ? AND tenant = ?",
                                     (scheduled_id, tenant)).fetchone()
            if row is None:
                return None
            if claim_blocks_cancel(row[0], now):
                return False  # an instance is publishing it right now
            connection.execute("DELETE FROM scheduled WHERE id = ?", (scheduled_id,))
            return True

        return await self._transaction(cancel)

    async def claim_due(self, owner: str, now: float, lease: float, limit: int) -> list[ScheduledEvent]:
        self._check_open()
        # Most checks find nothing due: asked first on the reader connection, they take no write lock (which every
        # process on the file shares) and cost no write transaction.
        if not await self._read(self._query, "SELECT 1 FROM scheduled WHERE deliver_at <= ? AND claimed_until <= ?"
                                " LIMIT 1", (now, now)):
            return []

        def claim(connection: sqlite3.Connection) -> list[ScheduledEvent]:
            # BEGIN IMMEDIATE makes select-then-update one atomic step across processes.
            rows = connection.execute(
                f"SELECT {SCHEDULED_COLUMNS} FROM scheduled WHERE deliver_at <= ? AND claimed_until <= ?"
                " ORDER BY deliver_at, id LIMIT ?", (now, now, limit)).fetchall()
            connection.executemany("UPDATE scheduled SET claimed_by = ?, claimed_until = ? WHERE id = ?",
                                   [(owner, now + lease, row[0]) for row in rows])
            return [_row_to_scheduled(row) for row in rows]

        return await self._transaction(claim)

    async def complete_scheduled(self, scheduled_ids: list[str]) -> None:
        await self._write("DELETE FROM scheduled WHERE id = ?", [(i,) for i in scheduled_ids])

    async def park_scheduled(self, scheduled_ids: list[str]) -> None:
        await self._write("UPDATE scheduled SET claimed_by = ?, claimed_until = ? WHERE id = ?",
                          [(PARKED_OWNER, PARKED_UNTIL, i) for i in scheduled_ids])

    async def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work(connection)`` atomically, in the next group-committed transaction."""
        return await self._submit(lambda connection, now: work(connection))

    async def _write(self, statement: str, rows: list[tuple]) -> None:
        """Run one statement for many rows, in the next group-committed transaction."""
        self._check_open()
        if rows:
            await self._submit(lambda connection, now: connection.executemany(statement, rows))

    def _query(self, statement: str, parameters: tuple) -> list[tuple]:
        assert self._reader is not None
        return self._reader.execute(statement, parameters).fetchall()

    # Reading -----------------------------------------------------------------

    async def history(self, tenant: str, channel: str, *, after: int = 0, limit: int = 100) -> History:
        self._check_open()
        return await self._read(self._history, tenant, channel, after, max(limit, 0))

    def _history(self, tenant: str, channel: str, after: int, limit: int) -> History:
        connection = self._reader
        assert connection is not None
        cutoff = self.now() - self.history_ttl
        connection.execute("BEGIN")  # one snapshot for both queries
        try:
            rows = connection.execute(
                f"SELECT {COLUMNS} FROM events WHERE tenant = ? AND channel = ? AND ephemeral = 0"
                " AND position > ? AND timestamp >= ? ORDER BY position LIMIT ?",
                (tenant, channel, after, cutoff, limit),
            ).fetchall()
            trimmed = connection.execute(
                "SELECT through FROM trimmed WHERE tenant = ? AND channel = ?", (tenant, channel)
            ).fetchone()
            # Expired but not yet swept counts as trimmed.
            expired = connection.execute(
                "SELECT max(position) FROM events WHERE tenant = ? AND channel = ? AND ephemeral = 0"
                " AND timestamp < ?",
                (tenant, channel, cutoff),
            ).fetchone()
        finally:
            connection.execute("COMMIT")
        through = max(trimmed[0] if trimmed else 0, expired[0] or 0)
        return History(events=[_row_to_event(r) for r in rows], lost=after < through)

    async def last_position(self) -> int:
        self._check_open()
        return await self._read(self._last_position)

    async def epoch(self) -> str:
        """Written once, when the file's schema is created; a new file has a new one."""
        if self._epoch is None:
            self._check_open()
            rows = await self._read(self._query, "SELECT value FROM store WHERE name = 'epoch'", ())
            self._epoch = rows[0][0]
        return self._epoch

    def _last_position(self) -> int:
        assert self._reader is not None
        row = self._reader.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        return row[0] if row else 0

    async def _read(self, function: Callable[..., T], *args: Any) -> T:
        try:
            return await self._on(self._reader_pool, function, *args)
        except sqlite3.Error as exc:
            raise StorageUnavailable(f"sqlite read failed: {exc}") from exc

    def _wake_watchers(self) -> None:
        for follower in self._followers:
            follower.ring()

    def _announce_commit(self, inserted: list[Event]) -> None:
        """After a batch that changed rows: hand this process's watchers the events it inserted, wake them now,
        and ring for the other processes."""
        assert self._writer is not None and self._doorbell is not None
        changes = self._writer.total_changes
        if changes != self._changes_seen:
            self._changes_seen = changes
            for follower in self._followers:
                follower.hand(inserted)
            self._doorbell.ring()

    async def watch(self, after: int) -> AsyncIterator[Event]:
        async for batch in self.watch_batches(after):
            for event in batch:
                yield event

    async def watch_batches(self, after: int) -> AsyncIterator[list[Event]]:
        self._check_open()
        follower = _Follower()
        wakeup = follower.wakeup
        self._followers.add(follower)
        loop = asyncio.get_running_loop()
        try:
            while not self._closed:
                handed = follower.take(after)
                if handed is not None:
                    # This process's commit, next in line: no read. Unless something else woke the watch too (then
                    # the file is read next), this commit's own ring is what reads the file after it.
                    if not follower.rung:
                        wakeup.clear()
                    yield handed
                    after = handed[-1].position
                else:
                    follower.rung = False
                    wakeup.clear()
                    rows = await self._read(self._feed_after, after)
                    if rows:
                        yield rows
                        after = rows[-1].position
                    if len(rows) == FEED_BATCH:
                        continue
                # Sleep until a commit wakes us (this process's writer, or another
                # process's doorbell), or until the poll reads the feed anyway: the
                # safety poll, or the fast poll where the doorbell cannot be heard.
                # A timer rather than asyncio.wait_for: on Python 3.11, wait_for can
                # swallow a cancellation that lands as its timeout fires.
                timer = loop.call_later(self._watch_timeout, follower.ring)
                try:
                    await wakeup.wait()
                finally:
                    timer.cancel()
        finally:
            self._followers.discard(follower)
        raise StorageUnavailable("sqlite storage was closed while watching")

    def _feed_after(self, after: int) -> list[Event]:
        assert self._reader is not None
        rows = self._reader.execute(
            f"SELECT {COLUMNS} FROM events WHERE position > ? ORDER BY position LIMIT ?", (after, FEED_BATCH)
        ).fetchall()
        return [_row_to_event(r) for r in rows]
