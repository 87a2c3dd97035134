"""Scheduled events: published when due, exactly once across every Eddy process on the store.

Each process polls the store for due events and *claims* a batch atomically
for a lease (a conditional update in the store, not a process-local timer).
It publishes each through the ordinary append with the idempotency key
``scheduled:<id>`` (:func:`storage.publication_key`), then forgets the
schedule; the listing stops showing an event as soon as its publication
commits. A process that dies after
claiming leaves the claim to expire; another process then claims the event
again, and the idempotency key makes a second append return the first event
instead of storing a duplicate. So every due event is published exactly once.

One bad item never stops the scheduler: an event that cannot be published
(its time cannot be written, the store refuses its data) is logged and
*parked* (:meth:`storage.Scheduling.park_scheduled`): it is never claimed
again, stays listed and can be cancelled, while the rest carry on. A fault of
the store itself is retried with backoff; ``/readyz`` reports a scheduler
whose task has ended.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
import uuid

from storage import EventDraft, ScheduledEvent, Storage, StorageError, StorageUnavailable, publication_key

from .frames import iso_timestamp

log = logging.getLogger("eddy.scheduler")

#: Seconds after its time a scheduled event counts as late.
LATE_AFTER = 1.0
#: The furthest from now (ahead, or behind for a time already past) an event may be scheduled, in seconds.
MAX_DELAY = 366 * 24 * 3600


def deliver_at_problem(deliver_at: float, now: float) -> str | None:
    """Why ``deliver_at`` cannot be scheduled, or None. Every store and every timestamp format holds the range."""
    if not now - MAX_DELAY <= deliver_at <= now + MAX_DELAY:  # also refuses NaN
        return "the delivery time must be within a year of now"
    return None


class Scheduler:
    def __init__(self, storage: Storage, *, interval: float = 0.25, lease: float = 30.0, batch: int = 100) -> None:
        self.storage = storage
        self.interval = interval
        self.lease = lease
        self.batch = batch
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.published = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="eddy-scheduler")

    @property
    def running(self) -> bool:
        """True while the scheduling task is alive (``/readyz`` reports it)."""
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def publish_due(self) -> int:
        """Claim and publish one batch of due events; returns how many were claimed.

        Each item succeeds or fails alone: one the store is momentarily unable
        to write stays claimed and is retried when its lease runs out; one that
        can never be published is parked.
        """
        now = time.time()
        claimed = await self.storage.claim_due(self.owner, now, self.lease, self.batch)
        published_at = time.time()
        drafts: dict[str, EventDraft] = {}
        broken: list[str] = []
        for item in claimed:
            try:
                drafts[item.id] = self._draft(item, published_at)
            except Exception as exc:  # noqa: BLE001 - one item failing must not stop the batch
                broken.append(self._failed(item.id, exc))
        # Appended together so a store that group-commits pays one write for the batch;
        # appends are queued in this order, so positions follow due order.
        results = await asyncio.gather(*(self.storage.append(d) for d in drafts.values()), return_exceptions=True)
        done = []
        for scheduled_id, result in zip(drafts, results, strict=True):
            if isinstance(result, StorageUnavailable):
                log.warning("scheduler: %s not published (%s); retried after its lease", scheduled_id, result)
            elif isinstance(result, BaseException):
                broken.append(self._failed(scheduled_id, result))
            else:
                done.append(scheduled_id)
        if broken:
            await self.storage.park_scheduled(broken)
        if done:
            await self.storage.complete_scheduled(done)
        self.published += len(done)
        return len(claimed)

    @staticmethod
    def _failed(scheduled_id: str, exc: BaseException) -> str:
        log.error("scheduler: parking scheduled event %s, which cannot be published: %s: %s",
                  scheduled_id, type(exc).__name__, exc)
        return scheduled_id

    @staticmethod
    def _draft(item: ScheduledEvent, now: float) -> EventDraft:
        late_by = max(0.0, now - item.deliver_at)
        meta = {"scheduled_for": iso_timestamp(item.deliver_at), "late": late_by > LATE_AFTER,
                "late_ms": int(late_by * 1000)}
        return dataclasses.replace(item.draft, idempotency_key=publication_key(item.id), meta=meta)

    async def _run(self) -> None:
        backoff = self.interval
        while True:
            try:
                count = await self.publish_due()
                backoff = self.interval
                if count == self.batch:
                    continue  # more are due: no sleep
            except StorageError as exc:
                log.warning("scheduler: storage unavailable (%s); retrying in %.1fs", exc, backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:  # a bug must not stop scheduled delivery for every tenant
                log.exception("scheduler: unexpected error; retrying in %.1fs", backoff)
                backoff = min(backoff * 2, 5.0)
            await asyncio.sleep(backoff)
