"""Socket.IO v5 on Engine.IO v4: namespaces, the config mapping, recovery. A translation at the edge.

* :class:`SocketIOServer`: the configured namespaces, their renderers (an
  event is encoded once per namespace, whatever the number of sockets), the
  recovery store, and the Engine.IO server under it.
* :class:`SocketIOConnection`: the Socket.IO side of one Engine.IO session;
  decodes packets and routes them to the namespace sockets it holds.
* :class:`NamespaceSocket`: one client in one namespace: the transport of a
  :class:`service.session.Session`, whose operations (join, leave, typing,
  publish, presence) perform the namespace's mapped events with the same
  rules, tenants, store and resume as the native protocol.

The mapping (``[socketio]`` in the config file, ``service/dialects/mapping.py``)
says what each client event does and what it answers. See docs/DIALECTS.md.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from typing import Any

from tornado.routing import Rule

from service import frames, metrics
from service.app import Eddy
from service.auth import Identity, token_from_request
from service.config import read_dialect_tables
from service.dialects import socketio, templates
from service.dialects.mapping import EventRule, Namespace, Operation, parse_socketio, token_context
from service.dialects.recovery import RecoveryStore, SessionRecord
from service.dialects.renderers import FrameRenderer, PacketRenderer, engine_message
from service.dialects.socketio import Packet, PacketError, PacketType
from service.frames import FrameError, PreparedMessage
from service.replay import Replay
from service.session import Session

from .engineio import CloseReason, EngineServer, EngineSession, EngineSocket, PollingHandler, Transport, TransportMatcher

log = logging.getLogger("eddy.socketio")


def socketio_routes(eddy: Eddy) -> list[Rule]:
    """The two ``/socket.io/`` rules (polling and WebSocket), sharing one server."""
    server = SocketIOServer(eddy)
    args = {"eddy": eddy, "engine": server.engine}
    return [Rule(TransportMatcher(Transport.WEBSOCKET), EngineSocket, args),
            Rule(TransportMatcher(Transport.POLLING), PollingHandler, args)]


class SocketIOServer:
    def __init__(self, eddy: Eddy) -> None:
        self.eddy = eddy
        tables = read_dialect_tables(eddy.settings.config) if eddy.settings.config else {}
        self.namespaces = parse_socketio(tables.get("socketio"))
        self.recovery = RecoveryStore.of(eddy)
        self.packets = {name: PacketRenderer(ns, self.recovery.enabled) for name, ns in self.namespaces.items()}
        self.frames = {name: FrameRenderer(renderer) for name, renderer in self.packets.items()}
        self.engine = EngineServer(eddy, lambda session: SocketIOConnection(self, session))


class SocketIOConnection:
    """The Socket.IO side of one Engine.IO session: its namespace sockets."""

    def __init__(self, server: SocketIOServer, session: EngineSession) -> None:
        self.server = server
        self.session = session
        self.sockets: dict[str, NamespaceSocket] = {}
        #: CONNECTs being authenticated (the loop keeps only weak references to tasks).
        self._connecting: set[asyncio.Task[None]] = set()

    def send(self, kind: PacketType, namespace: str, data: Any = socketio._MISSING, ack_id: int | None = None) -> None:
        self.session.send(engine_message(socketio.encode(kind, namespace, data, ack_id)))

    def receive(self, text: str) -> None:
        try:
            packet = socketio.decode(text)
        except PacketError as exc:
            namespace = text[1:].split(",", 1)[0] if text[1:2] == "/" else "/"
            metrics.FRAME_ERRORS.labels(frames.UNSUPPORTED_BINARY if "binary" in str(exc) else frames.INVALID_FRAME).inc()
            if namespace in self.sockets:
                self.send(PacketType.EVENT, namespace, ["error", {"message": str(exc)}])
            else:
                self.send(PacketType.CONNECT_ERROR, namespace, {"message": str(exc)})
            return
        socket = self.sockets.get(packet.namespace)
        if packet.type is PacketType.CONNECT:
            if socket is None:
                task = asyncio.get_running_loop().create_task(self.connect(packet))
                self._connecting.add(task)
                task.add_done_callback(self._connecting.discard)
        elif socket is None:
            return  # a packet for a namespace this client is not in: ignored, as Socket.IO servers do
        elif packet.type is PacketType.EVENT:
            socket.receive_event(packet)
        elif packet.type is PacketType.DISCONNECT:
            socket.end(forget=True)
        # ACK packets answer server emits with an ack id; Eddy emits none, so there is nothing to resolve.

    async def connect(self, packet: Packet) -> None:
        """CONNECT: authenticate, recover or open the namespace socket, answer CONNECT or CONNECT_ERROR."""
        namespace = self.server.namespaces.get(packet.namespace)
        if namespace is None:
            self.send(PacketType.CONNECT_ERROR, packet.namespace, {"message": "Invalid namespace"})
            return
        request = self.session.request
        if not Session.admits(self.server.eddy, request.remote_ip or ""):
            self.send(PacketType.CONNECT_ERROR, namespace.name, {"message": "too many connections from this address",
                                                                 "data": {"code": "TOO_MANY_CONNECTIONS"}})
            return
        auth = packet.data or {}
        token = auth.get("token") if isinstance(auth.get("token"), str) else None
        token = token or token_from_request(request.headers,
                                            lambda name: request.query_arguments.get(name, [b""])[0].decode() or None)
        socket = NamespaceSocket(self, namespace)
        try:
            identity = socket.session.identify(token)
        except FrameError as exc:
            self.send(PacketType.CONNECT_ERROR, namespace.name, {"message": exc.message, "data": {"code": exc.code}})
            return
        if self.session.closed or namespace.name in self.sockets:
            return
        self.sockets[namespace.name] = socket
        record = await self.server.recovery.load(identity, auth.get("pid"), namespace.name)
        if not socket.ended:  # the transport may have gone while the store answered
            await socket.start(record, auth.get("offset"))

    def session_closed(self, reason: CloseReason) -> None:
        for socket in list(self.sockets.values()):
            socket.end(forget=False)
        log.debug("socket.io connection closed: %s", reason.value)


class NamespaceSocket:
    """One client in one namespace: the :class:`service.session.Transport` of a Session, and its mapped events."""

    kind = "socketio"

    def __init__(self, connection: SocketIOConnection, namespace: Namespace) -> None:
        self.connection = connection
        self.server = connection.server
        self.eddy = connection.server.eddy
        self.namespace = namespace
        self.packets = connection.server.packets[namespace.name]
        self.frames = connection.server.frames[namespace.name]
        self.remote_ip = connection.session.request.remote_ip or ""
        # Socket.IO has no frame to hand over a fresh token: an expired one ends the socket (the client reconnects).
        self.session = Session(self.eddy, self, notify=self.notify, refreshable=False)
        self.record = SessionRecord(secrets.token_urlsafe(15), secrets.token_urlsafe(15), namespace.name,
                                    epoch=self.eddy.epoch)
        self.ended = False
        self._inbox: deque[Packet] = deque()
        #: The replay of a recovered session's missed events, sent after CONNECT.
        self._replay: Replay | None = None

    @property
    def identity(self) -> Identity:
        assert self.session.identity is not None
        return self.session.identity

    # Connect -------------------------------------------------------------------------

    async def start(self, record: SessionRecord | None, offset: object) -> None:
        """Recover the recorded session (its rooms, then what it missed) or start a new one; answer CONNECT; greet."""
        self.session.open()
        self.session.watch_expiry()
        recovered = record is not None and await self._recover(record, offset)
        if not recovered:
            keys = [(self.identity.tenant, room) for room in self.namespace.rooms_for(self.identity)]
            self.session.automatic.update(keys)
            self.session.subscribe(keys)
            position = int(self.session.resume_point())
            self.record.rooms.update((room, position) for _tenant, room in keys)
        answer = {"sid": self.record.sid}
        if self.server.recovery.enabled:
            answer["pid"] = self.record.pid
        self.connection.send(PacketType.CONNECT, self.namespace.name, answer)
        if self.namespace.greeting is not None:
            self.emit(self.namespace.greeting.event,
                      templates.render(self.namespace.greeting.data, {**token_context(self.identity), "now": now()}))
        if self._replay is not None:
            try:
                await self.session.finish_replay(self._replay, keep_live_on_error=True)
            except FrameError as error:
                self.notify(frames.error_frame(error.code, error.message))
        await self.server.recovery.save(self.identity, self.record)

    async def _recover(self, record: SessionRecord, offset: object) -> bool:
        """Rejoin ``record``'s rooms holding their live events, and start the replay of what came after ``offset``.

        False (and the rooms go live as they are) when an offset is not an id
        or a room's events after it are gone: the client gets a new session.
        """
        identity = self.identity
        if offset is not None and not (isinstance(offset, str) and offset.isdigit()):
            return False
        after = int(offset) if offset is not None else 0  # none: the client received no event at all
        since = {(identity.tenant, room): max(after, joined) for room, joined in record.rooms.items()}
        self.session.automatic.update((identity.tenant, room) for room in self.namespace.rooms_for(identity))
        replay, refused = await self.session.begin_replay(list(since), since, record.epoch or None)
        if refused:
            for key in since:
                self.session.release(key)
            self.record.rooms.update((room, int(self.session.resume_point())) for room in record.rooms)
            return False
        record.holder = self.record.holder  # this socket writes the record from now on (in this epoch)
        self.record, self._replay = record, replay
        return True

    # Transport -------------------------------------------------------------------------

    def queue(self, message: PreparedMessage) -> None:
        if self.ended:
            return
        engine = self.connection.session
        if engine.transport is Transport.WEBSOCKET:
            frame = message.rendered(self.frames)
            if frame:
                engine.send_frame(frame)
        else:
            packet = message.rendered(self.packets)
            if packet:
                engine.send(packet)

    def write_outbox(self) -> None:
        self.connection.session.flush()

    async def drained(self) -> bool:
        return await self.connection.session.drained()

    def close(self, code: int, reason: str) -> None:
        """The session closes this socket (shutdown, per-user limit, expired token, frame flood).

        Shutdown closes the transport, so the client reconnects elsewhere and
        recovers; any other reason disconnects the namespace (the client does
        not reconnect by itself, as after a server-side ``disconnect()``).
        """
        if code == frames.CLOSE_GOING_AWAY:
            self.connection.session.close(CloseReason.SERVER_SHUTDOWN)
            return
        self.connection.send(PacketType.DISCONNECT, self.namespace.name)
        self.end(forget=True)

    def notify(self, frame: dict[str, Any]) -> None:
        """A server-initiated native frame (an expiring token, a failed replay) as an ``error`` event."""
        if frame.get("type") == "error":
            self.emit("error", {"message": frame.get("error"), "code": frame.get("code")})

    def emit(self, event: str, data: Any) -> None:
        self.connection.send(PacketType.EVENT, self.namespace.name, [event, data])

    # Client events ---------------------------------------------------------------------

    def receive_event(self, packet: Packet) -> None:
        """Queue a client event: a socket's events are performed one after the other, in order."""
        self._inbox.append(packet)
        if len(self._inbox) == 1:
            self.session.background(self._perform_inbox())

    async def _perform_inbox(self) -> None:
        while self._inbox and not self.ended:
            await self.handle_event(self._inbox[0])
            self._inbox.popleft()
        self._inbox.clear()

    async def handle_event(self, packet: Packet) -> None:
        name, args = packet.data[0], packet.data[1:]
        rule = self.namespace.events.get(name)
        payload = args[0] if args and isinstance(args[0], dict) else {}
        # The token's fields win over the payload's: a client cannot name another user or tenant.
        context: dict[str, Any] = {**payload, **token_context(self.identity), "now": now()}
        try:
            self.session.check_frame_rate()
            if rule is None:
                raise FrameError(frames.UNKNOWN_TYPE, f"no mapping for the event {name[:50]!r}")
            channel = rule.channel.render(context) if rule.channel is not None else None
            context.update(await self.perform(rule, channel, payload, context))
        except templates.TemplateError as exc:
            self.refuse(packet, FrameError(frames.INVALID_FRAME, str(exc)), rule, context)
        except FrameError as exc:
            metrics.FRAME_ERRORS.labels(exc.code).inc()
            self.refuse(packet, exc, rule, context)
        except Exception:
            metrics.FRAME_ERRORS.labels(frames.INTERNAL_ERROR).inc()
            self.session.log.exception("socket.io event %s failed", name[:50])
            self.refuse(packet, FrameError(frames.INTERNAL_ERROR, "internal error; the event was not applied"), rule, context)
        else:
            assert rule is not None
            if rule.reply is not None:
                self.emit(rule.reply.event, templates.render(rule.reply.data, context))
            if packet.id is not None:
                answer = rule.ack if rule.ack is not None else (rule.reply.data if rule.reply else {"success": True})
                self.connection.send(PacketType.ACK, self.namespace.name, [templates.render(answer, context)], packet.id)

    def refuse(self, packet: Packet, error: FrameError, rule: EventRule | None, context: dict[str, Any]) -> None:
        """Answer a refused event: the rule's error event and ack shapes, else ``error {message, code}``."""
        context = {**context, "error": error.message, "code": error.code}
        if rule is not None and rule.error is not None:
            self.emit(rule.error.event, templates.render(rule.error.data, context))
        elif packet.id is None or rule is None or rule.ack_error is None:
            self.emit("error", {"message": error.message, "code": error.code})
        if packet.id is not None:
            shape = rule.ack_error if rule is not None and rule.ack_error is not None else \
                {"success": False, "error": "{error}", "code": "{code}"}
            self.connection.send(PacketType.ACK, self.namespace.name, [templates.render(shape, context)], packet.id)

    async def perform(self, rule: EventRule, channel: str | None, payload: dict[str, Any],
                      context: dict[str, Any]) -> dict[str, Any]:
        """Do the mapped operation on the session; what it returns extends the reply's context."""
        session, operation = self.session, rule.operation
        if operation is Operation.JOIN:
            before = set(session.channels)
            joined = await session.join(channel)
            if (self.identity.tenant, joined.channel) not in before:
                self.record.rooms[joined.channel] = int(joined.last_id or session.resume_point())
                await self.server.recovery.save(self.identity, self.record)
        elif operation is Operation.LEAVE:
            left = await session.leave(channel)
            self.record.rooms.pop(left, None)
            await self.server.recovery.save(self.identity, self.record)
        elif operation is Operation.TYPING:
            await session.typing(channel, rule.typing)
        elif operation is Operation.PRESENCE:
            await session.presence(payload.get("status"))
        elif operation is Operation.PUBLISH:
            data = templates.render(rule.data, context) if rule.data is not None else payload
            stored = await session.publish(channel, rule.publish_event or rule.event, data)
            return {"id": stored.id, "channel": channel}
        return {"channel": channel} if channel is not None else {}

    # Lifetime --------------------------------------------------------------------------

    def end(self, *, forget: bool) -> None:
        """Close the session; keep the recovery record for the window unless the client left on purpose."""
        if self.ended:
            return
        self.ended = True
        if self.connection.sockets.get(self.namespace.name) is self:
            del self.connection.sockets[self.namespace.name]
        identity = self.session.identity
        self.session.closed()
        if identity is not None:
            recovery = self.server.recovery
            self.session.background(recovery.forget(identity, self.record) if forget
                                    else recovery.release(identity, self.record))


def now() -> str:
    return frames.iso_timestamp(time.time())
