"""The watcher: the one consumer of the store's change feed in this process.

It turns every committed event into a hub publish, in commit order. It
remembers the position of the last event it handed over, and after a storage
error it resumes from exactly there (with exponential backoff), so an outage
neither loses nor repeats an event.
"""

from __future__ import annotations

import asyncio
import logging
import time

from storage import Storage

from . import metrics
from .hub import Hub

log = logging.getLogger("eddy.watcher")

#: Events fanned out between two yields to the event loop (they reach each socket in one write).
BATCH = 64


class Watcher:
    def __init__(
        self,
        storage: Storage,
        hub: Hub,
        *,
        initial_backoff: float = 0.05,
        max_backoff: float = 5.0,
    ) -> None:
        self.storage = storage
        self.hub = hub
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        #: Position of the last event handed to the hub (None until known).
        self.position: int | None = None
        #: Seconds-since-epoch timestamp of that event, for lag reporting.
        self.last_event_time: float | None = None
        #: How late (seconds after the store accepted it) that event was handed to the hub.
        self.lag = 0.0
        self.failures = 0
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        #: (position, future) pairs waiting for the watcher to hand over that position.
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def start(self, after: int | None = None) -> None:
        """Start following the feed after ``after`` (default: the store's current end)."""
        if self._task is not None:
            raise RuntimeError("the watcher is already running")
        self.position = after
        self._task = asyncio.get_running_loop().create_task(self._run(), name="eddy-watcher")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def connected(self) -> bool:
        """True while the watcher follows the feed (not backing off after an error)."""
        return self.running and self.last_error is None

    async def passed(self, position: int, timeout: float) -> None:
        """Return once every event up to ``position`` has been handed to the hub.

        A resuming subscriber that replayed history up to ``position`` waits
        for this before going live, so an event it replayed cannot reach it a
        second time from a watcher that was behind. ``asyncio.TimeoutError``
        if the watcher does not get there in time.
        """
        if self.position is not None and self.position >= position:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((position, future))
        try:
            async with asyncio.timeout(timeout):  # not wait_for: it can swallow a cancellation on 3.11
                await future
        finally:
            self._waiters = [(p, f) for p, f in self._waiters if f is not future]

    def _release_waiters(self) -> None:
        for position, future in self._waiters:
            if self.position is not None and position <= self.position and not future.done():
                future.set_result(None)

    def lag_seconds(self) -> float:
        """How old the newest event handed over is; 0 before the first one."""
        return 0.0 if self.last_event_time is None else max(0.0, time.time() - self.last_event_time)

    async def _run(self) -> None:
        backoff = self.initial_backoff
        handed = 0
        while True:
            try:
                if self.position is None:
                    self.position = await self.storage.last_position()
                if self.last_error is not None:
                    await self.storage.ping()
                    log.info("watcher resuming after position %d", self.position)
                    self.last_error = None
                async for batch in self.storage.watch_batches(self.position):
                    # A group the feed handed over together is a burst: fanned out without yielding,
                    # so each socket gets it in one write; a group of one is a lone event.
                    alone = len(batch) == 1
                    for event in batch:
                        if event.position <= self.position:
                            continue  # a backend replaying its seam; never hand over twice
                        self.hub.publish(event, alone=alone)
                        self.position = event.position
                        self.last_event_time = event.timestamp
                        self.lag = late = max(0.0, time.time() - event.timestamp)
                        metrics.EVENTS_FANNED_OUT.inc()
                        metrics.DELIVERY_LATENCY.observe(late)
                        metrics.WATCHER_LAG.set(late)
                        if self._waiters:
                            self._release_waiters()
                        backoff = self.initial_backoff
                        # Every few events, let sockets and requests run.
                        handed += 1
                        if handed % BATCH == 0:
                            await asyncio.sleep(0)
                raise RuntimeError("the storage change feed ended")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failures += 1
                metrics.WATCHER_ERRORS.inc()
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "watcher error at position %s (%s); retrying in %.2fs", self.position, self.last_error, backoff
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)
