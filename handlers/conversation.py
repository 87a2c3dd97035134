"""Conversation frames of the WebSocket protocol: publish, typing, read, presence, sync and resume.

:class:`ConversationFrames` is mixed into :class:`handlers.websocket.EventSocket`;
it relies on that class's ``eddy``, ``identity``, ``channels``, ``send``,
``_subscribe`` and timers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from service import frames, metrics
from service.app import ChannelRefused
from service.hub import ChannelKey
from service.presence import STATUSES
from storage import StorageUnavailable, parse_event_id

#: Events a resume replays per storage read; writes are flushed between pages.
REPLAY_PAGE = 500
#: Seconds a resume waits for this process's watcher to reach what was replayed.
REPLAY_CATCH_UP = 10.0
#: Events one sync answer carries at most.
SYNC_LIMIT = 1000
#: Typing frames a connection may send per window, and the window in seconds.
TYPING_BURST, TYPING_WINDOW = 10, 5.0
#: While a user keeps typing, the indicator is re-broadcast at most this often.
TYPING_REBROADCAST = 3.0


class FrameError(Exception):
    """A client frame was refused; becomes an ``error`` frame with ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def string_field(frame: dict[str, Any], name: str, *, limit: int = 200) -> str:
    value = frame.get(name)
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise FrameError(frames.INVALID_FRAME, f"{name} must be a string of 1-{limit} characters")
    return value


def position_field(frame: dict[str, Any], name: str) -> int | None:
    value = frame.get(name)
    if value is None:
        return None
    try:
        return parse_event_id(value)
    except (TypeError, ValueError):
        raise FrameError(frames.INVALID_FRAME, f"{name} must be an event id") from None


