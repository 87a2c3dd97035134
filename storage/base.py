"""The storage contracts, one per role, and the records they exchange.

* :class:`EventLog`: append, history, watch, positions and the epoch;
* :class:`PresenceStore`: who is online where;
* :class:`ReadReceiptStore`: each user's newest read per channel;
* :class:`Scheduling`: events kept until a time, claimed by one process;
* :class:`CollectionFeed`: the application's own collections as events (MongoDB).

:class:`Storage` is all of them at once, which is what a backend implements.
The storage layer knows nothing of sockets, frames or users: tenants and
channels are plain strings here.
"""

from __future__ import annotations

import abc
import time
import uuid
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)

__all__ = [
    "DEFAULT_HISTORY_SIZE",
    "DEFAULT_HISTORY_TTL",
    "EPHEMERAL_TTL",
    "BoundedCounts",
    "CollectionFeed",
    "Event",
    "EventDraft",
    "EventLog",
    "History",
    "PresenceEntry",
    "PresenceStore",
    "ReadReceipt",
    "ReadReceiptStore",
    "RecordRefused",
    "ScheduledEvent",
    "Scheduling",
    "Storage",
    "StorageError",
    "StorageUnavailable",
]

#: Events kept per channel unless configured otherwise.
DEFAULT_HISTORY_SIZE = 1000
#: Seconds an event is kept unless configured otherwise (one day).
DEFAULT_HISTORY_TTL = 24 * 3600.0
#: Seconds an ephemeral event (typing, presence pings) stays in the feed.
EPHEMERAL_TTL = 60.0


class StorageError(Exception):
    """A backend failed in a way the caller cannot fix by changing its input."""


class StorageUnavailable(StorageError):
    """The store cannot be reached or written right now; retrying later may work."""


class RecordRefused(StorageError, ValueError):
    """The store cannot keep this one record (its data cannot be encoded, it is too large or too deep).

    Only that record's write fails: a store that commits several writes
    together never lets one refused record fail the others.
    """


@dataclass(frozen=True, slots=True)
class EventDraft:
    """An event as a publisher hands it in, before the store gives it a position."""

    tenant: str
    channel: str
    event: str
    data: Any = None
    #: When set, a second append with the same (tenant, key) stores nothing and
    #: returns the first event instead: a publisher may retry safely.
    idempotency_key: str | None = None
    #: Ephemeral events reach live subscribers through the feed but never
    #: appear in history, and the store may forget them after ``EPHEMERAL_TTL``.
    ephemeral: bool = False
    #: Facts about the delivery itself (a scheduled event's lateness), sent beside ``data``.
    meta: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Event:
    """A stored event. ``position`` orders all events of a store by commit."""

    position: int
    tenant: str
    channel: str
    event: str
    data: Any
    #: Seconds since the epoch (UTC) when the store accepted the event.
    timestamp: float
    ephemeral: bool = False
    idempotency_key: str | None = None
    meta: dict[str, Any] | None = None

    @property
    def id(self) -> str:
        """The public id: the position in decimal."""
        return str(self.position)


@dataclass(frozen=True, slots=True)
class History:
    """One page of a channel's history."""

    events: list[Event] = field(default_factory=list)
    #: True when ``after`` is older than what the store still keeps for this
    #: channel: some events that came after it have been trimmed and are gone.
    lost: bool = False


@dataclass(frozen=True, slots=True)
class PresenceEntry:
    """One connection of a user in one channel, alive until ``expires_at``.

    Processes refresh their entries periodically; the entries of a process
    that dies expire by themselves, so presence heals without it.
    """

    tenant: str
    channel: str
    user_id: str
    connection_id: str
    status: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class ReadReceipt:
    """The newest message a user has read in a channel."""

    user_id: str
    message_id: str
    read_at: float


