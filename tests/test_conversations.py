"""Conversations over real sockets: publish with acks, typing, read receipts, presence, sync and resume."""

from __future__ import annotations

import asyncio

import pytest

from tests.support import Client, backend_token, http, json_of, make_token, publish

CONV = "conversation:158803db-1111-4c4c-8888-7f22a9c1aaaa"
RULES = """
[[channels]]
pattern = "conversation:*"
join = ["role:agent", "role:customer"]
publish = ["role:agent", "role:customer"]

[[channels]]
pattern = "orders"
join = ["tenant"]

[[channels]]
pattern = "dashboard"
join = ["tenant"]
publish = ["tenant"]
history = false
presence = false
"""


@pytest.fixture
def settings(settings, tmp_path):
    (tmp_path / "rules.toml").write_text(RULES)
    return settings.with_changes(config=str(tmp_path / "rules.toml"), typing_timeout=0.4)


async def member(port: int, user: str, *, role: str = "agent", channel: str = CONV) -> Client:
    client = await Client.connect(port, "/ws", make_token(user, roles=[role]))
    await client.recv()
    assert (await client.request({"type": "join", "channel": channel, "ref": "join"}))["type"] == "ack"
    return client


# Publish from a socket ---------------------------------------------------------------

@pytest.mark.gen_test
async def test_publish_from_socket_is_stored_broadcast_and_acked(http_server, http_port):
    ana, joao = await member(http_port, "ana"), await member(http_port, "joao", role="customer")
    ack = await ana.request({"type": "publish", "channel": CONV, "event": "message", "data": {"text": "Olá"},
                             "ref": 9})
    assert ack["type"] == "ack" and ack["ref"] == 9 and ack["channel"] == CONV and ack["timestamp"].endswith("Z")
    for client in (joao, ana):  # the sender receives its own message too: it is a stored event
        frame = await client.recv_type("event")
        assert (frame["id"], frame["event"], frame["data"]) == (ack["id"], "message", {"text": "Olá"})
    page = json_of(await http(http_port, "GET", f"/api/channels/{CONV}/events", token=make_token("ana", roles=["agent"])))
    assert [e["id"] for e in page["events"]] == [ack["id"]]
    ana.close()
    joao.close()


@pytest.mark.gen_test
async def test_retried_publish_with_idempotency_key_stores_once(http_server, http_port):
    ana = await member(http_port, "ana")
    frame = {"type": "publish", "channel": CONV, "event": "message", "data": {"n": 1}, "idempotency_key": "m-1"}
    first = await ana.request({**frame, "ref": 1})
    assert (await ana.recv_type("event"))["id"] == first["id"]
    # The client reconnects and retries from its offline queue.
    ana.close()
    ana = await member(http_port, "ana")
    retry = await ana.request({**frame, "ref": 2})
    assert retry["id"] == first["id"]
    assert await ana.no_frame_within(0.2)  # nothing new was broadcast
    ana.close()


@pytest.mark.gen_test
async def test_publish_refusals(http_server, http_port):
    client = await member(http_port, "ana", channel="orders")
    cases = [
        ({"channel": "orders", "event": "x"}, "FORBIDDEN"),            # rule has no publish list
        ({"channel": "user:ana", "event": "x"}, "FORBIDDEN"),          # built-in rooms: backend only
        ({"channel": "unlisted", "event": "x"}, "FORBIDDEN"),
        ({"channel": CONV, "event": "$typing"}, "INVALID_FRAME"),      # reserved names
        ({"channel": CONV, "event": ""}, "INVALID_FRAME"),
        ({"channel": CONV, "event": "m", "idempotency_key": 7}, "INVALID_FRAME"),
    ]
    for ref, (fields, code) in enumerate(cases):
        answer = await client.request({"type": "publish", "ref": ref, **fields})
        assert (answer["type"], answer["code"], answer["ref"]) == ("error", code, ref), fields
    client.close()


@pytest.mark.gen_test
async def test_channel_without_history_broadcasts_but_keeps_nothing(http_server, http_port):
    a, b = await member(http_port, "a", channel="dashboard"), await member(http_port, "b", channel="dashboard")
    ack = await a.request({"type": "publish", "channel": "dashboard", "event": "tick", "data": 1, "ref": 1})
    assert (await b.recv_type("event"))["id"] == ack["id"]
    page = json_of(await http(http_port, "GET", "/api/channels/dashboard/events", token=make_token("a")))
    assert page["events"] == []
    # Nor does it track presence (rule presence = false): thousands of dashboards stay quiet.
    assert (await a.recv_type("event"))["id"] == ack["id"]  # its own event
    assert (await a.request({"type": "presence_query", "channel": "dashboard", "ref": 2}))["users"] == []
    a.close()
    b.close()


