"""The hub: this process's connections, their subscriptions, and fan-out.

The hub never awaits a subscriber. ``publish`` encodes an event once and hands
the same :class:`PreparedMessage` to every local subscriber of the channel, each
of which queues bytes on its own socket and returns at once; a socket that
cannot keep up is the subscriber's problem (it disconnects itself), never the
other subscribers'. Channels are keyed by (tenant, channel), so tenants cannot
see each other's events even when they use the same channel names.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import orjson

from storage import BoundedCounts, Event

from . import metrics
from .frames import PROTOCOL_EVENT_PREFIX, PreparedMessage

log = logging.getLogger("eddy.hub")

ChannelKey = tuple[str, str]  # (tenant, channel)
#: Channels whose fan-out the hub counts for /api/stats at once.
COUNTED_CHANNELS = 10_000


class Subscriber(Protocol):
    """A connection as the hub sees it (a :class:`service.session.Session`)."""

    def deliver(self, message: PreparedMessage) -> None:
        """Queue ``message`` for sending without blocking; must not raise."""

    def close(self, code: int, reason: str) -> None:
        """Start closing the connection with ``code``."""


class Lane(Protocol):
    """A subscriber's direct path to its socket, for a lone event (see :meth:`Hub.publish`).

    A subscriber registers a lane for a channel only while every event of that
    channel may go straight to its socket (it holds none back for a replay).
    The hub hands a lone event to all of a channel's lanes of one class at once
    (:meth:`write_all`), and to a subscriber's ``deliver`` only when its lane
    declines, so the lanes are the whole per-socket cost of a lone event: they
    should touch as little as they can, and cost no Python call per socket.
    """

    @classmethod
    def write_all(cls, lanes: Sequence[Any], message: PreparedMessage) -> list[Any]:
        """Write ``message``'s frame now through each of ``lanes`` (all of this class) and return those that
        declined (closing, or bytes queued earlier must go first), which wrote nothing; must not raise."""


class _LonePlan:
    """A channel's members as a lone event reaches them: lanes grouped by class, then the laneless.

    Made on the channel's first lone event after its membership changed, so a
    lone event reads no subscriber object on its way to the sockets.
    """

    __slots__ = ("batches", "laneless", "owners")

    def __init__(self, members: dict[Subscriber, Lane | None]) -> None:
        groups: dict[type[Lane], list[Lane]] = {}
        #: The subscriber behind each lane: a declined lane's event goes through its ``deliver``.
        self.owners: dict[Lane, Subscriber] = {}
        laneless: list[Subscriber] = []
        for subscriber, lane in members.items():
            if lane is None:
                laneless.append(subscriber)
            else:
                groups.setdefault(type(lane), []).append(lane)
                self.owners[lane] = subscriber
        self.batches = tuple((kind.write_all, tuple(lanes)) for kind, lanes in groups.items())
        self.laneless = tuple(laneless)


class Writer(Protocol):
    """A connection's outbox (a transport): what :meth:`Hub.write_soon` flushes."""

    def write_outbox(self) -> None:
        """Write the frames queued since the last call."""

    # Optional, read with getattr so a transport may leave them out (the dashboard then shows no figure):
    # ``queued_bytes() -> int``: bytes accepted for this connection and not yet taken by the kernel;
    # ``connection_id: str`` and ``identity.user_id``: who it is, for the slowest-consumer list.


