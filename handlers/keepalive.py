"""One keepalive timer for every WebSocket of a process, in place of Tornado's ping task per connection.

Tornado's ``websocket_ping_interval`` runs an asyncio task per connection (a
coroutine frame and a timer each: memory per idle socket, and wake-ups a busy
fan-out pays for). :class:`PingSweep` keeps every socket's next ping time in
one heap and one timer: when it fires it pings the sockets that are due (with
the public ``WebSocketHandler.ping``) and closes the ones whose pong
(noted by the handler's ``on_pong``) did not come back within the timeout,
as Tornado does ("ping timed out").

Sockets connect at different times, so their pings stay spread out; the
sweep wakes at most every :data:`TICK` seconds (a quarter of the interval
when that is shorter), so pings due close together leave together. A
socket is held by a weak reference: a closed one is forgotten at its turn.
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

#: The sweep never wakes more often than this (seconds): pings due within it leave in one pass.
TICK = 0.25


class Pingable(Protocol):
    """A connection the sweep keeps alive (an :class:`handlers.websocket.EventSocket`)."""

    #: Set to False when a ping is sent, to True by the handler's ``on_pong``.
    pong_received: bool

    def ping(self, data: bytes = b"") -> None: ...

    def close(self, code: int | None = None, reason: str | None = None) -> None: ...

    def keepalive_closed(self) -> bool:
        """True once the connection is closing or closed (the sweep forgets it)."""


_PING, _CHECK = 0, 1


class PingSweep:
    """Pings every registered socket every ``interval`` seconds; closes it when no pong came within ``timeout``.

    ``timeout`` 0 pings without ever closing; it is capped at ``interval``, as in Tornado.
    """

    def __init__(self, interval: float, timeout: float) -> None:
        self.interval = interval
        self.timeout = min(timeout, interval)
        #: (when, tie-breaker, what to do, the socket): the next ping of each socket, or its pong check.
        self._due: list[tuple[float, int, int, weakref.ref[Pingable]]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        #: The sweep wakes at most this often; a ping is late by at most this much.
        self.tick = min(TICK, interval / 4)

    def __len__(self) -> int:
        return len(self._due)

    def add(self, socket: Pingable) -> None:
        """Start keeping ``socket`` alive: its first ping leaves ``interval`` seconds from now."""
        loop = asyncio.get_running_loop()
        # Every entry already in the heap is due no later than this one: a running timer comes first.
        self._push(loop.time() + self.interval, _PING, weakref.ref(socket))
        if self._timer is None:
            self._wake_at(loop, loop.time())

    def _push(self, when: float, action: int, ref: weakref.ref[Pingable]) -> None:
        heapq.heappush(self._due, (when, next(self._order), action, ref))

    def _wake_at(self, loop: asyncio.AbstractEventLoop, now: float) -> None:
        self._timer = loop.call_at(max(self._due[0][0], now + self.tick), self._sweep)

    def _sweep(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._due and self._due[0][0] <= now:
            _, _, action, ref = heapq.heappop(self._due)
            socket = ref()
            if socket is None or socket.keepalive_closed():
                continue
            try:
                self._visit(socket, action, ref, now)
            except Exception:  # one broken connection must not stop the others' keepalive
                log.exception("keepalive ping failed")
        if self._due:
            self._wake_at(loop, now)

    def _visit(self, socket: Pingable, action: int, ref: weakref.ref[Pingable], now: float) -> None:
        if action == _PING:
            socket.pong_received = False
            socket.ping()
            if self.timeout > 0:
                self._push(now + self.timeout, _CHECK, ref)
            else:
                self._push(now + self.interval, _PING, ref)
        elif not socket.pong_received:
            socket.close(reason="ping timed out")
        else:
            self._push(now + self.interval - self.timeout, _PING, ref)


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
