"""Seed 003: the order-broadcast ConnectionManager (/ws/pedidos?token=, authenticate, ping echo), done by Eddy."""

from __future__ import annotations

import pytest

from tests.support import Client, make_token, publish


@pytest.mark.gen_test
@pytest.mark.settings(auth_timeout=2.0)
async def test_order_broadcast(http_server, http_port):
    # ws://<api_url>/ws/pedidos?token=<session_token>  (Eddy: /ws/pedidos/stream)
    token = make_token("loja-centro", tenant="sgp")
    with_query = await Client.connect(http_port, "/ws/pedidos/stream", None, header=False, query=f"?token={token}")
    connected = await with_query.recv()
    assert connected["type"] == "connected" and "pedidos" in connected["channels"]

    # The seed also lets a client connect first and send {"type":"authenticate","token":…}.
    late = await Client.connect(http_port, "/ws/pedidos/stream", None)
    authenticated = await late.request({"type": "authenticate", "token": token, "ref": "auth"})
    assert authenticated["type"] == "connected" and authenticated["ref"] == "auth"

    # ping with the client's timestamp → pong echoing it
    assert await with_query.request({"type": "ping", "timestamp": "123"}) == {"type": "pong", "timestamp": "123"}

    # broadcast_pedido_criado / _atualizado / _cancelado → every connected client, in order
    backend = make_token("api-sgp", tenant="sgp")
    for kind, status in (("pedido_criado", "pendente"), ("pedido_atualizado", "aprovado"),
                         ("pedido_cancelado", "cancelado")):
        await publish(http_port, "pedidos", kind, {"pedido_id": 123, "status_atual": status, "cliente": "Nome",
                                                   "valor_total": "1000.00"}, backend)
    for client in (with_query, late):
        events = [await client.recv_type("event") for _ in range(3)]
        assert [e["event"] for e in events] == ["pedido_criado", "pedido_atualizado", "pedido_cancelado"]
        assert events[2]["data"]["status_atual"] == "cancelado"

    # A malformed message is logged and ignored in the seed; Eddy answers with a documented error and carries on.
    with_query.send("{not json")
    assert (await with_query.recv())["code"] == "INVALID_JSON"
    await publish(http_port, "pedidos", "pedido_criado", {"pedido_id": 124}, backend)
    assert (await with_query.recv_type("event"))["data"]["pedido_id"] == 124
    assert (await late.recv_type("event"))["data"]["pedido_id"] == 124

    # (The seed's manager awaited each socket in turn, so one stalled socket delayed all: Eddy's
    # slow-consumer handling is proven in tests/test_websocket.py.)
    for client in (with_query, late):
        client.close()
