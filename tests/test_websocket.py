"""The WebSocket endpoint over real sockets against a real server on a real SQLite file."""

from __future__ import annotations

import asyncio
import socket
import struct
from base64 import b64encode
from datetime import datetime

import pytest
from tornado.httpclient import HTTPClientError

from tests.support import Client, backend_token, http, json_of, make_token, publish


def parse_iso(text: str) -> datetime:
    assert text.endswith("Z") and len(text) == 24, text
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ")


# The seed-000 walk-through -------------------------------------------------

@pytest.mark.gen_test
@pytest.mark.parametrize("how", ["header", "access_token", "token"])
async def test_ticket_stream_walkthrough(http_server, http_port, how):
    """Seed 000: connect to /ws/tickets/stream, POST a ticket, see ticket.created arrive."""
    token = make_token("kiosk-1", tenant="parking")
    if how == "header":
        client = await Client.connect(http_port, "/ws/tickets/stream", token)
    else:
        client = await Client.connect(http_port, "/ws/tickets/stream", token, header=False, query=f"?{how}={token}")
    connected = await client.recv()
    assert connected["type"] == "connected"
    assert connected["user_id"] == "kiosk-1"
    assert connected["tenant"] == "parking"
    assert connected["channels"] == ["tenant", "tickets", "user:kiosk-1"]
    assert len(connected["connection_id"]) >= 16
    parse_iso(connected["timestamp"])

    data = {"id": "4f9fdb89-bc74-4f84-9181-169c6e1ee3bd", "plate": "ABC1D23", "status": "Active"}
    stored = await publish(http_port, "tickets", "ticket.created", data, token)
    frame = await client.recv_type("event")
    assert frame == {
        "type": "event",
        "id": stored["id"],
        "channel": "tickets",
        "event": "ticket.created",
        "timestamp": stored["timestamp"],
        "data": data,
    }
    parse_iso(frame["timestamp"])

    await publish(http_port, "tickets", "ticket.completed", {"id": data["id"], "status": "Completed"}, token)
    completed = await client.recv_type("event")
    assert completed["event"] == "ticket.completed"
    assert int(completed["id"]) > int(frame["id"])
    client.close()


@pytest.mark.gen_test
async def test_join_leave_and_ping(http_server, http_port):
    client = await Client.connect(http_port, "/ws", make_token())
    connected = await client.recv()
    assert connected["channels"] == ["tenant", "user:alice"] and connected["last_id"] == "0"
    # The ack says from which id on everything reaches the socket: the resume point of a quiet room.
    assert await client.request({"type": "join", "channel": "orders", "ref": 7}) == {
        "type": "ack", "ref": 7, "channel": "orders", "last_id": "0"}
    # Joining twice is harmless and still acked.
    assert (await client.request({"type": "join", "channel": "orders", "ref": "again"}))["ref"] == "again"
    assert await client.request({"type": "ping", "timestamp": "123"}) == {"type": "pong", "timestamp": "123"}
    pong = await client.request({"type": "ping"})
    parse_iso(pong["timestamp"])

    await publish(http_port, "orders", "pedido_criado", {"pedido_id": 1})
    assert (await client.recv_type("event"))["data"] == {"pedido_id": 1}

    assert await client.request({"type": "leave", "channel": "orders", "ref": 8}) == {
        "type": "ack", "ref": 8, "channel": "orders"}
    missed = await publish(http_port, "orders", "pedido_criado", {"pedido_id": 2})
    assert await client.no_frame_within(0.3)
    # Rejoined without since: live from the newest id on, and the ack says which.
    # (Positions are global: presence signals of other rooms may have moved it further.)
    assert int((await client.request({"type": "join", "channel": "orders", "ref": 9}))["last_id"]) >= int(missed["id"])
    client.close()


