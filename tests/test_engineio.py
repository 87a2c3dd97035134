"""Engine.IO v4 and Socket.IO v5 at the edges: protocol errors, limits, the server-driven heartbeat, binary refusal.

Real clients never send most of these requests, so the tests speak HTTP themselves here; the flows with
real clients are in tests/test_socketio_seeds.py.
"""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
import websockets
from tornado.httpclient import AsyncHTTPClient, HTTPRequest, HTTPResponse

from tests.socketio_clients import NodeClients, PythonClients
from tests.support import make_token
from tests.test_nodelay import server_side_nodelay
from tests.test_socketio_seeds import seed002_token, seed_settings


@pytest.fixture
def settings(request, tmp_path):
    marker = request.node.get_closest_marker("settings")
    return seed_settings(tmp_path, "seed002.toml", socketio_ping_interval=0.3, socketio_ping_timeout=0.3,
                         socketio_max_http_buffer_size=2000, **(marker.kwargs if marker else {}))


async def request(port: int, query: str, method: str = "GET", body: bytes | None = None) -> HTTPResponse:
    return await AsyncHTTPClient().fetch(HTTPRequest(f"http://127.0.0.1:{port}/socket.io/?{query}", method=method,
                                                     body=body, request_timeout=5), raise_error=False)


async def handshake(port: int) -> str:
    response = await request(port, "EIO=4&transport=polling")
    assert response.code == 200 and response.body.startswith(b"0")
    opened = orjson.loads(response.body[1:])
    assert (opened["upgrades"], opened["pingInterval"], opened["pingTimeout"], opened["maxPayload"]) == \
        (["websocket"], 300, 300, 2000)
    return opened["sid"]


@pytest.mark.gen_test(timeout=30)
async def test_protocol_errors_are_engineio_errors(http_server, http_port):
    cases = {
        "EIO=3&transport=polling": 5,               # unsupported protocol version
        "EIO=4&transport=carrier-pigeon": 0,        # unknown transport
        "EIO=4&transport=polling&sid=nope": 1,      # unknown session
    }
    for query, code in cases.items():
        response = await request(http_port, query)
        assert response.code == 400 and orjson.loads(response.body)["code"] == code, query
    response = await request(http_port, "EIO=4&transport=polling", method="POST", body=b"40")
    assert orjson.loads(response.body)["code"] == 2  # a handshake must be a GET


@pytest.mark.gen_test(timeout=30)
async def test_a_body_over_max_http_buffer_size_closes_the_session(http_server, http_port):
    sid = await handshake(http_port)
    response = await request(http_port, f"EIO=4&transport=polling&sid={sid}", "POST", b"4" + b"2" * 3000)
    assert response.code == 413
    assert (await request(http_port, f"EIO=4&transport=polling&sid={sid}")).code == 400  # the session is gone


@pytest.mark.gen_test(timeout=30)
async def test_the_server_pings_and_closes_a_client_that_never_pongs(http_server, http_port):
    sid = await handshake(http_port)
    ping = await request(http_port, f"EIO=4&transport=polling&sid={sid}")
    assert ping.body == b"2"
    await asyncio.sleep(0.5)  # no pong within pingTimeout
    gone = await request(http_port, f"EIO=4&transport=polling&sid={sid}")
    assert gone.code == 400 and orjson.loads(gone.body)["code"] == 1


@pytest.mark.gen_test(timeout=30)
async def test_a_client_that_pongs_stays_connected(http_server, http_port):
    clients = await NodeClients.start()
    try:
        await clients.connected("ana", f"http://127.0.0.1:{http_port}", auth={"token": seed002_token("ana")})
        await asyncio.sleep(1.5)  # five heartbeats
        assert not clients.events("ana", "disconnect")
        await clients.emit("ana", "ping")
        assert (await clients.next("ana", "event", "pong"))["args"][0]["timestamp"]
    finally:
        await clients.close()


@pytest.mark.gen_test(timeout=30)
async def test_unknown_namespace_and_binary_attachments_are_refused_clearly(http_server, http_port):
    clients = PythonClients()
    try:
        await clients.connect("ana", f"http://127.0.0.1:{http_port}/nowhere", auth={"token": seed002_token("ana")})
        assert (await clients.next("ana", "connect_error"))["message"] == "Invalid namespace"
        await clients.connected("bia", f"http://127.0.0.1:{http_port}", auth={"token": seed002_token("bia")})
        await clients.emit("bia", "join_conversation", b"\x00binary")
        refused = await clients.next("bia", "event", "error")
        assert "binary attachments are not supported" in refused["args"][0]["message"]
        await clients.emit("bia", "ping")  # the connection carries on
        assert (await clients.next("bia", "event", "pong"))["args"][0]["timestamp"]
    finally:
        await clients.close()


@pytest.mark.gen_test(timeout=30)
@pytest.mark.settings(max_connections_per_user=1)
async def test_a_socket_over_the_per_user_limit_is_disconnected_by_the_server(http_server, http_port):
    clients = await NodeClients.start()
    try:
        url = f"http://127.0.0.1:{http_port}"
        await clients.connected("first", url, auth={"token": seed002_token("ana")}, transports=["websocket"])
        await clients.connected("second", url, auth={"token": seed002_token("ana")}, transports=["websocket"])
        assert (await clients.next("first", "disconnect"))["reason"] == "io server disconnect"
    finally:
        await clients.close()


@pytest.mark.gen_test(timeout=30)
@pytest.mark.settings(max_connections_per_ip=2)
async def test_handshakes_per_address_are_bounded(http_server, http_port):
    sids = [await handshake(http_port) for _ in range(2)]
    refused = await request(http_port, "EIO=4&transport=polling")
    assert refused.code == 403 and orjson.loads(refused.body)["code"] == 4
    # a session that ends frees its place
    await request(http_port, f"EIO=4&transport=polling&sid={sids[0]}", "POST", b"1")
    assert (await request(http_port, "EIO=4&transport=polling")).code == 200


@pytest.mark.gen_test(timeout=30)
async def test_an_expired_token_gets_an_error_and_a_server_disconnect(http_server, http_port):
    clients = await NodeClients.start()
    try:
        token = make_token("ana", tenant=None, organization_id="org-1", role="agent", exp=int(time.time()) + 1)
        await clients.connected("ana", f"http://127.0.0.1:{http_port}", auth={"token": token},
                                transports=["websocket"])
        error = await clients.next("ana", "event", "error")
        assert error["args"][0]["code"] == "TOKEN_EXPIRED"
        assert (await clients.next("ana", "disconnect"))["reason"] == "io server disconnect"
    finally:
        await clients.close()


@pytest.mark.gen_test(timeout=30)
async def test_engineio_websocket_sends_at_once(http_server, http_port):
    url = f"ws://127.0.0.1:{http_port}/socket.io/?EIO=4&transport=websocket&token={seed002_token('agent-1')}"
    async with websockets.connect(url) as ws:
        assert (await asyncio.wait_for(ws.recv(), 5)).startswith("0")  # Engine.IO open
        assert server_side_nodelay(ws.transport.get_extra_info("sockname")[1]) == 1
