"""A lingering close: a socket whose ``close()`` lets the peer finish before the descriptor goes away.

Closing a TCP socket with unread bytes in its receive buffer makes the kernel
answer with a reset, and a reset can destroy what was sent just before it:
Tornado closes with ``1009`` as soon as it has read the header of a frame over
its size limit, while the client is still sending the rest, and the client
then sees a reset instead of the close frame. :class:`LingeringSocket`
shuts the write side (the close frame is followed by a FIN), reads and
discards whatever still arrives until the peer closes or
:data:`LINGER_SECONDS` pass, and only then closes the descriptor. It works at
the socket level, through ``IOStream.socket`` (a public attribute), so no
Tornado internals are involved.
"""

from __future__ import annotations

import asyncio
import socket

#: Seconds a closed connection may go on receiving (and discarding) before its descriptor is closed.
LINGER_SECONDS = 2.0


class LingeringSocket(socket.socket):
    """A ``socket.socket`` whose ``close()`` lingers (see the module docstring)."""

    def close(self) -> None:
        fd = self.fileno()
        try:
            loop = asyncio.get_running_loop()
            self.shutdown(socket.SHUT_WR)
        except (RuntimeError, OSError):  # no loop to linger on, or the peer is already gone
            super().close()
            return
        timer: asyncio.TimerHandle | None = None

        def finish() -> None:
            loop.remove_reader(fd)
            if timer is not None:
                timer.cancel()
            socket.socket.close(self)

        def discard() -> None:
            try:
                if self.recv(65536):
                    return
            except BlockingIOError:
                return
            except OSError:
                pass
            finish()  # EOF or an error: the peer is done

        loop.add_reader(fd, discard)
        timer = loop.call_later(LINGER_SECONDS, finish)


def lingering(sock: socket.socket) -> LingeringSocket:
    """The same connection as a :class:`LingeringSocket` (``sock`` is detached and must not be used again)."""
    replacement = LingeringSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    replacement.setblocking(False)
    return replacement
