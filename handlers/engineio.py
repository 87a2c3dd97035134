"""Engine.IO v4 at ``/socket.io/``: HTTP long-polling, WebSocket, and the upgrade between them.

* :class:`EngineServer`: this process's sessions by ``sid``.
* :class:`EngineSession`: one client: its transport, its queued packets and the
  server-driven heartbeat (a ``ping`` every ``socketio_ping_interval``; no
  ``pong`` within ``socketio_ping_timeout`` closes it).
* :class:`PollingHandler` (GET waits for packets, POST delivers the client's)
  and :class:`EngineSocket` (one packet per text frame) are the two transports;
  :class:`TransportMatcher` routes a request to one by its ``transport`` query
  argument, since both live at the same path.

What the session carries is opaque here: each text MESSAGE goes to its
:class:`Receiver` (the Socket.IO layer, ``handlers/socketio.py``), which
queues packets back with :meth:`EngineSession.send`.

A polling session lives in one process. Under ``eddy serve --processes N``
a worker passes any request for another worker's session to it, over that
worker's private loopback port (:class:`service.routing.ProcessRoute`): HTTP
requests by proxying them, a WebSocket upgrade by relaying its frames.
Between hosts, a load balancer must keep a polling client on one host
(docs/DIALECTS.md); WebSocket-only clients need nothing.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
from collections.abc import Callable
from typing import Any, Protocol

import tornado.ioloop
import tornado.web
import tornado.websocket
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.httputil import HTTPServerRequest
from tornado.iostream import StreamBufferFullError, StreamClosedError
from tornado.routing import PathMatches

from service import frames, metrics
from service.app import Eddy
from service.dialects import engineio
from service.dialects.engineio import EngineError, PacketType
from service.session import DRAIN_TIMEOUT

from . import stream_write

log = logging.getLogger("eddy.engineio")

PATH = "/socket.io/"
#: Request headers passed on to the worker holding a session.
FORWARDED_HEADERS = ("Authorization", "Content-Type", "Origin", "Cookie", "User-Agent")


class Transport(enum.Enum):
    POLLING = "polling"
    WEBSOCKET = "websocket"


class CloseReason(enum.Enum):
    """Why a session ended (logged; the client sees its own side of it)."""

    CLIENT_CLOSE = "client close"          # the client sent a CLOSE packet
    TRANSPORT_CLOSE = "transport close"    # the WebSocket closed, or polling stopped
    TRANSPORT_ERROR = "transport error"    # a malformed or oversized packet
    PING_TIMEOUT = "ping timeout"          # no pong in time
    SLOW_CONSUMER = "slow consumer"        # too much queued for a client that does not read
    SERVER_SHUTDOWN = "server shutting down"
    SERVER_CLOSE = "server close"          # every namespace of it disconnected by the server


class Receiver(Protocol):
    """The layer above Engine.IO (Socket.IO): gets every MESSAGE's text and the session's end."""

    def receive(self, text: str) -> None: ...

    def session_closed(self, reason: CloseReason) -> None: ...


class EngineServer:
    """This process's Engine.IO sessions, by ``sid``."""

    def __init__(self, eddy: Eddy, receiver_factory: Callable[[EngineSession], Receiver]) -> None:
        self.eddy = eddy
        self.sessions: dict[str, EngineSession] = {}
        self._receiver_factory = receiver_factory
        settings = eddy.settings
        self.ping_interval = settings.socketio_ping_interval
        self.ping_timeout = settings.socketio_ping_timeout
        self.max_payload = settings.socketio_max_http_buffer_size
        self.route = eddy.process_route
        self._http: AsyncHTTPClient | None = None
        #: Open sessions per client address.
        self._addresses: dict[str, int] = {}

    def admit(self, request: HTTPServerRequest) -> None:
        """``FORBIDDEN`` when the request's address holds ``max_connections_per_ip`` sessions already.

        A session counts from its handshake, before any namespace is connected, so handshakes alone cannot pile
        up; the Socket.IO sockets inside count toward the address's connections too, like native sockets.
        """
        if self._addresses.get(request.remote_ip or "", 0) >= self.eddy.settings.max_connections_per_ip:
            metrics.DROPPED.labels("connections_per_ip").inc()
            raise EngineError(EngineError.FORBIDDEN, "too many sessions from this address")

    def open(self, request: HTTPServerRequest, transport: Transport) -> EngineSession:
        address = request.remote_ip or ""
        self._addresses[address] = self._addresses.get(address, 0) + 1
        prefix = f"{self.route.index}." if self.route is not None else ""
        session = EngineSession(self, request, transport, prefix)
        self.sessions[session.sid] = session
        session.receiver = self._receiver_factory(session)
        return session

    def get(self, sid: str | None) -> EngineSession:
        session = self.sessions.get(sid) if sid else None
        if session is None:
            raise EngineError(EngineError.UNKNOWN_SID)
        return session

    def forget(self, session: EngineSession) -> None:
        if self.sessions.pop(session.sid, None) is not None:
            address = session.request.remote_ip or ""
            count = self._addresses.get(address, 1) - 1
            if count > 0:
                self._addresses[address] = count
            else:
                self._addresses.pop(address, None)

    def handshake(self, session: EngineSession, upgrades: list[str]) -> bytes:
        return engineio.open_packet(session.sid, upgrades, self.ping_interval, self.ping_timeout, self.max_payload)

    def owner_port(self, sid: str | None) -> int | None:
        """The private port of the worker holding ``sid`` when that is another worker of ``--processes N``."""
        if sid is None or self.route is None:
            return None
        owner = self.route.owner(sid)
        return self.route.ports[owner] if owner is not None and owner != self.route.index else None

    @property
    def http(self) -> AsyncHTTPClient:
        """The client that passes polling requests on (long polls wait, so many may be in flight)."""
        if self._http is None:
            self._http = AsyncHTTPClient(force_instance=True, max_clients=100_000)
        return self._http


