"""Tokens over real sockets: deferred authentication, refresh and expiry, the per-user limit."""

from __future__ import annotations

import asyncio
import time

import pytest
from tornado.httpclient import HTTPClientError

from tests.support import Client, backend_token, make_token, publish


async def closed_with(client: Client, timeout: float = 5.0) -> int | None:
    while True:
        message = await asyncio.wait_for(client.connection.read_message(), timeout)
        if message is None:
            return client.connection.close_code


# Deferred authentication (seed 003) ------------------------------------------------

@pytest.mark.gen_test
@pytest.mark.settings(auth_timeout=0.5)
async def test_deferred_authentication(http_server, http_port):
    client = await Client.connect(http_port, "/ws/pedidos/stream", None)
    assert await client.no_frame_within(0.1)  # nothing until it authenticates
    assert (await client.request({"type": "join", "channel": "x", "ref": 1}))["code"] == "UNAUTHENTICATED"
    assert (await client.request({"type": "ping", "timestamp": "1"}))["type"] == "pong"
    assert (await client.request({"type": "authenticate", "token": "junk", "ref": 2}))["code"] == "TOKEN_INVALID"
    connected = await client.request({"type": "authenticate", "token": make_token("loja-1"), "ref": 3})
    assert connected["type"] == "connected" and connected["ref"] == 3
    assert connected["channels"] == ["pedidos", "tenant", "user:loja-1"]
    await publish(http_port, "pedidos", "pedido_criado", {"pedido_id": 123})
    assert (await client.recv_type("event"))["event"] == "pedido_criado"
    await asyncio.sleep(0.6)  # past auth_timeout: an authenticated socket stays
    assert (await client.request({"type": "ping"}))["type"] == "pong"
    client.close()


@pytest.mark.gen_test
@pytest.mark.settings(auth_timeout=0.3)
async def test_unauthenticated_socket_is_closed_after_the_timeout(http_server, http_port):
    client = await Client.connect(http_port, "/ws", None)
    assert await closed_with(client) == 4001
    # A bad token at the handshake is still refused outright.
    with pytest.raises(HTTPClientError) as refused:
        await Client.connect(http_port, "/ws", "junk")
    assert refused.value.code == 401


@pytest.mark.gen_test
async def test_token_required_by_default(http_server, http_port):
    with pytest.raises(HTTPClientError) as refused:
        await Client.connect(http_port, "/ws", None)
    assert refused.value.code == 401


# Expiry and refresh -----------------------------------------------------------------

@pytest.mark.gen_test(timeout=20)
@pytest.mark.settings(token_grace=0.6)
async def test_expired_token_refreshed_within_grace_is_kept(http_server, http_port):
    client = await Client.connect(http_port, "/ws/orders/stream", make_token("alice", exp=int(time.time()) + 1))
    await client.recv()
    expired = await client.recv(5)
    assert expired["type"] == "error" and expired["code"] == "TOKEN_EXPIRED"
    fresh = make_token("alice", exp=int(time.time()) + 3600)
    ack = await client.request({"type": "authenticate", "token": fresh, "ref": "r"})
    assert ack["type"] == "ack" and ack["ref"] == "r" and ack["expires_at"].endswith("Z")
    await asyncio.sleep(0.8)  # past the grace period
    await publish(http_port, "orders", "still-here")
    assert (await client.recv_type("event"))["event"] == "still-here"
    # Refreshing as somebody else is refused and changes nothing.
    other = await client.request({"type": "authenticate", "token": make_token("mallory"), "ref": 9})
    assert other["code"] == "FORBIDDEN"
    client.close()


@pytest.mark.gen_test(timeout=20)
@pytest.mark.settings(token_grace=0.3)
async def test_expired_token_without_refresh_is_closed(http_server, http_port):
    client = await Client.connect(http_port, "/ws", make_token("alice", exp=int(time.time()) + 1))
    await client.recv()
    assert (await client.recv(5))["code"] == "TOKEN_EXPIRED"
    assert await closed_with(client) == 4003


# Per-user connection cap ---------------------------------------------------------------

@pytest.mark.gen_test
@pytest.mark.settings(max_connections_per_user=2)
async def test_per_user_cap_evicts_the_oldest(http_server, http_port):
    first = await Client.connect(http_port, "/ws", make_token("alice"))
    second = await Client.connect(http_port, "/ws", make_token("alice"))
    other_user = await Client.connect(http_port, "/ws", make_token("bob"))
    for client in (first, second, other_user):
        await client.recv()
    third = await Client.connect(http_port, "/ws", make_token("alice"))
    await third.recv()
    assert await closed_with(first) == 4029
    await publish(http_port, "user:alice", "hello", token=backend_token())
    assert (await second.recv_type("event"))["event"] == "hello"
    assert (await third.recv_type("event"))["event"] == "hello"
    assert (await other_user.request({"type": "ping"}))["type"] == "pong"
    for client in (second, third, other_user):
        client.close()
