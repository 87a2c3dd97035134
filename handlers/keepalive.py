"""One keepalive timer for every WebSocket of a process, in place of Tornado's ping task per connection.

Tornado's ``websocket_ping_interval`` runs an asyncio task per connection (a
coroutine frame, a sleep future and a timer each: ~1.2 KB per idle socket).
:class:`PingSweep` keeps every socket's next ping, or its pong check, in one
heap under one timer, and follows Tornado's schedule (6.x ``periodic_ping``)
to the tick:

- the first ping leaves ``interval`` seconds after the socket opened;
- the pong is checked ``timeout`` seconds after the ping: no pong (noted by
  the handler's ``on_pong``) closes the connection with "ping timed out";
- the next ping leaves ``interval`` seconds after the previous one, and never
  before the previous check (``timeout`` 0 pings without ever checking).

Keeping the schedule exact matters: a client that reads only while its
application reads (Tornado's and aiohttp's clients, websocket-client) cannot
answer a ping while its application is busy, so whether it survives depends
on when the pings and checks fall. A sweep that rounded ping times up to a
coarser tick sent pings later than Tornado does, into such a client's busy
spell, and closed connections that Tornado's own task keeps (the real-client
matrix's Tornado client, left unread for 2.5 s while the server pings every
second). Timers fire no more often than Tornado's would: one per due time.

A socket is held by a weak reference: a closed one is forgotten at its turn.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import weakref
from typing import Protocol

import tornado.web

log = logging.getLogger("eddy.websocket")


class Pingable(Protocol):
    """A connection the sweep keeps alive (an :class:`handlers.websocket.EventSocket`)."""

    #: Set to False when a ping is sent, to True by the handler's ``on_pong``.
    pong_received: bool

    def keepalive_ping(self) -> None:
        """Send a PING frame with no payload (:data:`PING_FRAME`)."""

    def close(self, code: int | None = None, reason: str | None = None) -> None: ...

    def keepalive_closed(self) -> bool:
        """True once the connection is closing or closed (the sweep forgets it)."""


#: The sweep's ping as it goes on the wire: FIN, opcode 0x9, no mask, no payload (what Tornado's ``ping()`` writes).
PING_FRAME = b"\x89\x00"

_PING, _CHECK = 0, 1


class PingSweep:
    """Pings every registered socket every ``interval`` seconds; closes it when no pong came within ``timeout``.

    ``timeout`` 0 pings without ever closing; it is capped at ``interval``, as in Tornado.
    """

    def __init__(self, interval: float, timeout: float) -> None:
        self.interval = interval
        self.timeout = min(timeout, interval)
        #: (when, tie-breaker, what to do, when the last ping left, the socket), earliest first.
        self._due: list[tuple[float, int, int, float, weakref.ref[Pingable]]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeping = False

    def __len__(self) -> int:
        return len(self._due)

    def add(self, socket: Pingable) -> None:
        """Start keeping ``socket`` alive: its first ping leaves ``interval`` seconds from now."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # an application served again on a new event loop: the old timer is gone
            self._loop, self._due, self._timer = loop, [], None
        now = loop.time()
        self._push(now + self.interval, _PING, now, weakref.ref(socket))

    def _push(self, when: float, action: int, pinged: float, ref: weakref.ref[Pingable]) -> None:
        heapq.heappush(self._due, (when, next(self._order), action, pinged, ref))
        if not self._sweeping and (self._timer is None or when < self._timer.when()):
            self._arm()

    def _arm(self) -> None:
        """Set the one timer for the earliest entry (none when nothing is left)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(self._due[0][0], self._sweep) if self._due and self._loop else None

    def _sweep(self) -> None:
        self._timer = None
        assert self._loop is not None
        now = self._loop.time()
        self._sweeping = True
        try:
            self._run_due(now)
        finally:
            self._sweeping = False
            self._arm()

    def _run_due(self, now: float) -> None:
        while self._due and self._due[0][0] <= now:
            _, _, action, pinged, ref = heapq.heappop(self._due)
            socket = ref()
            if socket is None or socket.keepalive_closed():
                continue
            try:
                self._visit(socket, action, pinged, ref, now)
            except Exception:  # one broken connection must not stop the others' keepalive
                log.exception("keepalive ping failed")

    def _visit(self, socket: Pingable, action: int, pinged: float, ref: weakref.ref[Pingable], now: float) -> None:
        if action == _PING:
            socket.pong_received = False
            socket.keepalive_ping()
            if self.timeout > 0:
                self._push(now + self.timeout, _CHECK, now, ref)
            else:
                self._push(now + self.interval, _PING, now, ref)
        elif not socket.pong_received:
            socket.close(reason="ping timed out")
        else:
            # As Tornado: the next ping `interval` after the last one, or now if the check came later.
            self._push(max(pinged + self.interval, now), _PING, pinged, ref)


_SWEEPS: weakref.WeakKeyDictionary[tornado.web.Application, PingSweep] = weakref.WeakKeyDictionary()


def sweep_for(application: tornado.web.Application) -> PingSweep | None:
    """The application's sweep, from Tornado's own settings (``websocket_ping_interval``/``_timeout``); None when off."""
    sweep = _SWEEPS.get(application)
    if sweep is None:
        interval = application.settings.get("websocket_ping_interval") or 0
        if interval <= 0:
            return None
        timeout = application.settings.get("websocket_ping_timeout")
        sweep = _SWEEPS[application] = PingSweep(interval, interval if timeout is None else timeout)
    return sweep
