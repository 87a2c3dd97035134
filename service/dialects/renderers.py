"""Eddy's events in the dialects' wire formats: one renderer object per dialect (or Socket.IO namespace).

A renderer is handed to ``PreparedMessage.rendered``, which caches its bytes on
the message: an event is rendered once per dialect, however many connections
use it, exactly as the native WebSocket frame is built once for all.

* :class:`PacketRenderer` / :class:`FrameRenderer`: a Socket.IO namespace's EVENT
  packets (for polling) and the same packets as WebSocket frames;
* :class:`ChatRenderer`: seed 001's chat frames;
* :class:`FlatRenderer`: seed 003's flat order frames.
"""

from __future__ import annotations

import logging
from typing import Any

from service import frames
from service.frames import PreparedMessage
from storage import Event

from . import engineio, socketio, templates
from .mapping import Namespace
from .socketio import PacketType
from .templates import Template

log = logging.getLogger("eddy.socketio")


def engine_message(packet: bytes) -> bytes:
    """A Socket.IO packet inside an Engine.IO MESSAGE packet."""
    return engineio.encode(engineio.PacketType.MESSAGE, packet)


class PacketRenderer:
    """Eddy's events as one namespace's Engine.IO MESSAGE packets; one instance per namespace (cached per event).

    A stored event becomes ``emit(<event name>, <data>, <offset>)``; typing,
    read and presence signals follow the namespace's ``signals`` tables. The
    offset (the event id, last argument) is what socket.io-client keeps for
    recovery; it is left out when recovery is off. Messages that are not
    events (the native keepalive and notices) render empty: not sent.
    """

    def __init__(self, namespace: Namespace, with_offsets: bool) -> None:
        self.namespace = namespace
        self.with_offsets = with_offsets

    def render(self, message: PreparedMessage) -> bytes:
        event = message.event
        emitted = self.emitted(event) if event is not None else None
        if event is None or emitted is None:
            return b""
        name, data = emitted
        arguments = [name, data, event.id] if self.with_offsets else [name, data]
        return engine_message(socketio.encode(PacketType.EVENT, self.namespace.name, arguments))

    def emitted(self, event: Event) -> tuple[str, Any] | None:
        if not event.event.startswith(frames.PROTOCOL_EVENT_PREFIX):
            if self.namespace.event_data is None:
                return event.event, event.data
            context = {"event": event.event, "id": event.id, "channel": event.channel, "data": event.data,
                       "timestamp": frames.iso_timestamp(event.timestamp)}
            return event.event, templates.render(self.namespace.event_data, context)
        signal = event.event[1:]
        data = dict(event.data) if isinstance(event.data, dict) else {}
        found = self.namespace.signal_for(signal, event.channel, data)
        if found is None:
            return (signal, {"channel": event.channel, **data}) if not self.namespace.signals else None
        rule, fields = found
        try:
            return rule.emit.event, templates.render(rule.emit.data, {**data, **fields, "channel": event.channel})
        except templates.TemplateError:
            log.warning("signal %s on %s does not fit the template of %s", signal, event.channel, rule.emit.event)
            return None


class FrameRenderer:
    """The same packets as WebSocket frames, for the sockets on the WebSocket transport."""

    def __init__(self, packets: PacketRenderer) -> None:
        self.packets = packets

    def render(self, message: PreparedMessage) -> bytes:
        packet = message.rendered(self.packets)
        return frames.websocket_text_frame(packet) if packet else b""


class ChatRenderer:
    """Eddy's events as seed 001's frames (one instance for all chat sockets, so each event renders once)."""

    def __init__(self, channel: Template) -> None:
        self.channel = channel
        self.field = channel.fields[0]

    def render(self, message: PreparedMessage) -> bytes:
        frame = self.frame(message.event) if message.event is not None else None
        # Anything else (connected, errors, pong…) is already the seed's shape, or a superset of it.
        return message.websocket_frame if frame is None else frames.websocket_text_frame(frames.encode(frame))

    def frame(self, event: Event) -> dict[str, Any] | None:
        fields = self.channel.match(event.channel)
        if fields is None:
            return None
        data = event.data if isinstance(event.data, dict) else {}
        conversation = fields[self.field]
        if event.event == "message":
            return {"type": "message", "message": self.message(event.id, conversation, event.data,
                                                               frames.iso_timestamp(event.timestamp))}
        if event.event in (frames.TYPING_EVENT, frames.READ_EVENT, frames.PRESENCE_EVENT):
            return {"type": event.event[1:], self.field: conversation, **data}
        return None

    def message(self, event_id: str, conversation: str, data: Any, created_at: str) -> dict[str, Any]:
        """Seed 001's message object; its id is the event id (what ``sync``'s ``last_message_id`` takes)."""
        data = data if isinstance(data, dict) else {"content": data}
        return {"id": event_id, self.field: conversation, "user_id": data.get("user_id"),
                "content": data.get("content"), "role": data.get("role"), "created_at": created_at}


class FlatRenderer:
    """Seed 003's broadcast: the event name as ``type``, the data's fields beside it, and ``timestamp``."""

    def render(self, message: PreparedMessage) -> bytes:
        event = message.event
        if event is None or event.event.startswith(frames.PROTOCOL_EVENT_PREFIX):
            return message.websocket_frame
        data = event.data if isinstance(event.data, dict) else {"data": event.data}
        fields = {name: value for name, value in data.items() if name not in ("type", "timestamp")}
        frame = {"type": event.event, **fields, "timestamp": frames.iso_timestamp(event.timestamp)}
        return frames.websocket_text_frame(frames.encode(frame))


FLAT = FlatRenderer()
