"""The WebSocket endpoint: authentication at the handshake, JSON frames, fan-out delivery.

One :class:`EventSocket` per connection. Client frames are dispatched by
``type`` to ``on_<type>`` methods, so a subclass adds a frame type by adding a
method. A bad frame gets an ``error`` frame and nothing else: the connection
and its other subscriptions carry on.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from typing import Any

import orjson
import tornado.ioloop
import tornado.web
import tornado.websocket
from tornado.iostream import IOStream, StreamBufferFullError, StreamClosedError

from service import frames, metrics
from service.app import ChannelRefused, Eddy
from service.auth import AuthError, Identity, token_from_request
from service.hub import ChannelKey
from service.limits import TokenBucket
from service.logs import ConnectionLogger
from service.rules import automatic_rooms

from .conversation import ConversationFrames, FrameError, position_field

log = logging.getLogger("eddy.ws")


class InvalidText:
    """Stands in for a text frame that is not UTF-8, so it gets an error frame instead of a dropped connection."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


class EddyProtocol(tornado.websocket.WebSocketProtocol13):
    """Tornado's RFC 6455 protocol, except that a text frame with invalid UTF-8 is reported, not fatal."""

    def _handle_message(self, opcode: int, data: bytes):
        if opcode == 0x1:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                return self._run_callback(self.handler.on_message, InvalidText(len(data)))
        return super()._handle_message(opcode, data)


