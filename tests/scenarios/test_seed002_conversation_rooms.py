"""Seed 002: Socket.IO-style conversation and user rooms, typing, and message status on FastAPI, done by Eddy."""

from __future__ import annotations

import pytest

from tests.support import Client, backend_token, make_token, publish

CONV_1 = "conversation:158803db-1111-4c4c-8888-7f22a9c1aaaa"
CONV_2 = "conversation:7f22a9c1-2222-4c4c-8888-158803dbbbbb"
RULES = """
[[channels]]
pattern = "conversation:*"
join = ["role:admin", "role:agent"]
id_pattern = "uuid"
"""


@pytest.fixture
def settings(settings, tmp_path):
    (tmp_path / "rules.toml").write_text(RULES)
    return settings.with_changes(config=str(tmp_path / "rules.toml"))


@pytest.mark.gen_test
async def test_conversation_rooms_typing_and_status(http_server, http_port):
    joao_desktop = await Client.connect(http_port, "/ws", make_token("joao", tenant="pytake", roles=["admin"]))
    joao_mobile = await Client.connect(http_port, "/ws", make_token("joao", tenant="pytake", roles=["admin"]))
    maria = await Client.connect(http_port, "/ws", make_token("maria", tenant="pytake", roles=["agent"]))
    ana = await Client.connect(http_port, "/ws", make_token("ana", tenant="pytake", roles=["agent"]))
    for client in (joao_desktop, joao_mobile, maria, ana):
        assert (await client.recv())["type"] == "connected"

    # join_conversation → joined_conversation (ack); UUID validated (the seed's UUID(conversation_id) check)
    for client in (joao_desktop, maria):
        assert (await client.request({"type": "join", "channel": CONV_1, "ref": 1}))["type"] == "ack"
    assert (await ana.request({"type": "join", "channel": CONV_2, "ref": 1}))["type"] == "ack"
    bad = await ana.request({"type": "join", "channel": "conversation:not-a-uuid", "ref": 2})
    assert bad["code"] == "INVALID_CHANNEL"
    # The seed's TODO ("check the user may access this conversation") is the rule's role list.
    customer = await Client.connect(http_port, "/ws", make_token("c", tenant="pytake", roles=["contact"]))
    await customer.recv()
    assert (await customer.request({"type": "join", "channel": CONV_1, "ref": 1}))["code"] == "FORBIDDEN"

    # typing_start / typing_stop → user_typing to the room, except the sender
    maria.send({"type": "typing", "channel": CONV_1, "is_typing": True})
    assert (await joao_desktop.recv_type("typing"))["user_id"] == "maria"
    maria.send({"type": "typing", "channel": CONV_1, "is_typing": False})
    assert (await joao_desktop.recv_type("typing"))["is_typing"] is False
    assert await maria.no_frame_within(0.1)

    # whatsapp_service emits message:new after commit → the conversation room only
    message = {"id": "m-1", "conversation_id": CONV_1.split(":")[1], "direction": "inbound",
               "sender_type": "contact", "message_type": "text", "content": {"text": "Oi"}, "status": "sent"}
    await publish(http_port, CONV_1, "message:new", message, backend_token("pytake"))
    for client in (joao_desktop, maria):
        frame = await client.recv_type("event")
        assert (frame["event"], frame["data"]["content"]) == ("message:new", {"text": "Oi"})
    assert await ana.no_frame_within(0.1)  # another conversation's room

    # message:status sent → delivered → read, in order
    for status in ("delivered", "read"):
        await publish(http_port, CONV_1, "message:status", {"message_id": "m-1", "status": status},
                      backend_token("pytake"))
    for client in (joao_desktop, maria):
        statuses = [(await client.recv_type("event"))["data"]["status"] for _ in range(2)]
        assert statuses == ["delivered", "read"]

    # emit_to_user: every device of one user
    await publish(http_port, "user:joao", "notification", {"text": "new conversation"},
                  backend_token("pytake"))
    for device in (joao_desktop, joao_mobile):
        assert (await device.recv_type("event"))["channel"] == "user:joao"

    # leave_conversation → left_conversation (ack), no more room events
    assert (await maria.request({"type": "leave", "channel": CONV_1, "ref": 3}))["type"] == "ack"
    await publish(http_port, CONV_1, "message:new", {**message, "id": "m-2"}, backend_token("pytake"))
    assert (await joao_desktop.recv_type("event"))["data"]["id"] == "m-2"
    assert await maria.no_frame_within(0.2)
    for client in (joao_desktop, joao_mobile, maria, ana, customer):
        client.close()