class EngineSession:
    """One Engine.IO client, on polling or WebSocket, with its heartbeat and its queue."""

    def __init__(self, server: EngineServer, request: HTTPServerRequest, transport: Transport, prefix: str = "") -> None:
        self.server = server
        self.sid = prefix + secrets.token_urlsafe(15)
        self.transport = transport
        #: The handshake request: where the Socket.IO layer finds a token (header or query) and the address.
        self.request = request
        self.receiver: Receiver | None = None
        self.closed = False
        self.upgrading = False
        self.socket: EngineSocket | None = None
        #: What is not written yet: packets on polling, WebSocket frames on the WebSocket (see :meth:`upgrade`).
        self._queue: list[bytes] = []
        self._queued_bytes = 0
        self._poll: asyncio.Future[list[bytes]] | None = None
        self._ping_handle: object | None = None
        self._pong_deadline: object | None = None
        self._flush_scheduled = False
        self._schedule_ping()

    # Sending -------------------------------------------------------------------

    def send(self, packet: bytes) -> None:
        """Queue one Engine.IO packet; everything queued in this loop iteration leaves in one write."""
        self._enqueue(packet if self.transport is Transport.POLLING else frames.websocket_text_frame(packet))

    def send_frame(self, frame: bytes) -> None:
        """Queue a packet already framed for WebSocket (an event's shared frame); only on the WebSocket transport."""
        self._enqueue(frame)

    def _enqueue(self, data: bytes) -> None:
        if self.closed:
            return
        self._queue.append(data)
        self._queued_bytes += len(data)
        if self.transport is Transport.POLLING and self._queued_bytes > self.server.eddy.settings.max_buffered_bytes:
            log.warning("socket.io session %s closed: slow consumer", self.sid)
            metrics.SLOW_CONSUMERS.inc()
            self.close(CloseReason.SLOW_CONSUMER)
            return
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.server.eddy.hub.write_soon(self)

    def write_outbox(self) -> None:
        """Called by the hub at the end of the loop iteration: what was queued meanwhile leaves in one write."""
        self.flush()

    def flush(self) -> None:
        """Write the queue: over the WebSocket, or as the answer of a waiting polling GET."""
        self._flush_scheduled = False
        if not self._queue or self.closed:
            return
        if self.transport is Transport.WEBSOCKET and self.socket is not None:
            queued, self._queue, self._queued_bytes = self._queue, [], 0
            self.socket.write_frames(queued[0] if len(queued) == 1 else b"".join(queued))
        elif self._poll is not None and not self._poll.done() and not self.upgrading:
            queued, self._queue, self._queued_bytes = self._queue, [], 0
            self._poll.set_result(queued)

    async def drained(self) -> bool:
        """Flush, and wait until the client has taken everything queued; False if the session is gone."""
        self.flush()
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT):
                while self._queue and not self.closed:  # polling: the next GET takes it
                    await asyncio.sleep(0.01)
                if self.transport is Transport.WEBSOCKET and self.socket is not None:
                    await self.socket.drained()
        except TimeoutError:
            self.close(CloseReason.SLOW_CONSUMER)
        return not self.closed

    async def poll(self) -> list[bytes]:
        """What a polling GET answers: the queued packets, waiting until there are some."""
        if self._poll is not None and not self._poll.done():
            # Engine.IO allows one GET at a time; a second one is a broken client.
            self.close(CloseReason.TRANSPORT_ERROR)
            raise EngineError(EngineError.BAD_REQUEST, "overlapping GET requests")
        if self.transport is not Transport.POLLING:
            raise EngineError(EngineError.BAD_REQUEST, "this session has upgraded to WebSocket")
        if self.upgrading:  # the client waits for this GET to end before it switches to the WebSocket
            return [engineio.encode(PacketType.NOOP)]
        if self._queue:
            queued, self._queue, self._queued_bytes = self._queue, [], 0
            return queued
        self._poll = asyncio.get_running_loop().create_future()
        return await self._poll

    def poll_abandoned(self) -> None:
        """The client closed a waiting GET's connection: packets stay queued for the next one."""
        if self._poll is not None and not self._poll.done():
            self._poll.cancel()
        self._poll = None

    def _answer_poll(self, packets: list[bytes]) -> None:
        if self._poll is not None and not self._poll.done():
            self._poll.set_result(packets)

    # Receiving -----------------------------------------------------------------

    def receive(self, kind: PacketType, data: str) -> None:
        if self.closed:
            return
        if kind is PacketType.MESSAGE:
            if self.receiver is not None:
                self.receiver.receive(data)
        elif kind is PacketType.PONG:
            self._cancel(self._pong_deadline)
            self._pong_deadline = None
            self._schedule_ping()
        elif kind is PacketType.PING:  # an Engine.IO v3-style client ping: answer it
            self.send(engineio.encode(PacketType.PONG, data))
        elif kind is PacketType.CLOSE:
            self.close(CloseReason.CLIENT_CLOSE)
        # NOOP and a stray UPGRADE are ignored.

    # Upgrade ---------------------------------------------------------------------

    def probe(self, socket: EngineSocket) -> None:
        """``2probe`` arrived on a new WebSocket: answer it and release the waiting GET with a NOOP."""
        self.upgrading = True
        socket.write_message(engineio.encode(PacketType.PONG, "probe").decode())
        self._answer_poll([engineio.encode(PacketType.NOOP)])

    def upgrade(self, socket: EngineSocket) -> None:
        """``5`` arrived: from now on the WebSocket carries everything, starting with what was queued."""
        self._answer_poll([engineio.encode(PacketType.NOOP)])
        self.transport = Transport.WEBSOCKET
        self._queue = [frames.websocket_text_frame(packet) for packet in self._queue]
        self.socket = socket
        self.upgrading = False
        self.flush()

    # Heartbeat -----------------------------------------------------------------

    def _schedule_ping(self) -> None:
        if self.server.ping_interval > 0 and not self.closed:
            self._ping_handle = tornado.ioloop.IOLoop.current().call_later(self.server.ping_interval, self._ping)

    def _ping(self) -> None:
        self._ping_handle = None
        self.send(engineio.encode(PacketType.PING))
        self._pong_deadline = tornado.ioloop.IOLoop.current().call_later(self.server.ping_timeout, self._pong_missed)

    def _pong_missed(self) -> None:
        self._pong_deadline = None
        self.close(CloseReason.PING_TIMEOUT)

    @staticmethod
    def _cancel(handle: object | None) -> None:
        if handle is not None:
            tornado.ioloop.IOLoop.current().remove_timeout(handle)

    # Closing -------------------------------------------------------------------

    def close(self, reason: CloseReason) -> None:
        """End the session (idempotent): tell the client where it can still hear it, then forget it."""
        if self.closed:
            return
        log.debug("socket.io session %s closed: %s", self.sid, reason.value)
        if reason not in (CloseReason.CLIENT_CLOSE, CloseReason.TRANSPORT_CLOSE, CloseReason.PING_TIMEOUT):
            close_packet = engineio.encode(PacketType.CLOSE)
            if self.transport is Transport.WEBSOCKET and self.socket is not None:
                self.flush()
                self.socket.write_frames(frames.websocket_text_frame(close_packet))
            else:
                self._answer_poll([close_packet])
        self.closed = True
        self._cancel(self._ping_handle)
        self._cancel(self._pong_deadline)
        self._answer_poll([engineio.encode(PacketType.CLOSE)])
        self._queue = []
        self.server.forget(self)
        if self.socket is not None:
            self.socket.close()
        if self.receiver is not None:
            self.receiver.session_closed(reason)


