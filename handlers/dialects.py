"""Two seeds' own WebSocket dialects, as thin translations over the native socket (:class:`EventSocket`).

* :class:`ChatSocket` at ``/ws/chat`` (seed 001): ``message``, ``typing``, ``read``, ``presence``, ``sync``,
  ``join``/``leave`` by ``conversation_id``; the server's ``message``, ``message_sent``, ``sync_data``…
* :class:`OrdersSocket` at ``/ws/pedidos`` (seed 003): ``connected`` on open, ``authenticate`` →
  ``authenticated``, and every event of the tenant's ``pedidos`` channel flat (``{"type": <event>, …data,
  "timestamp"}``).

Each is a table of client frames (:class:`service.protocol.FrameTable`) calling the same
:class:`service.session.Session` operations as the native protocol (same rules, tenants, store, rate limits,
resume), and a renderer of events (``PreparedMessage.rendered``: once per event per dialect). Wire formats and
config keys: docs/DIALECTS.md.
"""

from __future__ import annotations

import re
import time
from typing import Any

from tornado.websocket import WebSocketProtocol

from service import frames, protocol
from service.app import Eddy
from service.config import read_dialect_tables
from service.dialects.renderers import FLAT, ChatRenderer
from service.dialects.templates import Template
from service.frames import Event, FrameError, PreparedMessage
from service.protocol import FrameTable, Ref
from service.session import Session, position_field

from . import stream_write
from .websocket import EventSocket

CHAT_PATH = "/ws/chat"
DEFAULT_CHAT_CHANNEL = "conversation:{conversation_id}"
DEFAULT_ORDERS_CHANNEL = "pedidos"
AUTHENTICATED_MESSAGE = "Autenticação realizada com sucesso"
ORDERS_GREETING = "Conectado ao sistema de eventos de pedidos"


def dialect_routes(eddy: Eddy) -> list[tuple[str, type, dict[str, Any]]]:
    tables = read_dialect_tables(eddy.settings.config) if eddy.settings.config else {}
    chat, orders = tables.get("chat", {}), tables.get("orders", {})
    channel = _string(chat, "channel", DEFAULT_CHAT_CHANNEL, "chat")
    if not Template(channel).fields:
        raise ValueError("chat.channel: a template naming the payload's field, e.g. conversation:{conversation_id}")
    stream = _string(orders, "channel", DEFAULT_ORDERS_CHANNEL, "orders")
    if not frames.is_valid_channel(stream):
        raise ValueError(f"orders.channel: {frames.CHANNEL_RULE_TEXT}")
    args = {"eddy": eddy}
    return [(CHAT_PATH, ChatSocket, {**args, "renderer": ChatRenderer(Template(channel))}),
            (f"/ws/({re.escape(stream)})", OrdersSocket, args)]


def _string(table: dict[str, Any], name: str, default: str, where: str) -> str:
    value = table.get(name, default)
    unknown = set(table) - {"channel"}
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}.{name}: a non-empty string")
    return value


# Seed 001 -----------------------------------------------------------------------------


def chat_socket(session: Session) -> ChatSocket:
    socket = session.transport
    assert isinstance(socket, ChatSocket)
    return socket


async def chat_message(session: Session, frame: dict[str, Any], ref: Ref) -> None:
    """``message {conversation_id, content}``: stored on the conversation; ``message_sent`` to the sender."""
    socket = chat_socket(session)
    content = frame.get("content")
    if not isinstance(content, str) or not content:
        raise FrameError(frames.INVALID_FRAME, "content must be a non-empty string")
    identity = session.identity
    assert identity is not None
    field = socket.renderer.field
    data = {field: frame.get(field), "user_id": identity.user_id, "content": content,
            "role": identity.roles[0] if identity.roles else "user"}

    def sent(stored: Event) -> None:
        socket.skip_own(stored)
        protocol.send(session, {"type": "message_sent", "message_id": stored.id,
                                "timestamp": frames.iso_timestamp(stored.timestamp)})

    await session.publish(socket.channel_of(frame), "message", data, ack=sent)


async def chat_join(session: Session, frame: dict[str, Any], ref: Ref) -> None:
    await session.join(chat_socket(session).channel_of(frame))


async def chat_leave(session: Session, frame: dict[str, Any], ref: Ref) -> None:
    await session.leave(chat_socket(session).channel_of(frame))


async def chat_typing(session: Session, frame: dict[str, Any], ref: Ref) -> None:
    await session.typing(chat_socket(session).channel_of(frame), frame.get("is_typing", True))


async def chat_read(session: Session, frame: dict[str, Any], ref: Ref) -> None:
    await session.read(chat_socket(session).channel_of(frame), frame.get("message_id"))


