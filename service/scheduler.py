"""Scheduled events: published when due, exactly once across every Eddy process on the store.

Each process checks the store for due events and *claims* a batch atomically
for a lease (a conditional update in the store, not a process-local timer).
A process checks at the time of every event scheduled through it
(:meth:`Scheduler.expect`), and otherwise every ``interval`` seconds, for the
events it cannot know the time of: another process's whose claimer died, or
those scheduled before it started.
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
import heapq
import logging
import os
import time
import uuid

from storage import EventDraft, ScheduledEvent, Storage, StorageError, StorageUnavailable, publication_key

from .frames import iso_timestamp

log = logging.getLogger("eddy.scheduler")

#: Seconds after its time a scheduled event counts as late.
LATE_AFTER = 1.0
#: Due times a scheduler keeps for :meth:`Scheduler.expect`; past that, later events wait for the poll.
MAX_EXPECTED = 100_000
#: The furthest from now (ahead, or behind for a time already past) an event may be scheduled, in seconds.
MAX_DELAY = 366 * 24 * 3600


def deliver_at_problem(deliver_at: float, now: float) -> str | None:
    """Why ``deliver_at`` cannot be scheduled, or None. Every store and every timestamp format holds the range."""
    if not now - MAX_DELAY <= deliver_at <= now + MAX_DELAY:  # also refuses NaN
        return "the delivery time must be within a year of now"
    return None


class Scheduler:
    """Publishes due scheduled events: at the time of each one scheduled through this process, and every
    ``interval`` seconds for the others (see the module's docstring)."""

    def __init__(self, storage: Storage, *, interval: float = 1.0, lease: float = 30.0, batch: int = 100) -> None:
        self.storage = storage
        self.interval = interval
        self.lease = lease
        self.batch = batch
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.published = 0
        self._task: asyncio.Task[None] | None = None
        #: Due times (wall clock) of events scheduled through this process that no check has passed yet, earliest
        #: first.
        self._expected: list[float] = []
        #: Set to end the sleep early: an event expected earlier than any before it.
        self._wake = asyncio.Event()

    def start(self) -> None:
        self._wake = asyncio.Event()  # of this loop (an application may be served again on another)
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

    def expect(self, deliver_at: float) -> None:
        """Check for due events at ``deliver_at`` (an event just scheduled through this process), not at the poll."""
        if len(self._expected) >= MAX_EXPECTED:  # bounded: the poll finds the rest, up to ``interval`` late
            return
        heapq.heappush(self._expected, deliver_at)
        if self._expected[0] == deliver_at:  # the earliest now: a sleep in progress must end sooner
            self._wake.set()

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
            checked_at = time.time()
            try:
                count = await self.publish_due()
            except Exception as exc:  # a bug must not stop scheduled delivery for every tenant
                if isinstance(exc, StorageError):
                    log.warning("scheduler: storage unavailable (%s); retrying in %.1fs", exc, backoff)
                else:
                    log.exception("scheduler: unexpected error; retrying in %.1fs", backoff)
                backoff = min(backoff * 2, 5.0)
                await asyncio.sleep(backoff)
                continue
            backoff = self.interval
            expected = self._expected
            while expected and expected[0] <= checked_at:  # this check has published them (or another process)
                heapq.heappop(expected)
            if count < self.batch:  # a full batch: more are due, no sleep
                await self._sleep()

    async def _sleep(self) -> None:
        """Sleep ``interval`` seconds, or until the earliest expected event is due if that comes first.

        The poll is timed by the loop's monotonic clock (a wall clock set back must not delay it); due times are
        wall-clock times, and an expected one is due when ``time.time()`` reaches it."""
        loop = asyncio.get_running_loop()
        poll_at = loop.time() + self.interval
        while True:
            delay = poll_at - loop.time()
            if self._expected:
                delay = min(delay, self._expected[0] - time.time())
            if delay <= 0:
                return
            self._wake.clear()
            # A timer rather than asyncio.wait_for, which on Python 3.11 can swallow a cancellation.
            timer = loop.call_later(delay, self._wake.set)
            try:
                await self._wake.wait()
            finally:
                timer.cancel()
