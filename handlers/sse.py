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

The stream is a transport of a :class:`service.session.Session`, like a
WebSocket: resuming (``Last-Event-ID``, or ``?since=``) is the session's
replay, so the seam between history and live events is the same one (no gap,
no duplicate), and the replay is written as the client reads it, within the
same send bound as live events.
"""

from __future__ import annotations

import asyncio
import time
from typing import cast

import orjson
from tornado.http1connection import HTTP1Connection as HTTP1ServerConnection
from tornado.iostream import IOStream, StreamBufferFullError, StreamClosedError

from service import frames, metrics
from service.app import Eddy
from service.frames import FrameError, PreparedMessage
from service.hub import ChannelKey
from service.refusals import position_field
from service.session import DRAIN_TIMEOUT, Session

from . import stream_write
from .http import RETRY_AFTER_SECONDS, ApiError, ApiHandler

#: The HTTP status of a channel or resume the socket would refuse with an error frame.
_REFUSAL_STATUS = {frames.INVALID_CHANNEL: 400, frames.FORBIDDEN: 403, frames.HISTORY_LOST: 410,
                   frames.AUTHORIZER_UNAVAILABLE: 503, frames.STORAGE_UNAVAILABLE: 503}
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


class SSEChunks:
    """Renders a message as what the stream carries (see the module docstring); shared, cached per message."""

    def render(self, message: PreparedMessage) -> bytes:
        payload = message.payload
        if payload.startswith(_EVENT_FRAME):
            return sse_message(payload, event_id=message.position)
        kind = orjson.loads(payload).get("type", "message")
        if kind == "keepalive":
            # A comment: EventSource ignores it, proxies and dead-peer detection see traffic.
            return b": keepalive\n\n"
        return sse_message(payload, event=kind)


SSE_CHUNKS = SSEChunks()


def refusal(error: FrameError) -> ApiError:
    """The problem response for a channel or resume refused before the stream starts."""
    status = _REFUSAL_STATUS.get(error.code, 400)
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else None
    return ApiError(status, error.code, error.message, headers)


class SSEHandler(ApiHandler):
    """``GET /sse?channels=a,b``: a read-only event stream (``text/event-stream``).

    The :class:`service.session.Transport` of a session that never receives a
    client frame. Everything that can be refused (token, channels,
    ``Last-Event-ID``, a trimmed history) is refused with a problem body
    before the first byte of the stream.
    """

    kind = "sse"
    #: Milliseconds an EventSource waits before reconnecting (the ``retry:`` field).
    RETRY_MS = 3000

    def initialize(self, eddy: Eddy) -> None:
        super().initialize(eddy)
        self.remote_ip = self.request.remote_ip or ""
        # A stream cannot be handed a fresh token, and it is not listed in presence.
        self.session = Session(eddy, self, refreshable=False, tracks_presence=False)
        self._outbox: list[bytes] = []
        self._streaming = False
        self._gone = asyncio.Event()

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
        events in id order, then live ones.
        """
        if not Session.admits(self.eddy, self.remote_ip):
            raise ApiError(429, "TOO_MANY_CONNECTIONS", "too many connections from this address")
        session = self.session
        session.identity = self.authenticate()
        names = self._channel_names()
        since = self._since()
        keys = []
        for name in names:
            try:
                keys.append(await session.authorize(name))
            except FrameError as error:
                raise refusal(error) from None
        session.open()
        replay = None
        if since is None:
            session.subscribe(keys)
            # Nothing awaited since subscribing: every event after the watcher's position comes live.
            start = self.eddy.watcher.position
        else:
            start = since
            replay, refused = await session.begin_replay(keys, since, self.get_query_argument("epoch", None))
            if refused:
                raise refusal(next(iter(refused.values())))
        if self._gone.is_set():
            # Closed by the server while joining (shutdown): an empty stream, so the EventSource retries.
            self._stream_headers()
            self.write(b"retry: %d\n\n" % self.RETRY_MS)
            return
        self._start_stream(keys, start)
        if replay is not None:
            try:
                await session.finish_replay(replay)
            except FrameError as error:
                session.notify(frames.error_frame(error.code, error.message))
                self.close()
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
            return position_field({"since": raw.strip()}, "since")
        except FrameError:
            raise ApiError(400, "INVALID_PARAMETER", "Last-Event-ID (or since) must be an event id") from None

    def _stream_headers(self) -> None:
        self.set_status(200)
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Accel-Buffering", "no")  # nginx would otherwise hold events back

    def _start_stream(self, keys: list[ChannelKey], start: int | None) -> None:
        identity = self.session.identity
        assert identity is not None
        self._stream_headers()
        # The same bound as a socket's: past it the client is a slow consumer (replays wait below it).
        stream_write.carry_events(self._stream(), self.eddy.settings.max_buffered_bytes)
        connected = {
            "type": "connected",
            "connection_id": self.session.connection_id,
            "user_id": identity.user_id,
            "tenant": identity.tenant,
            "channels": sorted(channel for _, channel in keys),
            "timestamp": frames.iso_timestamp(time.time()),
            "epoch": self.eddy.epoch,
        }
        self._streaming = True
        self._write(b"retry: %d\n" % self.RETRY_MS + sse_message(frames.encode(connected), event="connected",
                                                                   event_id=start))
        self.session.watch_expiry()

    # Transport ---------------------------------------------------------------------

    def queue(self, message: PreparedMessage) -> None:
        if not self._streaming:
            return
        chunk = message.rendered(SSE_CHUNKS)
        if self._outbox:
            self._outbox.append(chunk)
            return
        self._outbox.append(chunk)
        self.eddy.hub.write_soon(self)

    def write_outbox(self) -> None:
        chunks, self._outbox = self._outbox, []
        if chunks:
            self._write(b"".join(chunks))

    async def drained(self) -> bool:
        self.write_outbox()
        if self._finished or self._gone.is_set():
            return False
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT):
                await self.flush_stream()
        except StreamClosedError:
            return False
        except TimeoutError:
            self._close_slow_consumer()
            return False
        return not self._gone.is_set()

    async def flush_stream(self) -> None:
        """Wait until everything written so far has left for the kernel."""
        await self._stream().write(b"")

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        """End the stream (shutdown, expiry, the per-user cap); an EventSource then reconnects after ``retry``."""
        self.write_outbox()
        self._gone.set()
        self.session.closed()
        if self._streaming and not self._finished:
            self.finish()

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

    def queued_bytes(self) -> int:
        """Bytes accepted for this stream and not yet taken by the kernel: its outbox and the connection's buffer."""
        queued = sum(map(len, self._outbox))
        return queued if self._finished or self._gone.is_set() else queued + stream_write.buffered(self._stream())

    def _close_slow_consumer(self) -> None:
        self.session.log.warning("closed: slow consumer")
        metrics.SLOW_CONSUMERS.inc()
        metrics.DROPPED.labels("slow_consumer").inc()
        self._gone.set()
        self.session.closed()
        # Unsent bytes are over the bound: dropping the connection is all that is left.
        self._stream().close()

    def _stream(self) -> IOStream:
        """The HTTP connection's stream (Tornado's HTTP/1 server connection has one)."""
        return cast(HTTP1ServerConnection, self.request.connection).stream

    def on_connection_close(self) -> None:
        self._gone.set()
        self.session.closed()

    def on_finish(self) -> None:
        self._gone.set()
        self.session.closed()
