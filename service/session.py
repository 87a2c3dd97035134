"""A connection's session, whatever carries it: identity, subscriptions, replay, timers, limits.

One :class:`Session` per connection (a WebSocket, an SSE stream, and whatever
transport or protocol dialect comes next). It is the hub's subscriber for the
connection and the only place that knows the rules a connection lives by:

* **identity**: who the connection is (:meth:`identify`, :meth:`authenticate`),
  the per-user connection cap (the oldest connection over it is closed, 4029),
  the per-address count, token expiry with its grace period, and the
  deferred-authentication timeout;
* **subscriptions**: automatic rooms, the path channel, ``join``/``leave``;
* **the replay seam**: a join with ``since`` replays stored events and holds
  the channel's live events meanwhile, then releases those the replay did not
  already send: no gap, no duplicate. Replayed bytes obey the same send bound
  as live ones (the transport is drained between batches);
* **limits**: frames per second, typing and presence signals per window;
* **errors**: storage, authorization and token errors become a
  :class:`service.frames.FrameError` with a documented code, here and only here.

Operations (:meth:`join`, :meth:`leave`, :meth:`publish`, :meth:`typing`,
:meth:`read`, :meth:`presence`, :meth:`presence_query`, :meth:`sync`,
:meth:`ping`, :meth:`authenticate`) are transport- and dialect-neutral: they
return a result or raise :class:`FrameError`. A protocol dialect (the native
one is :mod:`service.protocol`) turns client frames into these calls and
renders their results. Messages the server sends on its own (``connected``,
an expiring token, a replay that failed) go through ``notify`` in the native
frame shape; a dialect passes its own ``notify`` to render them its way.

A transport implements :class:`Transport` and calls :meth:`open` once the
connection is accepted and :meth:`closed` when it is gone.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from . import frames, metrics
from .auth import Identity
from .errors import StorageUnavailable
from .frames import FrameError, PreparedMessage
from .hub import ChannelKey
from .limits import TokenBucket, WindowLimit
from .logs import ConnectionLogger
from .presence import STATUSES
from .refusals import position_field, refusals
from .replay import Replay
from .rules import automatic_rooms

if TYPE_CHECKING:
    from storage import Event, History

    from .app import Eddy

__all__ = ["Authenticated", "Joined", "Session", "State", "Synced", "Transport", "position_field", "refusals"]

log = logging.getLogger("eddy.session")

#: Seconds a resume waits for this process's watcher to reach what was replayed.
REPLAY_CATCH_UP = 10.0
#: Seconds a replay waits for a client to read what it was sent before it is closed as a slow consumer.
DRAIN_TIMEOUT = 30.0
#: Events one sync answer carries at most.
SYNC_LIMIT = 1000
#: Typing frames a connection may send per window, and the window in seconds (the same for presence frames).
TYPING_BURST, TYPING_WINDOW = 10, 5.0
#: While a user keeps typing, the indicator is re-broadcast at most this often.
TYPING_REBROADCAST = 3.0


class Transport(Protocol):
    """What a session needs from the connection that carries it.

    ``queue`` is the fan-out's hot path: it renders the message for this
    transport (from the message's per-rendering cache, so an event is
    rendered once for all recipients), appends it to the connection's outbox
    and returns; it never blocks and never raises.
    """

    #: Label of the ``eddy_connections`` metric: ``websocket``, ``sse``, ...
    kind: str
    #: The client's address, for the per-address connection limit.
    remote_ip: str

    def queue(self, message: PreparedMessage) -> None:
        """Queue ``message``; what is queued in one loop iteration leaves in one write."""

    def write_outbox(self) -> None:
        """Write what is queued now."""

    async def drained(self) -> bool:
        """Flush, and wait until nothing is left unsent; False if the connection is gone (or was closed for not reading)."""

    def close(self, code: int, reason: str) -> None:
        """Start closing the connection with ``code``; the transport then calls :meth:`Session.closed`."""

    # Optional, read with getattr: ``lane``, a :class:`service.hub.Lane` to the connection's socket, which the
    # session registers with each channel it does not hold back (a lone event then goes straight to the socket).


class State(enum.Enum):
    NEW = "new"  # accepted, not yet open (handshake)
    UNAUTHENTICATED = "unauthenticated"  # open, waiting for an authenticate (deferred authentication)
    ACTIVE = "active"
    CLOSED = "closed"


@dataclass(frozen=True)
class Joined:
    channel: str
    #: The resume point of a join without ``since`` (everything after it reaches the connection); None with ``since``.
    last_id: str | None


@dataclass(frozen=True)
class Authenticated:
    #: True for the first authentication of a deferred socket (the session started), False for a refresh.
    started: bool
    expires_at: float | None


@dataclass(frozen=True)
class Synced:
    channel: str
    events: list[dict[str, Any]]
    has_more: bool


#: The presence set of a connection in no presence channel: one shared empty frozenset (since Python 3.10 each
#: ``frozenset()`` call makes a new one, 216 bytes).
NOT_PRESENT: frozenset[ChannelKey] = frozenset()


class Session:
    """One connection's state and the operations a client may ask for (see the module docstring)."""

    def __init__(self, eddy: Eddy, transport: Transport, *, path_channel: str | None = None,
                 notify: Callable[[dict[str, Any]], None] | None = None, refreshable: bool = True,
                 tracks_presence: bool = True) -> None:
        self.eddy = eddy
        self.transport = transport
        self.state = State.NEW
        self.connection_id = uuid.uuid4().hex
        self.log = ConnectionLogger(log, {"connection_id": self.connection_id})
        self.identity: Identity | None = None
        #: ``/ws/<channel>/stream``: a broadcast subscriber of that channel (no presence).
        self.path_channel = path_channel
        self._path_key: ChannelKey | None = None
        self._notify = notify or self._notify_native
        #: Whether a fresh token may replace an expiring one (False: the connection ends when its token expires).
        self.refreshable = refreshable
        #: Whether explicit joins list this connection in presence (not for read-only streams).
        self.tracks_presence = tracks_presence
        self.channels: set[ChannelKey] = set()
        self.automatic: set[ChannelKey] = set()
        #: Channels this connection is listed in for presence: a set from the first one on (most connections have none).
        self.present_in: frozenset[ChannelKey] | set[ChannelKey] = NOT_PRESENT
        self.status = "online"
        #: Channels whose live events wait (a replay, a publish's ack); released by :meth:`_release`.
        self.holding: dict[ChannelKey, list[PreparedMessage]] = {}
        settings = eddy.settings
        self._frames = TokenBucket(settings.frame_rate, settings.frame_burst)
        self._refused_in_a_row = 0
        #: Per-kind limits of typing and presence frames, created on a connection's first such frame.
        self._signals: dict[str, WindowLimit] = {}
        self._typing_since: dict[ChannelKey, float] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._background: set[asyncio.Task[None]] | None = None  # created with the first background task

    # Admission and identity ---------------------------------------------------------------

    @staticmethod
    def admits(eddy: Eddy, address: str) -> bool:
        """False when ``address`` holds as many connections as it may (refuse with ``TOO_MANY_CONNECTIONS``)."""
        if eddy.connections_from(address) >= eddy.settings.max_connections_per_ip:
            metrics.DROPPED.labels("connections_per_ip").inc()
            return False
        return True

    def identify(self, token: str | None) -> Identity:
        """Verify ``token`` before the connection is open (a handshake); raises :class:`FrameError`."""
        with refusals():
            self.identity = self.eddy.authenticate(token)
        return self.identity

    async def authorize(self, channel: object) -> ChannelKey:
        """The key of ``channel`` if this identity may join it; raises :class:`FrameError`."""
        assert self.identity is not None
        with refusals():
            return await self.eddy.authorize_join(self.identity, channel)

    async def authorize_path(self) -> None:
        """Check the path channel (``/ws/<channel>/stream``) for this identity; raises :class:`FrameError`."""
        if self.path_channel is not None:
            self._path_key = await self.authorize(self.path_channel)

    # Lifecycle -----------------------------------------------------------------------------

    def open(self) -> None:
        """The connection is accepted: count it; without an identity, wait for ``authenticate``."""
        self.eddy.hub.connect(self)
        self.eddy.count_address(self.transport.remote_ip, +1)
        metrics.CONNECTIONS.labels(self.transport.kind).inc()
        if self.identity is None:
            self.state = State.UNAUTHENTICATED
            self._set_timer("auth", self.eddy.settings.auth_timeout, self._authentication_timed_out)
        else:
            self.state = State.ACTIVE
            self._count_user()

    def start(self, since: int | None = None, epoch: str | None = None, **connected_extra: Any) -> None:
        """Join the automatic rooms and the path channel, say ``connected``, and resume after ``since``."""
        identity = self.identity
        assert identity is not None
        rooms = [(identity.tenant, room) for room in automatic_rooms(identity)]
        self.automatic.update(rooms)
        if self._path_key is not None:
            # A /ws/<channel>/stream socket is a broadcast subscriber (a dashboard,
            # a kiosk): no presence, or every connect would be announced to all of them.
            rooms.append(self._path_key)
        for key in rooms:
            if since is not None:
                self._hold(key)  # live events wait until the replay is done
            self._subscribe(key)
        self.watch_expiry()
        connected: dict[str, Any] = {
            "type": "connected",
            "connection_id": self.connection_id,
            "user_id": identity.user_id,
            "tenant": identity.tenant,
            "channels": sorted(channel for _, channel in self.channels),
            "timestamp": frames.iso_timestamp(time.time()),
        }
        if since is None:
            connected["last_id"] = self.resume_point()
        connected["epoch"] = self.eddy.epoch
        connected.update(connected_extra)
        self._notify(connected)
        if since is not None:
            self.background(self._resume_rooms(rooms, since, epoch))
        self.log.debug("open for user %s", identity.user_id)

    def closed(self) -> None:
        """The connection is gone: stop deliveries, uncount it, clear its typing and presence (idempotent)."""
        if self.state is State.CLOSED:
            return
        was_open = self.state is not State.NEW
        self.state = State.CLOSED
        self._leave_hub()
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        self.holding.clear()
        if not was_open:
            return
        metrics.CONNECTIONS.labels(self.transport.kind).dec()
        self.eddy.count_address(self.transport.remote_ip, -1)
        if self.identity is not None:
            self.eddy.remove_connection(self.identity, self)
            for key in list(self._typing_since):
                self.background(self._broadcast_typing(key, False))
            self._typing_since.clear()
            if self.present_in:
                self.background(self._leave_presence(sorted(self.present_in)))

    @property
    def active(self) -> bool:
        return self.state is State.ACTIVE

    def _count_user(self) -> None:
        assert self.identity is not None
        for evicted in self.eddy.add_connection(self.identity, self):
            evicted.close(frames.CLOSE_TOO_MANY_CONNECTIONS, "too many connections for this user")

    def background(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run work that outlives the current request; failures are logged, never lost silently."""
        task = asyncio.get_running_loop().create_task(coroutine)
        if self._background is None:
            self._background = set()
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        assert self._background is not None
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.warning("background work failed: %r", task.exception())

    # Hub subscriber (the hot path) ---------------------------------------------------------------

    def deliver(self, message: PreparedMessage) -> None:
        """Queue a message without blocking: skips the user's own typing/presence, holds a replaying channel's."""
        if message.exclude_user is not None and self.identity is not None \
                and message.exclude_user == self.identity.user_id:
            return
        if self.holding and message.key in self.holding:
            self.holding[message.key].append(message)
            return
        self.transport.queue(message)

    def close(self, code: int, reason: str) -> None:
        self.transport.close(code, reason)

    def queued_bytes(self) -> int:
        """Bytes queued for this connection and not yet sent (the dashboard's slowest consumers); 0 when the
        transport does not say (an optional ``queued_bytes()`` on it)."""
        measure = getattr(self.transport, "queued_bytes", None)
        return measure() if measure is not None else 0

    def resume_point(self) -> str:
        """The id after which everything reaches this connection: where to resume if nothing arrives first."""
        return str(self.eddy.watcher.position or 0)

    def notify(self, frame: dict[str, Any]) -> None:
        """Send a server-initiated message (native frame shape), rendered by the connection's dialect."""
        self._notify(frame)

    def _notify_native(self, frame: dict[str, Any]) -> None:
        self.transport.queue(PreparedMessage(frames.encode(frame)))

    # Limits ------------------------------------------------------------------------------------

    def check_frame_rate(self) -> None:
        """Token bucket per connection: ``RATE_LIMITED`` while over the rate, close 1008 under sustained abuse."""
        if self._frames.take():
            self._refused_in_a_row = 0
            return
        self._refused_in_a_row += 1
        metrics.RATE_LIMITED.labels("frames").inc()
        if self._refused_in_a_row > 2 * self.eddy.settings.frame_burst:
            self.log.warning("closed: sustained frame flood")
            self.transport.close(1008, "rate limit")
        raise FrameError(frames.RATE_LIMITED, f"more than {self.eddy.settings.frame_rate:g} frames per second")

    def _check_signal_rate(self, kind: str) -> None:
        # Typing and presence frames fan out to every member of a channel: without a bound a
        # client's frame rate is multiplied by the channel's size.
        limit = self._signals.get(kind)
        if limit is None:
            limit = self._signals[kind] = WindowLimit(TYPING_BURST, TYPING_WINDOW)
        if not limit.take():
            metrics.RATE_LIMITED.labels(kind).inc()
            raise FrameError(frames.RATE_LIMITED, f"at most {TYPING_BURST} {kind} frames per {TYPING_WINDOW:g}s")

    # Timers -----------------------------------------------------------------------------------

    def _set_timer(self, name: str, delay: float, callback: Callable[[], None]) -> None:
        self._cancel_timer(name)
        self._timers[name] = asyncio.get_running_loop().call_later(max(0.0, delay), callback)

    def _cancel_timer(self, name: str) -> None:
        handle = self._timers.pop(name, None)
        if handle is not None:
            handle.cancel()

    def _authentication_timed_out(self) -> None:
        self._timers.pop("auth", None)
        if self.identity is None:
            self.transport.close(frames.CLOSE_AUTH_TIMEOUT, "authentication timeout")

    def watch_expiry(self) -> None:
        """Warn with ``TOKEN_EXPIRED`` when the token expires; close after the grace period."""
        self._cancel_timer("grace")
        assert self.identity is not None
        if self.identity.expires_at is None:
            self._cancel_timer("expiry")
            return
        self._set_timer("expiry", self.identity.expires_at - time.time(), self._token_expired)

    def _token_expired(self) -> None:
        self._timers.pop("expiry", None)
        if not self.refreshable:
            self.notify(frames.error_frame(frames.TOKEN_EXPIRED, "the token has expired"))
            self.transport.close(frames.CLOSE_TOKEN_EXPIRED, "token expired")
            return
        grace = self.eddy.settings.token_grace
        self.notify(frames.error_frame(frames.TOKEN_EXPIRED, f"the token has expired; send authenticate within {grace:g}s"))
        self._set_timer("grace", grace, self._grace_over)

    def _grace_over(self) -> None:
        self._timers.pop("grace", None)
        self.transport.close(frames.CLOSE_TOKEN_EXPIRED, "token expired")

    # Subscriptions and the replay seam --------------------------------------------------------------

    def _subscribe(self, key: ChannelKey) -> None:
        if self.state is State.CLOSED:  # gone while a join was being authorized or replayed
            return
        self.channels.add(key)
        self.eddy.hub.subscribe(key, self, None if key in self.holding else getattr(self.transport, "lane", None))

    def _hold(self, key: ChannelKey) -> None:
        """Keep ``key``'s live events in :attr:`holding` until :meth:`_unhold` (the hub then skips the lane)."""
        if key in self.holding:
            return
        self.holding[key] = []
        if key in self.channels:
            self.eddy.hub.subscribe(key, self)

    def _unhold(self, key: ChannelKey) -> list[PreparedMessage]:
        """Stop holding ``key``'s live events; returns those held (the caller delivers or drops them)."""
        held = self.holding.pop(key, [])
        if key in self.channels:
            self._subscribe(key)  # the lane again
        return held

    def subscribe(self, keys: list[ChannelKey]) -> None:
        """Receive ``keys``' live events from now on (a read-only stream's channels)."""
        for key in keys:
            self._subscribe(key)

    def _unsubscribe(self, key: ChannelKey) -> None:
        self.channels.discard(key)
        self.holding.pop(key, None)
        self.eddy.hub.unsubscribe(key, self)

    def _leave_hub(self) -> None:
        """Stop all deliveries to this connection (idempotent)."""
        self.eddy.hub.disconnect(self, self.channels)
        self.channels = set()

    async def begin_replay(self, keys: list[ChannelKey], since: int | Mapping[ChannelKey, int],
                           epoch: str | None = None) -> tuple[Replay, dict[ChannelKey, FrameError]]:
        """Subscribe to ``keys`` holding their live events, and read each one's first stored page.

        Returns the replay to pass to :meth:`finish_replay`, and the channels
        that cannot be replayed (trimmed history, storage down) with their
        errors; those stay subscribed with their held events, for the caller
        to :meth:`release` (go live anyway) or unsubscribe.
        """
        for key in keys:
            self._hold(key)
            self._subscribe(key)
        identity = self.identity
        assert identity is not None

        async def read(key: ChannelKey, after: int, limit: int) -> History:
            # Through the service: it authorizes the channel again and checks the resume point's epoch.
            return await self.eddy.history(identity, key[1], after=after, limit=limit, epoch=epoch)

        replay = Replay(read, keys, since)
        return replay, await replay.start()

    async def finish_replay(self, replay: Replay, *, keep_live_on_error: bool = False) -> None:
        """Send the replay's events, then release the held live events that are newer: no gap, no duplicate.

        Batches are written as they come, waiting for the transport to drain
        whenever half the send bound is queued, so a replay never holds more
        than that in memory; a client that does not read is closed as a slow
        consumer. Raises :class:`FrameError`; the held live events are then
        dropped, or delivered with ``keep_live_on_error``.
        """
        bound = max(1, self.eddy.settings.max_buffered_bytes // 2)
        error: FrameError | None = None
        try:
            queued = 0
            async for batch in replay.batches():
                for event in batch:
                    message = PreparedMessage.for_event(event)
                    self.transport.queue(message)
                    queued += len(message.payload)
                    if queued >= bound:
                        queued = 0
                        if not await self.transport.drained():
                            return
                self.transport.write_outbox()
            # Events up to what was sent may still be on their way from a watcher that is
            # behind the store; once it has passed them, everything live is newer.
            await self.eddy.watcher.passed(max(replay.sent.values(), default=0), timeout=REPLAY_CATCH_UP)
        except TimeoutError:
            error = FrameError(frames.STORAGE_UNAVAILABLE, "the change feed is behind; retry the join")
        except FrameError as exc:
            error = exc
        finally:
            if error is None or keep_live_on_error:
                for key, sent in replay.sent.items():
                    self._release(key, after=sent)
            else:
                for key in replay.sent:
                    self._unhold(key)
        if error is not None:
            raise error

    def release(self, key: ChannelKey) -> None:
        """Go live on a channel whose replay was refused or abandoned: deliver its held events, stop holding it."""
        self._release(key)

    def _release(self, key: ChannelKey, *, after: int = -1) -> None:
        """Deliver the live events held for ``key`` that are newer than ``after`` (and every signal)."""
        for message in self._unhold(key):
            if message.position is None or message.position > after:
                self.transport.queue(message)

    async def _resume_rooms(self, keys: list[ChannelKey], since: int, epoch: str | None) -> None:
        """Replay the rooms subscribed at connect; a room that cannot be replayed gets an error naming it and goes live."""
        replay, refused = await self.begin_replay(keys, since, epoch)
        for key, error in refused.items():
            self._release(key)
            self._notify_error(error, channel=key[1])
        try:
            await self.finish_replay(replay, keep_live_on_error=True)
        except FrameError as error:
            self._notify_error(error)

    def _notify_error(self, error: FrameError, *, channel: str | None = None) -> None:
        frame = frames.error_frame(error.code, error.message, None)
        if channel is not None:
            frame["channel"] = channel
        self.notify(frame)

    # Operations ------------------------------------------------------------------------------

    async def authenticate(self, token: object, *, since: int | None = None, epoch: str | None = None,
                           **connected_extra: Any) -> Authenticated:
        """First authentication of a deferred connection (it then starts), or a token refresh.

        A refreshed token must be for the same user and tenant (``FORBIDDEN``).
        """
        with refusals():
            identity = self.eddy.authenticate(token if isinstance(token, str) else None)
        if self.identity is None:
            self.identity = identity
            self._cancel_timer("auth")
            self.state = State.ACTIVE
            self._count_user()
            try:
                await self.authorize_path()
            except FrameError as error:
                self.notify(frames.error_frame(error.code, error.message, connected_extra.get("ref")))
            self.start(since, epoch, **connected_extra)
            return Authenticated(True, identity.expires_at)
        if (identity.user_id, identity.tenant) != (self.identity.user_id, self.identity.tenant):
            raise FrameError(frames.FORBIDDEN, "a refreshed token must be for the same user and tenant")
        self.identity = identity
        self.watch_expiry()
        return Authenticated(False, identity.expires_at)

    async def join(self, channel: object, since: int | None = None,
                   ready: Callable[[Joined], None] | None = None, epoch: str | None = None) -> Joined:
        """Subscribe; with ``since`` (of ``epoch``, when the client has it), first replay every stored event after it.

        ``ready`` is called once the join is in effect, before any replayed
        event is queued (where a dialect sends its acknowledgement).
        """
        key = await self.authorize(channel)
        joined = len(self.channels - self.automatic)
        if key not in self.channels and joined >= self.eddy.settings.max_channels_per_connection:
            raise FrameError(frames.TOO_MANY_CHANNELS, "this connection has joined as many channels as it may")
        if since is not None and key not in self.channels:
            replay, refused = await self.begin_replay([key], since, epoch)
            if key in refused:
                self._unsubscribe(key)
                raise refused[key]
            result = Joined(key[1], None)
            if ready is not None:
                ready(result)
            try:
                await self.finish_replay(replay)
            except FrameError:
                self._unsubscribe(key)
                raise
        else:  # already joined: it receives everything live, a replay would repeat events
            self._subscribe(key)
            result = Joined(key[1], self.resume_point())
            if ready is not None:
                ready(result)
        await self._enter_presence(key)
        return result

    async def leave(self, channel: object) -> str:
        key = self._joined(channel)
        self._unsubscribe(key)
        await self._leave_presence([key])
        return key[1]

    def ping(self, timestamp: object = None) -> object:
        """The timestamp to echo in a pong: the client's, or now."""
        return timestamp if timestamp is not None else frames.iso_timestamp(time.time())

    async def publish(self, channel: object, event: object, data: Any, idempotency_key: object = None,
                      ack: Callable[[Event], None] | None = None) -> Event:
        """Store an event on a channel whose rule lets this user publish from a socket.

        The channel's live events wait until ``ack`` has run, so the sender
        always sees its acknowledgement before its own event comes back.
        """
        identity = self.identity
        assert identity is not None
        with refusals():
            key = self.eddy.authorize_socket_publish(identity, channel)
        if not frames.is_valid_event_name(event):
            raise FrameError(frames.INVALID_FRAME, "event must be 1-200 characters and not start with $")
        assert isinstance(event, str)
        if idempotency_key is not None and (not isinstance(idempotency_key, str) or not 0 < len(idempotency_key) <= 200):
            raise FrameError(frames.INVALID_FRAME, "idempotency_key must be a string of 1-200 characters")
        holds = key not in self.holding
        if holds:
            self._hold(key)
        try:
            with refusals("storage is unavailable; retry with the same idempotency_key"):
                stored = await self.eddy.publish(identity, key[1], event, data, idempotency_key=idempotency_key,
                                                 via="socket")
            if ack is not None:
                ack(stored)
        finally:
            if holds:
                self._release(key)
        return stored

    async def typing(self, channel: object, is_typing: object = True) -> str:
        key = self._joined(channel)
        if not isinstance(is_typing, bool):
            raise FrameError(frames.INVALID_FRAME, "is_typing must be true or false")
        self._check_signal_rate("typing")
        now = time.monotonic()
        timer = f"typing:{key[1]}"
        if not is_typing:
            self._cancel_timer(timer)
            if self._typing_since.pop(key, None) is not None:
                await self._broadcast_typing(key, False)
        else:
            self._set_timer(timer, self.eddy.settings.typing_timeout, lambda: self._typing_expired(key))
            last = self._typing_since.get(key)
            if last is None or now - last >= TYPING_REBROADCAST:
                self._typing_since[key] = now
                await self._broadcast_typing(key, True)
        return key[1]

    def _typing_expired(self, key: ChannelKey) -> None:
        self._timers.pop(f"typing:{key[1]}", None)
        if self._typing_since.pop(key, None) is not None:
            self.background(self._broadcast_typing(key, False))

    async def _broadcast_typing(self, key: ChannelKey, is_typing: bool) -> None:
        assert self.identity is not None
        with refusals("storage is unavailable"):
            await self.eddy.signal(key, frames.TYPING_EVENT, {"user_id": self.identity.user_id, "is_typing": is_typing})

    async def read(self, channel: object, message_id: object) -> str:
        key = self._joined(channel)
        if isinstance(message_id, int) and not isinstance(message_id, bool):
            message_id = str(message_id)
        if not isinstance(message_id, str) or not 0 < len(message_id) <= 200:
            raise FrameError(frames.INVALID_FRAME, "message_id must be a string of 1-200 characters")
        assert self.identity is not None
        with refusals("storage is unavailable"):
            await self.eddy.mark_read(self.identity, key, message_id)
        return key[1]

    async def presence(self, status: object) -> str:
        """Set this connection's status in every channel it is listed in."""
        if status not in STATUSES:
            raise FrameError(frames.INVALID_FRAME, f"status must be one of {', '.join(STATUSES)}")
        assert isinstance(status, str) and self.identity is not None
        self._check_signal_rate("presence")
        self.status = status
        with refusals("storage is unavailable"):
            await self.eddy.presence.set_status(sorted(self.present_in), self.identity.user_id,
                                                self.connection_id, status)
        return status

    async def presence_query(self, channel: object) -> tuple[str, list[dict[str, Any]]]:
        assert self.identity is not None
        key = self.eddy_key(channel)
        with refusals("storage is unavailable"):
            return key[1], await self.eddy.presence_users(self.identity, key[1])

    async def sync(self, channel: object, last_id: int | None, epoch: str | None = None) -> Synced:
        """Seed 001's sync: the events after ``last_id``, without subscribing."""
        assert self.identity is not None
        key = self.eddy_key(channel)
        after = last_id or 0
        with refusals():
            page = await self.eddy.history(self.identity, key[1], after=after, limit=SYNC_LIMIT, epoch=epoch)
        if page.lost and after:
            raise FrameError(frames.HISTORY_LOST, "events after last_id have been trimmed")
        events = [frames.event_body(e) for e in page.events]
        return Synced(key[1], events, len(events) == SYNC_LIMIT)

    # Presence ---------------------------------------------------------------------------------

    async def _enter_presence(self, key: ChannelKey) -> None:
        assert self.identity is not None
        if not self.tracks_presence or key in self.present_in or not self.eddy.tracks_presence(key[1]):
            return
        present = self.present_in if isinstance(self.present_in, set) else set()
        present.add(key)
        self.present_in = present
        try:
            await self.eddy.presence.join(key, self.identity.user_id, self.connection_id, self.status)
        except StorageUnavailable as exc:
            self.log.warning("presence not recorded (%s)", exc)

    async def _leave_presence(self, keys: list[ChannelKey]) -> None:
        assert self.identity is not None
        for key in keys:
            if key not in self.present_in or not isinstance(self.present_in, set):
                continue
            self.present_in.discard(key)
            try:
                await self.eddy.presence.leave(key, self.identity.user_id, self.connection_id)
            except StorageUnavailable as exc:
                self.log.warning("presence entry left to expire (%s)", exc)

    def eddy_key(self, channel: object) -> ChannelKey:
        """``channel``'s key in this identity's tenant (``INVALID_CHANNEL`` for a bad name); no authorization."""
        assert self.identity is not None
        with refusals():
            return self.eddy.channel_key(self.identity, channel)

    def _joined(self, channel: object) -> ChannelKey:
        """The key of a channel this connection has joined (leave, typing and reads need membership)."""
        key = self.eddy_key(channel)
        if key not in self.channels:
            raise FrameError(frames.NOT_SUBSCRIBED, f"not subscribed to {key[1]}")
        return key
