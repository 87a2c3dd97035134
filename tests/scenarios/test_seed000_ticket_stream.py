"""Seed 000: a parking-ticket stream at /ws/tickets/stream with JWT on the handshake, as the wscat walk-through does."""

from __future__ import annotations

import pytest

from tests.support import Client, http, json_of, make_token, publish


@pytest.mark.gen_test
@pytest.mark.settings(keepalive_interval=0.3)
async def test_ticket_stream_walkthrough(http_server, http_port):
    token = make_token("totem-entrada", tenant="estacionamento", roles=["kiosk"])
    # wscat -c "ws://localhost:5187/ws/tickets/stream" -H "Authorization: Bearer <TOKEN>"
    wscat = await Client.connect(http_port, "/ws/tickets/stream", token)
    # new WebSocket(`ws://…/ws/tickets/stream?access_token=${token}`) from the admin panel
    panel = await Client.connect(http_port, "/ws/tickets/stream", token, header=False, query=f"?access_token={token}")
    for client in (wscat, panel):
        assert (await client.recv())["type"] == "connected"

    ticket = {"id": "4f9fdb89-bc74-4f84-9181-169c6e1ee3bd", "plate": "ABC1D23", "status": "Active"}
    # POST /api/tickets persists the ticket; the backend publishes ticket.created
    await publish(http_port, "tickets", "ticket.created", ticket, token)
    await publish(http_port, "tickets", "ticket.completed", {**ticket, "status": "Completed"}, token)
    for client in (wscat, panel):
        created, completed = await client.recv_type("event"), await client.recv_type("event")
        # The seed's envelope {event, timestamp, data} is there, unchanged.
        assert (created["event"], created["data"]) == ("ticket.created", ticket)
        assert completed["event"] == "ticket.completed" and completed["data"]["status"] == "Completed"
        assert created["timestamp"].endswith("Z") and int(completed["id"]) > int(created["id"])
        # keepalive heartbeat (every 30 s in production, 0.3 s here)
        assert (await client.recv(2))["type"] == "keepalive"

    # The REST fallback returns the same events for clients without WebSockets.
    page = json_of(await http(http_port, "GET", "/api/channels/tickets/events", token=token))
    assert [e["event"] for e in page["events"]] == ["ticket.created", "ticket.completed"]
    # Tokens of another parking operator see nothing of this one.
    other = json_of(await http(http_port, "GET", "/api/channels/tickets/events",
                               token=make_token("x", tenant="outro-estacionamento")))
    assert other["events"] == []
    wscat.close()
    panel.close()
