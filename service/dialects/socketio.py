"""The Socket.IO v5 packet codec (https://github.com/socketio/socket.io-protocol, v5).

A packet travels inside one Engine.IO ``MESSAGE`` packet::

    <type>[<namespace>,][<ack id>][<JSON data>]       e.g. 2/atendimento,7["ticket:entrar",{"ticketId":"1"}]

The default namespace ``/`` is left out. Binary packets (types 5 and 6, whose
attachments follow as separate Engine.IO packets) are refused with a clear
error: Eddy's events are JSON.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import orjson

DEFAULT_NAMESPACE = "/"
MAX_ACK_ID = 2**53  # JavaScript's safe integers


class PacketType(enum.IntEnum):
    CONNECT = 0
    DISCONNECT = 1
    EVENT = 2
    ACK = 3
    CONNECT_ERROR = 4
    BINARY_EVENT = 5
    BINARY_ACK = 6


class PacketError(Exception):
    """A Socket.IO packet that cannot be decoded; the message says why."""


_MISSING: Any = object()


@dataclass(frozen=True)
class Packet:
    type: PacketType
    namespace: str = DEFAULT_NAMESPACE
    data: Any = None
    id: int | None = None


def decode(text: str) -> Packet:
    if not text or not text[0].isdigit():
        raise PacketError("a Socket.IO packet starts with its type")
    try:
        kind = PacketType(int(text[0]))
    except ValueError:
        raise PacketError(f"unknown Socket.IO packet type {text[0]}") from None
    if kind in (PacketType.BINARY_EVENT, PacketType.BINARY_ACK):
        raise PacketError("binary attachments are not supported; send JSON data")
    rest = text[1:]
    namespace = DEFAULT_NAMESPACE
    if rest.startswith("/"):
        namespace, comma, rest = rest.partition(",")
        if not comma:
            rest = ""
        namespace = namespace.split("?", 1)[0]  # v4 clients may append a query to the namespace
    digits = 0
    while digits < len(rest) and rest[digits].isdigit():
        digits += 1
    ack_id = int(rest[:digits]) if digits else None
    if ack_id is not None and ack_id > MAX_ACK_ID:
        raise PacketError("ack id out of range")
    rest = rest[digits:]
    data: Any = None
    if rest:
        try:
            data = orjson.loads(rest)
        except orjson.JSONDecodeError:
            raise PacketError("the packet's data is not valid JSON") from None
    if kind == PacketType.EVENT and (not isinstance(data, list) or not data or not isinstance(data[0], str)):
        raise PacketError("an EVENT carries an array that starts with the event name")
    if kind == PacketType.ACK and (ack_id is None or not isinstance(data, list)):
        raise PacketError("an ACK carries an ack id and an array")
    if kind == PacketType.CONNECT and data is not None and not isinstance(data, dict):
        raise PacketError("CONNECT data must be an object")
    return Packet(kind, namespace, data, ack_id)


def encode(kind: PacketType, namespace: str = DEFAULT_NAMESPACE, data: Any = _MISSING, ack_id: int | None = None) -> bytes:
    """One packet as the bytes of an Engine.IO MESSAGE's data (without the ``4`` prefix)."""
    parts = [b"%d" % kind]
    if namespace != DEFAULT_NAMESPACE:
        parts.append(namespace.encode() + b",")
    if ack_id is not None:
        parts.append(b"%d" % ack_id)
    if data is not _MISSING:
        parts.append(orjson.dumps(data))
    return b"".join(parts)