class TransportMatcher(PathMatches):
    """Matches ``/socket.io/`` requests of one transport (``?transport=polling`` or ``websocket``)."""

    def __init__(self, transport: Transport) -> None:
        super().__init__(PATH)
        self.transport = transport

    def match(self, request: HTTPServerRequest) -> dict[str, Any] | None:
        if super().match(request) is None:
            return None
        names = request.query_arguments.get("transport") or [b""]
        if self.transport is Transport.POLLING:
            # Polling also answers requests with a missing or unknown transport, with Engine.IO's error.
            return {} if names[0] != b"websocket" else None
        return {} if names[0] == b"websocket" else None


def origin_allowed(eddy: Eddy, origin: str, host: str) -> bool:
    """Same origin, or one ``EDDY_ALLOWED_ORIGINS`` lists (``*`` allows any)."""
    allowed = eddy.settings.allowed_origin_set
    if "*" in allowed or origin.lower().rstrip("/") in allowed:
        return True
    return origin.lower().split("://", 1)[-1] == host.lower()


class EngineRequestMixin:
    """What both transports check first: the protocol version."""

    request: HTTPServerRequest

    def engine_arguments(self) -> tuple[str | None, str | None]:
        """(sid, transport) of the request; :class:`EngineError` unless ``EIO=4``."""
        arguments = self.request.query_arguments
        if arguments.get("EIO", [b""])[0] != engineio.PROTOCOL_VERSION.encode():
            raise EngineError(EngineError.UNSUPPORTED_PROTOCOL_VERSION)
        sid = arguments.get("sid", [b""])[0].decode("ascii", "replace") or None
        transport = arguments.get("transport", [b""])[0].decode("ascii", "replace") or None
        return sid, transport


