"""Seed 001: the browser chat client's message types, both ways, against Eddy's protocol."""

from __future__ import annotations

import pytest

from tests.support import Client, make_token

CONV = "conversation:6f1c2a9e-0000-4000-8000-000000000001"
RULES = """
[[channels]]
pattern = "conversation:*"
join = ["tenant"]
publish = ["tenant"]
"""


@pytest.fixture
def settings(settings, tmp_path):
    (tmp_path / "rules.toml").write_text(RULES)
    return settings.with_changes(config=str(tmp_path / "rules.toml"))


@pytest.mark.gen_test
async def test_chat_client_message_types(http_server, http_port):
    # ws://api/ws?token=JWT_TOKEN
    me = await Client.connect(http_port, "/ws", None, header=False, query=f"?token={make_token('user-1')}")
    peer = await Client.connect(http_port, "/ws", make_token("user-2"))
    connected = await me.recv()
    assert connected["type"] == "connected" and connected["user_id"] == "user-1" and connected["timestamp"]
    await peer.recv()

    # join → (ack); both are in the conversation
    assert (await me.request({"type": "join", "channel": CONV, "ref": 1}))["type"] == "ack"
    assert (await peer.request({"type": "join", "channel": CONV, "ref": 1}))["type"] == "ack"

    # message → message_sent (Eddy: ack with id and timestamp) and message to the room
    sent = await me.request({"type": "publish", "channel": CONV, "event": "message", "data": {"content": "Hello!"},
                             "ref": "m1"})
    assert sent["type"] == "ack" and sent["id"] and sent["timestamp"]
    message = await peer.recv_type("event")
    assert (message["id"], message["data"]["content"]) == (sent["id"], "Hello!")
    await me.recv_type("event")

    # typing → typing to the others
    me.send({"type": "typing", "channel": CONV, "is_typing": True})
    typing = await peer.recv_type("typing")
    assert (typing["user_id"], typing["is_typing"]) == ("user-1", True)

    # read → read with read_at
    peer.send({"type": "read", "channel": CONV, "message_id": sent["id"]})
    read = await me.recv_type("read")
    assert (read["user_id"], read["message_id"]) == ("user-2", sent["id"]) and read["read_at"]

    # presence → presence
    peer.send({"type": "presence", "status": "away"})
    presence = await me.recv_type("presence")
    assert (presence["user_id"], presence["status"]) == ("user-2", "away")

    # sync {last_message_id} → sync_data {messages, count}
    data = await me.request({"type": "sync", "channel": CONV, "last_id": "0", "ref": "s"})
    assert data["type"] == "sync_data" and data["count"] == 1 and data["events"][0]["id"] == sent["id"]

    # ping → pong
    assert (await me.request({"type": "ping"}))["type"] == "pong"
    # an error has {type: 'error', error, code}
    error = await me.request({"type": "join", "channel": "bad channel!", "ref": 2})
    assert error["type"] == "error" and error["code"] == "INVALID_CHANNEL" and error["error"]

    # leave → ack; no more messages
    assert (await me.request({"type": "leave", "channel": CONV, "ref": 3}))["type"] == "ack"
    await peer.request({"type": "publish", "channel": CONV, "event": "message", "data": {"content": "?"}, "ref": 4})
    assert await me.no_frame_within(0.2)

    # Reconnect: the offline queue's retried publish stores once (idempotency key).
    retry = {"type": "publish", "channel": CONV, "event": "message", "data": {"content": "queued"},
             "idempotency_key": "offline-1"}
    first = await me.request({**retry, "ref": 5})
    me.close()
    me = await Client.connect(http_port, "/ws", make_token("user-1"))
    await me.recv()
    assert (await me.request({**retry, "ref": 6}))["id"] == first["id"]
    me.close()
    peer.close()
