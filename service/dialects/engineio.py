"""The Engine.IO v4 packet codec (https://github.com/socketio/engine.io-protocol, v4).

A packet is one ASCII digit (its type) followed by its data. Over WebSocket
each packet is one text frame; over HTTP long-polling several packets travel
in one body, separated by the record separator ``\\x1e``. Binary packets
(``b`` + base64 over polling, binary frames over WebSocket) are refused:
Eddy's events are JSON.
"""

from __future__ import annotations

import enum

import orjson

SEPARATOR = "\x1e"
PROTOCOL_VERSION = "4"


class PacketType(enum.IntEnum):
    OPEN = 0
    CLOSE = 1
    PING = 2
    PONG = 3
    MESSAGE = 4
    UPGRADE = 5
    NOOP = 6


class EngineError(Exception):
    """A request or packet that breaks the protocol. ``code`` is Engine.IO's error code for HTTP answers."""

    UNKNOWN_TRANSPORT = 0
    UNKNOWN_SID = 1
    BAD_HANDSHAKE_METHOD = 2
    BAD_REQUEST = 3
    FORBIDDEN = 4
    UNSUPPORTED_PROTOCOL_VERSION = 5

    MESSAGES = {
        0: "Transport unknown",
        1: "Session ID unknown",
        2: "Bad handshake method",
        3: "Bad request",
        4: "Forbidden",
        5: "Unsupported protocol version",
    }

    def __init__(self, code: int, detail: str | None = None) -> None:
        super().__init__(detail or self.MESSAGES[code])
        self.code = code
        self.detail = detail or self.MESSAGES[code]

    def body(self) -> bytes:
        """The JSON body Engine.IO servers answer a refused request with."""
        return orjson.dumps({"code": self.code, "message": self.MESSAGES[self.code]})


def encode(kind: PacketType, data: str | bytes = b"") -> bytes:
    """One packet as text bytes (a WebSocket text frame's payload, or one record of a polling body)."""
    if isinstance(data, str):
        data = data.encode()
    return b"%d" % kind + data


def open_packet(sid: str, upgrades: list[str], ping_interval: float, ping_timeout: float, max_payload: int) -> bytes:
    handshake = {"sid": sid, "upgrades": upgrades, "pingInterval": int(ping_interval * 1000),
                 "pingTimeout": int(ping_timeout * 1000), "maxPayload": max_payload}
    return encode(PacketType.OPEN, orjson.dumps(handshake))


def decode(packet: str) -> tuple[PacketType, str]:
    """(type, data) of one text packet; :class:`EngineError` for binary or malformed packets."""
    if not packet:
        raise EngineError(EngineError.BAD_REQUEST, "empty packet")
    if packet[0] == "b":
        raise EngineError(EngineError.BAD_REQUEST, "binary packets are not supported; Eddy speaks JSON")
    try:
        kind = PacketType(int(packet[0]))
    except ValueError:
        raise EngineError(EngineError.BAD_REQUEST, f"unknown packet type {packet[0]!r}") from None
    return kind, packet[1:]


def decode_payload(body: bytes) -> list[tuple[PacketType, str]]:
    """The packets of a polling POST body."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise EngineError(EngineError.BAD_REQUEST, "a polling body must be UTF-8") from None
    return [decode(packet) for packet in text.split(SEPARATOR)]


def encode_payload(packets: list[bytes]) -> bytes:
    """Packets joined for one polling GET answer."""
    return SEPARATOR.encode().join(packets)