@pytest.mark.gen_test
async def test_events_arrive_in_commit_order(http_server, http_port):
    client = await Client.connect(http_port, "/ws/orders/stream", make_token())
    await client.recv()
    stored = await asyncio.gather(*(publish(http_port, "orders", "n", {"n": n}) for n in range(50)))
    received = [await client.recv_type("event") for _ in range(50)]
    ids = [int(f["id"]) for f in received]
    assert ids == sorted(ids)
    assert sorted(ids) == sorted(int(s["id"]) for s in stored)
    client.close()


# Bad frames: every socket error code, and the connection survives ----------

BAD_FRAMES = [
    ("not json", "INVALID_JSON", None),
    ('{"type":"join",', "INVALID_JSON", None),
    ("[1,2]", "INVALID_FRAME", None),
    ('{"channel":"x"}', "INVALID_FRAME", None),
    ('{"type":7}', "INVALID_FRAME", None),
    ('{"type":"join","channel":"x","ref":true}', "INVALID_FRAME", None),
    ('{"type":"join","channel":"x","ref":{"a":1}}', "INVALID_FRAME", None),
    ('{"type":"subscribe_all","ref":4}', "UNKNOWN_TYPE", 4),
    ('{"type":"join","ref":5}', "INVALID_CHANNEL", 5),
    ('{"type":"join","channel":"has space","ref":"s"}', "INVALID_CHANNEL", "s"),
    ('{"type":"join","channel":"' + "x" * 201 + '","ref":6}', "INVALID_CHANNEL", 6),
    ('{"type":"join","channel":42,"ref":7}', "INVALID_CHANNEL", 7),
    ('{"type":"join","channel":"user:bob","ref":8}', "FORBIDDEN", 8),
    ('{"type":"leave","channel":"never-joined","ref":9}', "NOT_SUBSCRIBED", 9),
]


@pytest.mark.gen_test
async def test_bad_frames_get_documented_errors_and_keep_subscriptions(http_server, http_port):
    client = await Client.connect(http_port, "/ws/tickets/stream", make_token("alice"))
    await client.recv()
    for raw, code, ref in BAD_FRAMES:
        client.send(raw)
        error = await client.recv()
        assert error["type"] == "error", raw
        assert error["code"] == code, raw
        assert error["ref"] == ref, raw
        assert isinstance(error["error"], str) and error["error"]
    client.send(b"\x00\x01binary")
    assert (await client.recv())["code"] == "UNSUPPORTED_BINARY"
    # Still subscribed, still answering.
    await publish(http_port, "tickets", "ticket.created", {"ok": True})
    assert (await client.recv_type("event"))["data"] == {"ok": True}
    assert (await client.request({"type": "join", "channel": "user:alice", "ref": 1}))["type"] == "ack"
    client.close()


@pytest.mark.gen_test
async def test_too_many_channels(http_server, http_port, eddy):
    limit = eddy.settings.max_channels_per_connection
    client = await Client.connect(http_port, "/ws", make_token())
    await client.recv()
    for n in range(limit):
        client.send({"type": "join", "channel": f"c{n}", "ref": n})
    for _ in range(limit):
        assert (await client.recv())["type"] == "ack"
    error = await client.request({"type": "join", "channel": "one-more", "ref": "x"})
    assert error["code"] == "TOO_MANY_CHANNELS"
    # Re-joining a channel it already has is not a new channel.
    assert (await client.request({"type": "join", "channel": "c0", "ref": "y"}))["type"] == "ack"
    client.close()


@pytest.mark.gen_test
async def test_internal_error_is_reported_and_connection_survives(http_server, http_port, eddy, monkeypatch):
    from service import protocol

    async def broken(session, frame, ref):
        raise RuntimeError("bug")

    monkeypatch.setitem(protocol.FRAMES, "ping", broken)
    client = await Client.connect(http_port, "/ws/tickets/stream", make_token())
    await client.recv()
    error = await client.request({"type": "ping", "ref": 1})
    assert error == {"type": "error", "ref": 1, "code": "INTERNAL_ERROR",
                     "error": "internal error; the frame was not applied"}
    await publish(http_port, "tickets", "after-bug", None)
    assert (await client.recv_type("event"))["event"] == "after-bug"
    client.close()


# Authentication and tenants -------------------------------------------------