async def chat_sync(session: Session, frame: dict[str, Any], ref: Ref) -> None:
    """``sync {conversation_id, last_message_id}`` → ``sync_data {conversation_id, messages, count}``."""
    socket = chat_socket(session)
    last = frame.get("last_message_id")
    synced = await session.sync(socket.channel_of(frame), position_field({"last": last or None}, "last"))
    conversation = frame[socket.renderer.field]
    messages = [socket.renderer.message(body["id"], conversation, body["data"], body["timestamp"])
                for body in synced.events if body["event"] == "message"]
    answer: dict[str, Any] = {"type": "sync_data", socket.renderer.field: conversation, "messages": messages,
                              "count": len(messages)}
    if ref is not None:
        answer["ref"] = ref
    protocol.send(session, answer)


class ChatSocket(EventSocket):
    """Seed 001's chat client at ``/ws/chat?token=``: its frames both ways, the session's operations underneath."""

    FRAMES = FrameTable({
        "message": chat_message,
        "typing": chat_typing,
        "read": chat_read,
        "presence": protocol.presence,
        "sync": chat_sync,
        "join": chat_join,
        "leave": chat_leave,
        "ping": protocol.ping,
        "authenticate": protocol.authenticate,
    })

    def initialize(self, eddy: Eddy, renderer: ChatRenderer) -> None:  # type: ignore[override]
        super().initialize(eddy)
        self.renderer = renderer
        #: Positions of messages this connection sent: it gets message_sent for them, never the message.
        self._sent: set[int] = set()

    def channel_of(self, frame: dict[str, Any]) -> str:
        conversation = frame.get(self.renderer.field)
        if isinstance(conversation, int) and not isinstance(conversation, bool):
            conversation = str(conversation)
        if not isinstance(conversation, str) or not conversation:
            raise FrameError(frames.INVALID_FRAME, f"{self.renderer.field} is required")
        return self.renderer.channel.render({self.renderer.field: conversation})

    def skip_own(self, stored: Event) -> None:
        """The message ``stored`` was sent by this connection: its copy from the room is not delivered."""
        if (stored.tenant, stored.channel) in self.session.channels:
            self._sent.add(stored.position)

    def queue(self, message: PreparedMessage) -> None:
        if message.position is not None and message.position in self._sent:
            self._sent.discard(message.position)
            return
        super().queue(message)

    def frame_for(self, message: PreparedMessage) -> bytes:
        return message.rendered(self.renderer)

    def make_lane(self, connection: WebSocketProtocol) -> stream_write.Lane | None:
        return None  # queue() drops this connection's own messages: every event goes through it


# Seed 003 -----------------------------------------------------------------------------


async def orders_authenticate(session: Session, frame: dict[str, Any], ref: Ref) -> None:
    """``authenticate {token}`` → ``authenticated`` (first time after a bare connect, or a refresh)."""
    result = await session.authenticate(frame.get("token"))
    if not result.started:  # a refresh; a first authentication answers through OrdersSocket.notify
        protocol.send(session, {"type": "authenticated", "message": AUTHENTICATED_MESSAGE})


class OrdersSocket(EventSocket):
    """Seed 003's order stream at ``/ws/pedidos?token=``: the tenant's ``pedidos`` events, flat."""

    FRAMES = FrameTable({"authenticate": orders_authenticate, "ping": protocol.ping})

    def initialize(self, eddy: Eddy) -> None:
        super().initialize(eddy)
        self.session = Session(eddy, self, notify=self.notify)
        #: True once the seed's greeting went out before any token: the later ``connected`` is ``authenticated``.
        self.greeted_before_authentication = False

    def open(self, *args: str) -> None:
        super().open(*args)
        if self.session.identity is None:  # deferred authentication: the seed greets before the token comes
            protocol.send(self.session, {"type": "connected", "message": ORDERS_GREETING,
                                         "timestamp": frames.iso_timestamp(time.time())})
            self.greeted_before_authentication = True

    def notify(self, frame: dict[str, Any]) -> None:
        """The session's own messages; ``connected`` after a deferred authenticate is the seed's ``authenticated``."""
        if frame.get("type") == "connected" and self.greeted_before_authentication:
            frame = {**frame, "type": "authenticated", "message": AUTHENTICATED_MESSAGE}
        protocol.send(self.session, frame)

    def frame_for(self, message: PreparedMessage) -> bytes:
        return message.rendered(FLAT)

    def make_lane(self, connection: WebSocketProtocol) -> stream_write.Lane | None:
        return stream_write.lane_for(connection, FLAT, self)
