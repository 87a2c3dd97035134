"""The fan-out's fast path: a connection's bytes in one ``send()``, one of three uses of Tornado's private state.

``IOStream.write`` creates a Future, schedules its callback and touches the
poller for every call: 2-3x the cost of a whole fan-out delivery. When nothing
is queued on a plain TCP stream, one ``socket.send()`` puts the bytes in the
kernel's buffer instead, and only what did not fit goes through
``IOStream.write``. Knowing that nothing is queued needs ``IOStream``'s
private state: :func:`write` reads its ``_write_buffer``, and a :class:`Lane`
(a lone event's path, which must touch as little memory per socket as it can)
compares its two write indexes after anything but its own ``send()`` went
through the stream. If a Tornado release renames them, :func:`write`
falls back to ``IOStream.write`` for everything and no lane is made (correct,
only slower), and ``tests/test_stream_write.py`` fails loudly so the fast path
gets fixed.
"""

from __future__ import annotations

import logging
from asyncio import Future
from collections.abc import Sequence
from typing import Protocol

from tornado.iostream import IOStream
from tornado.websocket import WebSocketProtocol

from service.frames import PreparedMessage, Renderer

#: The private attribute :func:`write` reads: IOStream's queue of unsent bytes.
PRIVATE_BUFFER = "_write_buffer"
#: The private attributes a :class:`Lane` reads: bytes ever queued on the stream, and ever written from it.
PRIVATE_INDEXES = ("_total_write_index", "_total_write_done_index")
_MISSING = object()
log = logging.getLogger("eddy.websocket")


def carry_events(stream: IOStream, max_buffered: int) -> None:
    """Set up a stream that carries events (every transport's, once it is open): bounded, and sent at once.

    Bounded: past ``max_buffered`` unsent bytes a write raises, and the transport closes the client as a slow
    consumer instead of growing without limit.

    Sent at once (TCP_NODELAY): Tornado leaves Nagle's algorithm on; Go's net package, asyncio and Node's ``ws``
    turn it off for every connection. With it on, bytes written while earlier ones are unacknowledged wait for
    their ACK, and a client with nothing to send delays its ACK (40 ms and more on Linux). On a real network that
    holds back the tail of any event longer than one segment (~1.4 KB), and an event sent within a round trip of
    the one before.
    """
    stream.max_write_buffer_size = max_buffered
    stream.set_nodelay(True)


def has_fast_path(stream: IOStream) -> bool:
    """True when ``stream`` exposes what the fast path needs (a plain TCP stream with a private write buffer)."""
    return type(stream) is IOStream and getattr(stream, PRIVATE_BUFFER, _MISSING) is not _MISSING \
        and hasattr(stream, "socket")


def has_lane(stream: IOStream | None) -> bool:
    """True when a :class:`Lane` can be made for ``stream`` (the fast path, and the stream's write indexes)."""
    return stream is not None and has_fast_path(stream) and all(isinstance(getattr(stream, name, None), int) for name in PRIVATE_INDEXES)


def lane_for(connection: WebSocketProtocol, renderer: Renderer | None, rest: Rest) -> Lane | None:
    """A :class:`Lane` to ``connection``'s socket, or None when its stream lacks what a lane reads."""
    return Lane(connection, renderer, rest) if has_lane(connection.stream) else None


class Rest(Protocol):
    """Where a lane sends what the kernel did not take (the transport, which owns the stream's bound)."""

    def write_rest(self, data: memoryview) -> None: ...


