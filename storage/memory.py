"""An in-process store for tests and single-process experiments (``memory://``).

Nothing survives a restart and nothing is shared between processes, but every
other promise of the contract holds, so it is the reference the contract suite
checks the durable backends against.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from .base import (
    PARKED_OWNER,
    PARKED_UNTIL,
    Event,
    EventDraft,
    History,
    PresenceEntry,
    ReadReceipt,
    ScheduledEvent,
    Storage,
    StorageUnavailable,
    claim_blocks_cancel,
    new_epoch,
    publication_key,
    scheduled_id_for,
)

#: How many events the change feed keeps for watchers that fall behind.
FEED_SIZE = 100_000


class MemoryStorage(Storage):
    def __init__(self, url: str = "memory://", **options: Any) -> None:
        super().__init__(**options)
        self.url = url
        self._position = 0
        self._feed: deque[Event] = deque(maxlen=FEED_SIZE)
        self._channels: dict[tuple[str, str], deque[Event]] = {}
        self._trimmed_through: dict[tuple[str, str], int] = {}
        self._keys: dict[tuple[str, str], Event] = {}
        self._presence: dict[tuple[str, str], dict[str, PresenceEntry]] = {}
        self._reads: dict[tuple[str, str], dict[str, ReadReceipt]] = {}
        #: id -> (scheduled event, owner of the claim, claim expiry)
        self._scheduled: dict[str, tuple[ScheduledEvent, str | None, float]] = {}
        self._changed = asyncio.Condition()
        #: Nothing survives this object, so every instance is a new store.
        self._epoch = new_epoch()
        self._open = False

    async def open(self) -> None:
        self._open = True

    async def close(self) -> None:
        self._open = False
        async with self._changed:
            self._changed.notify_all()

    def _check_open(self) -> None:
        if not self._open:
            raise StorageUnavailable("memory storage is closed")

    async def append(self, draft: EventDraft) -> Event:
        self._check_open()
        if draft.idempotency_key is not None:
            existing = self._keys.get((draft.tenant, draft.idempotency_key))
            if existing is not None:
                return existing
        self._position += 1
        event = Event(
            position=self._position,
            tenant=draft.tenant,
            channel=draft.channel,
            event=draft.event,
            data=draft.data,
            timestamp=self.now(),
            ephemeral=draft.ephemeral,
            idempotency_key=draft.idempotency_key,
            meta=draft.meta,
        )
        if draft.idempotency_key is not None:
            self._keys[(draft.tenant, draft.idempotency_key)] = event
        self._feed.append(event)
        if not draft.ephemeral:
            self._remember(event)
        async with self._changed:
            self._changed.notify_all()
        return event

    def _remember(self, event: Event) -> None:
        key = (event.tenant, event.channel)
        kept = self._channels.setdefault(key, deque())
        kept.append(event)
        oldest_allowed = event.timestamp - self.history_ttl
        while kept and (len(kept) > self.history_size or kept[0].timestamp < oldest_allowed):
            self._trimmed_through[key] = kept.popleft().position

    async def history(
        self, tenant: str, channel: str, *, after: int = 0, limit: int = 100
    ) -> History:
        self._check_open()
        key = (tenant, channel)
        kept = self._channels.get(key, ())
        oldest_allowed = self.now() - self.history_ttl
        events = [e for e in kept if e.position > after and e.timestamp >= oldest_allowed]
        expired = [e.position for e in kept if e.timestamp < oldest_allowed]
        trimmed_through = max([self._trimmed_through.get(key, 0), *expired])
        return History(events=events[: max(limit, 0)], lost=after < trimmed_through)

    async def last_position(self) -> int:
        self._check_open()
        return self._position

    async def epoch(self) -> str:
        return self._epoch

    async def watch(self, after: int) -> AsyncIterator[Event]:
        self._check_open()
        while self._open:
            pending = self._feed_after(after)
            for event in pending:
                yield event
                after = event.position
            if pending:
                continue
            async with self._changed:
                if self._position <= after and self._open:
                    await self._changed.wait()
        raise StorageUnavailable("memory storage was closed while watching")

    async def save_presence(self, entries: list[PresenceEntry]) -> None:
        self._check_open()
        for entry in entries:
            self._presence.setdefault((entry.tenant, entry.channel), {})[entry.connection_id] = entry

    async def remove_presence(self, connection_id: str, channels: list[tuple[str, str]]) -> None:
        self._check_open()
        for key in channels:
            entries = self._presence.get(key)
            if entries is not None:
                entries.pop(connection_id, None)
                if not entries:
                    del self._presence[key]

    async def presence(self, tenant: str, channel: str) -> list[PresenceEntry]:
        self._check_open()
        now = self.now()
        return [e for e in self._presence.get((tenant, channel), {}).values() if e.expires_at > now]

    async def save_read(self, tenant: str, channel: str, receipt: ReadReceipt) -> None:
        self._check_open()
        self._reads.setdefault((tenant, channel), {})[receipt.user_id] = receipt

    async def reads(self, tenant: str, channel: str) -> list[ReadReceipt]:
        self._check_open()
        return list(self._reads.get((tenant, channel), {}).values())

    async def schedule(self, draft: EventDraft, deliver_at: float) -> ScheduledEvent:
        self._check_open()
        scheduled_id = scheduled_id_for(draft)
        if scheduled_id in self._scheduled:
            return self._scheduled[scheduled_id][0]
        item = ScheduledEvent(scheduled_id, draft, deliver_at, self.now())
        self._scheduled[item.id] = (item, None, 0.0)
        return item

    async def scheduled(self, tenant: str, channel: str | None = None, *,
                        after: tuple[float, str] | None = None, limit: int | None = None) -> list[ScheduledEvent]:
        self._check_open()
        items = [i for i, _, _ in self._scheduled.values()
                 if i.draft.tenant == tenant and (channel is None or i.draft.channel == channel)
                 and (after is None or (i.deliver_at, i.id) > after)
                 and (tenant, publication_key(i.id)) not in self._keys]
        return sorted(items, key=lambda i: (i.deliver_at, i.id))[:limit]

    async def get_scheduled(self, tenant: str, scheduled_id: str) -> ScheduledEvent | None:
        self._check_open()
        entry = self._scheduled.get(scheduled_id)
        return entry[0] if entry is not None and entry[0].draft.tenant == tenant else None

    async def count_scheduled(self, tenant: str) -> int:
        self._check_open()
        return sum(1 for i, _, _ in self._scheduled.values() if i.draft.tenant == tenant)

    async def cancel_scheduled(self, tenant: str, scheduled_id: str) -> bool | None:
        self._check_open()
        entry = self._scheduled.get(scheduled_id)
        if entry is None or entry[0].draft.tenant != tenant:
            return None
        if entry[1] is not None and claim_blocks_cancel(entry[2], self.now()):
            return False
        del self._scheduled[scheduled_id]
        return True

    async def claim_due(self, owner: str, now: float, lease: float, limit: int) -> list[ScheduledEvent]:
        self._check_open()
        due = sorted((i for i, claimer, until in self._scheduled.values()
                      if i.deliver_at <= now and (claimer is None or until <= now)),
                     key=lambda i: (i.deliver_at, i.id))[:limit]
        for item in due:
            self._scheduled[item.id] = (item, owner, now + lease)
        return due

    async def complete_scheduled(self, scheduled_ids: list[str]) -> None:
        self._check_open()
        for scheduled_id in scheduled_ids:
            self._scheduled.pop(scheduled_id, None)

    async def park_scheduled(self, scheduled_ids: list[str]) -> None:
        self._check_open()
        for scheduled_id in scheduled_ids:
            if scheduled_id in self._scheduled:
                self._scheduled[scheduled_id] = (self._scheduled[scheduled_id][0], PARKED_OWNER, PARKED_UNTIL)

    def _feed_after(self, after: int) -> list[Event]:
        # Positions in the feed are consecutive, so the start is arithmetic and
        # deque indexing near the tail (where watchers read) is cheap.
        if not self._feed:
            return []
        start = max(0, after - self._feed[0].position + 1)
        return [self._feed[i] for i in range(start, len(self._feed))]