class Hub:
    def __init__(self) -> None:
        #: Each channel's local subscribers, with the lane each registered for it (None: no lane).
        self._channels: dict[ChannelKey, dict[Subscriber, Lane | None]] = {}
        #: Each channel's members as a lone event reaches them, dropped when its membership changes.
        self._lone_plans: dict[ChannelKey, _LonePlan] = {}
        self._connections: set[Subscriber] = set()
        self.events_published = 0
        self.deliveries = 0
        #: Events fanned out per channel since start (for rates in /api/stats), for at most
        #: :data:`COUNTED_CHANNELS` channels (the oldest counted is forgotten first): a flood of channel
        #: names cannot grow it without bound.
        self.channel_events: BoundedCounts[ChannelKey] = BoundedCounts(COUNTED_CHANNELS)
        #: Subscribers with frames waiting in their outbox, written at the end of this loop iteration.
        self._pending: list[Writer] = []
        #: True during a lone event's fan-out: :meth:`write_soon` writes at once instead of at the iteration's end.
        self._writing_now = False
        #: True from a fan-out to the end of its loop iteration: a second event in the same iteration is part of
        #: a burst, so its frames (and the rest of the burst's) are coalesced.
        self._fanned_out = False

    # Coalescing ------------------------------------------------------------

    def write_soon(self, writer: Writer) -> None:
        """Have ``writer.write_outbox()`` called once, at the end of this loop iteration.

        A socket's frames from every event fanned out in one iteration (a burst
        the watcher read in one go) leave in one ``send()``: the system call,
        not the Python around it, is what a delivery costs. During a lone
        event's fan-out (see :meth:`publish`) the frame is written at once
        instead, so the first socket does not wait for the last to be queued.
        """
        if self._writing_now:
            writer.write_outbox()
            return
        self._pending.append(writer)
        if len(self._pending) == 1:
            asyncio.get_running_loop().call_soon(self._write_pending)

    def _mark_fanned_out(self) -> None:
        """Remember until the end of this loop iteration that an event was fanned out in it."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a hub driven by hand, outside a loop: no iteration to share
            return
        self._fanned_out = True
        loop.call_soon(self._end_of_iteration)

    def _end_of_iteration(self) -> None:
        self._fanned_out = False

    def _write_pending(self) -> None:
        pending, self._pending = self._pending, []
        for writer in pending:
            try:
                writer.write_outbox()
            except Exception:  # one broken connection must not starve the others
                log.exception("writing to a connection failed")

    # Connections -----------------------------------------------------------

    def connect(self, subscriber: Subscriber) -> None:
        self._connections.add(subscriber)

    def disconnect(self, subscriber: Subscriber, channels: Iterable[ChannelKey]) -> None:
        """Forget ``subscriber`` and its subscriptions to ``channels``."""
        self._connections.discard(subscriber)
        for key in channels:
            self.unsubscribe(key, subscriber)

    def close_all(self, code: int, reason: str) -> None:
        """Tell every connection to reconnect elsewhere, then close it; they disconnect as they go."""
        self.broadcast(PreparedMessage(orjson.dumps({"type": "reconnect", "reason": reason})))
        for subscriber in tuple(self._connections):
            try:
                subscriber.close(code, reason)
            except Exception:
                log.exception("closing a connection failed")

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    # Subscriptions ---------------------------------------------------------

    def subscribe(self, key: ChannelKey, subscriber: Subscriber, lane: Lane | None = None) -> None:
        """Deliver ``key``'s events to ``subscriber``; lone ones through ``lane`` when it has one.

        Subscribing again replaces the lane (None: every event through ``deliver``).
        """
        self._channels.setdefault(key, {})[subscriber] = lane
        self._lone_plans.pop(key, None)
        metrics.CHANNELS.set(len(self._channels))

    def unsubscribe(self, key: ChannelKey, subscriber: Subscriber) -> None:
        members = self._channels.get(key)
        if members is None:
            return
        if subscriber in members:
            del members[subscriber]
            self._lone_plans.pop(key, None)
        if not members:
            del self._channels[key]
            metrics.CHANNELS.set(len(self._channels))

    def subscriber_count(self, key: ChannelKey) -> int:
        return len(self._channels.get(key, ()))

    @property
    def channel_count(self) -> int:
        return len(self._channels)

    def tenant_channels(self, tenant: str) -> dict[str, int]:
        """Local subscriber counts of one tenant's channels."""
        return {channel: len(members) for (owner, channel), members in self._channels.items() if owner == tenant}

    def slowest(self, tenant: str, limit: int = 5) -> list[dict[str, Any]]:
        """The tenant's connections with the most bytes queued and not yet sent, most first.

        Only connections that report ``queued_bytes()`` are listed; a connection
        belongs to the tenant when it is subscribed to one of the tenant's
        channels (every connection is in its tenant's ``tenant`` room).
        """
        members = {s for (owner, _), subscribers in self._channels.items() if owner == tenant for s in subscribers}
        queued = []
        for subscriber in members:
            measure = getattr(subscriber, "queued_bytes", None)
            if measure is None:
                continue
            queued.append({"connection_id": getattr(subscriber, "connection_id", None),
                           "user_id": getattr(getattr(subscriber, "identity", None), "user_id", None),
                           "queued_bytes": measure()})
        queued.sort(key=lambda entry: entry["queued_bytes"], reverse=True)
        return queued[:limit]

    # Fan-out ---------------------------------------------------------------

    def publish(self, event: Event, *, alone: bool = True) -> int:
        """Deliver ``event`` to every local subscriber of its channel; returns how many.

        ``alone`` is False when the change feed handed the event over together
        with others (a group commit read in one go): those are a burst. A lone
        event (``alone``, nothing queued, no other fan-out in this loop
        iteration) is written to each socket as the loop reaches it, through
        the subscriber's lane when it has one; a burst's events are queued and
        leave in one write per socket at the end of the iteration.
        """
        self.events_published += 1
        key = (event.tenant, event.channel)
        if not event.event.startswith(PROTOCOL_EVENT_PREFIX):  # typing, reads, presence are not the channel's events
            self.channel_events.add(key)
        members = self._channels.get(key)
        if not members:
            return 0
        started = time.perf_counter()
        message = PreparedMessage.for_event(event)
        if self._starts_lone(alone):
            delivered = self._write_lone(key, members, message)
        else:
            delivered = self._deliver(tuple(members), message)  # a snapshot: a subscriber may leave meanwhile
        metrics.FANOUT_DURATION.observe(time.perf_counter() - started)
        return delivered

    def broadcast(self, message: PreparedMessage) -> int:
        """Deliver ``message`` to every connection (keepalives, shutdown notices), queued like a burst's."""
        self._starts_lone(False)
        return self._deliver(tuple(self._connections), message)

    def _starts_lone(self, alone: bool) -> bool:
        """Whether a fan-out starting now is lone; from now to the end of this loop iteration none is."""
        lone = alone and not self._pending and not self._fanned_out
        if not self._fanned_out:
            self._mark_fanned_out()
        return lone

    def _write_lone(self, key: ChannelKey, members: dict[Subscriber, Lane | None], message: PreparedMessage) -> int:
        # The lanes first, each class's in one call: the per-socket work of a lone event is then the lane, the
        # stream's state and the system call. A typing or presence signal skips one user, which only the
        # subscriber knows, so it takes no lane.
        self._writing_now = True
        try:
            if message.exclude_user is not None:
                others: Iterable[Subscriber] = tuple(members)
            else:
                plan = self._lone_plans.get(key)
                if plan is None:
                    plan = self._lone_plans[key] = _LonePlan(members)
                declined: list[Lane] = []
                for write_all, lanes in plan.batches:
                    declined += write_all(lanes, message)
                others = [plan.owners[lane] for lane in declined] + list(plan.laneless) if declined \
                    else plan.laneless
            for subscriber in others:
                try:
                    subscriber.deliver(message)
                except Exception:  # one broken subscriber must not starve the others
                    log.exception("delivery to a subscriber failed")
        finally:
            self._writing_now = False
        return self._count(len(members))

    def _deliver(self, recipients: tuple[Subscriber, ...], message: PreparedMessage) -> int:
        for subscriber in recipients:
            try:
                subscriber.deliver(message)
            except Exception:  # one broken subscriber must not starve the others
                log.exception("delivery to a subscriber failed")
        return self._count(len(recipients))

    def _count(self, deliveries: int) -> int:
        self.deliveries += deliveries
        metrics.DELIVERIES.inc(deliveries)
        return deliveries
