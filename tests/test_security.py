"""Regression tests for the findings of the hostile review (issue 15), one or more per finding.

Each test names its finding; docs/SECURITY.md lists them with the fix. All run against a real server on a
real SQLite file (the ``http_server``/``http_port`` fixtures) unless the finding is about a storage backend.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest

from storage import EventDraft
from tests.support import Client, http, json_of, make_token, publish

TOO_BIG_ID = str(1 << 63)  # one above the largest position a store holds

RULES = """
[[channels]]
pattern = "desk:*"
join = ["role:agent"]
publish = ["role:agent"]

[[channels]]
pattern = "orders"
join = ["tenant"]

[[channels]]
pattern = "live"
join = ["tenant"]
history = false
"""
#: A backend's credential: a token with the publisher role (EDDY_PUBLISHER_ROLE).
BACKEND = {"sub": "backend", "roles": ["publisher"]}


@pytest.fixture
def settings(settings, tmp_path, request):
    """``@pytest.mark.rules(RULES)`` runs the test's Eddy with a rules file."""
    marker = request.node.get_closest_marker("rules")
    if marker is None:
        return settings
    path = tmp_path / "rules.toml"
    path.write_text(marker.args[0])
    return settings.with_changes(config=str(path))


# Medium: event ids above 2^63-1 gave 500 (REST, SSE) and INTERNAL_ERROR on join -------------------------------