@dataclass(frozen=True, slots=True)
class ScheduledEvent:
    """An event waiting for ``deliver_at``; ``id`` is an opaque string."""

    id: str
    draft: EventDraft
    deliver_at: float
    created_at: float


#: The claim a parked scheduled event holds: never runs out, so it is never claimed again.
PARKED_OWNER, PARKED_UNTIL = "parked", float("inf")


def claim_blocks_cancel(claimed_until: float, now: float) -> bool:
    """True while an instance is publishing an event (its lease runs); a parked event can always be cancelled."""
    return now < claimed_until < PARKED_UNTIL


class BoundedCounts(Generic[K]):
    """Counts per key for at most ``limit`` keys: counting a new key past the limit forgets the oldest key (the
    one first counted) and returns it, so its owner can finish with it. Per-channel counters live in one of
    these, so a flood of distinct channel names cannot grow a process's memory without bound. Counting a known
    key costs what a dict increment costs (no reordering on the hot path)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: dict[K, int] = {}

    def add(self, key: K, amount: int = 1) -> tuple[int, K | None]:
        """Add ``amount`` to ``key``'s count; returns the new count and the key forgotten to make room, if any."""
        counts = self._counts
        count = counts.get(key)
        if count is not None:
            counts[key] = count + amount
            return count + amount, None
        forgotten = None
        if len(counts) >= self.limit:
            forgotten = next(iter(counts))
            del counts[forgotten]
        counts[key] = amount
        return amount, forgotten

    def set(self, key: K, count: int) -> None:
        if key in self._counts:
            self._counts[key] = count

    def items(self) -> list[tuple[K, int]]:
        return list(self._counts.items())

    def __len__(self) -> int:
        return len(self._counts)


def new_epoch() -> str:
    """A fresh epoch for a store being created: 12 random hex digits."""
    return uuid.uuid4().hex[:12]


_SCHEDULE_NAMESPACE = uuid.UUID("6f0d3c1e-8f51-4c55-9a3e-5d2f1b7c9e01")


def scheduled_id_for(draft: EventDraft) -> str:
    """A new id, or one derived from the idempotency key so that a retried schedule is stored once."""
    if draft.idempotency_key is None:
        return uuid.uuid4().hex
    return uuid.uuid5(_SCHEDULE_NAMESPACE, f"{draft.tenant}\0{draft.idempotency_key}").hex


def publication_key(scheduled_id: str) -> str:
    """The idempotency key a scheduled event is published with: a second publication stores nothing."""
    return f"scheduled:{scheduled_id}"


#: The largest position a store hands out (a signed 64-bit integer: SQLite's and MongoDB's).
MAX_POSITION = (1 << 63) - 1


def parse_event_id(event_id: str | int) -> int:
    """Turn a public event id back into a position; ``ValueError`` if it is not one.

    Every path that takes an id from a client (REST ``after``, SSE
    ``Last-Event-ID``, socket ``since``/``last_id``) parses it here, so each
    refuses the same things: non-integers, negatives, and anything above
    :data:`MAX_POSITION`, which no store can hold or compare.
    """
    if isinstance(event_id, bool) or not isinstance(event_id, (str, int)):
        raise TypeError("an event id is a decimal string")
    if isinstance(event_id, str) and not (event_id.isascii() and event_id.isdigit() and len(event_id) <= 19):
        raise ValueError("an event id is a decimal string of at most 19 digits")
    position = int(event_id)
    if not 0 <= position <= MAX_POSITION:
        raise ValueError(f"an event id is between 0 and {MAX_POSITION}")
    return position