@pytest.mark.gen_test
@pytest.mark.parametrize(
    "token, code",
    [
        (None, "TOKEN_MISSING"),
        ("not-a-jwt", "TOKEN_INVALID"),
        (make_token(secret="another-secret-that-is-long-enough!!"), "TOKEN_INVALID"),
        (make_token(exp=1), "TOKEN_EXPIRED"),
        (make_token(sub=None), "TOKEN_INVALID"),
        (make_token(roles="x", tenant=""), "TOKEN_INVALID"),
        (make_token(algorithm="none", secret=None), "TOKEN_INVALID"),
    ],
)
async def test_bad_tokens_are_refused_before_the_upgrade(http_server, http_port, token, code):
    with pytest.raises(HTTPClientError) as refused:
        await Client.connect(http_port, "/ws/tickets/stream", token)
    assert refused.value.code == 401
    response = await http(http_port, "GET", "/ws/tickets/stream", token=token,
                          headers={"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                                   "Sec-WebSocket-Key": b64encode(b"0123456789abcdef").decode()})
    assert response.code == 401
    assert response.headers["Content-Type"] == "application/problem+json"
    assert json_of(response)["code"] == code


@pytest.mark.gen_test
async def test_path_channel_is_checked_at_the_handshake(http_server, http_port):
    for path, status, code in [("/ws/user:bob/stream", 403, "FORBIDDEN"), ("/ws/bad%20name/stream", 400, "INVALID_CHANNEL")]:
        response = await http(http_port, "GET", path, token=make_token("alice"))
        assert response.code == status
        assert json_of(response)["code"] == code


@pytest.mark.gen_test
async def test_tenants_never_see_each_others_events(http_server, http_port):
    acme = await Client.connect(http_port, "/ws/tickets/stream", make_token("a", tenant="acme"))
    globex = await Client.connect(http_port, "/ws/tickets/stream", make_token("g", tenant="globex"))
    await acme.recv()
    await globex.recv()
    await publish(http_port, "tickets", "secret", {"owner": "acme"}, make_token("a", tenant="acme"))
    await publish(http_port, "tickets", "public", {"owner": "globex"}, make_token("g", tenant="globex"))
    assert (await acme.recv_type("event"))["data"] == {"owner": "acme"}
    assert (await globex.recv_type("event"))["data"] == {"owner": "globex"}
    assert await acme.no_frame_within(0.3)
    assert await globex.no_frame_within(0.1)
    # History is tenant-scoped too.
    page = json_of(await http(http_port, "GET", "/api/channels/tickets/events", token=make_token("g", tenant="globex")))
    assert [e["data"]["owner"] for e in page["events"]] == ["globex"]
    acme.close()
    globex.close()


@pytest.mark.gen_test
@pytest.mark.settings(allowed_origins="https://app.example, https://admin.example")
async def test_origin_allowlist(http_server, http_port):
    token = make_token()
    with pytest.raises(HTTPClientError) as refused:
        await _connect_with_origin(http_port, token, "https://evil.example")
    assert refused.value.code == 403
    client = await _connect_with_origin(http_port, token, "https://admin.example")
    assert (await client.recv())["type"] == "connected"
    client.close()
    # Same origin is always fine.
    client = await _connect_with_origin(http_port, token, f"http://127.0.0.1:{http_port}")
    assert (await client.recv())["type"] == "connected"
    client.close()


async def _connect_with_origin(port, token, origin):
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    request = HTTPRequest(f"ws://127.0.0.1:{port}/ws", headers={"Authorization": f"Bearer {token}", "Origin": origin})
    return Client(await asyncio.wait_for(websocket_connect(request), 5))


# Keepalive ------------------------------------------------------------------

@pytest.mark.gen_test
@pytest.mark.settings(keepalive_interval=0.2)
async def test_keepalive_frames(http_server, http_port):
    client = await Client.connect(http_port, "/ws", make_token())
    await client.recv()
    first = await client.recv(2)
    second = await client.recv(2)
    assert first["type"] == second["type"] == "keepalive"
    assert parse_iso(second["timestamp"]) >= parse_iso(first["timestamp"])
    client.close()


# Slow consumers --------------------------------------------------------------

def raw_handshake(port: int, token: str, path: str) -> socket.socket:
    """A WebSocket client that completes the handshake and then never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = b64encode(b"slow-consumer-16").decode()
    sock.sendall(
        (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n").encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


def read_until_close_frame(sock: socket.socket, timeout: float) -> int:
    """Drain frames until a close frame; return its code."""
    sock.settimeout(timeout)

    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed without a close frame")
            data += chunk
        return data

    while True:
        first, second = exactly(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", exactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", exactly(8))
        payload = exactly(length)
        if first & 0x0F == 0x8:
            return struct.unpack("!H", payload[:2])[0]


@pytest.mark.gen_test(timeout=60)
@pytest.mark.settings(max_buffered_bytes=256 * 1024)
async def test_slow_consumer_is_closed_while_fast_one_keeps_receiving(http_server, http_port, eddy, io_loop):
    token = make_token()
    slow = await io_loop.run_in_executor(None, raw_handshake, http_port, token, "/ws/feed/stream")
    fast = await Client.connect(http_port, "/ws/feed/stream", token)
    await fast.recv()
    key = ("acme", "feed")
    for _ in range(100):
        if eddy.hub.subscriber_count(key) == 2:
            break
        await asyncio.sleep(0.02)
    assert eddy.hub.subscriber_count(key) == 2

    blob = "x" * 60_000
    total = 200  # 12 MB: more than the slow socket's kernel buffers and its 256 KiB bound
    received = 0
    for n in range(total):
        await publish(http_port, "feed", "big", {"n": n, "blob": blob}, token)
        while True:  # the fast client keeps up
            try:
                frame = await fast.recv(0.001 if received < n else 5)
            except TimeoutError:
                break
            assert frame["data"]["n"] == received
            received += 1
            if received > n:
                break
    while received < total:
        assert (await fast.recv_type("event"))["data"]["n"] == received
        received += 1
    assert received == total
    assert eddy.hub.subscriber_count(key) == 1, "the slow consumer is still subscribed"
    # The slow client, once it reads, finds the close code behind its backlog.
    code = await io_loop.run_in_executor(None, read_until_close_frame, slow, 10)
    assert code == 4008
    slow.close()
    fast.close()


@pytest.mark.gen_test(timeout=30)
async def test_reconnect_with_since_resumes_the_rooms_joined_at_connect(http_server, http_port):
    token = make_token("kiosk")
    first = await Client.connect(http_port, "/ws/tickets/stream", token)
    assert "last_id" in await first.recv()
    seen = (await publish(http_port, "tickets", "ticket.created", {"n": 1}, token))["id"]
    assert (await first.recv_type("event"))["id"] == seen
    first.close()  # away while the stream and the user's own room get events
    missed = [(await publish(http_port, "tickets", "ticket.created", {"n": n}, token))["id"] for n in (2, 3)]
    direct = (await publish(http_port, "user:kiosk", "notice", {"n": 4}, backend_token()))["id"]
    again = await Client.connect(http_port, "/ws/tickets/stream", token, query=f"?since={seen}")
    connected = await again.recv()
    assert connected["type"] == "connected" and "last_id" not in connected
    live = asyncio.ensure_future(publish(http_port, "tickets", "ticket.created", {"n": 5}, token))
    received = [await again.recv_type("event") for _ in range(4)]
    live_id = (await live)["id"]
    by_channel = {}
    for frame in received:
        by_channel.setdefault(frame["channel"], []).append(frame["id"])
    assert by_channel == {"tickets": [*missed, live_id], "user:kiosk": [direct]}  # in order, none twice
    assert await again.no_frame_within(0.3)
    bad = await http(http_port, "GET", "/ws/tickets/stream?since=abc", token=token,
                     headers={"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                              "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert bad.code == 400 and json_of(bad)["code"] == "INVALID_FRAME"
