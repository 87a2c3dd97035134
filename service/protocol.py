"""The native JSON protocol: client frames to :class:`service.session.Session` operations, and the replies.

Every client frame is a JSON object with a ``type``; :data:`FRAMES` maps each
type to a function ``(session, frame, ref)`` that calls the session and sends
the native reply. A refused frame gets one ``error`` frame (with the frame's
``ref``) and nothing else: the connection and its subscriptions carry on.
:func:`dispatch` is what a transport calls for every text message it receives.

Another dialect (Socket.IO events, a seed's frame names) is another table of
the same shape plus its own rendering of replies and notices; the session and
its rules stay the same.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from . import frames, metrics
from .frames import FrameError
from .refusals import position_field
from .session import Joined, Session

log = logging.getLogger("eddy.protocol")

Ref = str | int | None
FrameHandler = Callable[[Session, dict[str, Any], Ref], Awaitable[None]]


def decode(message: str | bytes, max_bytes: int) -> dict[str, Any]:
    """A client text message as a frame; raises :class:`FrameError` with a documented code.

    The size limit counts UTF-8 bytes, as the WebSocket frame carried them.
    """
    if isinstance(message, bytes):
        raise FrameError(frames.UNSUPPORTED_BINARY, "binary frames are not supported; send JSON text frames")
    # A character is 1-4 bytes: count the bytes only when the characters alone do not decide.
    if len(message) > max_bytes or (4 * len(message) > max_bytes and len(message.encode()) > max_bytes):
        raise FrameError(frames.FRAME_TOO_LARGE, f"frames are limited to {max_bytes} bytes")
    try:
        frame = orjson.loads(message)
    except orjson.JSONDecodeError:
        raise FrameError(frames.INVALID_JSON, "the frame is not valid JSON") from None
    if not isinstance(frame, dict):
        raise FrameError(frames.INVALID_FRAME, "a frame is a JSON object")
    return frame


def epoch_field(frame: dict[str, Any]) -> str | None:
    """The optional ``epoch`` a client got with its ids (``connected.epoch``): ids of another epoch are refused."""
    epoch = frame.get("epoch")
    if epoch is not None and (not isinstance(epoch, str) or len(epoch) > 200):
        raise FrameError(frames.INVALID_FRAME, "epoch must be the string the server sent in connected")
    return epoch


def parse_ref(frame: dict[str, Any]) -> Ref:
    ref = frame.get("ref")
    if ref is not None and (isinstance(ref, bool) or not isinstance(ref, (str, int))):
        raise FrameError(frames.INVALID_FRAME, "ref must be a string or an integer")
    return ref


@dataclass(frozen=True)
class FrameTable:
    """A dialect's client frames: the function for each ``type``, and those allowed before authentication."""

    handlers: Mapping[str, FrameHandler]
    before_authentication: frozenset[str] = frozenset({"authenticate", "ping"})


def handler_for(session: Session, frame: dict[str, Any], table: FrameTable | None = None) -> FrameHandler:
    """The table entry for ``frame``'s type; ``UNKNOWN_TYPE``, or ``UNAUTHENTICATED`` before authentication."""
    table = table or NATIVE
    kind = frame.get("type")
    if not isinstance(kind, str):
        raise FrameError(frames.INVALID_FRAME, "a frame needs a string type")
    handler = table.handlers.get(kind)
    if handler is None:
        raise FrameError(frames.UNKNOWN_TYPE, f"unknown frame type {kind[:50]!r}")
    if session.identity is None and kind not in table.before_authentication:
        raise FrameError(frames.UNAUTHENTICATED, "send an authenticate frame first")
    return handler


async def dispatch(session: Session, message: str | bytes, table: FrameTable | None = None) -> None:
    """Handle one client message: rate limit, decode, run its table entry; refusals become ``error`` frames."""
    ref: Ref = None
    try:
        session.check_frame_rate()
        frame = decode(message, session.eddy.settings.max_frame_bytes)
        ref = parse_ref(frame)
        await handler_for(session, frame, table)(session, frame, ref)
    except FrameError as exc:
        metrics.FRAME_ERRORS.labels(exc.code).inc()
        send(session, frames.error_frame(exc.code, exc.message, ref))
    except Exception:
        metrics.FRAME_ERRORS.labels(frames.INTERNAL_ERROR).inc()
        session.log.exception("frame handler failed")
        send(session, frames.error_frame(frames.INTERNAL_ERROR, "internal error; the frame was not applied", ref))