class Lane:
    """One WebSocket's direct path for a lone event (:class:`service.hub.Lane`).

    :meth:`write_all` writes an event's frame to each of many lanes with one
    ``send()`` per socket, in one loop with no Python call per socket but the
    system call's, when the connection is not closing and nothing is queued on
    its stream (a ping, a close frame or an earlier event must not be
    overtaken); what the kernel does not take goes to ``rest``, which queues it
    on the stream. Made by :func:`lane_for`.

    On a lone event to thousands of sockets, memory reads and interpreter work
    are the cost beside the system call, so the lane keeps what it needs in
    itself: the socket's ``send``, its renderer, and :attr:`clear`, which says
    that the stream was idle when the lane last looked and has carried nothing
    since but the lane's own sends. Every other write passes through the
    stream's ``write``, which the lane replaces with :meth:`write_through`
    (Tornado's own frames: pings, pongs, the close frame; and the transport's
    queued bytes): that clears the flag, and the next lone event looks at the
    connection and the stream again (:meth:`check`) before it sends. A clear
    lane costs its event one flag, one ``send()`` and one comparison.
    """

    __slots__ = ("clear", "connection", "renderer", "rest", "send", "stream")

    def __init__(self, connection: WebSocketProtocol, renderer: Renderer | None, rest: Rest) -> None:
        assert connection.stream is not None, "a lane is made for an open connection"
        self.connection = connection
        self.stream: IOStream = connection.stream
        self.send = self.stream.socket.send
        #: None: the plain WebSocket frame; else the renderer of this socket's frames (compressed, a dialect's).
        self.renderer = renderer
        self.rest = rest
        #: True while the lane may send without looking: set by :meth:`check`, cleared by any other write.
        self.clear = False
        # An instance attribute, found before IOStream.write by every caller (Tornado's protocol included). One
        # lane per stream: a second would take the hook from the first, whose flag would then never be cleared.
        assert "write" not in vars(self.stream), "a stream has one lane"
        self.stream.write = self.write_through  # type: ignore[method-assign]

    def write_through(self, data: bytes | memoryview) -> Future[None]:
        """The stream's ``write`` while the lane lives: ``IOStream.write``, after which the lane looks again."""
        self.clear = False
        return IOStream.write(self.stream, data)

    def check(self) -> bool:
        """Whether the lane may send now (the connection is not closing and nothing is queued); sets :attr:`clear`."""
        connection, stream = self.connection, self.stream
        self.clear = not (connection.server_terminated or connection.client_terminated) \
            and stream._total_write_index == stream._total_write_done_index
        return self.clear

    def write_frame(self, frame: bytes) -> bool:
        """Send one frame of the transport's own (the keepalive's ping) as a lone event's is; False when the lane
        may not send now, and the caller writes it through the stream, behind what is queued.

        :meth:`write_all`'s step for one socket, kept apart: that loop calls nothing per socket but ``send()``.
        """
        if not (self.clear or self.check()):
            return False
        try:
            sent = self.send(frame)
        except BlockingIOError:
            sent = 0
        except OSError:  # closed, or a dead peer: the stream's own path finds out
            self.clear = False
            return False
        if sent != len(frame):
            self.rest.write_rest(memoryview(frame)[sent:])
        return True

    @classmethod
    def write_all(cls, lanes: Sequence[Lane], message: PreparedMessage) -> list[Lane]:
        """Write ``message`` through each of ``lanes``; return those that declined (in order). Never raises."""
        declined: list[Lane] = []
        plain = message.websocket_frame
        plain_size = len(plain)
        for lane in lanes:
            try:
                if not (lane.clear or lane.check()):
                    declined.append(lane)
                    continue
                renderer = lane.renderer
                if renderer is None:
                    frame, size = plain, plain_size
                else:
                    frame = message.rendered(renderer)
                    size = len(frame)
                try:
                    sent = lane.send(frame)
                except BlockingIOError:
                    sent = 0
                except OSError:  # closed, or a dead peer: the transport's own path finds out and drops the frame
                    lane.clear = False
                    declined.append(lane)
                    continue
                if sent != size:
                    lane.rest.write_rest(memoryview(frame)[sent:])
            except Exception:  # one broken connection must not starve the others
                log.exception("a lone event's write failed")
        return declined


def write(stream: IOStream, data: bytes | memoryview) -> None:
    """Write ``data`` now if the kernel takes it, else queue the rest on the stream.

    Raises what ``IOStream.write`` raises: ``StreamBufferFullError`` past
    ``max_write_buffer_size``, ``StreamClosedError`` on a closed stream.
    """
    if type(stream) is IOStream and not getattr(stream, PRIVATE_BUFFER, True) and stream.socket is not None:
        try:
            sent = stream.socket.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            sent = 0  # a dead peer: IOStream.write below notices and closes the stream
        if sent == len(data):
            return
        data = memoryview(data)[sent:]
    stream.write(data)


def buffered(stream: IOStream) -> int:
    """Bytes queued on ``stream`` and not yet taken by the kernel (0 if a Tornado release hides them)."""
    buffer = getattr(stream, PRIVATE_BUFFER, None)
    return len(buffer) if buffer is not None else 0