class EventLog(abc.ABC):
    """The event log: an append-only, totally ordered log shared by every Eddy process on the store.

    * ``append`` stores one event and gives it a *position*: an integer that
      grows by commit order across the whole store (every channel, every
      tenant, every process). The public id is the position in decimal.
    * ``history`` reads one channel of one tenant after a position, oldest
      first, bounded by count and age; ``History.lost`` says when the read
      starts before what is still kept.
    * ``watch`` is the change feed: every event committed after a position,
      in commit order, other processes' appends included.
    * ``epoch`` names this incarnation of the log. Positions only compare
      within one epoch: a new store (a new file, a restarted ``memory://``,
      fresh collections) starts a new epoch, so a client's position from the
      old one is recognised as meaningless rather than silently skipping.

    Backends are created by :func:`storage.open_storage` from a URL and are not
    usable until :meth:`open` has returned. All methods are called from the
    asyncio event loop; a backend that does blocking I/O moves it off the loop.
    """

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect, create schema if needed. Idempotent."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections. Pending ``watch`` iterators end. Idempotent."""

    @abc.abstractmethod
    async def append(self, draft: EventDraft) -> Event:
        """Store ``draft`` durably and return it with its position and timestamp.

        Every field of the draft comes back unchanged in the event, from here,
        from ``history`` and from ``watch``. With an ``idempotency_key``
        already used in the same tenant, nothing is stored and the event
        stored the first time is returned. Raises :class:`StorageUnavailable`
        when the store cannot be written, :class:`RecordRefused` when it
        cannot keep this draft (then nothing else fails with it).
        """

    @abc.abstractmethod
    async def history(
        self, tenant: str, channel: str, *, after: int = 0, limit: int = 100
    ) -> History:
        """Up to ``limit`` non-ephemeral events of one channel with position > ``after``, oldest first."""

    @abc.abstractmethod
    async def last_position(self) -> int:
        """The position of the newest committed event in the store, 0 if none."""

    @abc.abstractmethod
    def watch(self, after: int) -> AsyncIterator[Event]:
        """Every event (all tenants, all channels, ephemeral included) committed
        after ``after``, in commit order, waiting for new ones forever.

        Must see appends made by other processes sharing the store. The
        iterator raises :class:`StorageError` on a fault; the caller resumes by
        calling ``watch`` again with the last position it received.
        """

    async def watch_batches(self, after: int) -> AsyncIterator[list[Event]]:
        """The feed of :meth:`watch`, in the groups the store hands over together.

        A group is the events one read of the feed returned (a group commit,
        several publishers' events at once); the watcher fans a group of more
        than one out as a burst. Backends that read their feed in batches
        override this (SQLite); the default hands over one event at a time.
        """
        async for event in self.watch(after):
            yield [event]

    @abc.abstractmethod
    async def epoch(self) -> str:
        """This store's epoch: a short string, the same for every process and across restarts of the same
        durable store, different for a store created anew."""

    async def ping(self) -> None:
        """Raise :class:`StorageUnavailable` unless the store answers now."""
        await self.last_position()


class PresenceStore(abc.ABC):
    """Who is online where: entries per (tenant, channel, connection) that expire unless refreshed.

    Processes refresh their entries periodically; the entries of a process that
    dies expire by themselves, so presence heals without it.
    """

    @abc.abstractmethod
    async def save_presence(self, entries: list[PresenceEntry]) -> None:
        """Insert or replace entries, keyed by (tenant, channel, connection_id)."""

    @abc.abstractmethod
    async def remove_presence(self, connection_id: str, channels: list[tuple[str, str]]) -> None:
        """Forget a connection's entries in the given (tenant, channel) pairs."""

    @abc.abstractmethod
    async def presence(self, tenant: str, channel: str) -> list[PresenceEntry]:
        """Entries of a channel that have not expired, in no particular order."""


class ReadReceiptStore(abc.ABC):
    """Each user's newest read message per channel: one mutable row per (tenant, channel, user)."""

    @abc.abstractmethod
    async def save_read(self, tenant: str, channel: str, receipt: ReadReceipt) -> None:
        """Remember ``receipt`` as the user's newest read in the channel (replacing an older one)."""

    @abc.abstractmethod
    async def reads(self, tenant: str, channel: str) -> list[ReadReceipt]:
        """Each user's newest read receipt in the channel."""


