"""Wire formats shared by every transport: JSON frames, error codes, WebSocket framing.

The hub encodes an event once into a :class:`PreparedMessage`; each transport
takes the representation it needs from it (the JSON payload, or the complete
WebSocket frame), computed once and shared by every recipient.
"""

from __future__ import annotations

import re
import struct
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, Protocol, TypeGuard

import orjson

from storage import Event

# Error codes sent in {"type":"error"} frames (documented in docs/PROTOCOL.md).
INVALID_JSON = "INVALID_JSON"
INVALID_FRAME = "INVALID_FRAME"
INVALID_UTF8 = "INVALID_UTF8"
FRAME_TOO_LARGE = "FRAME_TOO_LARGE"
UNSUPPORTED_BINARY = "UNSUPPORTED_BINARY"
UNKNOWN_TYPE = "UNKNOWN_TYPE"
INVALID_CHANNEL = "INVALID_CHANNEL"
FORBIDDEN = "FORBIDDEN"
NOT_SUBSCRIBED = "NOT_SUBSCRIBED"
TOO_MANY_CHANNELS = "TOO_MANY_CHANNELS"
HISTORY_LOST = "HISTORY_LOST"
RATE_LIMITED = "RATE_LIMITED"
STORAGE_UNAVAILABLE = "STORAGE_UNAVAILABLE"
AUTHORIZER_UNAVAILABLE = "AUTHORIZER_UNAVAILABLE"
UNAUTHENTICATED = "UNAUTHENTICATED"
TOKEN_EXPIRED = "TOKEN_EXPIRED"
TOKEN_INVALID = "TOKEN_INVALID"
INTERNAL_ERROR = "INTERNAL_ERROR"

# WebSocket close codes.
CLOSE_GOING_AWAY = 1001
CLOSE_AUTH_TIMEOUT = 4001
CLOSE_TOKEN_EXPIRED = 4003
CLOSE_SLOW_CONSUMER = 4008
CLOSE_TOO_MANY_CONNECTIONS = 4029

CHANNEL_PATTERN = re.compile(r"[A-Za-z0-9_.:@-]{1,200}")
CHANNEL_RULE_TEXT = "channel names are 1-200 characters of A-Z a-z 0-9 _ - . : @"


class FrameError(Exception):
    """A client request was refused with a documented error ``code`` (the table in docs/PROTOCOL.md).

    Raised by :class:`service.session.Session` operations; each protocol dialect
    renders it in its own shape (the native protocol: an ``error`` frame).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def is_valid_channel(name: object) -> bool:
    return isinstance(name, str) and CHANNEL_PATTERN.fullmatch(name) is not None


def iso_timestamp(seconds: float) -> str:
    """``2024-05-30T14:27:11.125Z``: UTC, millisecond precision, as in seed 000."""
    moment = datetime.fromtimestamp(seconds, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def iso_timestamp_or_none(seconds: float) -> str | None:
    """:func:`iso_timestamp`, or None for a time no calendar date holds (one stored before it was validated)."""
    try:
        return iso_timestamp(seconds)
    except (ValueError, OverflowError, OSError):
        return None


def event_body(event: Event) -> dict[str, Any]:
    """The ``event`` frame as a dict; HTTP answers use the same shape."""
    body = {
        "type": "event",
        "id": event.id,
        "channel": event.channel,
        "event": event.event,
        "timestamp": iso_timestamp(event.timestamp),
        "data": event.data,
    }
    if event.meta is not None:
        body["meta"] = event.meta
    return body


#: Event names Eddy itself uses for ephemeral protocol events; clients may not publish names starting with "$".
PROTOCOL_EVENT_PREFIX = "$"
TYPING_EVENT = "$typing"
READ_EVENT = "$read"
PRESENCE_EVENT = "$presence"


def is_valid_event_name(name: object) -> TypeGuard[str]:
    return isinstance(name, str) and 0 < len(name) <= 200 and not name.startswith(PROTOCOL_EVENT_PREFIX)


def frame_body(event: Event) -> dict[str, Any]:
    """The frame a subscriber receives for ``event``.

    Stored events become ``event`` frames; Eddy's own ephemeral events
    (``$typing``, ``$read``, ``$presence``) become frames of that type.
    """
    if event.event.startswith(PROTOCOL_EVENT_PREFIX):
        return {"type": event.event[1:], "channel": event.channel, **event.data}
    return event_body(event)


def encode(frame: dict[str, Any]) -> bytes:
    return orjson.dumps(frame)


def error_frame(code: str, message: str, ref: Any = None) -> dict[str, Any]:
    return {"type": "error", "ref": ref, "code": code, "error": message}


def websocket_text_frame(payload: bytes, *, compressed: bool = False) -> bytes:
    """A complete, unmasked RFC 6455 text frame (what a server sends); ``compressed`` sets RSV1 (RFC 7692)."""
    first = 0xC1 if compressed else 0x81
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", first, length)
    elif length <= 0xFFFF:
        header = struct.pack("!BBH", first, 126, length)
    else:
        header = struct.pack("!BBQ", first, 127, length)
    return header + payload


class Renderer(Protocol):
    """Turns a message into the bytes one kind of connection sends (a transport's framing, a dialect's shape).

    Renderers are shared objects: :meth:`PreparedMessage.rendered` caches each
    one's result on the message, so an event is rendered once per renderer,
    however many connections use it.
    """

    def render(self, message: PreparedMessage) -> bytes:
        """The bytes for ``message``."""


class PreparedMessage:
    """One outgoing message, encoded once for any number of recipients."""

    __slots__ = ("__dict__", "_renderings", "event", "exclude_user", "key", "payload", "position")

    def __init__(
        self,
        payload: bytes,
        *,
        position: int | None = None,
        key: tuple[str, str] | None = None,
        exclude_user: str | None = None,
    ) -> None:
        self.payload = payload
        #: The event's position, so a resuming subscriber can drop what it already has.
        self.position = position
        #: (tenant, channel) of the event, None for connection-wide messages.
        self.key = key
        #: A user who must not receive it (the sender of a typing indicator).
        self.exclude_user = exclude_user
        #: The event it was prepared from, for dialects that render it in their own wire format.
        self.event: Event | None = None
        self._renderings: dict[Renderer, bytes] | None = None

    @classmethod
    def for_event(cls, event: Event) -> PreparedMessage:
        # Nobody needs their own typing indicator or presence change echoed back.
        exclude = event.data.get("user_id") if event.event in (TYPING_EVENT, PRESENCE_EVENT) else None
        message = cls(encode(frame_body(event)), position=event.position, key=(event.tenant, event.channel),
                      exclude_user=exclude)
        message.event = event
        return message

    @cached_property
    def websocket_frame(self) -> bytes:
        """The plain WebSocket text frame (the fan-out's common case, so an attribute rather than a renderer)."""
        return websocket_text_frame(self.payload)

    def rendered(self, renderer: Renderer) -> bytes:
        """``renderer``'s bytes for this message, computed once for every connection that uses that renderer."""
        renderings = self._renderings
        if renderings is None:
            renderings = self._renderings = {}
        data = renderings.get(renderer)
        if data is None:
            data = renderings[renderer] = renderer.render(self)
        return data