class ConversationFrames:
    def init_conversation(self) -> None:
        self.status = "online"
        #: Channels this connection is listed in for presence (joined explicitly, not automatic rooms).
        self.present_in: set[ChannelKey] = set()
        #: Channels being replayed after a ``join`` with ``since``: live events wait here meanwhile.
        self.replaying: dict[ChannelKey, list[frames.PreparedMessage]] = {}
        self._typing_since: dict[ChannelKey, float] = {}
        self._typing_frames: list[float] = []

    # Hub subscriber ------------------------------------------------------------

    def deliver(self, message: frames.PreparedMessage) -> None:
        """Queue a prepared frame without blocking (a socket's or a stream's ``deliver_now``).

        Skips typing indicators of this connection's own user, and holds back
        events of a channel whose history is being replayed.
        """
        if message.exclude_user is not None and self.identity is not None \
                and message.exclude_user == self.identity.user_id:
            return
        if self.replaying and message.key in self.replaying:
            self.replaying[message.key].append(message)
            return
        self.deliver_now(message)

    def resume_point(self) -> str:
        """The id after which everything reaches this connection: where to resume if nothing arrives first."""
        return str(self.eddy.watcher.position or 0)

    # Resume -------------------------------------------------------------------

    async def join_with_replay(self, key: ChannelKey, since: int, ref: Any) -> None:
        """Subscribe, replay what came after ``since``, then continue live: no gap, no duplicate.

        Live events that arrive during the replay are held back and released
        afterwards, skipping any the replay already sent (same position).
        """
        self.replaying[key] = []
        self._subscribe(key)
        try:
            await self.replay(key, since, acknowledge=lambda: self.send({"type": "ack", "ref": ref, "channel": key[1]}))
        except FrameError:
            self._unsubscribe(key)
            raise

    async def resume_rooms(self, keys: list[ChannelKey], since: int) -> None:
        """Replay the rooms subscribed at connect (put in ``replaying`` before) after ``since``.

        Positions are global and a connection receives its rooms' events in
        commit order, so the newest id a client saw on any of them is a resume
        point for all. A room that cannot be replayed gets an error frame naming
        it and continues live.
        """
        for key in keys:
            try:
                await self.replay(key, since, keep_live_on_error=True)
            except FrameError as exc:
                error = frames.error_frame(exc.code, exc.message, None)
                error["channel"] = key[1]
                self.send(error)

    async def replay(self, key: ChannelKey, since: int, *, acknowledge: Callable[[], None] | None = None,
                     keep_live_on_error: bool = False) -> None:
        """Send ``key``'s stored events after ``since``, then the live ones held meanwhile that are newer.

        ``key`` must already be subscribed with ``self.replaying[key]`` set.
        Raises :class:`FrameError`; the held live events are then dropped,
        or delivered with ``keep_live_on_error``.
        """
        sent = since
        try:
            page = await self.eddy.storage.history(*key, after=since, limit=REPLAY_PAGE)
            if page.lost:
                raise FrameError(frames.HISTORY_LOST, "events after since have been trimmed; join without since and reload")
            if acknowledge is not None:
                acknowledge()
            while page.events:
                for event in page.events:
                    self.deliver_now(frames.PreparedMessage.for_event(event))
                sent = page.events[-1].position
                await self.flushed()
                if len(page.events) < REPLAY_PAGE:
                    break
                page = await self.eddy.storage.history(*key, after=sent, limit=REPLAY_PAGE)
            # Events up to `sent` may still be on their way from a watcher that is
            # behind the store; once it has passed `sent`, everything live is newer.
            await self.eddy.watcher.passed(sent, timeout=REPLAY_CATCH_UP)
        except asyncio.TimeoutError:
            error = FrameError(frames.STORAGE_UNAVAILABLE, "the change feed is behind; retry the join")
        except StorageUnavailable:
            error = FrameError(frames.STORAGE_UNAVAILABLE, "storage is unavailable; retry the join")
        except FrameError as exc:
            error = exc
        else:
            error = None
        held = self.replaying.pop(key, [])
        if error is None or keep_live_on_error:
            for message in held:
                if message.position is None or message.position > sent:
                    self.deliver_now(message)
        if error is not None:
            raise error

    async def on_sync(self, frame: dict[str, Any], ref: Any) -> None:
        """Seed 001's sync: the events after ``last_id``, without subscribing."""
        key = await self.authorized(frame)
        after = position_field(frame, "last_id") or 0
        try:
            page = await self.eddy.storage.history(*key, after=after, limit=SYNC_LIMIT)
        except StorageUnavailable:
            raise FrameError(frames.STORAGE_UNAVAILABLE, "storage is unavailable; retry later") from None
        if page.lost and after:
            raise FrameError(frames.HISTORY_LOST, "events after last_id have been trimmed")
        events = [frames.event_body(e) for e in page.events]
        self.send({"type": "sync_data", "ref": ref, "channel": key[1], "events": events, "count": len(events),
                   "has_more": len(events) == SYNC_LIMIT})

    # Publishing and signals ----------------------------------------------------------

    async def on_publish(self, frame: dict[str, Any], ref: Any) -> None:
        assert self.identity is not None
        try:
            key = self.eddy.authorize_socket_publish(self.identity, frame.get("channel"))
        except ChannelRefused as exc:
            raise FrameError(exc.code, exc.message) from None
        event = frame.get("event")
        if not frames.is_valid_event_name(event):
            raise FrameError(frames.INVALID_FRAME, "event must be 1-200 characters and not start with $")
        idempotency_key = frame.get("idempotency_key")
        if idempotency_key is not None:
            idempotency_key = string_field(frame, "idempotency_key")
        # The room's live events wait until the ack is out, so the sender always sees its
        # ack (seed 001's message_sent) before its own message comes back from the watcher.
        holds = key not in self.replaying
        if holds:
            self.replaying[key] = []
        try:
            stored = await self.eddy.append(*key, event, frame.get("data"), idempotency_key=idempotency_key)
            metrics.EVENTS_PUBLISHED.labels("socket").inc()
            self.send({"type": "ack", "ref": ref, "channel": key[1], "id": stored.id,
                       "timestamp": frames.iso_timestamp(stored.timestamp)})
        except StorageUnavailable:
            raise FrameError(frames.STORAGE_UNAVAILABLE, "storage is unavailable; retry with the same idempotency_key") from None
        finally:
            if holds:
                for message in self.replaying.pop(key, []):
                    self.deliver_now(message)

    async def on_typing(self, frame: dict[str, Any], ref: Any) -> None:
        key = self.joined(frame)
        is_typing = frame.get("is_typing", True)
        if not isinstance(is_typing, bool):
            raise FrameError(frames.INVALID_FRAME, "is_typing must be true or false")
        now = time.monotonic()
        self._typing_frames = [t for t in self._typing_frames if now - t < TYPING_WINDOW] + [now]
        if len(self._typing_frames) > TYPING_BURST:
            metrics.RATE_LIMITED.labels("typing").inc()
            raise FrameError(frames.RATE_LIMITED, f"at most {TYPING_BURST} typing frames per {TYPING_WINDOW:g}s")
        timer = f"typing:{key[1]}"
        if not is_typing:
            self._cancel_timer(timer)
            if self._typing_since.pop(key, None) is not None:
                await self.broadcast_typing(key, False)
        else:
            self._set_timer(timer, self.eddy.settings.typing_timeout, lambda: self._typing_expired(key))
            last = self._typing_since.get(key)
            if last is None or now - last >= TYPING_REBROADCAST:
                self._typing_since[key] = now
                await self.broadcast_typing(key, True)
        if ref is not None:
            self.send({"type": "ack", "ref": ref, "channel": key[1]})

    def _typing_expired(self, key: ChannelKey) -> None:
        self._timers.pop(f"typing:{key[1]}", None)
        if self._typing_since.pop(key, None) is not None:
            self.background(self.broadcast_typing(key, False))

    async def broadcast_typing(self, key: ChannelKey, is_typing: bool) -> None:
        assert self.identity is not None
        try:
            await self.eddy.signal(key, frames.TYPING_EVENT, {"user_id": self.identity.user_id, "is_typing": is_typing})
        except StorageUnavailable:
            raise FrameError(frames.STORAGE_UNAVAILABLE, "storage is unavailable") from None

    async def on_read(self, frame: dict[str, Any], ref: Any) -> None:
        key = self.joined(frame)
        message_id = frame.get("message_id")
        if isinstance(message_id, int) and not isinstance(message_id, bool):
            message_id = str(message_id)
        if not isinstance(message_id, str) or not 0 < len(message_id) <= 200:
            raise FrameError(frames.INVALID_FRAME, "message_id must be a string of 1-200 characters")
        assert self.identity is not None
        try:
            await self.eddy.mark_read(self.identity, key, message_id)
        except StorageUnavailable:
            raise FrameError(frames.STORAGE_UNAVAILABLE, "storage is unavailable") from None
        if ref is not None:
            self.send({"type": "ack", "ref": ref, "channel": key[1]})

    # Presence ---------------------------------------------------------------------

    async def on_presence(self, frame: dict[str, Any], ref: Any) -> None:
        status = frame.get("status")
        if status not in STATUSES:
            raise FrameError(frames.INVALID_FRAME, f"status must be one of {', '.join(STATUSES)}")
        assert self.identity is not None
        self.status = status
        try:
            await self.eddy.presence.set_status(sorted(self.present_in), self.identity.user_id,
                                                self.connection_id, status)
        except StorageUnavailable:
            raise FrameError(frames.STORAGE_UNAVAILABLE, "storage is unavailable") from None
        if ref is not None:
            self.send({"type": "ack", "ref": ref, "status": status})

    async def on_presence_query(self, frame: dict[str, Any], ref: Any) -> None:
        key = await self.authorized(frame)
        users = await self.eddy.presence.users(key)
        self.send({"type": "presence_data", "ref": ref, "channel": key[1], "users": users})

    async def enter_presence(self, key: ChannelKey) -> None:
        assert self.identity is not None
        if key in self.present_in or not self.eddy.tracks_presence(key[1]):
            return
        self.present_in.add(key)
        try:
            await self.eddy.presence.join(key, self.identity.user_id, self.connection_id, self.status)
        except StorageUnavailable as exc:
            self.log.warning("presence not recorded (%s)", exc)

    async def leave_presence(self, keys: list[ChannelKey]) -> None:
        assert self.identity is not None
        for key in keys:
            self.present_in.discard(key)
            try:
                await self.eddy.presence.leave(key, self.identity.user_id, self.connection_id)
            except StorageUnavailable as exc:
                self.log.warning("presence entry left to expire (%s)", exc)

    # Helpers ------------------------------------------------------------------------

    async def authorized(self, frame: dict[str, Any]) -> ChannelKey:
        assert self.identity is not None
        try:
            return await self.eddy.authorize_join(self.identity, frame.get("channel"))
        except ChannelRefused as exc:
            raise FrameError(exc.code, exc.message) from None

    def joined(self, frame: dict[str, Any]) -> ChannelKey:
        """The key of a channel this socket has joined (leave, typing and reads need membership)."""
        assert self.identity is not None
        try:
            key = self.eddy.channel_key(self.identity, frame.get("channel"))
        except ChannelRefused as exc:
            raise FrameError(exc.code, exc.message) from None
        if key not in self.channels:
            raise FrameError(frames.NOT_SUBSCRIBED, f"not subscribed to {key[1]}")
        return key
