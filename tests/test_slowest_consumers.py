"""The dashboard's slowest consumers: WebSocket and SSE connections report the bytes they have not sent yet."""

from __future__ import annotations

import asyncio
import os
import socket
from base64 import b64encode

import pytest

from tests.support import Client, http, json_of, make_token, publish

#: Enough to fill the kernel's buffers on loopback (send and receive, autotuned) several times over.
EVENTS, EVENT_BYTES = 40, 200_000


def stalled(port: int, request: str) -> socket.socket:
    """A client that sends ``request`` and then never reads: what it is sent piles up in the server."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(request.encode())
    return sock


@pytest.mark.gen_test(timeout=60)
@pytest.mark.settings(max_buffered_bytes=64 << 20)
async def test_stalled_websocket_and_sse_clients_top_the_slowest_consumers(http_server, http_port):
    key = b64encode(os.urandom(16)).decode()
    websocket = stalled(http_port, f"GET /ws/orders/stream?access_token={make_token('ws-stalled')} HTTP/1.1\r\n"
                                   f"Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                                   f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
    sse = stalled(http_port, f"GET /sse?channels=orders&access_token={make_token('sse-stalled')} HTTP/1.1\r\n"
                             "Host: x\r\n\r\n")
    reader = await Client.connect(http_port, "/ws/orders/stream", make_token("reader"))
    await reader.recv()
    admin = make_token("admin")
    for _ in range(100):  # both stalled connections are subscribed
        stats = json_of(await http(http_port, "GET", "/api/stats", token=admin))
        if stats["channels"].get("orders", {}).get("subscribers") == 3:
            break
        await asyncio.sleep(0.05)
    for n in range(EVENTS):
        await publish(http_port, "orders", "big", {"n": n, "blob": "x" * EVENT_BYTES})
        await reader.recv_type("event")
    stats = json_of(await http(http_port, "GET", "/api/stats", token=admin))
    queued = {entry["user_id"]: entry["queued_bytes"] for entry in stats["slowest_consumers"]}
    # Megabytes wait for each stalled client (beyond what the kernel took); the reader, which kept up, is last.
    assert queued["ws-stalled"] > EVENT_BYTES and queued["sse-stalled"] > EVENT_BYTES, queued
    assert [entry["user_id"] for entry in stats["slowest_consumers"]][-1] == "reader"
    assert queued["reader"] < EVENT_BYTES
    reader.close()
    websocket.close()
    sse.close()
