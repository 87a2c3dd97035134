"""The WebSocket endpoint: a thin transport for :class:`service.session.Session`.

One :class:`EventSocket` per connection. The handshake refuses what can be
refused with an HTTP problem before the upgrade (address limit, token, path
channel, ``since``); after it, every client message goes to
:func:`service.protocol.dispatch` and every server message leaves through
:meth:`EventSocket.queue`, which writes each loop iteration's frames in one
``send()`` (see :mod:`handlers.stream_write`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import tornado.websocket
from tornado.iostream import IOStream, StreamBufferFullError, StreamClosedError
from tornado.websocket import WebSocketProtocol

from service import frames, metrics, protocol
from service.app import Eddy
from service.auth import token_from_request
from service.deflate import negotiate
from service.frames import FrameError, PreparedMessage
from service.refusals import position_field
from service.session import DRAIN_TIMEOUT, Session

from . import detached, keepalive, stream_write, strict_utf8
from .linger import lingering


class EventSocket(tornado.websocket.WebSocketHandler):
    """A WebSocket connection: the :class:`service.session.Transport` of one session."""

    kind = "websocket"
    #: Whether the keepalive's last ping was answered (see :mod:`handlers.keepalive`).
    pong_received = True
    #: The client frames this socket understands (a dialect's socket has its own table).
    FRAMES = protocol.NATIVE

    def initialize(self, eddy: Eddy) -> None:
        self.eddy = eddy
        self.remote_ip = self.request.remote_ip or ""
        self.session = Session(eddy, self)
        #: ``?since=`` on the handshake (or in a deferred ``authenticate``): resume the rooms joined at connect.
        self.resume_since: int | None = None
        #: ``?epoch=``: the epoch the client got its ids with (a resume across a recreated store is refused).
        self.resume_epoch: str | None = None
        #: Frames queued in this loop iteration (see Hub.write_soon).
        self._outbox: list[bytes] = []
        #: True when this socket negotiated permessage-deflate: its frames come from eddy.deflated_frames.
        self.deflate = False
        #: The hub's direct path to this socket for lone events (made once open; None where it cannot be).
        self.lane: stream_write.Lane | None = None
        self._extensions_answer = ""

    # Handshake -------------------------------------------------------------

    async def prepare(self) -> None:
        """Refuse with an HTTP problem before the upgrade: too many connections, bad ``since``, token, path channel.

        With ``EDDY_AUTH_TIMEOUT`` set, a request with no token at all is let
        through unauthenticated; it must send an ``authenticate`` frame in time.
        """
        if not Session.admits(self.eddy, self.remote_ip):
            return self._refuse(429, "TOO_MANY_CONNECTIONS", "too many connections from this address")
        try:
            self.resume_since = position_field({"since": self.get_query_argument("since", None)}, "since")
            self.resume_epoch = protocol.epoch_field({"epoch": self.get_query_argument("epoch", None)})
        except FrameError as exc:
            return self._refuse(400, exc.code, exc.message)
        self.session.path_channel = self.path_args[0] if self.path_args else None
        self._negotiate_compression()
        token = token_from_request(self.request.headers, lambda name: self.get_query_argument(name, None))
        if token is None and self.eddy.settings.auth_timeout > 0:
            return None
        try:
            self.session.identify(token)
        except FrameError as exc:
            self.set_header("WWW-Authenticate", 'Bearer realm="eddy"')
            return self._refuse(401, exc.code, exc.message)
        try:
            await self.session.authorize_path()
        except FrameError as exc:
            return self._refuse(400 if exc.code == frames.INVALID_CHANNEL else 403, exc.code, exc.message)
        return None

    def _negotiate_compression(self) -> None:
        """Leave Tornado only the permessage-deflate offer Eddy accepts, and remember Eddy's answer to it.

        Tornado negotiates the first offer it sees (and would abort the
        handshake on a parameter it does not know); its answer drops
        parameters without a value, so :meth:`set_header` replaces it with
        Eddy's, which promises ``server_no_context_takeover``: every message
        is compressed on its own (see :mod:`service.deflate`).
        """
        headers = self.request.headers
        agreed = negotiate(headers.get("Sec-WebSocket-Extensions", "")) if self.eddy.settings.compression else None
        if "Sec-WebSocket-Extensions" in headers:
            del headers["Sec-WebSocket-Extensions"]
        if agreed is not None:
            headers["Sec-WebSocket-Extensions"], self._extensions_answer = agreed
            self.deflate = True

    def set_header(self, name: str, value: Any) -> None:
        if name == "Sec-WebSocket-Extensions" and self.deflate:
            value = self._extensions_answer
        super().set_header(name, value)

    def get_compression_options(self) -> dict[str, Any] | None:
        return {} if self.deflate else None

    def get_websocket_protocol(self) -> WebSocketProtocol | None:
        # Tornado's protocol, closing with 1007 on a text message that is not UTF-8 (see handlers/strict_utf8.py).
        return strict_utf8.install(super().get_websocket_protocol())

    def _refuse(self, status: int, code: str, message: str) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/problem+json")
        self.finish(
            orjson.dumps({"type": "about:blank", "title": self._reason, "status": status, "code": code, "detail": message})
        )

    @property
    def ping_interval(self) -> float | None:
        # Not Tornado's ping task per connection: the application's one sweep pings every socket
        # (handlers/keepalive.py), with the same websocket_ping_interval and _timeout settings.
        return None

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

    # Tornado's hooks ---------------------------------------------------------

    def open(self, *args: str) -> None:
        stream = self._open_stream()
        assert stream is not None
        # Frames are written straight into this stream's buffer, within its bound.
        stream_write.carry_events(stream, self.eddy.settings.max_buffered_bytes)
        # Every close frame reaches the client, even one sent while it is still writing.
        stream.socket = lingering(stream.socket)
        assert self.ws_connection is not None
        self.lane = self.make_lane(self.ws_connection)
        sweep = keepalive.sweep_for(self.application)
        if sweep is not None:
            sweep.add(self)
        self._forget_handshake()
        self.session.open()
        if self.session.identity is not None:
            self.session.start(self.resume_since, self.resume_epoch)
        # `connected` leaves now, before the first client frame is read: a frame that fails the connection
        # (invalid UTF-8 closes at the protocol level, without this handler's close()) must not overtake it.
        self.write_outbox()

    def _forget_handshake(self) -> None:
        """Drop what only the handshake needed: its headers, query and arguments (and any token), the HTTP/1
        exchange, the response state (see :mod:`handlers.detached`); a live socket keeps the path, for log lines.
        """
        detached.forget_handshake(self, also=("_extensions_answer",))

    def on_message(self, message: str | bytes) -> Any:
        return protocol.dispatch(self.session, message, self.FRAMES)

    def on_pong(self, data: bytes) -> None:
        self.pong_received = True

    def keepalive_ping(self) -> None:
        """The sweep's ping: two bytes in one ``send()`` through the lane when it may send, else Tornado's
        ``ping()`` (the lane's stream has bytes queued, or this socket has no lane)."""
        if self.lane is None or not self.lane.write_frame(keepalive.PING_FRAME):
            self.ping()

    def on_close(self) -> None:
        self.session.closed()
        self.session.log.debug("closed (%s)", self.close_code)

    # Transport ---------------------------------------------------------------

    def queue(self, message: PreparedMessage) -> None:
        """Queue a frame; every frame queued in this loop iteration leaves in one write (at once during a lone
        event's fan-out: see :meth:`service.hub.Hub.write_soon`)."""
        frame = self.frame_for(message)
        if self._outbox:
            self._outbox.append(frame)
            return
        connection = self.ws_connection
        if connection is None or connection.is_closing():
            return
        self._outbox.append(frame)
        self.eddy.hub.write_soon(self)

    def frame_for(self, message: PreparedMessage) -> bytes:
        """The WebSocket frame this socket sends for ``message``; a dialect's socket renders its own shape."""
        return message.rendered(self.eddy.deflated_frames) if self.deflate else message.websocket_frame

    def make_lane(self, connection: WebSocketProtocol) -> stream_write.Lane | None:
        """This socket's lane for lone events, rendering as :meth:`frame_for` does; None where Tornado lacks
        what a lane reads (and a dialect whose :meth:`queue` filters must return None)."""
        return stream_write.lane_for(connection, self.eddy.deflated_frames if self.deflate else None, self)

    def write_rest(self, data: memoryview) -> None:
        """What the kernel did not take of a frame the lane wrote: queued on the stream, within its bound."""
        stream = self._open_stream()
        if stream is not None:
            self._write(stream, data)

    def write_outbox(self) -> None:
        """Write the queued frames (called by the hub at the end of the loop iteration)."""
        frames_out, self._outbox = self._outbox, []
        connection = self.ws_connection  # not _open_stream(): this runs once per socket per burst
        if not frames_out or connection is None or connection.is_closing():
            return
        self._write(connection.stream, frames_out[0] if len(frames_out) == 1 else b"".join(frames_out))

    def _write(self, stream: IOStream | None, data: bytes | memoryview) -> None:
        assert stream is not None  # set once the connection is accepted
        try:
            stream_write.write(stream, data)
        except StreamBufferFullError:
            self._close_slow_consumer()
        except StreamClosedError:
            pass

    async def drained(self) -> bool:
        self.write_outbox()
        stream = self._open_stream()
        if stream is None:
            return False
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT):
                await stream.write(b"")
        except StreamClosedError:
            return False
        except TimeoutError:
            self._close_slow_consumer()
            return False
        return self._open_stream() is not None

    def keepalive_closed(self) -> bool:
        return self._open_stream() is None

    def queued_bytes(self) -> int:
        """Bytes accepted for this socket and not yet taken by the kernel: its outbox and its stream's buffer."""
        queued = sum(map(len, self._outbox))
        stream = self._open_stream()
        return queued + (stream_write.buffered(stream) if stream is not None else 0)

    def _open_stream(self) -> IOStream | None:
        """The connection's stream while frames may still be sent on it."""
        connection = self.ws_connection
        if connection is None or connection.is_closing():
            return None
        return connection.stream

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        self.write_outbox()  # what was queued (a reconnect frame, an error) goes before the close
        super().close(code, reason)

    def _close_slow_consumer(self) -> None:
        self.session.log.warning("closed: slow consumer")
        metrics.SLOW_CONSUMERS.inc()
        metrics.DROPPED.labels("slow_consumer").inc()
        self.session.closed()
        self._outbox = []
        # Lift the bound so the close frame can queue behind the backlog; if the
        # client never reads it, Tornado aborts the connection after a timeout.
        stream = self._open_stream()
        if stream is not None:
            stream.max_write_buffer_size = None
        super().close(frames.CLOSE_SLOW_CONSUMER, "slow consumer")
