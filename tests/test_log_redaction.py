"""Tokens never reach a log line: a real `eddy serve` at debug level driven through its error paths with
``?access_token=`` and ``?token=``, and every line it wrote scanned for the tokens."""

from __future__ import annotations

import io
import logging
import os
import socket
import struct
import urllib.error
import urllib.request
from base64 import b64encode

import pytest
import websocket as websocket_client

from service.logs import configure_logging
from tests.processes import EddyProcess
from tests.support import make_token

ERROR_PATHS_HTTP = [
    ("GET", "/api/nope?access_token={t}"),  # 404
    ("POST", "/api/events?access_token={t}"),  # 400, not JSON
    ("GET", "/api/events?token={t}"),  # 405
    ("GET", "/api/channels/x/events?access_token={t}&after=zz"),  # 400 parameter
    ("GET", "/sse?channels=user:someone-else&access_token={t}"),  # 403
    ("GET", "/sse?channels=a&access_token={bad}"),  # 401, a bad token is a secret too
    ("GET", "/sse?channels=a&token={expired}"),  # 401 expired
    ("GET", "/ws?access_token={t}"),  # 400: not an upgrade
    ("GET", "/static/../../etc/passwd?token={t}"),  # 403/404
]


def http(port: int, method: str, path: str) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                     data=b"not json" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            response.read(1)
    except urllib.error.HTTPError:
        pass


def raw_socket_session(port: int, path: str, frames: list[bytes]) -> None:
    """A handshake, then hand-made client frames (invalid UTF-8, a huge frame), reading until the server hangs up."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    key = b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    try:
        for frame in frames:
            sock.sendall(frame)
        while sock.recv(65536):
            pass
    except OSError:
        pass
    finally:
        sock.close()


def masked(opcode: int, payload: bytes) -> bytes:
    mask = b"\x01\x02\x03\x04"
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length <= 0xFFFF:
        header = struct.pack("!BBH", 0x80 | opcode, 0xFE, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0xFF, length)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_token_in_any_log_line_of_a_real_server(tmp_path, log_format):
    token, other = make_token("logged"), make_token("logged-too")
    bad = token[:-4] + "AAAA"
    expired = make_token("late", exp=1)
    server = EddyProcess(tmp_path, f"sqlite:///{tmp_path}/eddy.db",
                         env={"EDDY_LOG_LEVEL": "debug", "EDDY_LOG_FORMAT": log_format, "EDDY_PING_INTERVAL": "1",
                              "EDDY_PING_TIMEOUT": "1"})
    try:
        server.wait_ready()
        for method, path in ERROR_PATHS_HTTP:
            http(server.port, method, path.format(t=token, bad=bad, expired=expired))
        base = f"ws://127.0.0.1:{server.port}"
        for query in (f"?access_token={token}", f"?token={other}"):
            ws = websocket_client.create_connection(base + "/ws" + query, timeout=5)
            ws.recv()
            for frame in ("not json", "[1]", '{"type":"nope"}', '{"type":"join","channel":"user:x"}',
                          '{"type":"ping","timestamp":"' + "x" * 70_000 + '"}', '{"type":"authenticate","token":"zz"}'):
                ws.send(frame)
                ws.recv()
            ws.send_binary(b"\x00")
            ws.recv()
            ws.ping("p")
            ws.close()
            for refused in ("/ws/user:someone-else/stream", "/ws/bad channel/stream"):
                try:
                    websocket_client.create_connection(base + refused + query, timeout=5).close()
                except websocket_client.WebSocketException:
                    pass
        for frames in ([masked(0x1, b'{"type":"ping","x":"\xff"}')], [masked(0x1, b"x" * (300 * 1024))],
                       [masked(0x2, b"\x00"), masked(0x9, b"ping"), masked(0x3, b"reserved opcode")], []):
            raw_socket_session(server.port, f"/ws?access_token={token}", frames)
        for bad_query in (f"?access_token={bad}", f"?token={expired}", f"?access_token={token}&since=zz"):
            try:
                websocket_client.create_connection(base + "/ws" + bad_query, timeout=5).close()
            except websocket_client.WebSocketException:
                pass
    finally:
        server.stop()
    output = server.log_path.read_text(errors="replace")
    assert "debug" in output.lower() and "/ws?access_token=***" in output  # it did log those requests
    for secret in (token, other, bad, expired):
        assert secret not in output
        assert secret.rsplit(".", 1)[1] not in output  # not even the signature


def test_uncaught_exception_and_warning_lines_are_redacted(monkeypatch):
    """Tornado's uncaught-exception log quotes the request and the traceback; a warning may quote a header."""
    token = make_token("traced")
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("debug", "text")
        root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
        try:
            raise ValueError(f"bad request /ws?access_token={token}")
        except ValueError:
            logging.getLogger("tornado.application").exception("Uncaught exception GET /ws?token=%s", token)
        logging.getLogger("some.library").warning("header was Authorization: Bearer %s", token)
        logging.getLogger("x").debug("a JWT on its own: %s", token)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    output = stream.getvalue()
    assert output.count("***") >= 4, output
    assert token not in output and token.rsplit(".", 1)[1] not in output
