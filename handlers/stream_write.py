"""The fan-out's fast path: a connection's queued bytes in one ``send()``, one of two uses of Tornado's private state.

``IOStream.write`` creates a Future, schedules its callback and touches the
poller for every call: 2-3x the cost of a whole fan-out delivery. When nothing
is queued on a plain TCP stream, one ``socket.send()`` puts the bytes in the
kernel's buffer instead, and only what did not fit goes through
``IOStream.write``. Knowing that nothing is queued needs ``IOStream``'s
private ``_write_buffer``; if a Tornado release renames it, :func:`write`
falls back to ``IOStream.write`` for everything (correct, only slower), and
``tests/test_stream_write.py`` fails loudly so the fast path gets fixed.
"""

from __future__ import annotations

from tornado.iostream import IOStream

#: The private attribute the fast path reads: IOStream's queue of unsent bytes.
PRIVATE_BUFFER = "_write_buffer"
_MISSING = object()


def has_fast_path(stream: IOStream) -> bool:
    """True when ``stream`` exposes what the fast path needs (a plain TCP stream with a private write buffer)."""
    return type(stream) is IOStream and getattr(stream, PRIVATE_BUFFER, _MISSING) is not _MISSING \
        and hasattr(stream, "socket")


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