@pytest.mark.gen_test
async def test_event_ids_above_the_64_bit_range_are_refused_everywhere(http_server, http_port):
    token = make_token()
    await publish(http_port, "orders", token=token)
    response = await http(http_port, "GET", f"/api/channels/orders/events?after={TOO_BIG_ID}", token=token)
    assert response.code == 400 and json_of(response)["code"] == "INVALID_PARAMETER"
    response = await http(http_port, "GET", f"/sse?channels=orders&since={TOO_BIG_ID}", token=token)
    assert response.code == 400 and json_of(response)["code"] == "INVALID_PARAMETER"
    response = await http(http_port, "GET", f"/ws?since={TOO_BIG_ID}", token=token,
                          headers={"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                                   "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert response.code == 400
    client = await Client.connect(http_port, "/ws", token)
    await client.recv_type("connected")
    for frame in ({"type": "join", "ref": 1, "channel": "orders", "since": TOO_BIG_ID},
                  f'{{"type": "join", "ref": 1, "channel": "orders", "since": {1 << 64}}}',
                  {"type": "sync", "ref": 1, "channel": "orders", "last_id": TOO_BIG_ID}):
        answer = await client.request(frame)  # type: ignore[arg-type]
        assert answer["type"] == "error" and answer["code"] == "INVALID_FRAME", answer
    # The room was not left subscribed: a new event on it is not delivered to this socket.
    await publish(http_port, "orders", token=token)
    assert await client.no_frame_within(0.3)
    client.close()


# High: `deliver_at: "0001-01-01T00:00:00+01:00"` stopped scheduled delivery for every tenant -------------------


@pytest.mark.gen_test
async def test_a_delivery_time_out_of_range_is_refused_at_the_edge(http_server, http_port):
    token = make_token("backend")
    for deliver_at in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59+00:00", "1970-01-01T00:00:00Z"):
        response = await http(http_port, "POST", "/api/events",
                              {"channel": "orders", "event": "e", "deliver_at": deliver_at}, token)
        assert response.code == 400 and json_of(response)["code"] == "INVALID_BODY", (deliver_at, response.body)
    assert json_of(await http(http_port, "GET", "/api/scheduled", token=token))["scheduled"] == []


@pytest.mark.gen_test
@pytest.mark.settings(schedule_interval=0.05)
async def test_the_scheduler_parks_an_item_it_cannot_publish_and_carries_on(eddy, http_server, http_port):
    # As a database written before the edge validated the time would hold it.
    bad = await eddy.storage.schedule(EventDraft("acme", "orders", "bad"), -62135600400.0)
    token = make_token("backend")
    client = await Client.connect(http_port, "/ws/orders/stream", token)
    await client.recv_type("connected")
    response = await http(http_port, "POST", "/api/events",
                          {"channel": "orders", "event": "good", "data": 1, "delay_s": 0.2}, token)
    assert response.code == 202
    frame = await client.recv_type("event", timeout=5)
    assert frame["event"] == "good"
    assert eddy.scheduler.running
    listed = json_of(await http(http_port, "GET", "/api/scheduled", token=token))["scheduled"]
    assert [(i["id"], i["deliver_at"]) for i in listed] == [(bad.id, None)]  # parked: listed, never claimed
    assert (await http(http_port, "DELETE", f"/api/scheduled/{bad.id}", token=token)).code == 204
    ready = await http(http_port, "GET", "/readyz")
    assert ready.code == 200 and json_of(ready)["checks"]["scheduler"] == "ok"
    client.close()


@pytest.mark.gen_test
async def test_readyz_reports_a_dead_scheduler(eddy, http_server, http_port):
    assert (await http(http_port, "GET", "/readyz")).code == 200
    eddy.scheduler._task.cancel()  # however it ended, a scheduler that no longer runs is not ready
    await asyncio.sleep(0.05)
    ready = await http(http_port, "GET", "/readyz")
    assert ready.code == 503 and json_of(ready)["checks"]["scheduler"] == "stopped"


# High: data nested ~300 deep failed other tenants' writes in the shared SQLite group commit ---------------------
# (the store's per-item isolation: test_sqlite_storage.py::test_one_bad_record_never_fails_its_neighbours_in_a_group_commit)


def nested_json(depth: int) -> str:
    """Data ``depth`` levels deep, as JSON text (orjson itself cannot write more than 254 levels)."""
    return '{"a":' * (depth // 2) + "[" * (depth - depth // 2) + "1" + "]" * (depth - depth // 2) + "}" * (depth // 2)


@pytest.mark.gen_test
async def test_data_nested_deeper_than_every_backend_stores_is_refused(http_server, http_port):
    token = make_token("backend")
    for depth in (65, 300):
        for when in ("", ', "delay_s": 5'):
            body = f'{{"channel": "orders", "event": "e", "data": {nested_json(depth)}{when}}}'
            response = await http(http_port, "POST", "/api/events", token=token, raw=body.encode())
            assert response.code == 400 and json_of(response)["code"] == "INVALID_BODY", (depth, when)
    body = f'{{"channel": "orders", "event": "e", "data": {nested_json(64)}}}'
    assert (await http(http_port, "POST", "/api/events", token=token, raw=body.encode())).code == 201
    page = json_of(await http(http_port, "GET", "/api/channels/orders/events", token=token))
    assert [e["data"] for e in page["events"]] == [orjson.loads(nested_json(64))]


# High: unauthenticated bodies up to 100 MiB were buffered, with no body timeout, on every route but POST /api/events


async def raw_request(port: int, head: bytes, body: bytes = b"", *, read_for: float = 3.0) -> tuple[bytes, float]:
    """Send a request as bytes; return everything read until the server closes the connection, and when it did."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = asyncio.get_running_loop().time()
    writer.write(head + body)
    await writer.drain()
    answer = b""
    try:
        async with asyncio.timeout(read_for):
            while chunk := await reader.read(65536):
                answer += chunk
    finally:
        writer.close()
    return answer, asyncio.get_running_loop().time() - started


@pytest.mark.gen_test
@pytest.mark.settings(max_body_bytes=1024, body_timeout=0.3)
async def test_every_route_bounds_the_body_size_and_time(http_server, http_port):
    for path in ("/api/dev-token", "/api/stats", "/healthz", "/sse", "/static/eddy.js", "/nowhere"):
        declared = b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 104857600\r\n\r\n" % path.encode()
        answer, _ = await raw_request(http_port, declared)
        assert answer.startswith(b"HTTP/1.1 400"), (path, answer[:80])  # refused before a byte of it is read
        chunked = b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n" % path.encode()
        answer, _ = await raw_request(http_port, chunked, b"800\r\n" + b"x" * 2048 + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 400"), (path, answer[:80])
        slow = b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n" % path.encode()
        answer, took = await raw_request(http_port, slow, b"{}")
        assert answer == b"" and took < 2.0, (path, answer[:80], took)  # closed after body_timeout
    events = b"POST /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2048\r\n\r\n"
    answer, _ = await raw_request(http_port, events)
    assert answer.startswith((b"HTTP/1.1 401", b"HTTP/1.1 413")), answer[:80]


# Medium: GET/DELETE /api/scheduled skipped the join check ----------------------------------------------------------


async def schedule(port: int, token: str, channel: str, n: int = 0) -> dict:
    response = await http(port, "POST", "/api/events",
                          {"channel": channel, "event": "reminder", "data": {"n": n}, "delay_s": 600}, token)
    assert response.code == 202, response.body
    return json_of(response)["scheduled"]


@pytest.mark.gen_test
async def test_nobody_lists_or_cancels_another_users_scheduled_events(http_server, http_port):
    backend, ana, bob = make_token(**BACKEND), make_token("ana"), make_token("bob")
    for_ana = await schedule(http_port, backend, "user:ana")
    public = await schedule(http_port, backend, "orders")
    listed = json_of(await http(http_port, "GET", "/api/scheduled", token=bob))["scheduled"]
    assert [i["id"] for i in listed] == [public["id"]]
    refused = await http(http_port, "GET", "/api/scheduled?channel=user:ana", token=bob)
    assert refused.code == 403 and json_of(refused)["code"] == "FORBIDDEN"
    assert (await http(http_port, "DELETE", f"/api/scheduled/{for_ana['id']}", token=bob)).code == 404
    mine = json_of(await http(http_port, "GET", "/api/scheduled?channel=user:ana", token=ana))["scheduled"]
    assert [i["id"] for i in mine] == [for_ana["id"]]
    assert (await http(http_port, "DELETE", f"/api/scheduled/{for_ana['id']}", token=ana)).code == 204


@pytest.mark.gen_test
@pytest.mark.rules(RULES)
async def test_scheduled_listing_and_cancel_obey_the_channel_rules(http_server, http_port):
    backend, agent, customer = make_token(**BACKEND), make_token("ana", roles=["agent"]), make_token("joao")
    desk = await schedule(http_port, backend, "desk:1")
    orders = await schedule(http_port, backend, "orders")
    assert [i["id"] for i in json_of(await http(http_port, "GET", "/api/scheduled", token=customer))["scheduled"]] \
        == [orders["id"]]
    assert (await http(http_port, "GET", "/api/scheduled?channel=desk:1", token=customer)).code == 403
    assert (await http(http_port, "DELETE", f"/api/scheduled/{desk['id']}", token=customer)).code == 404
    both = json_of(await http(http_port, "GET", "/api/scheduled", token=agent))["scheduled"]
    assert sorted(i["id"] for i in both) == sorted([desk["id"], orders["id"]])
    assert (await http(http_port, "DELETE", f"/api/scheduled/{desk['id']}", token=agent)).code == 204


# Low: no cap on scheduled events per tenant, and the listing was not paged -------------------------------------


@pytest.mark.gen_test
@pytest.mark.settings(max_scheduled_per_tenant=5)
async def test_scheduled_events_are_capped_per_tenant_and_listed_in_pages(http_server, http_port):
    backend = make_token(**BACKEND)
    made = [await schedule(http_port, backend, "orders", n) for n in range(5)]
    refused = await http(http_port, "POST", "/api/events",
                         {"channel": "orders", "event": "e", "delay_s": 600}, backend)
    assert refused.code == 429 and json_of(refused)["code"] == "TOO_MANY_SCHEDULED"
    other_tenant = make_token("backend", tenant="globex", roles=["publisher"])
    assert (await http(http_port, "POST", "/api/events",
                       {"channel": "orders", "event": "e", "delay_s": 600}, other_tenant)).code == 202
    seen, cursor = [], None
    while True:
        query = "limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = json_of(await http(http_port, "GET", f"/api/scheduled?{query}", token=backend))
        assert len(page["scheduled"]) <= 2
        seen += [i["id"] for i in page["scheduled"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == [i["id"] for i in made]
    for bad in ("limit=0", "limit=1001", "limit=x", "cursor=nonsense", "cursor=inf_abc"):
        response = await http(http_port, "GET", f"/api/scheduled?{bad}", token=backend)
        assert response.code == 400 and json_of(response)["code"] == "INVALID_PARAMETER", bad


# Medium: idempotency keys were tenant-wide and disclosed another user's event --------------------------------------


@pytest.mark.gen_test
async def test_idempotency_keys_belong_to_their_caller(http_server, http_port):
    ana, bob = make_token("ana"), make_token("bob")
    body = {"channel": "orders", "event": "e", "idempotency_key": "k-1"}
    first = json_of(await http(http_port, "POST", "/api/events", {**body, "data": "ana's secret"}, ana))
    theirs = await http(http_port, "POST", "/api/events", {**body, "data": "bob's"}, bob)
    assert theirs.code == 201 and json_of(theirs)["data"] == "bob's" and json_of(theirs)["id"] != first["id"]
    retried = json_of(await http(http_port, "POST", "/api/events", {**body, "data": "again"}, ana))
    assert retried["id"] == first["id"] and retried["data"] == "ana's secret"  # a retry is still stored once
    when = {**body, "idempotency_key": "remind", "delay_s": 600}
    mine = json_of(await http(http_port, "POST", "/api/events", {**when, "data": 1}, ana))["scheduled"]
    other = json_of(await http(http_port, "POST", "/api/events", {**when, "data": 2}, bob))["scheduled"]
    assert mine["id"] != other["id"] and other["data"] == 2
    page = json_of(await http(http_port, "GET", "/api/channels/orders/events", token=ana))
    assert [e["data"] for e in page["events"]] == ["ana's secret", "bob's"]


@pytest.mark.gen_test
@pytest.mark.settings(schedule_interval=0.05)
async def test_the_scheduled_key_prefix_is_reserved(http_server, http_port):
    backend = make_token(**BACKEND)
    item = await schedule(http_port, backend, "orders")
    for key in (f"scheduled:{item['id']}", "scheduled:", "tab\there"):
        response = await http(http_port, "POST", "/api/events",
                              {"channel": "orders", "event": "e", "idempotency_key": key}, backend)
        assert response.code == 400 and json_of(response)["code"] == "INVALID_BODY", key
    assert [i["id"] for i in json_of(await http(http_port, "GET", "/api/scheduled", token=backend))["scheduled"]] \
        == [item["id"]]


# Medium: with a rules file, REST publish ignored the rule's publish list -------------------------------------------


@pytest.mark.gen_test
@pytest.mark.rules(RULES)
async def test_rest_publish_obeys_the_rules_and_server_credentials_target_any_room(http_server, http_port):
    async def status(token: str, channel: str) -> tuple[int, str | None]:
        response = await http(http_port, "POST", "/api/events", {"channel": channel, "event": "e"}, token)
        return response.code, json_of(response).get("code")

    nobody, agent, backend = make_token("eve"), make_token("ana", roles=["agent"]), make_token(**BACKEND)
    for channel in ("role:agent", "user:ana", "tenant", "desk:1", "orders", "unlisted"):
        assert await status(nobody, channel) == (403, "FORBIDDEN"), channel
    assert await status(agent, "desk:1") == (201, None)  # the rule's publish list names agents
    assert await status(agent, "orders") == (403, "FORBIDDEN")  # this rule has no publish list
    assert await status(agent, "user:ana") == (403, "FORBIDDEN")  # built-in rooms: server credentials only
    for channel in ("role:agent", "user:ana", "tenant", "desk:1", "orders"):
        assert await status(backend, channel) == (201, None), channel
    assert await status(backend, "unlisted") == (403, "FORBIDDEN")  # a channel no rule matches: nobody joins it
    # The same for scheduling.
    response = await http(http_port, "POST", "/api/events", {"channel": "user:ana", "event": "e", "delay_s": 9}, nobody)
    assert response.code == 403


# A scheduled event on a `history = false` channel lost `ephemeral` (SQLite, MongoDB) and ended up in history -----
# (every backend: test_storage_contract.py::test_every_draft_field_round_trips_through_scheduling)


@pytest.mark.gen_test
@pytest.mark.rules(RULES)
@pytest.mark.settings(schedule_interval=0.05)
async def test_a_scheduled_event_on_a_channel_without_history_stays_out_of_history(http_server, http_port):
    backend, viewer = make_token(**BACKEND), make_token("ana")
    client = await Client.connect(http_port, "/ws/live/stream", viewer)
    await client.recv_type("connected")
    response = await http(http_port, "POST", "/api/events", {"channel": "live", "event": "tick", "delay_s": 0.1}, backend)
    assert response.code == 202
    assert (await client.recv_type("event", timeout=5))["event"] == "tick"  # delivered live
    page = json_of(await http(http_port, "GET", "/api/channels/live/events", token=viewer))
    assert page["events"] == []
    client.close()


# A recreated store was a silent gap: a resume from the old store's ids got nothing and no `lost` -----------------


@pytest.mark.gen_test(timeout=60)
async def test_a_resume_against_a_recreated_store_is_history_lost(tmp_path):
    from tests.processes import EddyProcess

    database = tmp_path / "eddy.db"
    token = make_token(**BACKEND)

    async def run_server() -> EddyProcess:
        server = EddyProcess(tmp_path, f"sqlite:///{database}", port=port)
        await asyncio.get_running_loop().run_in_executor(None, server.wait_ready)
        return server

    port = None
    server = await run_server()
    port = server.port
    try:
        ids = [(await publish(port, "orders", data={"n": n}, token=token))["id"] for n in range(5)]
        first = json_of(await http(port, "GET", "/api/channels/orders/events", token=token))
        epoch = first["epoch"]
        kept = json_of(await http(port, "GET", f"/api/channels/orders/events?after={ids[1]}&epoch={epoch}",
                                  token=token))
        assert [e["id"] for e in kept["events"]] == ids[2:] and kept["epoch"] == epoch
    finally:
        server.stop()
    for path in tmp_path.glob("eddy.db*"):
        path.unlink()  # the operator recreates the store
    server = await run_server()
    try:
        await publish(port, "orders", data={"n": "new"}, token=token)  # position 1 of the new store
        for query in (f"after={ids[1]}&epoch={epoch}", f"after={ids[-1]}"):  # with its epoch, or an id from beyond
            response = await http(port, "GET", f"/api/channels/orders/events?{query}", token=token)
            assert response.code == 410 and json_of(response)["code"] == "HISTORY_LOST", query
        fresh = json_of(await http(port, "GET", "/api/channels/orders/events", token=token))
        assert fresh["epoch"] != epoch and [e["data"] for e in fresh["events"]] == [{"n": "new"}]
    finally:
        server.stop()


# Low: user ids outside the channel charset got a `user:` room that REST and SSE could not address ----------------


def test_room_names_escape_what_the_channel_charset_cannot_hold():
    from service.frames import is_valid_channel
    from service.rules import user_room

    assert user_room("ana") == "user:ana" and user_room("ana@example.com") == "user:ana@example.com"
    names = ["auth0|abc", "José", "a b", "@ana", "x" * 300, "ana@", "", "ünïcode" * 40]
    rooms = [user_room(name) for name in names]
    assert all(is_valid_channel(room) for room in rooms), rooms
    assert len(set(rooms)) == len(names)  # distinct users, distinct rooms
    assert user_room("@ana") != "user:@ana"  # a plain id never looks like an escaped one


@pytest.mark.gen_test
async def test_a_user_id_outside_the_charset_has_one_room_on_every_transport(http_server, http_port):
    from service.rules import user_room

    token = make_token("auth0|abc")
    room = user_room("auth0|abc")
    client = await Client.connect(http_port, "/ws", token)
    assert room in (await client.recv_type("connected"))["channels"]
    stream = await http(http_port, "GET", f"/api/channels/{room}/events", token=token)
    assert stream.code == 200
    assert (await http(http_port, "GET", f"/api/channels/{room}/events", token=make_token("auth0"))).code == 403
    sent = await publish(http_port, room, "notice", {"to": "auth0|abc"}, make_token(**BACKEND))
    assert (await client.recv_type("event"))["id"] == sent["id"]
    page = json_of(await http(http_port, "GET", f"/api/channels/{room}/events", token=token))
    assert [e["id"] for e in page["events"]] == [sent["id"]]
    client.close()


# Low: a refresh token with exp=1e300 gave INTERNAL_ERROR -------------------------------------------------------------


@pytest.mark.gen_test
async def test_a_token_expiring_beyond_any_date_is_invalid_everywhere(http_server, http_port):
    forever = make_token("alice", exp=1e300)
    client = await Client.connect(http_port, "/ws", make_token("alice"))
    await client.recv_type("connected")
    answer = await client.request({"type": "authenticate", "ref": 1, "token": forever})
    assert (answer["type"], answer["code"]) == ("error", "TOKEN_INVALID"), answer
    assert (await client.request({"type": "ping", "ref": 2}))["type"] == "pong"  # the socket lives on
    response = await http(http_port, "GET", "/api/stats", token=forever)
    assert response.code == 401 and json_of(response)["code"] == "TOKEN_INVALID"
    far = make_token("alice", exp=253402300799)  # the last second of year 9999 still works
    assert (await client.request({"type": "authenticate", "ref": 3, "token": far}))["type"] == "ack"
    client.close()


# The service API the session core (issue 13) publishes through: the socket's rules, keys scoped to the caller ------


@pytest.mark.gen_test
@pytest.mark.rules(RULES)
async def test_socket_publishing_through_the_service_obeys_rules_and_scopes_keys(eddy):
    from service.auth import Identity
    from service.errors import ChannelRefused

    ana, bia = Identity("ana", "acme", ("agent",)), Identity("bia", "acme", ("agent",))
    first = await eddy.publish(ana, "desk:1", "m", {"n": 1}, idempotency_key="k", via="socket")
    again = await eddy.publish(ana, "desk:1", "m", {"n": 2}, idempotency_key="k", via="socket")
    theirs = await eddy.publish(bia, "desk:1", "m", {"n": 3}, idempotency_key="k", via="socket")
    assert again.position == first.position and theirs.position != first.position and theirs.data == {"n": 3}
    for identity, channel in ((Identity("eve", "acme"), "desk:1"), (ana, "orders"),
                              (Identity("x", "acme", ("publisher",)), "user:ana")):
        with pytest.raises(ChannelRefused):
            await eddy.publish(identity, channel, "m", None, via="socket")