class Scheduling(abc.ABC):
    """Events kept until a time, then published exactly once by whichever process claims them.

    A draft comes back from every method with all its fields (``ephemeral``
    and ``meta`` included). Claims are leases held in the store, not in a
    process: a process that dies leaves its claims to run out, and another
    takes them. An event that can never be published is *parked*.
    """

    @abc.abstractmethod
    async def schedule(self, draft: EventDraft, deliver_at: float) -> ScheduledEvent:
        """Keep ``draft`` until ``deliver_at`` (seconds since the epoch).

        With an idempotency key, a second call with the same (tenant, key) stores nothing and returns the first.
        """

    @abc.abstractmethod
    async def scheduled(self, tenant: str, channel: str | None = None, *,
                        after: tuple[float, str] | None = None, limit: int | None = None) -> list[ScheduledEvent]:
        """Pending scheduled events of a tenant (one channel, or all), by (``deliver_at``, ``id``).

        A page: at most ``limit`` events, those after the (``deliver_at``, ``id``)
        key ``after`` (the last of the previous page). An event whose
        publication has committed is not pending, even before the publisher has
        called :meth:`complete_scheduled`: a client that has received the event
        never sees it listed as still to come.
        """

    @abc.abstractmethod
    async def get_scheduled(self, tenant: str, scheduled_id: str) -> ScheduledEvent | None:
        """One scheduled event of the tenant (pending, parked or being published), None if unknown."""

    @abc.abstractmethod
    async def count_scheduled(self, tenant: str) -> int:
        """How many scheduled events the tenant holds (pending, parked or being published)."""

    @abc.abstractmethod
    async def cancel_scheduled(self, tenant: str, scheduled_id: str) -> bool | None:
        """Remove a pending event: True if removed, None if unknown, False if it is being published now."""

    @abc.abstractmethod
    async def claim_due(self, owner: str, now: float, lease: float, limit: int) -> list[ScheduledEvent]:
        """Atomically take up to ``limit`` due events, oldest ``deliver_at`` first, for ``lease`` seconds.

        An event claimed by another owner whose lease has not run out is not
        taken; one whose lease ran out (its owner died) is taken again.
        """

    @abc.abstractmethod
    async def complete_scheduled(self, scheduled_ids: list[str]) -> None:
        """Forget scheduled events that have been published."""

    @abc.abstractmethod
    async def park_scheduled(self, scheduled_ids: list[str]) -> None:
        """Set aside events that can never be published: never claimed again, still listed, still cancellable.

        Their claim is held by :data:`PARKED_OWNER` until :data:`PARKED_UNTIL` (forever).
        """


class CollectionFeed:
    """The application's own collections as events (``[[collections]]``): a change feed of data Eddy does not own.

    Optional: only a backend with a change feed of the application's data
    offers it (MongoDB's change streams); the others refuse at start.
    """

    async def follow_collections(self, tables: list[dict[str, Any]]) -> None:
        """Turn changes in the application's own collections into events of the log."""
        raise ValueError(f"{type(self).__name__} cannot watch application collections: use MongoDB storage")


class Storage(EventLog, PresenceStore, ReadReceiptStore, Scheduling, CollectionFeed):
    """Every role in one object: what :func:`storage.open_storage` returns and the built-in backends implement.

    The roles are separate contracts (above); a backend implements them all in
    one class because they share one connection, but the service could be
    given each from a different store.
    """

    def __init__(
        self,
        *,
        history_size: int = DEFAULT_HISTORY_SIZE,
        history_ttl: float = DEFAULT_HISTORY_TTL,
    ) -> None:
        if history_size < 1:
            raise ValueError("history_size must be at least 1")
        if history_ttl <= 0:
            raise ValueError("history_ttl must be positive")
        self.history_size = history_size
        self.history_ttl = history_ttl

    @staticmethod
    def now() -> float:
        return time.time()