class PollingHandler(EngineRequestMixin, tornado.web.RequestHandler):
    """HTTP long-polling: a GET without ``sid`` opens a session, a GET waits for packets, a POST sends some."""

    def initialize(self, eddy: Eddy, engine: EngineServer) -> None:
        self.eddy = eddy
        self.engine = engine
        self.session: EngineSession | None = None

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")
        origin = self.request.headers.get("Origin")
        if origin and origin_allowed(self.eddy, origin, self.request.host):
            self.set_header("Access-Control-Allow-Origin", origin)
            self.set_header("Access-Control-Allow-Credentials", "true")

    def options(self) -> None:
        """CORS preflight (a page on another origin sending ``Authorization``)."""
        self.set_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.set_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
        self.set_status(204)

    def _polling_sid(self) -> str | None:
        """The request's session id (None for a handshake); :class:`EngineError` unless it is a polling request."""
        sid, transport = self.engine_arguments()
        if transport != Transport.POLLING.value:
            raise EngineError(EngineError.UNKNOWN_TRANSPORT)
        return sid

    async def get(self) -> None:
        try:
            sid = self._polling_sid()
            if sid is None:
                self.engine.admit(self.request)
                session = self.engine.open(self.request, Transport.POLLING)
                return self._answer([self.engine.handshake(session, [Transport.WEBSOCKET.value])])
            port = self.engine.owner_port(sid)
            if port is not None:
                return await self._pass_on(port)
            self.session = self.engine.get(sid)
            packets = await self.session.poll()
        except EngineError as exc:
            return self._refuse(exc)
        except asyncio.CancelledError:
            return  # the client went away while waiting
        self._answer(packets)

    async def post(self) -> None:
        try:
            sid = self._polling_sid()
            if sid is None:
                raise EngineError(EngineError.BAD_HANDSHAKE_METHOD)
            port = self.engine.owner_port(sid)
            if port is not None:
                return await self._pass_on(port)
            session = self.engine.get(sid)
            if len(self.request.body) > self.engine.max_payload:
                session.close(CloseReason.TRANSPORT_ERROR)
                self.set_status(413)
                self.finish(b"payload too large")
                return
            try:
                packets = engineio.decode_payload(self.request.body)
            except EngineError:
                session.close(CloseReason.TRANSPORT_ERROR)
                raise
        except EngineError as exc:
            return self._refuse(exc)
        for kind, data in packets:
            session.receive(kind, data)
        self.set_header("Content-Type", "text/html")
        self.finish(b"ok")

    def on_connection_close(self) -> None:
        if self.session is not None:
            self.session.poll_abandoned()

    async def _pass_on(self, port: int) -> None:
        """Answer with what the worker holding the session answers (``--processes N``)."""
        headers = {name: self.request.headers[name] for name in FORWARDED_HEADERS if name in self.request.headers}
        request = HTTPRequest(f"http://127.0.0.1:{port}{self.request.uri}", method=self.request.method,
                              headers=headers, body=self.request.body if self.request.method == "POST" else None,
                              request_timeout=self.engine.ping_interval + self.engine.ping_timeout + 10,
                              follow_redirects=False, decompress_response=False)
        response = await self.engine.http.fetch(request, raise_error=False)
        if response.code == 599:  # that worker is gone, and its sessions with it
            return self._refuse(EngineError(EngineError.UNKNOWN_SID))
        self.set_status(response.code)
        self.set_header("Content-Type", response.headers.get("Content-Type", "text/plain; charset=UTF-8"))
        self.finish(response.body)

    def _answer(self, packets: list[bytes]) -> None:
        if self.request.connection is None or self._finished:
            return
        self.set_header("Content-Type", "text/plain; charset=UTF-8")
        self.finish(engineio.encode_payload(packets))

    def _refuse(self, error: EngineError) -> None:
        self.set_status(403 if error.code == EngineError.FORBIDDEN else 400)
        self.set_header("Content-Type", "application/json")
        self.finish(error.body())