# Typing ----------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_typing_reaches_others_not_the_sender_and_never_history(http_server, http_port):
    ana, ana_phone, joao = (await member(http_port, "ana"), await member(http_port, "ana"),
                            await member(http_port, "joao", role="customer"))
    ana.send({"type": "typing", "channel": CONV, "is_typing": True})
    typing = await joao.recv_type("typing")
    assert typing == {"type": "typing", "channel": CONV, "user_id": "ana", "is_typing": True}
    # Refreshing within the re-broadcast window is not broadcast again.
    ana.send({"type": "typing", "channel": CONV, "is_typing": True})
    ana.send({"type": "typing", "channel": CONV, "is_typing": False})
    assert (await joao.recv_type("typing"))["is_typing"] is False
    assert await ana.no_frame_within(0.2)          # the sender never sees its own typing
    assert await ana_phone.no_frame_within(0.05)   # nor do its other devices
    page = json_of(await http(http_port, "GET", f"/api/channels/{CONV}/events", token=make_token("joao", roles=["agent"])))
    assert page["events"] == []
    for client in (ana, ana_phone, joao):
        client.close()


@pytest.mark.gen_test
async def test_typing_is_cleared_by_the_server_and_rate_limited(http_server, http_port):
    ana, joao = await member(http_port, "ana"), await member(http_port, "joao", role="customer")
    ana.send({"type": "typing", "channel": CONV, "is_typing": True})
    assert (await joao.recv_type("typing"))["is_typing"] is True
    cleared = await joao.recv_type("typing", timeout=2)  # typing_timeout is 0.4 s here
    assert cleared["is_typing"] is False
    assert (await ana.request({"type": "typing", "channel": CONV, "is_typing": False, "ref": "t"}))["type"] == "ack"
    codes = []
    for n in range(12):  # with the two above, 14 frames within the 5 s window; the limit is 10
        ana.send({"type": "typing", "channel": CONV, "is_typing": False, "ref": n})
    while True:
        try:
            frame = await ana.recv(0.3)
        except TimeoutError:
            break
        codes.append(frame.get("code"))
    assert codes.count("RATE_LIMITED") == 4 and codes.count(None) == 8  # 8 acks, then refusals
    error = await ana.request({"type": "typing", "channel": "orders", "is_typing": True, "ref": "x"})
    assert error["code"] in ("NOT_SUBSCRIBED", "RATE_LIMITED")
    ana.close()
    joao.close()


# Read receipts -----------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_read_receipts_are_broadcast_and_stored(http_server, http_port):
    ana, joao = await member(http_port, "ana"), await member(http_port, "joao", role="customer")
    ack = await ana.request({"type": "publish", "channel": CONV, "event": "message", "data": {}, "ref": 1})
    await ana.recv_type("event")
    await joao.recv_type("event")
    joao.send({"type": "read", "channel": CONV, "message_id": ack["id"], "ref": 2})
    read = await ana.recv_type("read")
    assert (read["channel"], read["user_id"], read["message_id"]) == (CONV, "joao", ack["id"])
    assert read["read_at"].endswith("Z")
    late = make_token("carla", roles=["agent"])
    reads = json_of(await http(http_port, "GET", f"/api/channels/{CONV}/reads", token=late))["reads"]
    assert [(r["user_id"], r["message_id"]) for r in reads] == [("joao", ack["id"])]
    # The reader gets its ack, and its devices learn of the read too (read on another device), in either order.
    own = [await joao.recv(), await joao.recv()]
    assert sorted(f["type"] for f in own) == ["ack", "read"]
    assert [f["ref"] for f in own if f["type"] == "ack"] == [2]
    assert (await joao.request({"type": "read", "channel": CONV, "ref": 3}))["code"] == "INVALID_FRAME"
    ana.close()
    joao.close()


# Presence --------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_presence_join_status_query_and_leave(http_server, http_port):
    ana = await member(http_port, "ana")
    joao = await Client.connect(http_port, "/ws", make_token("joao", roles=["customer"]))
    await joao.recv()
    joao.send({"type": "join", "channel": CONV, "ref": 1})
    assert (await ana.recv_type("presence"))["user_id"] == "joao"
    assert (await joao.recv_type("ack"))["ref"] == 1
    data = await ana.request({"type": "presence_query", "channel": CONV, "ref": 5})
    assert data["type"] == "presence_data" and data["ref"] == 5
    assert [(u["user_id"], u["status"], u["connections"]) for u in data["users"]] == [
        ("ana", "online", 1), ("joao", "online", 1)]

    assert (await joao.request({"type": "presence", "status": "away", "ref": 2}))["status"] == "away"
    change = await ana.recv_type("presence")
    assert (change["user_id"], change["status"]) == ("joao", "away")
    body = json_of(await http(http_port, "GET", f"/api/channels/{CONV}/presence", token=make_token("x", roles=["agent"])))
    assert {u["user_id"]: u["status"] for u in body["users"]} == {"ana": "online", "joao": "away"}
    assert (await joao.request({"type": "presence", "status": "sleepy", "ref": 3}))["code"] == "INVALID_FRAME"

    joao.close()
    gone = await ana.recv_type("presence")
    assert (gone["user_id"], gone["status"]) == ("joao", "offline")
    ana.close()


