"""Close 1007 on a text message that is not UTF-8 rests on two private Tornado methods: this fails loudly if they move."""

from __future__ import annotations

import asyncio
import socket
import zlib
from base64 import b64encode

import pytest
import websocket  # websocket-client: it sends any bytes in a text frame and reports the close code it got
from tornado.websocket import WebSocketProtocol13

from handlers import strict_utf8
from tests.support import make_token
from tests.test_limits import raw_text_frame


def test_tornado_still_has_what_the_1007_close_needs():
    assert strict_utf8.supported(), (
        "Tornado's WebSocketProtocol13 no longer has _handle_message/_abort: invalid UTF-8 is back to a reset "
        "without a close frame; update handlers/strict_utf8.py for this Tornado release")


def test_without_the_private_methods_the_protocol_is_left_as_tornado_made_it(monkeypatch):
    monkeypatch.setattr(strict_utf8, "PRIVATE_METHODS", ("_handle_message", "_renamed_by_a_future_tornado"))
    protocol = object.__new__(WebSocketProtocol13)
    assert type(strict_utf8.install(protocol)) is WebSocketProtocol13


def close_code_after(port: int, payload: bytes, **options) -> tuple[int | None, list[str]]:
    """Send ``payload`` in a text frame with websocket-client; the close code the server answers with."""
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/ws", header=[f"Authorization: Bearer {make_token()}"],
                                     timeout=5, **options)
    received = [ws.recv()]  # connected
    ws.send(payload, opcode=websocket.ABNF.OPCODE_TEXT)
    while True:
        opcode, data = ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            code = int.from_bytes(data[:2], "big") if len(data) >= 2 else None
            ws.close()
            return code, received
        received.append(data.decode(errors="replace"))


@pytest.mark.gen_test
async def test_invalid_utf8_closes_with_1007(http_server, http_port):
    loop = asyncio.get_running_loop()
    code, received = await loop.run_in_executor(None, lambda: close_code_after(http_port, b'{"type":"ping","x":"\xff\xfe"}'))
    assert code == 1007
    assert len(received) == 1 and '"connected"' in received[0]  # nothing but the close after the bad frame


def compressed_exchange(port: int, payload: bytes) -> list[tuple[int, bytes]]:
    """Negotiate permessage-deflate on a raw socket, wait for ``connected``, send ``payload`` compressed in a text frame.

    Returns the server's frames as (first byte, payload), up to and including its close frame.
    """
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(5)
    sock.sendall((f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {b64encode(b'0123456789abcdef').decode()}\r\nSec-WebSocket-Version: 13\r\n"
                  f"Sec-WebSocket-Extensions: permessage-deflate; client_no_context_takeover\r\n"
                  f"Authorization: Bearer {make_token()}\r\n\r\n").encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, data = data.split(b"\r\n\r\n", 1)
    assert b"permessage-deflate" in head
    frames: list[tuple[int, bytes]] = []

    def read_frame() -> bool:
        nonlocal data
        while len(data) < 2 or len(data) < header_size(data) + frame_length(data):
            chunk = sock.recv(4096)
            if not chunk:
                return False
            data += chunk
        start, size = header_size(data), frame_length(data)
        frames.append((data[0], data[start:start + size]))
        data = data[start + size:]
        return True

    read_frame()  # connected
    compressor = zlib.compressobj(wbits=-15)
    body = (compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]
    frame = raw_text_frame(body)
    sock.sendall(bytes([0xC1]) + frame[1:])  # FIN, RSV1 (compressed), text
    while frames[-1][0] & 0x0F != 0x8 and read_frame():
        pass
    sock.close()
    return frames


def header_size(data: bytes) -> int:
    return {126: 4, 127: 10}.get(data[1] & 0x7F, 2)


def frame_length(data: bytes) -> int:
    size = data[1] & 0x7F
    if size < 126:
        return size
    start = header_size(data)
    return int.from_bytes(data[2:start], "big") if len(data) >= start else 1 << 62


@pytest.mark.gen_test
async def test_invalid_utf8_in_a_compressed_message_closes_with_1007(http_server, http_port):
    loop = asyncio.get_running_loop()
    frames = await loop.run_in_executor(None, lambda: compressed_exchange(http_port, b'{"type":"ping","x":"\xff"}'))
    # The connected frame, then only the close, with 1007 (no pong, no error frame, no reset).
    assert [first & 0x0F for first, _ in frames] == [0x1, 0x8], frames
    assert int.from_bytes(frames[-1][1][:2], "big") == 1007
