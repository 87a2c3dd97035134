"""Limits and hostile input over real sockets: each limit reached once, with its code and its metric."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
from base64 import b64encode

import orjson
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from tornado.httpclient import HTTPClientError

from tests.support import Client, http, json_of, make_token, publish
from tests.test_operations import delta, scrape

DOCUMENTED_CODES = {
    "INVALID_JSON", "INVALID_FRAME", "INVALID_UTF8", "FRAME_TOO_LARGE", "UNSUPPORTED_BINARY", "UNKNOWN_TYPE",
    "INVALID_CHANNEL", "FORBIDDEN", "NOT_SUBSCRIBED", "TOO_MANY_CHANNELS", "RATE_LIMITED", "HISTORY_LOST",
    "UNAUTHENTICATED", "TOKEN_MISSING", "TOKEN_INVALID", "TOKEN_EXPIRED", "AUTHORIZER_UNAVAILABLE",
    "STORAGE_UNAVAILABLE", "INTERNAL_ERROR",
}


def raw_text_frame(payload: bytes) -> bytes:
    """A masked client text frame carrying arbitrary bytes (invalid UTF-8 included)."""
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    length = len(payload)
    header = struct.pack("!BB", 0x81, 0x80 | length) if length < 126 else struct.pack("!BBH", 0x81, 0xFE, length)
    return header + mask + masked


@pytest.mark.gen_test
@pytest.mark.settings(max_frame_bytes=1024)
async def test_oversized_frames_get_errors_and_non_utf8_fails_only_that_connection(http_server, http_port, io_loop):
    before = await scrape(http_port)
    client = await Client.connect(http_port, "/ws/orders/stream", make_token())
    await client.recv()
    client.send({"type": "ping", "timestamp": "x" * 2000})
    assert (await client.recv())["code"] == "FRAME_TOO_LARGE"
    # Over 4x the limit Tornado refuses to buffer it at all and closes with 1009.
    # Invalid UTF-8 needs a raw frame: Tornado's client only sends valid text.
    token = make_token()

    def invalid_utf8_exchange() -> bytes:
        """What the server sends after ``connected`` in answer to a text frame that is not UTF-8, until it hangs up."""
        sock = socket.create_connection(("127.0.0.1", http_port))
        sock.settimeout(5)
        key = b64encode(b"0123456789abcdef").decode()
        sock.sendall((f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                      f"Authorization: Bearer {token}\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(4096)
        data = data.split(b"\r\n\r\n", 1)[1]
        while len(data) < 4:
            data += sock.recv(4096)
        size, start = (data[1] & 0x7F, 2) if data[1] & 0x7F < 126 else (struct.unpack("!H", data[2:4])[0], 4)
        while len(data) < start + size:  # the connected frame
            data += sock.recv(4096)
        data = data[start + size:]
        sock.sendall(raw_text_frame(b'{"type":"ping","x":"\xff\xfe"}'))
        while len(data) < 4 and (chunk := sock.recv(4096)):  # a close frame, or the end of the connection
            data += chunk
        sock.close()
        return data

    # RFC 6455 8.1: invalid UTF-8 fails the connection with close 1007; no pong, no other frame.
    answer = await io_loop.run_in_executor(None, invalid_utf8_exchange)
    assert answer[0] == 0x88 and struct.unpack("!H", answer[2:4])[0] == 1007, answer
    await publish(http_port, "orders", "still-open")
    assert (await client.recv_type("event"))["event"] == "still-open"
    after = await scrape(http_port)
    assert delta(before, after, "eddy_frame_errors_total", code="FRAME_TOO_LARGE") == 1
    client.close()


@pytest.mark.gen_test
@pytest.mark.settings(frame_rate=5, frame_burst=5)
async def test_frame_flood_gets_rate_limited_then_closed(http_server, http_port):
    before = await scrape(http_port)
    client = await Client.connect(http_port, "/ws", make_token())
    await client.recv()
    for n in range(40):
        client.send({"type": "ping", "ref": n})
    answers = []
    while True:
        message = await asyncio.wait_for(client.connection.read_message(), 5)
        if message is None:
            break
        answers.append(orjson.loads(message))
    assert sum(a["type"] == "pong" for a in answers) >= 5
    assert sum(a.get("code") == "RATE_LIMITED" for a in answers) >= 10
    assert client.connection.close_code == 1008  # sustained abuse closes the socket
    after = await scrape(http_port)
    assert delta(before, after, "eddy_rate_limited_total", kind="frames") >= 11


@pytest.mark.gen_test
@pytest.mark.settings(max_connections_per_ip=2)
async def test_connections_per_address(http_server, http_port):
    clients = [await Client.connect(http_port, "/ws", make_token(f"u{n}")) for n in range(2)]
    for client in clients:
        await client.recv()
    with pytest.raises(HTTPClientError) as refused:
        await Client.connect(http_port, "/ws", make_token("u3"))
    assert refused.value.code == 429
    clients[0].close()
    await asyncio.sleep(0.1)
    again = await Client.connect(http_port, "/ws", make_token("u3"))  # a slot was freed
    assert (await again.recv())["type"] == "connected"
    again.close()
    clients[1].close()


@pytest.mark.gen_test
@pytest.mark.settings(rest_rate=1, rest_burst=3)
async def test_http_rate_limit_per_token(http_server, http_port):
    token = make_token("busy")
    codes = [(await http(http_port, "GET", "/api/channels/c/events", token=token)).code for _ in range(5)]
    assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]
    limited = await http(http_port, "GET", "/api/channels/c/events", token=token)
    assert json_of(limited)["code"] == "RATE_LIMITED" and int(limited.headers["Retry-After"]) >= 1
    assert (await http(http_port, "GET", "/api/channels/c/events", token=make_token("other"))).code == 200


@pytest.mark.gen_test(timeout=120)
@pytest.mark.settings(frame_rate=1e6, frame_burst=10 ** 6)  # this test is about parsing, not the flood limit
async def test_live_fuzz_thousands_of_hostile_frames(http_server, http_port):
    """Random frames into a real server: every answer is a documented frame; a bystander is unaffected."""
    rng = random.Random(7)
    fuzzer = await Client.connect(http_port, "/ws/orders/stream", make_token("fuzzer"))
    bystander = await Client.connect(http_port, "/ws/orders/stream", make_token("bystander"))
    await fuzzer.recv()
    await bystander.recv()
    atoms = [None, True, 0, -1, 2 ** 70, 1.5e308, "", "orders", "x" * 300, "user:other", [], {}, [1, [2, [3]]]]
    kinds = ["join", "leave", "ping", "publish", "typing", "read", "presence", "presence_query", "sync",
             "authenticate", "nope", 7, None]
    sent = 0
    for _ in range(2000):
        shape = rng.random()
        if shape < 0.15:
            fuzzer.send(bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40))))
        elif shape < 0.3:
            fuzzer.send("".join(rng.choice('{}[]":,0123456789abc\\ ') for _ in range(rng.randint(0, 60))))
        elif shape < 0.35:
            fuzzer.send("[" * 2000 + "]" * 2000)  # deep nesting
        else:
            frame = {"type": rng.choice(kinds)}
            for field in rng.sample(["channel", "ref", "since", "last_id", "event", "data", "status", "token",
                                     "message_id", "is_typing", "timestamp"], rng.randint(0, 5)):
                frame[field] = rng.choice(atoms)
            # stdlib json: it writes integers orjson cannot (2**70), which the server must refuse cleanly
            fuzzer.send(json.dumps(frame) if rng.random() < 0.9 else '{"type":"ping","type":"join"}')  # dup keys
        sent += 1
        if sent % 50 == 0:
            await asyncio.sleep(0)
    answered = 0
    while True:
        try:
            frame = await fuzzer.recv(1.0)
        except TimeoutError:
            break
        answered += 1
        assert frame["type"] in {"ack", "pong", "error", "sync_data", "presence_data", "event", "presence", "typing",
                                 "read", "keepalive"}, frame
        if frame["type"] == "error":
            assert frame["code"] in DOCUMENTED_CODES, frame
            assert frame["code"] != "INTERNAL_ERROR", frame  # no handler crashed
    assert answered > 100
    await publish(http_port, "orders", "after-fuzz")
    assert (await bystander.recv_type("event"))["event"] == "after-fuzz"
    fuzzer.close()
    bystander.close()


@hypothesis_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                              lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=4),
                              max_leaves=20).map(json.dumps)))
def test_frame_parser_never_crashes(message):
    """The parser either returns a frame dict or raises a documented FrameError, whatever it is given."""
    from service import protocol
    from service.frames import FrameError

    class Unauthenticated:
        identity = None

    try:
        frame = protocol.decode(message, 65536)
        protocol.parse_ref(frame)
        protocol.handler_for(Unauthenticated(), frame)
    except FrameError as error:
        assert error.code in DOCUMENTED_CODES