# Sync and resume --------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_sync_returns_what_came_after_last_id(http_server, http_port):
    token = make_token("ana", roles=["agent"])
    ids = [(await publish(http_port, CONV, "message", {"n": n}, token))["id"] for n in range(5)]
    client = await Client.connect(http_port, "/ws", token)
    await client.recv()
    data = await client.request({"type": "sync", "channel": CONV, "last_id": ids[1], "ref": 1})
    assert data["type"] == "sync_data" and data["count"] == 3 and data["has_more"] is False
    assert [e["id"] for e in data["events"]] == ids[2:]
    assert (await client.request({"type": "sync", "channel": CONV, "last_id": "x", "ref": 2}))["code"] == "INVALID_FRAME"
    client.close()


@pytest.mark.gen_test
async def test_join_since_replays_missed_events_then_live(http_server, http_port):
    token = make_token("ana", roles=["agent"])
    client = await member(http_port, "ana")
    seen = (await publish(http_port, CONV, "message", {"n": 0}, token))["id"]
    assert (await client.recv_type("event"))["id"] == seen
    client.close()  # offline while three messages arrive
    missed = [(await publish(http_port, CONV, "message", {"n": n}, token))["id"] for n in (1, 2, 3)]
    client = await Client.connect(http_port, "/ws", token)
    await client.recv()
    ack = await client.request({"type": "join", "channel": CONV, "since": seen, "ref": 1})
    assert ack == {"type": "ack", "ref": 1, "channel": CONV}
    assert [(await client.recv_type("event"))["id"] for _ in missed] == missed
    live = (await publish(http_port, CONV, "message", {"n": 4}, token))["id"]
    assert (await client.recv_type("event"))["id"] == live
    assert await client.no_frame_within(0.2)
    client.close()


@pytest.mark.gen_test
@pytest.mark.settings(history_size=3)
async def test_join_since_a_trimmed_position_says_history_lost(http_server, http_port):
    token = make_token("ana", roles=["agent"])
    ids = [e["id"] for e in await asyncio.gather(*(publish(http_port, "orders", "n", {"n": n}, backend_token())
                                                   for n in range(150)))]
    ids.sort(key=int)
    client = await Client.connect(http_port, "/ws", token)
    await client.recv()
    error = await client.request({"type": "join", "channel": "orders", "since": ids[0], "ref": 1})
    assert (error["type"], error["code"], error["ref"]) == ("error", "HISTORY_LOST", 1)
    await publish(http_port, "orders", "n", {"n": "after"}, backend_token())
    assert await client.no_frame_within(0.2)  # not joined after the refusal
    assert (await client.request({"type": "join", "channel": "orders", "since": ids[-2], "ref": 2}))["type"] == "ack"
    assert (await client.recv_type("event"))["id"] == ids[-1]
    client.close()


@pytest.mark.gen_test(timeout=60)
async def test_resume_seam_under_continuous_publishing(http_server, http_port):
    """Events committed while the replay runs are neither lost nor repeated at the seam."""
    token = make_token("ana", roles=["agent"])
    first = (await publish(http_port, CONV, "message", {"n": -1}, token))["id"]
    stop = asyncio.Event()
    published: list[str] = []

    async def publisher():
        n = 0
        while not stop.is_set():
            published.append((await publish(http_port, CONV, "message", {"n": n}, token))["id"])
            n += 1

    task = asyncio.ensure_future(publisher())
    await asyncio.sleep(0.2)
    received: list[str] = []
    for _ in range(5):  # join with since in the middle of the stream, several times
        client = await Client.connect(http_port, "/ws", token)
        await client.recv()
        since = received[-1] if received else first
        assert (await client.request({"type": "join", "channel": CONV, "since": since, "ref": 1}))["type"] == "ack"
        for _ in range(20):
            received.append((await client.recv_type("event"))["id"])
        client.close()
    stop.set()
    await task
    assert received == [i for i in published if int(i) > int(first)][: len(received)]


@pytest.mark.gen_test
async def test_storage_outage_on_socket_frames_is_reported_and_survived(http_server, http_port, eddy, monkeypatch):
    from storage import StorageUnavailable

    ana = await member(http_port, "ana")
    original = eddy.storage.append

    async def down(draft):
        raise StorageUnavailable("disk full")

    monkeypatch.setattr(eddy.storage, "append", down)
    error = await ana.request({"type": "publish", "channel": CONV, "event": "m", "data": 1, "ref": 1})
    assert (error["code"], error["ref"]) == ("STORAGE_UNAVAILABLE", 1)
    monkeypatch.setattr(eddy.storage, "append", original)
    ack = await ana.request({"type": "publish", "channel": CONV, "event": "m", "data": 2, "ref": 2})
    assert ack["type"] == "ack"
    assert (await ana.recv_type("event"))["data"] == 2
    # An authenticate frame without a token is refused with TOKEN_MISSING, and the session goes on.
    assert (await ana.request({"type": "authenticate", "ref": 3}))["code"] == "TOKEN_MISSING"
    assert (await ana.request({"type": "ping"}))["type"] == "pong"
    ana.close()

