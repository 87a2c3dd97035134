"""An asyncio client of the Eddy WebSocket protocol, with what the browser client (``static/eddy.js``) adds.

::

    client = EddyClient("ws://127.0.0.1:8888/ws", token_provider=fetch_token)
    client.on("state", lambda change: print(change["state"]))
    stream = client.events()
    await client.connect()
    await client.join("orders")
    ack = await client.publish("orders", "order.created", {"total": 12})
    async for frame in stream:
        print(frame["channel"], frame["event"], frame["data"])

On top of ``docs/PROTOCOL.md``: reconnection with exponential backoff and
jitter, a bounded offline queue flushed on reconnect, resume of every joined
room with ``since`` = the last id seen there (events are de-duplicated by id),
tokens from a provider on every connect and on ``TOKEN_EXPIRED``, and a send
rate under the server's frame limit. Methods that expect an answer return an
awaitable future at once (the frame is queued even before it is awaited);
``typing`` expects none.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import random as _random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClientConnection, WebSocketClosedError, WebSocketError, websocket_connect

log = logging.getLogger("eddy.client")

#: Connection states, in the order a connection usually goes through them.
STATES = ("disconnected", "connecting", "connected", "reconnecting", "error")

# Close codes of docs/PROTOCOL.md.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_TOKEN_EXPIRED = 4003
CLOSE_TOO_MANY_CONNECTIONS = 4029
#: Not a server code: what the client reports when it drops a silent socket itself.
CLOSE_IDLE = 4900

#: Error codes after which re-sending a join on the same socket may succeed.
TRANSIENT = frozenset({"STORAGE_UNAVAILABLE", "AUTHORIZER_UNAVAILABLE", "RATE_LIMITED"})

TokenProvider = Callable[[], "str | None | Awaitable[str | None]"]
Listener = Callable[[Any], Any]


# Pure helpers ------------------------------------------------------------------------

def backoff_ceiling(attempt: int, *, base_delay: float = 1.0, max_delay: float = 32.0) -> float:
    """The longest wait before reconnection attempt ``attempt`` (1-based): 1, 2, 4 … 32 s by default."""
    if attempt < 1:
        return 0.0
    return min(max_delay, base_delay * 2 ** min(attempt - 1, 40))


def backoff_bounds(attempt: int, *, base_delay: float = 1.0, max_delay: float = 32.0,
                   jitter: str = "equal") -> tuple[float, float]:
    """``(lowest, highest)`` wait :func:`backoff_delay` can return for ``attempt``."""
    ceiling = backoff_ceiling(attempt, base_delay=base_delay, max_delay=max_delay)
    if jitter == "none":
        return ceiling, ceiling
    if jitter == "full":
        return 0.0, ceiling
    return ceiling / 2, ceiling


def backoff_delay(attempt: int, *, base_delay: float = 1.0, max_delay: float = 32.0, jitter: str = "equal",
                  random: Callable[[], float] = _random.random) -> float:
    """Seconds to wait before attempt ``attempt``.

    ``equal`` jitter (default) is half the ceiling plus a random half, so a
    fleet that lost its server together does not come back together;
    ``full`` is anywhere up to the ceiling; ``none`` the ceiling itself.
    """
    low, high = backoff_bounds(attempt, base_delay=base_delay, max_delay=max_delay, jitter=jitter)
    return low + random() * (high - low)


def backoff_schedule(max_attempts: int = 10, **options: Any) -> list[float]:
    """The waits before attempts 1..``max_attempts``; after the last, the client gives up (state ``error``)."""
    return [backoff_delay(attempt, **options) for attempt in range(1, max_attempts + 1)]


def close_policy(code: int | None) -> str:
    """After a close with ``code``: ``stop``, ``refresh`` (new token first), ``now`` (server leaving) or ``retry``."""
    if code == CLOSE_TOO_MANY_CONNECTIONS:
        return "stop"
    if code == CLOSE_TOKEN_EXPIRED:
        return "refresh"
    if code == CLOSE_GOING_AWAY:
        return "now"
    return "retry"


def compare_ids(a: str | int, b: str | int) -> int:
    """Negative, 0 or positive as event id ``a`` is before, equal to or after ``b`` (ids are positions)."""
    return int(a) - int(b)


def socket_url(url: str) -> str:
    """``url`` with a WebSocket scheme (``http://host/ws`` is accepted for ``ws://host/ws``)."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, parts.path or "/ws", parts.query, parts.fragment))


class EddyError(Exception):
    """A refusal carrying the protocol's ``code`` (and the error frame, when there was one)."""

    def __init__(self, code: str, message: str | None = None, frame: dict[str, Any] | None = None) -> None:
        super().__init__(message or code)
        self.code = code
        self.message = message or code
        self.frame = frame

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


# Book-keeping --------------------------------------------------------------------------

@dataclass(eq=False)
class _Room:
    name: str
    last_id: str | None = None
    #: The newest id seen anywhere when a live join was acknowledged: a resume point when nothing came since.
    floor: str | None = None
    #: Server time of the first acknowledged join, to skip older events of a resume from the start.
    joined_at: str | None = None
    from_start: bool = False
    joined: bool = False
    joining: bool = False
    waiters: list[asyncio.Future[Any]] = field(default_factory=list)


@dataclass(eq=False)
class _Item:
    """A frame on its way: queued, or sent and waiting for the answer with its ``ref``."""

    kind: str
    frame: dict[str, Any]
    future: asyncio.Future[Any] | None = None
    retry: bool = True
    room: _Room | None = None
    channel: str | None = None
    server_time: str | None = None
    history_lost: bool = False


_END = object()


class EventStream:
    """``async for frame in client.events()``: event frames, each once, until the client is closed or gives up.

    Listening starts when :meth:`EddyClient.events` is called, not at the first
    ``async for`` step, so nothing between the two is missed.
    """

    def __init__(self, client: EddyClient) -> None:
        self._client = client
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        client.on("event", self._queue.put_nowait)
        client._streams.add(self)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # later calls end too
            raise StopAsyncIteration
        return item

    def _end(self) -> None:
        self._queue.put_nowait(_END)

    def close(self) -> None:
        """Stop listening; what was received stays readable."""
        self._client.off("event", self._queue.put_nowait)
        self._client._streams.discard(self)
        self._end()


# The client ------------------------------------------------------------------------------

class EddyClient:
    """One logical connection to Eddy that survives reconnects. Use it from one asyncio event loop."""

    def __init__(self, url: str, token: str | None = None, token_provider: TokenProvider | None = None,
                 max_attempts: int = 10, base_delay: float = 1.0, max_delay: float = 32.0, queue_limit: int = 100,
                 *, jitter: str = "equal", random: Callable[[], float] = _random.random,
                 send_rate: float = 40.0, send_burst: int = 80, idle_timeout: float = 75.0,
                 connect_timeout: float = 10.0) -> None:
        self.url = socket_url(url)
        self.token = token
        self.token_provider = token_provider
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.jitter = jitter
        self.random = random
        self.queue_limit = queue_limit
        # The server allows 50 frames/s with bursts of 100: staying below means a flush after a
        # reconnect is never refused with RATE_LIMITED.
        self.send_rate = send_rate
        self.send_burst = send_burst
        # The server sends a keepalive every 30 s; silence for longer than this means a dead link.
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout

        self.state = "disconnected"
        #: Failed attempts since the last successful connection.
        self.attempt = 0
        #: The last ``connected`` frame.
        self.user: dict[str, Any] | None = None
        #: This client's presence status, restored on every reconnect.
        self.status = "online"

        self._listeners: dict[str, list[Listener]] = {}
        self._streams: set[EventStream] = set()
        self._rooms: dict[str, _Room] = {}
        self._last_seen: dict[str, str] = {}
        self._high_water: str | None = None
        self._server_time: str | None = None
        self._auto_rooms: set[str] = set()
        self._catching_up: dict[str, list[dict[str, Any]]] = {}
        self._queue: collections.deque[_Item] = collections.deque()
        self._priority: collections.deque[_Item] = collections.deque()
        self._pending: dict[int, _Item] = {}
        self._next_ref = 1
        self._holding = False
        self._ws: WebSocketClientConnection | None = None
        self._wanted = False
        self._task: asyncio.Task[None] | None = None
        self._pump_handle: asyncio.TimerHandle | None = None
        self._tokens = float(send_burst)
        self._tokens_at = time.monotonic()
        self._last_frame_at = 0.0
        self._pinging = False
        self._server_asked = False
        self._token_expired = False
        self._connect_waiters: list[asyncio.Future[dict[str, Any]]] = []

    # Listeners --------------------------------------------------------------------------

    def on(self, kind: str, callback: Listener) -> Callable[[], None]:
        """Call ``callback(payload)`` for ``kind``; returns a function that removes it.

        Kinds: ``state`` ({state, previous, attempt, max_attempts, delay, reason,
        code}), ``connected``, ``event``, ``event:<name>``, ``duplicate``,
        ``typing``, ``read``, ``presence``, ``ack``, ``frame`` (every frame
        received), ``reconnect``, ``dropped`` and ``error`` (an
        :class:`EddyError`). A coroutine callback runs as a task; a failing
        callback is logged and never breaks the connection.
        """
        self._listeners.setdefault(kind, []).append(callback)
        return lambda: self.off(kind, callback)

    def off(self, kind: str, callback: Listener) -> None:
        listeners = self._listeners.get(kind, [])
        if callback in listeners:
            listeners.remove(callback)

    def events(self) -> EventStream:
        """An async iterator of event frames (de-duplicated), listening from now on."""
        return EventStream(self)

    def _emit(self, kind: str, payload: Any) -> None:
        for callback in list(self._listeners.get(kind, ())):
            try:
                result = callback(payload)
                if inspect.isawaitable(result):
                    asyncio.ensure_future(result).add_done_callback(_log_failure)
            except Exception:
                log.exception("a %s listener failed", kind)

    def _set_state(self, state: str, *, delay: float | None = None, reason: str | None = None,
                   code: int | None = None) -> None:
        previous, self.state = self.state, state
        self._emit("state", {"state": state, "previous": previous, "attempt": self.attempt,
                             "max_attempts": self.max_attempts, "delay": delay, "reason": reason, "code": code})

    # Connection ----------------------------------------------------------------------------

    async def connect(self) -> dict[str, Any]:
        """Open the connection and keep it open; returns the ``connected`` frame.

        Raises :class:`EddyError` when the client gives up (``MAX_ATTEMPTS``, a
        refused token without a provider, ``TOO_MANY_CONNECTIONS``) or is closed.
        """
        if self.state == "connected" and self.user is not None:
            return self.user
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._connect_waiters.append(waiter)
        if self._task is None or self._task.done():
            self._wanted = True
            self.attempt = 0
            self._task = asyncio.get_running_loop().create_task(self._supervise(), name="eddy-client")
        return await waiter

    def close(self) -> None:
        """Close for good (until :meth:`connect` again). Queued frames stay queued; event iterators end."""
        self._wanted = False
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
        self._cancel_pump()
        ws, self._ws = self._ws, None
        if ws is not None:
            ws.close(CLOSE_NORMAL, "client closed")
            self._lost_socket()
        self._settle_connect(EddyError("CLOSED", "the client was closed"))
        for stream in list(self._streams):
            stream._end()
        if self.state != "disconnected":
            self._set_state("disconnected", reason="closed by the client")

    @property
    def connected(self) -> bool:
        return self.state == "connected"

    async def _token(self) -> str | None:
        if self.token_provider is not None:
            token = self.token_provider()
            if inspect.isawaitable(token):
                token = await token
            if token:
                self.token = token
            return token
        return self.token

    async def _supervise(self) -> None:
        """Connect, serve the socket until it closes, decide whether and when to go again."""
        self._set_state("connecting")
        try:
            while self._wanted:
                policy, code, reason = await self._session()
                if not self._wanted:
                    return
                if policy == "fail":
                    self._fail(reason[0], reason[1], code)
                    return
                if policy == "stop":
                    self._fail("TOO_MANY_CONNECTIONS", "this user opened too many connections; not reconnecting", code)
                    return
                if policy == "refresh" and self.token_provider is None:
                    self._fail("TOKEN_EXPIRED", "the token expired and there is no token_provider to get a new one",
                               code)
                    return
                delay = None
                if policy == "now":
                    # Another instance takes over: go at once, spread over one base delay against a stampede.
                    self.attempt = 0
                    delay = self.random() * self.base_delay
                self.attempt += 1
                if self.attempt > self.max_attempts:
                    self.attempt = self.max_attempts
                    self._fail("MAX_ATTEMPTS", f"gave up after {self.max_attempts} attempts", code)
                    return
                if delay is None:
                    delay = backoff_delay(self.attempt, base_delay=self.base_delay, max_delay=self.max_delay,
                                          jitter=self.jitter, random=self.random)
                self._set_state("reconnecting", delay=delay, reason=reason[1], code=code)
                await asyncio.sleep(delay)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not leave connect() waiting forever
            log.exception("the client's connection loop failed")
            self._fail("INTERNAL_ERROR", f"the client failed: {exc!r}")

    async def _session(self) -> tuple[str, int | None, tuple[str, str]]:
        """One connection, from handshake to close: ``(policy, close code, (error code, reason))``."""
        try:
            token = await self._token()
        except Exception as exc:
            self._emit("error", EddyError("TOKEN_PROVIDER", f"the token provider failed: {exc!r}"))
            return "retry", None, ("TOKEN_PROVIDER", "token provider failed")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        request = HTTPRequest(self.url, headers=headers, connect_timeout=self.connect_timeout,
                              request_timeout=self.connect_timeout)
        try:
            ws = await websocket_connect(request)
        except HTTPClientError as exc:
            return self._refused(exc)
        except (TimeoutError, OSError, StreamClosedError, WebSocketError) as exc:
            return "retry", None, ("CONNECT_FAILED", f"cannot connect: {exc!r}")
        if not self._wanted:
            ws.close(CLOSE_NORMAL, "client closed")
            return "retry", None, ("CLOSED", "closed")
        self._ws = ws
        self._server_asked = self._token_expired = False
        self._last_frame_at = time.monotonic()
        code, reason = await self._read(ws)
        if self._ws is ws:
            self._ws = None
        self._cancel_pump()
        self._lost_socket()
        for room in self._rooms.values():
            room.joined = room.joining = False
        policy = "now" if self._server_asked else close_policy(code)
        if self._token_expired and policy == "retry":
            policy = "refresh"
        return policy, code, ("CONNECTION_LOST", reason or "connection lost")

    def _refused(self, exc: HTTPClientError) -> tuple[str, int | None, tuple[str, str]]:
        """A handshake answered with an HTTP error (a WebSocket client, unlike a browser, can see it)."""
        problem: dict[str, Any] = {}
        if exc.response is not None and exc.response.body:
            try:
                problem = orjson.loads(exc.response.body)
            except orjson.JSONDecodeError:
                pass
        code = problem.get("code") or f"HTTP_{exc.code}"
        detail = problem.get("detail") or str(exc)
        if exc.code == 401:
            if self.token_provider is None:
                return "fail", None, (code, detail)  # the same token would be refused again
            self._emit("error", EddyError(code, detail))  # the provider may have a better one next time
            return "retry", None, (code, detail)
        if exc.code in (400, 403, 404):
            return "fail", None, (code, detail)
        return "retry", None, (code, detail)

    async def _read(self, ws: WebSocketClientConnection) -> tuple[int | None, str | None]:
        """Handle frames until the socket closes (or goes silent for ``idle_timeout``)."""
        reading: asyncio.Future[Any] | None = None
        while True:
            wait = self.idle_timeout / 4 if self.idle_timeout else None
            # The read is kept across idle checks rather than cancelled by a timeout: a
            # cancelled read could lose the message that arrives just then.
            if reading is None:
                reading = asyncio.ensure_future(ws.read_message())
            done, _ = await asyncio.wait({reading}, timeout=wait)
            if done:
                message, reading = reading.result(), None
            else:
                silent = time.monotonic() - self._last_frame_at
                if silent >= self.idle_timeout:
                    # A half-open TCP connection may take minutes to report its close.
                    ws.close(CLOSE_NORMAL, "idle")
                    return CLOSE_IDLE, "no frame from the server within idle_timeout"
                if silent >= self.idle_timeout / 2 and self.connected and not self._pinging:
                    self._pinging = True
                    self._control({"type": "ping", "timestamp": str(int(time.time() * 1000))})
                continue
            if message is None:
                return ws.close_code, ws.close_reason
            self._last_frame_at = time.monotonic()
            if isinstance(message, str):
                self._on_message(ws, message)
            if self._server_asked:
                # Go now instead of waiting for the close: the server is draining.
                ws.close(CLOSE_NORMAL, "server asked to reconnect")
                return CLOSE_GOING_AWAY, "server asked to reconnect"
            if self._ws is not ws:
                return ws.close_code, ws.close_reason

    def _fail(self, code: str, message: str, close_code: int | None = None) -> None:
        self._wanted = False
        error = EddyError(code, message)
        self._emit("error", error)
        self._settle_connect(error)
        self._set_state("error", reason=message, code=close_code)
        for stream in list(self._streams):
            stream._end()

    def _settle_connect(self, error: EddyError | None) -> None:
        waiters, self._connect_waiters = self._connect_waiters, []
        for waiter in waiters:
            if not waiter.done():
                if error is None and self.user is not None:
                    waiter.set_result(self.user)
                else:
                    waiter.set_exception(error or EddyError("DISCONNECTED", "connection lost before connected"))

    def _lost_socket(self) -> None:
        """The socket is gone: frames sent but not answered go back to the front of the queue (or fail)."""
        self._catching_up.clear()  # fetched again on the next connection
        for item in self._priority:
            if item.kind == "leave":
                _resolve(item.future, None)  # the room is forgotten: not re-joined
        self._priority.clear()
        again: list[_Item] = []
        for ref in sorted(self._pending):
            item = self._pending.pop(ref)
            if item.kind == "leave":
                _resolve(item.future, None)
            if item.kind in ("join", "leave", "control", "catchup"):
                continue  # redone by the next connection
            if item.retry:
                again.append(item)
            else:
                _reject(item.future, EddyError("DISCONNECTED", "the connection closed before an answer"))
        self._queue.extendleft(reversed(again))
        self._enforce_bound()

    # Frames from the server -------------------------------------------------------------------

    def _on_message(self, ws: WebSocketClientConnection, message: str) -> None:
        try:
            frame = orjson.loads(message)
        except orjson.JSONDecodeError:
            self._emit("error", EddyError("INVALID_JSON", "the server sent a frame that is not JSON"))
            return
        if not isinstance(frame, dict):
            return
        stamp = frame.get("timestamp") if frame.get("type") != "pong" else None
        if isinstance(stamp, str) and stamp[:4].isdigit() and (self._server_time is None or stamp > self._server_time):
            self._server_time = stamp  # the server's clock (ISO strings sort by time), to date joins
        self._emit("frame", frame)
        kind = frame.get("type")
        if kind == "connected":
            self._on_connected(frame)
        elif kind == "event":
            self._on_event(frame)
        elif kind == "ack":
            self._on_ack(frame)
        elif kind == "error":
            self._on_error(frame)
        elif kind in ("presence_data", "sync_data", "pong"):
            self._answer(frame)
        elif kind in ("typing", "read", "presence"):
            self._emit(kind, frame)
        elif kind == "reconnect":
            self._server_asked = True
            self._emit("reconnect", frame)
        # keepalive, and frames of newer servers: nothing to do

    def _on_connected(self, frame: dict[str, Any]) -> None:
        self.user = frame
        self.attempt = 0
        self._tokens, self._tokens_at = float(self.send_burst), time.monotonic()
        self._set_state("connected")
        self._emit("connected", frame)
        self._settle_connect(None)
        # Rooms first (the server handles a socket's frames in order, so what is flushed after finds
        # its room joined), then presence, then the queue; nothing queued may overtake a re-join.
        self._holding = True
        previous, self._auto_rooms = self._auto_rooms, set(frame.get("channels") or ())
        for room in self._rooms.values():
            self._send_join(room, live=room.name in self._auto_rooms)
        # Rooms the server subscribes at connect (user:, tenant, role:, a /ws/<c>/stream channel) replay
        # nothing: fetch what they missed with sync, holding their live events meanwhile.
        for channel in self._auto_rooms:
            auto_room = self._rooms.get(channel)
            start = None
            if auto_room is not None:
                start = auto_room.last_id or auto_room.floor
            elif channel in previous:
                start = self._last_seen.get(channel) or self._high_water
            if start is None:
                continue
            self._catching_up[channel] = []
            self._control({"type": "sync", "channel": channel, "last_id": start}, kind="catchup", channel=channel)
        if self.status != "online":
            self._control({"type": "presence", "status": self.status})
        self._holding = False
        self._pump()

    def _on_event(self, frame: dict[str, Any], caught_up: bool = False) -> None:
        channel = frame.get("channel")
        if not isinstance(channel, str) or frame.get("id") is None:
            return
        if not caught_up and channel in self._catching_up:
            self._catching_up[channel].append(frame)  # delivered after the missed ones, in order
            return
        last = self._last_seen.get(channel)
        if last is not None and compare_ids(frame["id"], last) <= 0:
            self._emit("duplicate", frame)  # the overlap of a resume: already delivered
            return
        room = self._rooms.get(channel)
        if room is not None and room.from_start and room.joined_at and str(frame.get("timestamp", "")) < room.joined_at:
            return  # a resume from the start of history: what predates the first join was never wanted
        self._last_seen[channel] = frame["id"]
        if room is not None:
            room.last_id = frame["id"]
        if self._high_water is None or compare_ids(frame["id"], self._high_water) > 0:
            self._high_water = frame["id"]
        self._emit("event", frame)
        if frame.get("event"):
            self._emit(f"event:{frame['event']}", frame)

    def _on_ack(self, frame: dict[str, Any]) -> None:
        item = self._pending.pop(frame["ref"], None) if frame.get("ref") is not None else None
        self._emit("ack", frame)
        if item is None:
            return
        if item.kind == "join":
            room = item.room
            assert room is not None
            if self._rooms.get(room.name) is not room:
                return  # left meanwhile
            room.joined, room.joining = True, False
            if not room.joined_at:
                room.joined_at = item.server_time
            if room.last_id is None and room.floor is None and not room.from_start and self._high_water is not None:
                # A live join with nothing seen on it yet: resume later from the newest id seen anywhere
                # by now. Ids grow across the whole store, so that misses nothing.
                room.floor = self._high_water
            waiters, room.waiters = room.waiters, []
            for waiter in waiters:
                _resolve(waiter, {**frame, "history_lost": item.history_lost})
            return
        _resolve(item.future, frame)

    def _on_error(self, frame: dict[str, Any]) -> None:
        error = EddyError(frame.get("code") or "ERROR", frame.get("error") or frame.get("code"), frame)
        item = self._pending.pop(frame["ref"], None) if frame.get("ref") is not None else None
        if item is None:
            if error.code == "TOKEN_EXPIRED":
                asyncio.ensure_future(self._refresh_token()).add_done_callback(_log_failure)
            self._emit("error", error)
            return
        if item.kind == "join":
            self._join_refused(item, error)
            return
        if item.kind == "catchup":
            self._caught_up(item.channel or "")  # e.g. HISTORY_LOST: carry on live
        if item.future is not None:
            _reject(item.future, error)
        else:
            self._emit("error", error)

    def _join_refused(self, item: _Item, error: EddyError) -> None:
        room = item.room
        assert room is not None
        if self._rooms.get(room.name) is not room:
            return
        room.joining = False
        self._emit("error", error)
        if error.code == "HISTORY_LOST":
            # Events after our position are gone: join live; the application reloads (it got the error).
            room.last_id = room.floor = None
            room.from_start = False
            room.joined_at = self._server_time
            self._last_seen.pop(room.name, None)
            self._send_join(room, live=True, history_lost=True)
            return
        if error.code in TRANSIENT:
            ws = self._ws

            def again() -> None:
                if self._ws is ws and self._rooms.get(room.name) is room and not room.joined and not room.joining:
                    self._send_join(room)

            asyncio.get_running_loop().call_later(self.base_delay, again)
            return
        # Refused for good (FORBIDDEN, INVALID_CHANNEL, TOO_MANY_CHANNELS): forget the room.
        del self._rooms[room.name]
        waiters, room.waiters = room.waiters, []
        for waiter in waiters:
            _reject(waiter, error)

    def _answer(self, frame: dict[str, Any]) -> None:
        if frame.get("type") == "pong":
            self._pinging = False
        item = self._pending.pop(frame["ref"], None) if frame.get("ref") is not None else None
        if item is None:
            return
        if item.kind == "catchup":
            events = frame.get("events") or []
            for event in events:
                self._on_event(event, caught_up=True)
            if frame.get("has_more") and events:
                self._control({"type": "sync", "channel": item.channel, "last_id": events[-1]["id"]},
                              kind="catchup", channel=item.channel)
            else:
                self._caught_up(item.channel or "")
            return
        _resolve(item.future, frame)

    def _caught_up(self, channel: str) -> None:
        for event in self._catching_up.pop(channel, []):
            self._on_event(event)

    async def _refresh_token(self) -> None:
        if self.token_provider is None:
            self._token_expired = True  # the server closes with 4003 after its grace period
            return
        ws = self._ws
        try:
            token = await self._token()
        except Exception as exc:
            self._token_expired = True
            self._emit("error", EddyError("TOKEN_PROVIDER", f"the token provider failed: {exc!r}"))
            return
        if ws is not None and ws is self._ws and token:
            self._control({"type": "authenticate", "token": token})

    # Frames to the server ----------------------------------------------------------------------

    def _take_token(self) -> bool:
        now = time.monotonic()
        self._tokens = min(float(self.send_burst), self._tokens + (now - self._tokens_at) * self.send_rate)
        self._tokens_at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def _write(self, frame: dict[str, Any]) -> None:
        ws = self._ws
        if ws is None:
            return
        try:
            written = ws.write_message(orjson.dumps(frame).decode())
        except WebSocketClosedError:
            return  # the read loop sees the close and re-queues what waits for an answer
        written.add_done_callback(_ignore_failure)

    def _control(self, frame: dict[str, Any], *, kind: str = "control", **extra: Any) -> None:
        """A frame the client itself needs on this connection (resume, presence, leave, token refresh):
        sent before the queue, never dropped, forgotten when the socket closes (the next one redoes it)."""
        if not self.connected:
            return
        self._priority.append(_Item(kind=kind, frame=frame, **extra))
        self._pump()

    def _send_join(self, room: _Room, *, live: bool = False, history_lost: bool = False) -> None:
        frame: dict[str, Any] = {"type": "join", "channel": room.name}
        if not live:
            if room.last_id is not None:
                frame["since"] = room.last_id
            elif room.floor is not None:
                frame["since"] = room.floor
            elif room.joined_at:
                # Joined on an earlier connection, nothing seen since: replay the history, skip its older part.
                frame["since"] = "0"
                room.from_start = True
        room.joining = True
        self._control(frame, kind="join", room=room, server_time=self._server_time, history_lost=history_lost)

    def _enqueue(self, frame: dict[str, Any], *, expect_answer: bool = True, retry: bool = True
                 ) -> asyncio.Future[Any] | None:
        future = asyncio.get_running_loop().create_future() if expect_answer else None
        if future is not None:
            future.add_done_callback(_ignore_failure)  # failures are also reported as "error" and "dropped"
        self._queue.append(_Item(kind=frame["type"], frame=frame, future=future, retry=retry))
        self._enforce_bound()
        self._pump()
        return future

    def _enforce_bound(self) -> None:
        while len(self._queue) > self.queue_limit:
            dropped = self._queue.popleft()
            error = EddyError("DROPPED", f"offline queue full ({self.queue_limit}): the oldest frame was dropped",
                              dropped.frame)
            _reject(dropped.future, error)
            self._emit("dropped", {"frame": dropped.frame, "reason": "queue full", "queue_limit": self.queue_limit})
            self._emit("error", error)

    def _pump(self) -> None:
        if self._holding:
            return
        self._cancel_pump()
        while self.connected and self._ws is not None and (self._priority or self._queue):
            if not self._take_token():
                # Stay under the server's frame rate: the rest goes out as tokens come back.
                wait = max((1 - self._tokens) / self.send_rate, 0.005)
                self._pump_handle = asyncio.get_running_loop().call_later(wait, self._pump)
                return
            if self._priority:
                item = self._priority.popleft()
                ref = self._take_ref()
                self._pending[ref] = item
                self._write({**item.frame, "ref": ref})
                continue
            item = self._queue.popleft()
            frame = dict(item.frame)
            if item.future is not None:
                if item.future.done():  # cancelled by its caller while queued
                    continue
                frame["ref"] = self._take_ref()
                self._pending[frame["ref"]] = item
            self._write(frame)

    def _cancel_pump(self) -> None:
        if self._pump_handle is not None:
            self._pump_handle.cancel()
            self._pump_handle = None

    def _take_ref(self) -> int:
        ref, self._next_ref = self._next_ref, self._next_ref + 1
        return ref

    @property
    def queued(self) -> int:
        """Frames waiting to be sent (at most ``queue_limit``)."""
        return len(self._queue)

    # Public API ----------------------------------------------------------------------------------

    def join(self, channel: str, since: str | int | None = None) -> asyncio.Future[dict[str, Any]]:
        """Subscribe; with ``since``, first receive every stored event after that id.

        The room is re-joined on every reconnect with ``since`` = the last id
        seen on it. Resolves with the ack (``history_lost`` true when the
        server had trimmed what came after ``since``; the room is then joined
        live); raises :class:`EddyError` for a refusal (``FORBIDDEN`` …).
        """
        loop = asyncio.get_running_loop()
        room = self._rooms.get(channel)
        if room is not None and room.joined:
            done = loop.create_future()
            done.set_result({"type": "ack", "channel": channel})
            return done
        if room is None:
            room = _Room(name=channel, last_id=str(since) if since is not None else None)
            if room.last_id is not None:
                self._last_seen[channel] = room.last_id
            self._rooms[channel] = room
        waiter: asyncio.Future[dict[str, Any]] = loop.create_future()
        waiter.add_done_callback(_ignore_failure)
        room.waiters.append(waiter)
        if self.connected and not room.joining:
            self._send_join(room)
        return waiter

    def leave(self, channel: str) -> asyncio.Future[dict[str, Any] | None]:
        """Unsubscribe; the room is no longer re-joined. Resolves with the ack (``None`` when offline)."""
        future: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_ignore_failure)
        room = self._rooms.pop(channel, None)
        if room is None:
            future.set_result(None)
            return future
        for waiter in room.waiters:
            _reject(waiter, EddyError("LEFT", f"left {channel} before the join was answered"))
        room.waiters = []
        if not self.connected or (not room.joined and not room.joining):
            future.set_result(None)
            return future
        self._control({"type": "leave", "channel": channel}, kind="leave", future=future)
        return future

    @property
    def channels(self) -> list[str]:
        """Channels joined (or being joined) by this client."""
        return list(self._rooms)

    def last_event_id(self, channel: str) -> str | None:
        return self._last_seen.get(channel)

    def publish(self, channel: str, event: str, data: Any = None, idempotency_key: str | None = None
                ) -> asyncio.Future[dict[str, Any]]:
        """Store and broadcast an event (the channel's rule must allow socket publishing).

        Queued while offline; resolves with the ack (``id``, ``timestamp`` …).
        A key is generated when none is given, so a frame re-sent after a
        reconnect is stored once.
        """
        key = idempotency_key or f"eddy-py-{uuid.uuid4().hex}"
        future = self._enqueue({"type": "publish", "channel": channel, "event": event, "data": data,
                                "idempotency_key": key})
        assert future is not None
        return future

    def typing(self, channel: str, is_typing: bool = True) -> None:
        """Typing indicator: fire and forget (queued while offline)."""
        self._enqueue({"type": "typing", "channel": channel, "is_typing": bool(is_typing)}, expect_answer=False)

    def read(self, channel: str, message_id: str | int) -> asyncio.Future[dict[str, Any]]:
        """Read receipt; resolves with the ack."""
        future = self._enqueue({"type": "read", "channel": channel, "message_id": str(message_id)})
        assert future is not None
        return future

    def presence(self, status: str) -> asyncio.Future[dict[str, Any]]:
        """Set this connection's status (online, away, busy, offline); restored after a reconnect."""
        self.status = status
        future = self._enqueue({"type": "presence", "status": status})
        assert future is not None
        return future

    def presence_query(self, channel: str) -> asyncio.Future[dict[str, Any]]:
        """Who is online in ``channel``: resolves with the ``presence_data`` frame."""
        future = self._enqueue({"type": "presence_query", "channel": channel})
        assert future is not None
        return future

    def sync(self, channel: str, last_id: str | int = "0") -> asyncio.Future[dict[str, Any]]:
        """Events of ``channel`` after ``last_id`` (at most 1000) without subscribing: ``sync_data``."""
        future = self._enqueue({"type": "sync", "channel": channel, "last_id": str(last_id)})
        assert future is not None
        return future

    def ping(self) -> asyncio.Future[dict[str, Any]]:
        """Round trip to the server: resolves with the ``pong``."""
        future = self._enqueue({"type": "ping", "timestamp": str(int(time.time() * 1000))}, retry=False)
        assert future is not None
        return future