class EngineSocket(EngineRequestMixin, tornado.websocket.WebSocketHandler):
    """The WebSocket transport: a new session, or the upgrade of a polling one (``?sid=``)."""

    def initialize(self, eddy: Eddy, engine: EngineServer) -> None:
        self.eddy = eddy
        self.engine = engine
        self.session: EngineSession | None = None
        self.probing: EngineSession | None = None
        #: The upgrade of another worker's session (``--processes N``): frames are relayed to it.
        self.relay: tornado.websocket.WebSocketClientConnection | None = None
        self._relaying: asyncio.Task[None] | None = None

    async def get(self, *args: Any, **kwargs: Any) -> None:
        try:
            sid, _transport = self.engine_arguments()
            if sid is None:
                self.engine.admit(self.request)
            elif self.engine.owner_port(sid) is None:
                session = self.engine.get(sid)
                if session.transport is not Transport.POLLING or session.upgrading:
                    raise EngineError(EngineError.BAD_REQUEST, "this session cannot upgrade")
        except EngineError as exc:
            self.set_status(403 if exc.code == EngineError.FORBIDDEN else 400)
            self.set_header("Content-Type", "application/json")
            self.finish(exc.body())
            return
        await super().get(*args, **kwargs)

    @property
    def max_message_size(self) -> int:
        return self.engine.max_payload

    def write_frames(self, data: bytes) -> None:
        """Write prepared WebSocket frames now (one ``send()`` when the kernel takes them)."""
        connection = self.ws_connection
        if connection is None or connection.is_closing() or connection.stream is None:
            return
        try:
            stream_write.write(connection.stream, data)
        except StreamBufferFullError:
            if self.session is not None:
                log.warning("socket.io session %s closed: slow consumer", self.session.sid)
                metrics.SLOW_CONSUMERS.inc()
                self.session.close(CloseReason.SLOW_CONSUMER)
        except StreamClosedError:
            pass

    async def drained(self) -> None:
        connection = self.ws_connection
        if connection is not None and not connection.is_closing() and connection.stream is not None:
            try:
                await connection.stream.write(b"")
            except StreamClosedError:
                pass

    def check_origin(self, origin: str) -> bool:
        return origin_allowed(self.eddy, origin, self.request.host)

    async def open(self, *args: str) -> None:
        assert self.ws_connection is not None and self.ws_connection.stream is not None  # open: the handshake is done
        stream_write.carry_events(self.ws_connection.stream, self.eddy.settings.max_buffered_bytes)
        sid, _transport = self.engine_arguments()
        port = self.engine.owner_port(sid)
        if port is not None:
            await self._relay_to(port)
            return
        if sid is not None:
            self.probing = self.engine.sessions.get(sid)
            if self.probing is None:
                self.close()
            return
        self.session = self.engine.open(self.request, Transport.WEBSOCKET)
        self.session.socket = self
        self.write_message(self.engine.handshake(self.session, []).decode())

    async def _relay_to(self, port: int) -> None:
        """Carry this WebSocket's frames to and from the worker holding its session."""
        try:
            self.relay = await tornado.websocket.websocket_connect(
                f"ws://127.0.0.1:{port}{self.request.uri}", max_message_size=self.engine.max_payload)
        except OSError:
            self.close()
            return
        self._relaying = asyncio.get_running_loop().create_task(self._relay_back(self.relay))

    async def _relay_back(self, relay: tornado.websocket.WebSocketClientConnection) -> None:
        while (message := await relay.read_message()) is not None:
            try:
                await self.write_message(message, binary=isinstance(message, bytes))
            except tornado.websocket.WebSocketClosedError:
                break
        relay.close()
        self.close()

    def on_message(self, message: str | bytes) -> None:
        if self.relay is not None:
            self.relay.write_message(message, binary=isinstance(message, bytes))
            return
        if isinstance(message, bytes):
            return  # a binary attachment: the Socket.IO layer already refused its packet
        if self.session is None:
            self._upgrade_step(message)
            return
        try:
            kind, data = engineio.decode(message)
        except EngineError:
            return  # a binary ("b") packet: ignored, as above
        self.session.receive(kind, data)

    def _upgrade_step(self, message: str) -> None:
        session = self.probing
        if session is None or session.closed:
            self.close()
        elif message == "2probe":
            session.probe(self)
        elif message == "5":
            self.session, self.probing = session, None
            session.upgrade(self)

    def on_close(self) -> None:
        if self.relay is not None:
            self.relay.close()
            return
        session = self.session or self.probing
        if session is None:
            return
        if self.session is None:
            session.upgrading = False  # a failed probe: the client carries on polling
            session.flush()
        elif session.socket is self:
            session.socket = None
            session.close(CloseReason.TRANSPORT_CLOSE)