class EventSocket(ConversationFrames, tornado.websocket.WebSocketHandler):
    #: Client frame types and the method that handles each.
    FRAME_HANDLERS = {
        "join": "on_join",
        "leave": "on_leave",
        "ping": "on_ping",
        "authenticate": "on_authenticate",
        "publish": "on_publish",
        "typing": "on_typing",
        "read": "on_read",
        "presence": "on_presence",
        "presence_query": "on_presence_query",
        "sync": "on_sync",
    }
    #: Frames a socket may send before it has authenticated.
    BEFORE_AUTHENTICATION = frozenset({"authenticate", "ping"})

    def initialize(self, eddy: Eddy) -> None:
        self.eddy = eddy
        self.identity: Identity | None = None
        self.path_channel: ChannelKey | None = None
        #: ``?since=`` on the handshake (or in a deferred ``authenticate``): resume the rooms joined at connect.
        self.resume_since: int | None = None
        self.channels: set[ChannelKey] = set()
        self.automatic: set[ChannelKey] = set()
        self.connection_id = uuid.uuid4().hex
        self.log = ConnectionLogger(log, {"connection_id": self.connection_id})
        self._timers: dict[str, object] = {}
        self._background: set[asyncio.Task[None]] = set()
        #: Frames queued in this loop iteration (see Hub.write_soon).
        self._outbox: list[bytes] = []
        self.init_conversation()

    # Handshake -------------------------------------------------------------

    async def prepare(self) -> None:
        """Refuse a bad token or path channel with an HTTP problem before the upgrade.

        With ``EDDY_AUTH_TIMEOUT`` set, a request with no token at all is let
        through unauthenticated; it must send an ``authenticate`` frame in time.
        """
        if self.eddy.connections_from(self.request.remote_ip) >= self.eddy.settings.max_connections_per_ip:
            metrics.DROPPED.labels("connections_per_ip").inc()
            return self._refuse(429, "TOO_MANY_CONNECTIONS", "too many connections from this address")
        try:
            self.resume_since = position_field({"since": self.get_query_argument("since", None)}, "since")
        except FrameError as exc:
            return self._refuse(400, exc.code, "since must be an event id")
        token = token_from_request(self.request.headers, lambda name: self.get_query_argument(name, None))
        if token is None and self.eddy.settings.auth_timeout > 0:
            return
        try:
            self.identity = self.eddy.authenticate(token)
        except AuthError as exc:
            self.set_header("WWW-Authenticate", 'Bearer realm="eddy"')
            return self._refuse(401, exc.code, exc.message)
        try:
            self.path_channel = await self._authorize_path_channel()
        except ChannelRefused as exc:
            return self._refuse(400 if exc.code == frames.INVALID_CHANNEL else 403, exc.code, exc.message)

    async def _authorize_path_channel(self) -> ChannelKey | None:
        channel = self.path_args[0] if self.path_args else None
        if channel is None:
            return None
        assert self.identity is not None
        return await self.eddy.authorize_join(self.identity, channel)

    def _refuse(self, status: int, code: str, message: str) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/problem+json")
        self.finish(
            orjson.dumps({"type": "about:blank", "title": self._reason, "status": status, "code": code, "detail": message})
        )

    def get_websocket_protocol(self):
        if self.request.headers.get("Sec-WebSocket-Version") != "13":
            return None
        params = tornado.websocket._WebSocketParams(
            ping_interval=self.ping_interval,
            ping_timeout=self.ping_timeout,
            max_message_size=self.max_message_size,
            compression_options=self.get_compression_options(),
        )
        return EddyProtocol(self, False, params)

    @property
    def max_message_size(self) -> int:
        # Frames up to 4x the limit are read and refused with FRAME_TOO_LARGE; beyond
        # that Tornado closes with 1009 without buffering them.
        return 4 * self.eddy.settings.max_frame_bytes

    def check_origin(self, origin: str) -> bool:
        # Only browsers send Origin. Same-origin unless EDDY_ALLOWED_ORIGINS
        # lists the page's origin (or is "*"), so a foreign page cannot ride
        # on a user's token.
        allowed = self.eddy.settings.allowed_origin_set
        if "*" in allowed or origin.lower() in allowed:
            return True
        return super().check_origin(origin)

    # Connection ------------------------------------------------------------

    def open(self, *args: str) -> None:
        # The hub writes straight into this buffer; past the bound the socket
        # is a slow consumer and is closed instead of growing without limit.
        self.ws_connection.stream.max_write_buffer_size = self.eddy.settings.max_buffered_bytes
        self.eddy.hub.connect(self)
        self.eddy.count_address(self.request.remote_ip, +1)
        self.frames = TokenBucket(self.eddy.settings.frame_rate, self.eddy.settings.frame_burst)
        self.refused_in_a_row = 0
        metrics.CONNECTIONS.labels("websocket").inc()
        if self.identity is not None:
            self._start_session(ref=None)
        else:
            self._set_timer("auth", self.eddy.settings.auth_timeout, self._authentication_timed_out)

    def _start_session(self, ref: Any) -> None:
        """Join the automatic rooms and the path channel, then say ``connected``."""
        identity = self.identity
        assert identity is not None
        for evicted in self.eddy.add_connection(identity, self):
            evicted.close(frames.CLOSE_TOO_MANY_CONNECTIONS, "too many connections for this user")
        rooms = [(identity.tenant, room) for room in automatic_rooms(identity)]
        self.automatic.update(rooms)
        if self.path_channel is not None:
            # A /ws/<channel>/stream socket is a broadcast subscriber (a dashboard,
            # a kiosk): no presence, or every connect would be announced to all of them.
            rooms.append(self.path_channel)
        since = self.resume_since
        for key in rooms:
            if since is not None:
                self.replaying[key] = []  # live events wait until the replay is done
            self._subscribe(key)
        self._watch_expiry()
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
        if ref is not None:
            connected["ref"] = ref
        self.send(connected)
        if since is not None:
            self.background(self.resume_rooms(rooms, since))
        self.log.debug("open for user %s", identity.user_id)

    def on_close(self) -> None:
        metrics.CONNECTIONS.labels("websocket").dec()
        self.eddy.count_address(self.request.remote_ip, -1)
        self._leave_hub()
        for handle in self._timers.values():
            tornado.ioloop.IOLoop.current().remove_timeout(handle)
        self._timers.clear()
        if self.identity is not None:
            self.eddy.remove_connection(self.identity, self)
            for key in list(self._typing_since):
                self.background(self.broadcast_typing(key, False))
            self._typing_since.clear()
            if self.present_in:
                self.background(self.leave_presence(sorted(self.present_in)))
        self.log.debug("closed (%s)", self.close_code)

    def background(self, coroutine) -> None:
        """Run work that outlives the current frame; failures are logged, never lost silently."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.warning("background work failed: %r", task.exception())

    def _leave_hub(self) -> None:
        """Stop all deliveries to this socket (idempotent)."""
        self.eddy.hub.disconnect(self, self.channels)
        self.channels = set()

    # Timers ------------------------------------------------------------------

    def _set_timer(self, name: str, delay: float, callback) -> None:
        self._cancel_timer(name)
        loop = tornado.ioloop.IOLoop.current()
        self._timers[name] = loop.call_later(max(0.0, delay), callback)

    def _cancel_timer(self, name: str) -> None:
        handle = self._timers.pop(name, None)
        if handle is not None:
            tornado.ioloop.IOLoop.current().remove_timeout(handle)

    def _authentication_timed_out(self) -> None:
        self._timers.pop("auth", None)
        if self.identity is None:
            self.close(frames.CLOSE_AUTH_TIMEOUT, "authentication timeout")

    def _watch_expiry(self) -> None:
        """Warn with TOKEN_EXPIRED when the token expires; close after the grace period."""
        self._cancel_timer("grace")
        assert self.identity is not None
        if self.identity.expires_at is None:
            self._cancel_timer("expiry")
            return
        self._set_timer("expiry", self.identity.expires_at - time.time(), self._token_expired)

    def _token_expired(self) -> None:
        self._timers.pop("expiry", None)
        grace = self.eddy.settings.token_grace
        self.send(frames.error_frame(frames.TOKEN_EXPIRED, f"the token has expired; send authenticate within {grace:g}s"))
        self._set_timer("grace", grace, self._grace_over)

    def _grace_over(self) -> None:
        self._timers.pop("grace", None)
        self.close(frames.CLOSE_TOKEN_EXPIRED, "token expired")

    def deliver_now(self, message: frames.PreparedMessage) -> None:
        """Queue a frame; every frame queued in this loop iteration leaves in one write."""
        if self._outbox:
            self._outbox.append(message.websocket_frame)
            return
        connection = self.ws_connection
        if connection is None or connection.is_closing():
            return
        self._outbox.append(message.websocket_frame)
        self.eddy.hub.write_soon(self)

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        self.write_outbox()  # what was queued (a reconnect frame, an error) goes before the close
        super().close(code, reason)

    def write_outbox(self) -> None:
        frames_out, self._outbox = self._outbox, []
        if not frames_out:
            return
        connection = self.ws_connection
        if connection is None or connection.is_closing():
            return
        stream = connection.stream
        data: bytes | memoryview = frames_out[0] if len(frames_out) == 1 else b"".join(frames_out)
        # Fast path: with nothing queued on a plain TCP stream, one send() puts the frame in
        # the kernel's buffer. IOStream.write would also create a Future, schedule its
        # callback and touch the poller for every socket: 2-3x the cost of a fan-out.
        if not stream._write_buffer and type(stream) is IOStream and stream.socket is not None:
            try:
                sent = stream.socket.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = 0  # a dead peer: IOStream.write below notices and closes the stream
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
        try:
            stream.write(data)
        except StreamBufferFullError:
            self._close_slow_consumer()
        except StreamClosedError:
            pass

    def send(self, frame: dict[str, Any]) -> None:
        self.deliver_now(frames.PreparedMessage(frames.encode(frame)))

    async def flushed(self) -> None:
        """Wait until everything queued so far has been handed to the kernel."""
        self.write_outbox()
        connection = self.ws_connection
        if connection is not None and not connection.is_closing():
            try:
                await connection.stream.write(b"")
            except StreamClosedError:
                pass

    def _close_slow_consumer(self) -> None:
        self.log.warning("closed: slow consumer")
        metrics.SLOW_CONSUMERS.inc()
        metrics.DROPPED.labels("slow_consumer").inc()
        self._leave_hub()
        # Lift the bound so the close frame can queue behind the backlog; if the
        # client never reads it, Tornado aborts the connection after a timeout.
        self.ws_connection.stream.max_write_buffer_size = None
        self.close(frames.CLOSE_SLOW_CONSUMER, "slow consumer")

    # Client frames ---------------------------------------------------------

    async def on_message(self, message: str | bytes | InvalidText) -> None:
        ref = None
        try:
            self._check_rate()
            frame = self._decode(message)
            ref = self._ref(frame)
            result = self._handler_for(frame)(frame, ref)
            if inspect.isawaitable(result):
                await result
        except FrameError as exc:
            metrics.FRAME_ERRORS.labels(exc.code).inc()
            self.send(frames.error_frame(exc.code, exc.message, ref))
        except Exception:
            metrics.FRAME_ERRORS.labels(frames.INTERNAL_ERROR).inc()
            self.log.exception("frame handler failed")
            self.send(frames.error_frame(frames.INTERNAL_ERROR, "internal error; the frame was not applied", ref))

    def _check_rate(self) -> None:
        """Token bucket per socket: an error while over the rate, a close (1008) under sustained abuse."""
        if self.frames.take():
            self.refused_in_a_row = 0
            return
        self.refused_in_a_row += 1
        metrics.RATE_LIMITED.labels("frames").inc()
        if self.refused_in_a_row > 2 * self.eddy.settings.frame_burst:
            self.log.warning("closed: sustained frame flood")
            self.close(1008, "rate limit")
        raise FrameError(frames.RATE_LIMITED, f"more than {self.eddy.settings.frame_rate:g} frames per second")

    def _decode(self, message: str | bytes | InvalidText) -> dict[str, Any]:
        if isinstance(message, InvalidText):
            raise FrameError(frames.INVALID_UTF8, "a text frame must be UTF-8")
        if isinstance(message, bytes):
            raise FrameError(frames.UNSUPPORTED_BINARY, "binary frames are not supported; send JSON text frames")
        if len(message) > self.eddy.settings.max_frame_bytes:
            raise FrameError(frames.FRAME_TOO_LARGE, f"frames are limited to {self.eddy.settings.max_frame_bytes} bytes")
        try:
            frame = orjson.loads(message)
        except orjson.JSONDecodeError:
            raise FrameError(frames.INVALID_JSON, "the frame is not valid JSON") from None
        if not isinstance(frame, dict):
            raise FrameError(frames.INVALID_FRAME, "a frame is a JSON object")
        return frame

    @staticmethod
    def _ref(frame: dict[str, Any]) -> str | int | None:
        ref = frame.get("ref")
        if ref is not None and (isinstance(ref, bool) or not isinstance(ref, (str, int))):
            raise FrameError(frames.INVALID_FRAME, "ref must be a string or an integer")
        return ref

    def _handler_for(self, frame: dict[str, Any]):
        kind = frame.get("type")
        if not isinstance(kind, str):
            raise FrameError(frames.INVALID_FRAME, "a frame needs a string type")
        if kind not in self.FRAME_HANDLERS:
            raise FrameError(frames.UNKNOWN_TYPE, f"unknown frame type {kind[:50]!r}")
        if self.identity is None and kind not in self.BEFORE_AUTHENTICATION:
            raise FrameError(frames.UNAUTHENTICATED, "send an authenticate frame first")
        return getattr(self, self.FRAME_HANDLERS[kind])

    async def on_join(self, frame: dict[str, Any], ref: Any) -> None:
        """Subscribe; with ``since``, first replay every stored event after that id."""
        since = position_field(frame, "since")
        key = await self.authorized(frame)
        joined = len(self.channels - self.automatic)
        if key not in self.channels and joined >= self.eddy.settings.max_channels_per_connection:
            raise FrameError(frames.TOO_MANY_CHANNELS, "this connection has joined as many channels as it may")
        if since is not None and key not in self.channels:
            await self.join_with_replay(key, since, ref)
        else:  # already joined: it receives everything live, a replay would repeat events
            self._subscribe(key)
            self.send({"type": "ack", "ref": ref, "channel": key[1], "last_id": self.resume_point()})
        await self.enter_presence(key)

    async def on_leave(self, frame: dict[str, Any], ref: Any) -> None:
        key = self.joined(frame)
        self._unsubscribe(key)
        self.send({"type": "ack", "ref": ref, "channel": key[1]})
        await self.leave_presence([key])

    def on_ping(self, frame: dict[str, Any], ref: Any) -> None:
        timestamp = frame.get("timestamp")
        pong: dict[str, Any] = {"type": "pong", "timestamp": timestamp if timestamp is not None else frames.iso_timestamp(time.time())}
        if ref is not None:
            pong["ref"] = ref
        self.send(pong)

    async def on_authenticate(self, frame: dict[str, Any], ref: Any) -> None:
        """First authentication of a deferred socket, or a token refresh."""
        token = frame.get("token")
        try:
            identity = self.eddy.authenticate(token if isinstance(token, str) else None)
        except AuthError as exc:
            raise FrameError(exc.code, exc.message) from None
        if self.identity is None:
            self.resume_since = position_field(frame, "since")
            self.identity = identity
            self._cancel_timer("auth")
            try:
                self.path_channel = await self._authorize_path_channel()
            except ChannelRefused as exc:
                self.send(frames.error_frame(exc.code, exc.message, ref))
            self._start_session(ref)
            return
        if (identity.user_id, identity.tenant) != (self.identity.user_id, self.identity.tenant):
            raise FrameError(frames.FORBIDDEN, "a refreshed token must be for the same user and tenant")
        self.identity = identity
        self._watch_expiry()
        expires = frames.iso_timestamp(identity.expires_at) if identity.expires_at is not None else None
        self.send({"type": "ack", "ref": ref, "expires_at": expires})

    def _subscribe(self, key: ChannelKey) -> None:
        self.channels.add(key)
        self.eddy.hub.subscribe(key, self)

    def _unsubscribe(self, key: ChannelKey) -> None:
        self.channels.discard(key)
        self.eddy.hub.unsubscribe(key, self)
