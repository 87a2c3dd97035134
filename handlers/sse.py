"""Server-Sent Events: the WebSocket's event stream for clients that can only read HTTP.

``GET /sse?channels=a,b`` authenticates like the WebSocket handshake, checks
every channel with the same join rules, and then streams what a socket joined
to those channels would receive, one SSE message per frame:

* an ``event`` frame is a message without an ``event:`` field (so it reaches
  ``EventSource.onmessage``), with ``id:`` the event id and ``data:`` the very
  JSON of the WebSocket frame. Event names are free text (they may even hold a
  newline), so they stay inside the JSON instead of in the ``event:`` field;
* other frames (``connected``, ``typing``, ``read``, ``presence``,
  ``reconnect``, ``error``) are named messages: ``event: <frame type>``.

Resuming (``Last-Event-ID``, or ``?since=``) reuses the WebSocket's
join-with-since, so the seam between history and live events is the same one:
no gap, no duplicate.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import orjson
import tornado.ioloop
from tornado.iostream import StreamBufferFullError, StreamClosedError

from service import frames, metrics
from service.hub import ChannelKey
from storage import parse_event_id

from .conversation import ConversationFrames, FrameError
from .http import RETRY_AFTER_SECONDS, ApiError, ApiHandler, service_errors

#: The HTTP status of a resume the WebSocket would refuse with an error frame.
_RESUME_STATUS = {frames.HISTORY_LOST: 410, frames.STORAGE_UNAVAILABLE: 503}
#: ``frames.encode`` writes ``type`` first, so an event frame is told apart without parsing it.
_EVENT_FRAME = b'{"type":"event",'


def sse_message(payload: bytes, *, event: str | None = None, event_id: int | str | None = None) -> bytes:
    """One SSE message. ``payload`` is compact JSON, so it never holds a newline and fits one ``data:`` line."""
    head = b""
    if event_id is not None:
        head += b"id: %s\n" % str(event_id).encode()
    if event is not None:
        head += b"event: %s\n" % event.encode()
    return head + b"data: " + payload + b"\n\n"


def sse_chunk(message: frames.PreparedMessage) -> bytes:
    """What the stream carries for a frame the hub (or a replay) hands over."""
    payload = message.payload
    if payload.startswith(_EVENT_FRAME):
        return sse_message(payload, event_id=message.position)
    kind = orjson.loads(payload).get("type", "message")
    if kind == "keepalive":
        # A comment: EventSource ignores it, proxies and dead-peer detection see traffic.
        return b": keepalive\n\n"
    return sse_message(payload, event=kind)


class SSEHandler(ConversationFrames, ApiHandler):
    """``GET /sse?channels=a,b``: a read-only event stream (``text/event-stream``).

    A hub subscriber like :class:`handlers.websocket.EventSocket`: it offers
    ``deliver`` and ``close`` to the hub. It takes the socket's conversation
    mixin only for :meth:`ConversationFrames.join_with_replay`, which it reuses
    as is through the ``_subscribe``, ``_unsubscribe``, ``send``,
    ``deliver_now`` and ``flushed`` below; no client frame ever reaches the
    mixin's other methods. Everything that can be refused (token, channels,
    ``Last-Event-ID``) is refused with a problem body before the first byte of
    the stream.
    """

    #: Milliseconds an EventSource waits before reconnecting (the ``retry:`` field).
    RETRY_MS = 3000

    def initialize(self, eddy) -> None:  # type: ignore[override]
        super().initialize(eddy)
        self.identity = None
        self.connection_id = uuid.uuid4().hex
        self.channels: set[ChannelKey] = set()
        self.init_conversation()  # among others `replaying`: live events of a channel being replayed wait there
        #: While channels are being joined, everything to send waits here, to go out in position order.
        self._joining: list[frames.PreparedMessage] | None = None
        self._registered = False
        self._streaming = False
        self._gone = asyncio.Event()
        self._expiry: object | None = None

    def set_default_headers(self) -> None:
        super().set_default_headers()
        if hasattr(self, "eddy"):  # Tornado sets the defaults once before initialize()
            self._allow_origin()

    def prepare(self) -> None:
        self._allow_origin()

    def _allow_origin(self) -> None:
        origin = self.request.headers.get("Origin")
        if origin:
            # A page on another origin may read the stream only where EDDY_ALLOWED_ORIGINS lets its
            # WebSocket in; the token travels in the URL, never in a cookie, so no credentials mode.
            allowed = self.eddy.settings.allowed_origin_set
            if "*" in allowed or origin.lower().rstrip("/") in allowed:
                self.set_header("Access-Control-Allow-Origin", origin)
                self.set_header("Vary", "Origin")

    # The request ------------------------------------------------------------------

    async def get(self) -> None:
        """Refuse with a problem body, or stream until the client goes away or the server closes it.

        Order of the stream: ``retry:``, a ``connected`` message whose ``id:``
        is the position the stream starts after (so an EventSource that
        reconnects before any event resumes without a gap), the replayed
        events, then live ones.
        """
        address = self.request.remote_ip
        if self.eddy.connections_from(address) >= self.eddy.settings.max_connections_per_ip:
            metrics.DROPPED.labels("connections_per_ip").inc()
            raise ApiError(429, "TOO_MANY_CONNECTIONS", "too many connections from this address")
        self.identity = self.authenticate()
        names = self._channel_names()
        since = self._since()
        keys = []
        for name in names:
            with service_errors():
                keys.append(await self.eddy.authorize_join(self.identity, name))
        self._register()
        self._joining = []
        if since is None:
            for key in keys:
                self._subscribe(key)
            # Nothing awaited since subscribing: every event after the watcher's position comes live.
            start = self.eddy.watcher.position
        else:
            start = since
            for key in keys:
                try:
                    await self.join_with_replay(key, since, None)
                except FrameError as exc:
                    transient = exc.code == frames.STORAGE_UNAVAILABLE
                    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if transient else None
                    raise ApiError(_RESUME_STATUS.get(exc.code, 400), exc.code, exc.message, headers) from None
                if self._gone.is_set():
                    break
        if self._gone.is_set():
            # Closed by the server while joining (shutdown): an empty stream, so the EventSource retries.
            self._stream_headers()
            self.write(b"retry: %d\n\n" % self.RETRY_MS)
            return
        await self._start_stream(keys, start)
        await self._gone.wait()

    def _channel_names(self) -> list[str]:
        names: list[str] = []
        for argument in self.get_query_arguments("channels"):
            for name in argument.split(","):
                name = name.strip()
                if name and name not in names:
                    names.append(name)
        if not names:
            raise ApiError(400, "INVALID_PARAMETER", "channels must name at least one channel (channels=a,b)")
        if len(names) > self.eddy.settings.max_channels_per_connection:
            raise ApiError(400, "TOO_MANY_CHANNELS",
                           f"at most {self.eddy.settings.max_channels_per_connection} channels per stream")
        return names

    def _since(self) -> int | None:
        # The header wins: an EventSource keeps its original URL (and its ?since=) when it reconnects.
        raw = self.request.headers.get("Last-Event-ID") or self.get_query_argument("since", None)
        if raw is None or raw == "":
            return None
        try:
            return parse_event_id(raw.strip())
        except ValueError:
            raise ApiError(400, "INVALID_PARAMETER", "Last-Event-ID (or since) must be an event id") from None

    def _stream_headers(self) -> None:
        self.set_status(200)
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Accel-Buffering", "no")  # nginx would otherwise hold events back

    async def _start_stream(self, keys: list[ChannelKey], start: int | None) -> None:
        assert self.identity is not None
        self._stream_headers()
        connected = {
            "type": "connected",
            "connection_id": self.connection_id,
            "user_id": self.identity.user_id,
            "tenant": self.identity.tenant,
            "channels": sorted(channel for _, channel in keys),
            "timestamp": frames.iso_timestamp(time.time()),
        }
        backlog = self._joining or []
        self._joining = None
        # Channels were replayed one after the other; in position order, the last id a client
        # received is a resume point for all of them.
        backlog.sort(key=lambda message: message.position or 0)
        chunks = [b"retry: %d\n" % self.RETRY_MS,
                  sse_message(frames.encode(connected), event="connected", event_id=start)]
        chunks += [sse_chunk(message) for message in backlog]
        self._streaming = True
        self._write(b"".join(chunks))
        self._watch_expiry()
        stream = self.request.connection.stream  # type: ignore[attr-defined]
        try:
            # The replay may exceed the bound on unsent bytes; it applies once that has drained.
            await stream.write(b"")
        except StreamClosedError:
            return
        if not stream.closed():
            stream.max_write_buffer_size = self.eddy.settings.max_buffered_bytes

    # Hub subscriber ------------------------------------------------------------------

    def deliver_now(self, message: frames.PreparedMessage) -> None:
        if self._joining is not None:
            if message.key is not None:  # keepalives mean nothing before the stream starts
                self._joining.append(message)
            return
        if self._streaming:
            self._write(sse_chunk(message))

    def send(self, frame: dict[str, Any]) -> None:
        # join_with_replay acknowledges the join: a stream has no acks, starting is the answer.
        if frame.get("type") == "ack":
            return
        self.deliver_now(frames.PreparedMessage(frames.encode(frame)))

    async def flushed(self) -> None:
        """Nothing is written while channels are joined (see ``_joining``), so nothing to wait for."""

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        """End the stream (shutdown, expiry); an EventSource then reconnects after ``retry``."""
        self._gone.set()
        self._leave()
        if self._streaming and not self._finished:
            self.finish()

    # Writing ------------------------------------------------------------------------

    def _write(self, chunk: bytes) -> None:
        if self._finished or self._gone.is_set():
            return
        try:
            self.write(chunk)
            self.flush()
        except StreamBufferFullError:
            self._close_slow_consumer()
        except StreamClosedError:
            pass

    def _close_slow_consumer(self) -> None:
        metrics.SLOW_CONSUMERS.inc()
        metrics.DROPPED.labels("slow_consumer").inc()
        self._leave()
        self._gone.set()
        # Unsent bytes are over the bound: dropping the connection is all that is left.
        self.request.connection.stream.close()  # type: ignore[attr-defined]

    def _watch_expiry(self) -> None:
        assert self.identity is not None
        if self.identity.expires_at is None:
            return
        loop = tornado.ioloop.IOLoop.current()
        self._expiry = loop.call_later(max(0.0, self.identity.expires_at - time.time()), self._token_expired)

    def _token_expired(self) -> None:
        # A stream cannot be handed a fresh token: say why, and end it. The EventSource's retry
        # with the old URL gets 401, and the page opens a new one with a new token (and ?since=).
        self._expiry = None
        self._write(sse_message(frames.encode(frames.error_frame(frames.TOKEN_EXPIRED, "the token has expired")),
                                event="error"))
        self.close()

    # Subscriptions ------------------------------------------------------------------

    def _register(self) -> None:
        self.eddy.hub.connect(self)
        self.eddy.count_address(self.request.remote_ip, +1)
        metrics.CONNECTIONS.labels("sse").inc()
        self._registered = True

    def _subscribe(self, key: ChannelKey) -> None:
        if not self._registered:  # gone while a replay was still running
            return
        self.channels.add(key)
        self.eddy.hub.subscribe(key, self)

    def _unsubscribe(self, key: ChannelKey) -> None:
        self.channels.discard(key)
        self.eddy.hub.unsubscribe(key, self)

    def _leave(self) -> None:
        """Stop every delivery and uncount the connection (idempotent)."""
        if self._expiry is not None:
            tornado.ioloop.IOLoop.current().remove_timeout(self._expiry)
            self._expiry = None
        if not self._registered:
            return
        self._registered = False
        self.eddy.hub.disconnect(self, self.channels)
        self.channels = set()
        self.replaying.clear()
        self.eddy.count_address(self.request.remote_ip, -1)
        metrics.CONNECTIONS.labels("sse").dec()

    def on_connection_close(self) -> None:
        self._gone.set()
        self._leave()

    def on_finish(self) -> None:
        self._gone.set()
        self._leave()