def _resolve(future: asyncio.Future[Any] | None, value: Any) -> None:
    if future is not None and not future.done():
        future.set_result(value)


def _reject(future: asyncio.Future[Any] | None, error: BaseException) -> None:
    if future is not None and not future.done():
        future.set_exception(error)


def _ignore_failure(future: asyncio.Future[Any]) -> None:
    # Mark the exception as retrieved: callers may fire and forget, failures are reported as events.
    if not future.cancelled():
        future.exception()


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("client background work failed", exc_info=future.exception())


# HTTP ------------------------------------------------------------------------------------------------

async def publish_http(base_url: str, token: str, channel: str, event: str, data: Any = None, *,
                       idempotency_key: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """``POST /api/events``: the stored event (its ``id``, ``position``, ``timestamp`` …).

    Raises :class:`EddyError` with the problem body's ``code`` and ``detail``
    (``frame`` is the whole body) when the server refuses, and
    ``CONNECT_FAILED`` when it cannot be reached.
    """
    body: dict[str, Any] = {"channel": channel, "event": event, "data": data}
    if idempotency_key is not None:
        body["idempotency_key"] = idempotency_key
    request = HTTPRequest(base_url.rstrip("/") + "/api/events", method="POST", body=orjson.dumps(body),
                          headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
                          connect_timeout=timeout, request_timeout=timeout)
    try:
        response = await AsyncHTTPClient().fetch(request, raise_error=False)
    except (OSError, StreamClosedError, HTTPClientError) as exc:
        raise EddyError("CONNECT_FAILED", f"cannot reach {base_url}: {exc}") from None
    try:
        answer = orjson.loads(response.body) if response.body else {}
    except orjson.JSONDecodeError:
        answer = {}
    if response.code not in (200, 201, 202) or not isinstance(answer, dict):
        problem = answer if isinstance(answer, dict) else {}
        raise EddyError(problem.get("code") or f"HTTP_{response.code}",
                        problem.get("detail") or f"HTTP {response.code}", problem or None)
    return answer