def send(session: Session, frame: dict[str, Any]) -> None:
    """Queue a native frame on the session's connection."""
    session.transport.queue(frames.PreparedMessage(frames.encode(frame)))


def ack(session: Session, ref: Ref, **fields: Any) -> None:
    send(session, {"type": "ack", "ref": ref, **fields})


# The table ---------------------------------------------------------------------------------

async def authenticate(session: Session, frame: dict[str, Any], ref: Ref) -> None:
    """First authentication of a deferred socket (answered by ``connected``), or a token refresh (``ack``)."""
    since = position_field(frame, "since") if session.identity is None else None
    extra = {"ref": ref} if ref is not None else {}
    result = await session.authenticate(frame.get("token"), since=since, epoch=epoch_field(frame), **extra)
    if not result.started:
        expires = frames.iso_timestamp(result.expires_at) if result.expires_at is not None else None
        ack(session, ref, expires_at=expires)


async def join(session: Session, frame: dict[str, Any], ref: Ref) -> None:
    def ready(joined: Joined) -> None:
        if joined.last_id is None:
            ack(session, ref, channel=joined.channel)
        else:
            ack(session, ref, channel=joined.channel, last_id=joined.last_id)

    await session.join(frame.get("channel"), position_field(frame, "since"), ready, epoch_field(frame))


async def leave(session: Session, frame: dict[str, Any], ref: Ref) -> None:
    ack(session, ref, channel=await session.leave(frame.get("channel")))


async def ping(session: Session, frame: dict[str, Any], ref: Ref) -> None:
    pong: dict[str, Any] = {"type": "pong", "timestamp": session.ping(frame.get("timestamp"))}
    if ref is not None:
        pong["ref"] = ref
    send(session, pong)


async def publish(session: Session, frame: dict[str, Any], ref: Ref) -> None:
    await session.publish(
        frame.get("channel"), frame.get("event"), frame.get("data"), frame.get("idempotency_key"),
        ack=lambda stored: ack(session, ref, channel=stored.channel, id=stored.id,
                               timestamp=frames.iso_timestamp(stored.timestamp)),
    )


async def typing(session: Session, frame: dict[str, Any], ref: Ref) -> None:
    channel = await session.typing(frame.get("channel"), frame.get("is_typing", True))
    if ref is not None:
        ack(session, ref, channel=channel)


async def read(session: Session, frame: dict[str, Any], ref: Ref) -> None:
    channel = await session.read(frame.get("channel"), frame.get("message_id"))
    if ref is not None:
        ack(session, ref, channel=channel)


async def presence(session: Session, frame: dict[str, Any], ref: Ref) -> None:
    status = await session.presence(frame.get("status"))
    if ref is not None:
        ack(session, ref, status=status)


async def presence_query(session: Session, frame: dict[str, Any], ref: Ref) -> None:
    channel, users = await session.presence_query(frame.get("channel"))
    send(session, {"type": "presence_data", "ref": ref, "channel": channel, "users": users})


async def sync(session: Session, frame: dict[str, Any], ref: Ref) -> None:
    synced = await session.sync(frame.get("channel"), position_field(frame, "last_id"), epoch_field(frame))
    send(session, {"type": "sync_data", "ref": ref, "channel": synced.channel, "events": synced.events,
                   "count": len(synced.events), "has_more": synced.has_more})


#: Client frame types and the function that handles each.
FRAMES: dict[str, FrameHandler] = {
    "join": join,
    "leave": leave,
    "ping": ping,
    "authenticate": authenticate,
    "publish": publish,
    "typing": typing,
    "read": read,
    "presence": presence,
    "presence_query": presence_query,
    "sync": sync,
}
#: Frames a connection may send before it has authenticated.
BEFORE_AUTHENTICATION = frozenset({"authenticate", "ping"})
#: The native protocol's table.
NATIVE = FrameTable(FRAMES, BEFORE_AUTHENTICATION)
