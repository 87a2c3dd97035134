"""The Eddy service: wires storage, hub, watcher and auth, and builds the Tornado app.

Handlers talk to :class:`Eddy` only; it is the one place that knows both the
storage contract and the rules about who may do what.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tornado.web

from storage import (
    Event,
    EventDraft,
    History,
    ReadReceipt,
    RecordRefused,
    ScheduledEvent,
    Storage,
    StorageError,
    open_storage,
    publication_key,
)

from . import frames, metrics
from .auth import AuthError, Identity, TokenVerifier, resolve_secret
from .authorizer import ChannelRefused, JoinAuthorizer
from .config import Settings, read_collection_mappings, read_config_file
from .deflate import DeflatedFrames
from .errors import HistoryLost, InvalidInput, LimitReached, NotFound
from .hub import ChannelKey, Hub
from .limits import Buckets
from .logs import log_request
from .payload import check_data
from .presence import PresenceTracker
from .routing import ProcessRoute
from .rules import ChannelRule, Rules, builtin_decision
from .scheduler import Scheduler, deliver_at_problem
from .watcher import Watcher

log = logging.getLogger("eddy")

#: Channels /api/stats lists at most (those with the most events).
MAX_STATS_CHANNELS = 1000
#: Most scheduled events one listing page holds.
MAX_SCHEDULED_PAGE = 1000


@dataclass(frozen=True, slots=True)
class ScheduledPage:
    """A page of pending scheduled events; ``next`` is the cursor of the following page, None on the last."""

    items: list[ScheduledEvent]
    next: str | None


#: Idempotency keys the scheduler publishes with (``storage.publication_key``): no client may use one.
RESERVED_KEY_PREFIX = publication_key("")
#: Separates the caller from its key in a stored idempotency key; never part of a client's key.
_KEY_SCOPE = "\x1f"


def scoped_idempotency_key(identity: Identity, key: str | None) -> str | None:
    """The key as stored: the caller's user id and its key, so keys of different callers never meet.

    :class:`InvalidInput` for a key with control characters or the reserved ``scheduled:`` prefix.
    """
    if key is None:
        return None
    if key.startswith(RESERVED_KEY_PREFIX) or not key.isprintable():
        raise InvalidInput(f"idempotency keys are printable and do not start with {RESERVED_KEY_PREFIX!r}")
    return f"{identity.user_id}{_KEY_SCOPE}{key}"


def parse_scheduled_cursor(cursor: str) -> tuple[float, str]:
    """The (deliver_at, id) key a listing cursor stands for; :class:`InvalidInput` if it is not one."""
    moment, _, scheduled_id = cursor.rpartition("_")
    try:
        deliver_at = float(moment)
    except ValueError:
        raise InvalidInput("cursor must be the next value of a previous page") from None
    if not scheduled_id or not math.isfinite(deliver_at):
        raise InvalidInput("cursor must be the next value of a previous page")
    return deliver_at, scheduled_id


class Eddy:
    """One Eddy process: its storage, hub, watcher and keepalive timer."""

    def __init__(self, settings: Settings, storage: Storage | None = None) -> None:
        self.settings = settings
        self.storage = storage or open_storage(
            settings.storage, history_size=settings.history_size, history_ttl=settings.history_ttl
        )
        uses_secret = any(a.strip().upper().startswith("HS") for a in settings.jwt_algorithms.split(","))
        self.dev_secret_file: Path | None
        secret, self.dev_secret_file = (
            resolve_secret(settings.jwt_secret, settings.secret_file, settings.storage, create=True)
            if uses_secret else (None, None)
        )
        self.verifier = TokenVerifier.from_settings(settings, secret)
        self.rules = Rules.from_config(read_config_file(settings.config)[1]) if settings.config else Rules([])
        #: ``[[collections]]``: the application's collections whose changes become events (MongoDB).
        self.collection_mappings = read_collection_mappings(settings.config) if settings.config else []
        self.authorizer = JoinAuthorizer(settings.authorizer_timeout, settings.authorizer_cache_ttl)
        self.hub = Hub()
        #: Compressed WebSocket frames, built once per event for every socket that negotiated permessage-deflate.
        self.deflated_frames = DeflatedFrames(settings.compression_threshold)
        self.scheduler = Scheduler(self.storage, interval=settings.schedule_interval, lease=settings.schedule_lease)
        self.presence = PresenceTracker(self.storage, ttl=settings.presence_ttl, refresh=settings.presence_ttl / 3)
        self.rest_buckets = Buckets(settings.rest_rate, settings.rest_burst)
        self._addresses: dict[str, int] = {}
        #: (tenant, user) -> that user's open connections in this process, oldest first.
        self._user_connections: dict[tuple[str, str], dict[Any, None]] = {}
        self.watcher = Watcher(self.storage, self.hub)
        #: Set by ``eddy serve --processes N``: this worker and its siblings' private ports (Socket.IO polling).
        self.process_route: ProcessRoute | None = None
        self.started_at = time.time()
        self._keepalive: asyncio.Task[None] | None = None
        #: The store's epoch (:meth:`storage.EventLog.epoch`), read at start: ids only compare within it.
        self.epoch = ""

    # Lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Open storage and start following its feed from the current end (and time this process's garbage
        collections, :func:`metrics.time_gc_pauses`)."""
        if self.dev_secret_file is not None:
            log.warning(
                "DEVELOPMENT SECRET IN USE: no EDDY_JWT_SECRET set, tokens are signed with the secret in %s. "
                "Set EDDY_JWT_SECRET in production.",
                self.dev_secret_file,
            )
        metrics.time_gc_pauses()
        await self.storage.open()
        self.epoch = await self.storage.epoch()
        if self.collection_mappings:
            await self.storage.follow_collections(self.collection_mappings)
        self.watcher.start(after=await self.storage.last_position())
        self.presence.start()
        self.scheduler.start()
        if self.settings.keepalive_interval > 0:
            self._keepalive = asyncio.get_running_loop().create_task(self._send_keepalives(), name="eddy-keepalive")

    async def stop(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        await self.scheduler.stop()
        await self.presence.stop()
        await self.watcher.stop()
        await self.storage.close()

    async def _send_keepalives(self) -> None:
        while True:
            await asyncio.sleep(self.settings.keepalive_interval)
            frame = {"type": "keepalive", "timestamp": frames.iso_timestamp(time.time())}
            self.hub.broadcast(frames.PreparedMessage(frames.encode(frame)))

    # What handlers may ask --------------------------------------------------

    def authenticate(self, token: str | None) -> Identity:
        """The identity behind ``token``; raises :class:`service.auth.AuthError`."""
        try:
            return self.verifier.verify(token)
        except AuthError as exc:
            metrics.AUTH_FAILURES.labels(exc.code).inc()
            raise

    def channel_key(self, identity: Identity, channel: object) -> ChannelKey:
        """``channel``'s key in the identity's tenant; ``INVALID_CHANNEL`` if the name is bad."""
        if not frames.is_valid_channel(channel):
            raise ChannelRefused(frames.INVALID_CHANNEL, frames.CHANNEL_RULE_TEXT)
        assert isinstance(channel, str)
        return (identity.tenant, channel)

    async def authorize_join(self, identity: Identity, channel: object) -> ChannelKey:
        """The key of ``channel`` if ``identity`` may subscribe to it, else :class:`ChannelRefused`."""
        key = self.channel_key(identity, channel)
        name = key[1]
        builtin = builtin_decision(identity, name)
        if builtin is not None:
            if not builtin:
                raise ChannelRefused(frames.FORBIDDEN, "user: and role: rooms belong to that user or role")
            return key
        if not self.rules.configured:
            return key
        rule = self._rule_for(name)
        if not rule.may_join(identity, name):
            raise ChannelRefused(frames.FORBIDDEN, f"joining {name} is not allowed for this user")
        if rule.authorizer:
            await self.authorizer.check(rule.authorizer, identity, name)
        return key

    def authorize_publish(self, identity: Identity, channel: object) -> ChannelKey:
        """The key of ``channel`` if the identity may publish to it over HTTP, else :class:`ChannelRefused`.

        The policy (docs/SECURITY.md, "Who may publish"):

        * a *server credential* (a token holding ``EDDY_PUBLISHER_ROLE``) publishes to any channel of its tenant,
          built-in rooms included (server-side targeting), whatever a rule's ``publish`` list says; with a rules
          file the channel must still match a rule;
        * any other token never publishes to built-in rooms (``user:``, ``role:``, ``tenant``); with a rules
          file it publishes where the channel's rule lets it (the same check as a socket publish), without one
          to any other channel of its tenant (the development default).
        """
        key = self.channel_key(identity, channel)
        name = key[1]
        builtin = builtin_decision(identity, name) is not None
        if self.is_publisher(identity):
            if self.rules.configured and not builtin:
                self._rule_for(name)
            return key
        if builtin:
            raise ChannelRefused(frames.FORBIDDEN, f"publishing to built-in rooms needs the "
                                 f"{self.settings.publisher_role or 'publisher'} role (a server credential)")
        if self.rules.configured and not self._rule_for(name).may_publish(identity, name):
            raise ChannelRefused(frames.FORBIDDEN, f"publishing to {name} is not allowed for this user")
        return key

    def is_publisher(self, identity: Identity) -> bool:
        """Whether ``identity`` is a server credential (holds the configured publisher role)."""
        return bool(self.settings.publisher_role) and self.settings.publisher_role in identity.roles

    def authorize_socket_publish(self, identity: Identity, channel: object) -> ChannelKey:
        """The key of ``channel`` if a rule lets the identity publish to it from a socket."""
        key = self.channel_key(identity, channel)
        if not self.rules.configured or builtin_decision(identity, key[1]) is not None:
            raise ChannelRefused(frames.FORBIDDEN, "publishing from a socket needs a channel rule that allows it")
        if not self._rule_for(key[1]).may_publish(identity, key[1]):
            raise ChannelRefused(frames.FORBIDDEN, f"publishing to {key[1]} is not allowed for this user")
        return key

    def keeps_history(self, channel: str) -> bool:
        rule = self.rules.rule_for(channel)
        return rule is None or rule.history

    def tracks_presence(self, channel: str) -> bool:
        rule = self.rules.rule_for(channel)
        return rule is None or rule.presence

    def _rule_for(self, channel: str) -> ChannelRule:
        rule = self.rules.rule_for(channel)
        if rule is None:
            raise ChannelRefused(frames.FORBIDDEN, f"no channel rule allows {channel}")
        if not rule.valid_id(channel):
            raise ChannelRefused(frames.INVALID_CHANNEL, f"{channel} does not match the id pattern {rule.id_pattern}")
        return rule

    # Connections per address and per user ----------------------------------------

    def connections_from(self, address: str) -> int:
        return self._addresses.get(address, 0)

    def count_address(self, address: str, change: int) -> None:
        count = self._addresses.get(address, 0) + change
        if count > 0:
            self._addresses[address] = count
        else:
            self._addresses.pop(address, None)


    def add_connection(self, identity: Identity, connection: Any) -> list[Any]:
        """Count a user's connection; returns the oldest ones now over the per-user limit."""
        owned = self._user_connections.setdefault((identity.tenant, identity.user_id), {})
        owned[connection] = None
        excess = len(owned) - self.settings.max_connections_per_user
        return list(owned)[:excess] if excess > 0 else []

    def remove_connection(self, identity: Identity, connection: Any) -> None:
        key = (identity.tenant, identity.user_id)
        owned = self._user_connections.get(key)
        if owned is not None:
            owned.pop(connection, None)
            if not owned:
                del self._user_connections[key]

    async def publish(
        self, identity: Identity, channel: object, event: str, data: Any, *, idempotency_key: str | None = None,
        via: str = "http",
    ) -> Event:
        """Store an event ``identity`` publishes over HTTP (or, with ``via="socket"``, from a socket, where only
        a rule's ``publish`` list grants it); the watcher broadcasts it.

        The idempotency key is the caller's own (:func:`scoped_idempotency_key`): a retry returns the caller's
        first event, and nobody else's key can suppress or reveal it.
        """
        authorize = self.authorize_socket_publish if via == "socket" else self.authorize_publish
        tenant, channel = authorize(identity, channel)
        stored = await self.append(tenant, channel, event, data,
                                   idempotency_key=scoped_idempotency_key(identity, idempotency_key))
        metrics.EVENTS_PUBLISHED.labels(via).inc()
        return stored

    async def append(self, tenant: str, channel: str, event: str, data: Any, *,
                     idempotency_key: str | None = None) -> Event:
        """Store an event on an authorized channel (ephemeral where its rule keeps no history).

        :class:`InvalidInput` when the data cannot be stored (nested too deep, refused by the store) or the key
        is reserved. Callers with an identity use :meth:`publish`, which scopes the key to the caller.
        """
        check_data(data)
        if idempotency_key is not None and idempotency_key.startswith(RESERVED_KEY_PREFIX):
            raise InvalidInput(f"idempotency keys starting with {RESERVED_KEY_PREFIX!r} are reserved")
        draft = EventDraft(tenant=tenant, channel=channel, event=event, data=data, idempotency_key=idempotency_key,
                           ephemeral=not self.keeps_history(channel))
        try:
            return await self.storage.append(draft)
        except RecordRefused as exc:
            raise InvalidInput(str(exc)) from None

    async def schedule(self, identity: Identity, channel: object, event: str, data: Any, deliver_at: float, *,
                       idempotency_key: str | None = None) -> ScheduledEvent:
        """Keep an event until ``deliver_at``; the scheduler publishes it then.

        :class:`InvalidInput` when ``deliver_at`` is not within :data:`service.scheduler.MAX_DELAY` of now.
        The idempotency key is scoped to the caller as in :meth:`publish`.
        """
        problem = deliver_at_problem(deliver_at, time.time())
        if problem is not None:
            raise InvalidInput(problem)
        tenant, channel = self.authorize_publish(identity, channel)
        check_data(data)
        key = scoped_idempotency_key(identity, idempotency_key)
        if await self.storage.count_scheduled(tenant) >= self.settings.max_scheduled_per_tenant:
            raise LimitReached("TOO_MANY_SCHEDULED", f"this tenant already holds "
                               f"{self.settings.max_scheduled_per_tenant} scheduled events")
        draft = EventDraft(tenant=tenant, channel=channel, event=event, data=data, idempotency_key=key,
                           ephemeral=not self.keeps_history(channel))
        try:
            scheduled = await self.storage.schedule(draft, deliver_at)
        except RecordRefused as exc:
            raise InvalidInput(str(exc)) from None
        self.scheduler.expect(scheduled.deliver_at)
        return scheduled

    async def scheduled(self, identity: Identity, channel: str | None = None, *, cursor: str | None = None,
                        limit: int = 100) -> ScheduledPage:
        """One page of the tenant's pending scheduled events on channels ``identity`` may join.

        With ``channel``, that channel only (refused like a join); without, the
        events of channels the identity may not join are left out of the page.
        ``cursor`` is the ``next`` of the previous page.
        """
        if not 1 <= limit <= MAX_SCHEDULED_PAGE:
            raise InvalidInput(f"limit must be between 1 and {MAX_SCHEDULED_PAGE}")
        after = parse_scheduled_cursor(cursor) if cursor is not None else None
        if channel is not None:
            channel = (await self.authorize_join(identity, channel))[1]
        read = await self.storage.scheduled(identity.tenant, channel, after=after, limit=limit)
        items = read
        if channel is None:
            allowed = {name: await self.may_join(identity, name) for name in {i.draft.channel for i in read}}
            items = [i for i in read if allowed[i.draft.channel]]
        last = read[-1] if len(read) == limit else None
        return ScheduledPage(items, f"{last.deliver_at!r}_{last.id}" if last is not None else None)

    async def cancel_scheduled(self, identity: Identity, scheduled_id: str) -> bool:
        """Cancel a pending event on a channel ``identity`` may join: True, or False while it is being published.

        :class:`NotFound` when there is no such event the identity may see.
        """
        item = await self.storage.get_scheduled(identity.tenant, scheduled_id)
        if item is None or not await self.may_join(identity, item.draft.channel):
            raise NotFound("no pending scheduled event with that id")
        removed = await self.storage.cancel_scheduled(identity.tenant, scheduled_id)
        if removed is None:
            raise NotFound("no pending scheduled event with that id")
        return removed

    async def may_join(self, identity: Identity, channel: str) -> bool:
        """Whether :meth:`authorize_join` lets ``identity`` in (an unreachable authorizer says no)."""
        try:
            await self.authorize_join(identity, channel)
        except ChannelRefused:
            return False
        return True

    async def signal(self, key: ChannelKey, name: str, data: dict[str, Any]) -> None:
        """Broadcast an ephemeral protocol event (typing, read, presence) to every process."""
        await self.storage.append(EventDraft(key[0], key[1], name, data, ephemeral=True))

    async def mark_read(self, identity: Identity, key: ChannelKey, message_id: str) -> ReadReceipt:
        receipt = ReadReceipt(identity.user_id, message_id, time.time())
        await self.storage.save_read(key[0], key[1], receipt)
        await self.signal(key, frames.READ_EVENT, {"user_id": identity.user_id, "message_id": message_id,
                                                   "read_at": frames.iso_timestamp(receipt.read_at)})
        return receipt

    async def reads(self, identity: Identity, channel: str) -> list[ReadReceipt]:
        key = await self.authorize_join(identity, channel)
        return await self.storage.reads(*key)

    async def presence_users(self, identity: Identity, channel: str) -> list[dict[str, Any]]:
        key = await self.authorize_join(identity, channel)
        return await self.presence.users(key)

    async def history(self, identity: Identity, channel: str, *, after: int, limit: int,
                      epoch: str | None = None) -> History:
        """A page of ``channel``'s history after ``after``, if ``identity`` may join it.

        :class:`HistoryLost` when ``after`` cannot be from this store: ``epoch`` (the one the client got with the
        id) is not the store's, or ``after`` is beyond the newest position the store ever gave (the store was
        recreated since). ``History.lost`` still says when the events after ``after`` were trimmed.
        """
        tenant, channel = await self.authorize_join(identity, channel)
        await self.check_resume_point(after, epoch)
        return await self.storage.history(tenant, channel, after=after, limit=limit)

    async def check_resume_point(self, after: int, epoch: str | None) -> None:
        """:class:`HistoryLost` unless a position ``after`` of ``epoch`` can be resumed from in this store."""
        if epoch is not None and epoch != self.epoch:
            raise HistoryLost(f"those ids are from epoch {epoch[:32]!r}; the store was recreated "
                              f"(epoch {self.epoch!r}): reload without since")
        # The watcher's position is never ahead of the store: only an id beyond it costs a store round trip.
        if after > (self.watcher.position or 0) and after > await self.storage.last_position():
            raise HistoryLost("that id is ahead of this store, which was recreated: reload without since")

    async def readiness(self) -> dict[str, str]:
        """Each check's state; all ``"ok"`` means ready to serve."""
        checks = {"storage": "ok", "watcher": "ok", "scheduler": "ok"}
        try:
            async with asyncio.timeout(2.0):
                await self.storage.ping()
        except (TimeoutError, StorageError, OSError) as exc:
            checks["storage"] = f"unavailable: {type(exc).__name__}"
        if not self.watcher.running:
            checks["watcher"] = "stopped"
        elif not self.watcher.connected:
            checks["watcher"] = f"retrying: {self.watcher.last_error}"
        if not self.scheduler.running:
            checks["scheduler"] = "stopped"
        return checks

    def stats(self, tenant: str) -> dict[str, Any]:
        """This process's view: its totals, the watcher's lag, the delivery-latency histogram, the tenant's
        slowest consumers, and the tenant's channels with subscribers and event counts."""
        uptime = max(time.time() - self.started_at, 1e-9)
        subscribers = self.hub.tenant_channels(tenant)
        counts = {channel: n for (owner, channel), n in self.hub.channel_events.items() if owner == tenant}
        if len(counts) > MAX_STATS_CHANNELS:  # the busiest ones
            counts = dict(sorted(counts.items(), key=lambda item: -item[1])[:MAX_STATS_CHANNELS])
        channels = {
            name: {"subscribers": subscribers.get(name, 0), "events": counts.get(name, 0),
                   "events_per_second": round(counts.get(name, 0) / uptime, 3)}
            for name in sorted(set(subscribers) | set(counts))
        }
        return {
            "process": {"pid": os.getpid(), "connections": self.hub.connection_count,
                        "channels": self.hub.channel_count, "uptime_seconds": round(uptime, 1),
                        "events_fanned_out": self.hub.events_published, "deliveries": self.hub.deliveries,
                        "watcher_position": self.watcher.position},
            "watcher": {"position": self.watcher.position, "lag_seconds": round(self.watcher.lag, 6),
                        "connected": self.watcher.connected, "failures": self.watcher.failures},
            "delivery_latency": metrics.histogram_counts(metrics.DELIVERY_LATENCY),
            "slowest_consumers": self.hub.slowest(tenant),
            "channels": channels,
        }

    # Tornado ---------------------------------------------------------------

    def make_app(self, **extra_settings: Any) -> tornado.web.Application:
        from handlers import BoundedApplication, routes
        from handlers.http import NotFoundHandler

        return BoundedApplication(
            routes(self),
            max_body_bytes=self.settings.max_body_bytes,
            body_timeout=self.settings.body_timeout,
            default_handler_class=NotFoundHandler,
            default_handler_args={"eddy": self},
            websocket_ping_interval=self.settings.ping_interval or None,
            websocket_ping_timeout=self.settings.ping_timeout or None,
            websocket_max_message_size=self.settings.max_frame_bytes,
            log_function=log_request,
            **extra_settings,
        )
