"""permessage-deflate (RFC 7692): negotiated per socket, compressed once per event for all of them.

Tornado compresses with one compressor per connection, so an event sent to
5,000 sockets would be compressed 5,000 times. Eddy accepts the extension only
with ``server_no_context_takeover``: every message is then compressed on its
own, the compressed bytes are the same for every socket that negotiated it,
and :class:`DeflatedFrames` builds that frame once per event (cached on the
:class:`service.frames.PreparedMessage`). Messages under a threshold go
uncompressed (a message may always be sent without RSV1). Inbound messages
are decompressed by Tornado, bounded by the handler's ``max_message_size``,
before Eddy's UTF-8 and size checks.
"""

from __future__ import annotations

import zlib

from .frames import PreparedMessage, websocket_text_frame

EXTENSION = "permessage-deflate"
#: The parameters a client may offer (RFC 7692 §7.1); an offer with any other is declined.
_KNOWN = {"server_no_context_takeover", "client_no_context_takeover", "server_max_window_bits",
          "client_max_window_bits"}


def negotiate(header: str) -> tuple[str, str] | None:
    """The permessage-deflate offer Eddy accepts from a client's ``Sec-WebSocket-Extensions``, and its answer.

    The first offer Eddy can honour (only known parameters, and no
    ``server_max_window_bits`` under 15: Eddy compresses with the full
    window); None when there is none (compression is then declined). The
    answer always says ``server_no_context_takeover``, agrees to the client's
    ``client_no_context_takeover``, and to a ``client_max_window_bits`` with a
    value (one without a value may not be echoed).
    """
    for offer in header.split(","):
        name, *raw = [part.strip() for part in offer.split(";")]
        if name.lower() != EXTENSION:
            continue
        params: dict[str, str | None] = {}
        for item in raw:
            key, _, value = item.partition("=")
            params[key.strip().lower()] = value.strip().strip('"') or None
        if not set(params) <= _KNOWN:
            continue
        window = params.get("server_max_window_bits")
        if window is not None and window != "15":
            continue
        client_window = params.get("client_max_window_bits")
        if client_window is not None and not (client_window.isdigit() and 8 <= int(client_window) <= 15):
            continue
        answer = [EXTENSION, "server_no_context_takeover"]
        if "client_no_context_takeover" in params:
            answer.append("client_no_context_takeover")
        if client_window is not None:
            answer.append(f"client_max_window_bits={client_window}")
        return offer.strip(), "; ".join(answer)
    return None


class DeflatedFrames:
    """Renders a message as a compressed WebSocket frame (RSV1), or plain below ``threshold`` bytes."""

    def __init__(self, threshold: int, level: int = zlib.Z_DEFAULT_COMPRESSION) -> None:
        self.threshold = threshold
        self.level = level

    def render(self, message: PreparedMessage) -> bytes:
        payload = message.payload
        if len(payload) < self.threshold:
            return message.websocket_frame
        # A fresh raw-deflate stream per message: no context carried between messages (RFC 7692 §7.2.1).
        compressor = zlib.compressobj(self.level, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
        data = data[:-4]  # the 00 00 ff ff every sync flush ends with is left off on the wire
        if len(data) >= len(payload):
            return message.websocket_frame
        return websocket_text_frame(data, compressed=True)
