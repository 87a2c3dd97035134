"""Close 1007 for a text message that is not UTF-8, as RFC 6455 §8.1 requires: the second use of Tornado's private state.

Tornado (6.4-6.6) decodes a text message in ``WebSocketProtocol13._handle_message``
and, when it is not UTF-8, aborts the TCP connection without a close frame:
clients report 1006 and never learn why. There is no public hook. This module
gives one connection's protocol object a subclass whose ``_abort``, while a text
message is being handled, sends close 1007 instead (the client then closes, as
for any close). Everything else is Tornado's own code, unchanged.

It rests on two private method names. :func:`install` leaves the protocol as it
is when either is missing (a future Tornado: clients then see Tornado's
behaviour again), and ``tests/test_strict_utf8.py`` fails loudly so this gets
fixed.
"""

from __future__ import annotations

from typing import Any

from tornado.websocket import WebSocketProtocol13

#: The private methods the override wraps.
PRIVATE_METHODS = ("_handle_message", "_abort")
CLOSE_INVALID_PAYLOAD = 1007


class StrictTextProtocol(WebSocketProtocol13):
    """Tornado's RFC 6455 protocol, except that a text message that is not UTF-8 closes with 1007."""

    _in_text_message = False

    def _handle_message(self, opcode: int, data: bytes) -> Any:
        self._in_text_message = opcode == 0x1
        try:
            return super()._handle_message(opcode, data)
        finally:
            self._in_text_message = False

    def _abort(self) -> None:
        # While a text message is handled Tornado aborts only when it is not UTF-8 (a message too large once
        # inflated has already been closed with 1009, so server_terminated is set and the abort goes ahead).
        if self._in_text_message and not self.server_terminated:
            self._in_text_message = False
            self.close(CLOSE_INVALID_PAYLOAD, "text message is not valid UTF-8")
            return
        super()._abort()


def supported() -> bool:
    """True when Tornado still has the private methods the override wraps."""
    return all(callable(getattr(WebSocketProtocol13, name, None)) for name in PRIVATE_METHODS)


def install(protocol: Any) -> Any:
    """``protocol`` (as ``get_websocket_protocol`` made it) closing with 1007 on invalid UTF-8, where it can."""
    if type(protocol) is WebSocketProtocol13 and supported():
        protocol.__class__ = StrictTextProtocol
    return protocol
