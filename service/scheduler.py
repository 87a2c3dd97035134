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
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
import uuid

from storage import ScheduledEvent, Storage, StorageError, publication_key

from .frames import iso_timestamp

log = logging.getLogger("eddy.scheduler")

#: Seconds after its time a scheduled event counts as late.
LATE_AFTER = 1.0


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

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def publish_due(self) -> int:
        """Claim and publish one batch of due events; returns how many."""
        now = time.time()
        claimed = await self.storage.claim_due(self.owner, now, self.lease, self.batch)
        # Appended together so a store that group-commits pays one write for the batch;
        # appends are queued in this order, so positions follow due order.
        published_at = time.time()
        await asyncio.gather(*(self.storage.append(self._draft(item, published_at)) for item in claimed))
        self.published += len(claimed)
        if claimed:
            await self.storage.complete_scheduled([item.id for item in claimed])
        return len(claimed)

    @staticmethod
    def _draft(item: ScheduledEvent, now: float):
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
            await asyncio.sleep(backoff)
