"""Identity, rooms and permissions over real sockets: automatic rooms, rules, authorizer, tokens."""

from __future__ import annotations

import asyncio
import json

import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web
from tornado.httpclient import HTTPClientError

from tests.support import Client, backend_token, http, json_of, make_token, publish

RULES = """
[[channels]]
pattern = "conversation:*"
join = ["role:agent", "role:admin"]
publish = ["role:agent"]
id_pattern = "uuid"

[[channels]]
pattern = "ticket:*"
join = ["role:agent"]
authorizer = "http://127.0.0.1:{authorizer_port}/authorize"

[[channels]]
pattern = "orders"
join = ["tenant"]
"""

CONVERSATION = "conversation:158803db-1111-4c4c-8888-7f22a9c1aaaa"


# Automatic rooms and server-side targeting -----------------------------------

@pytest.mark.gen_test
async def test_automatic_rooms_target_a_user_a_role_and_a_tenant(http_server, http_port):
    alice_desktop = await Client.connect(http_port, "/ws", make_token("alice", roles=["agent"]))
    alice_phone = await Client.connect(http_port, "/ws", make_token("alice", roles=["agent"]))
    bob = await Client.connect(http_port, "/ws", make_token("bob", roles=["customer"]))
    other_tenant_agent = await Client.connect(http_port, "/ws", make_token("carol", tenant="globex", roles=["agent"]))
    for client in (alice_desktop, alice_phone, bob, other_tenant_agent):
        await client.recv()
    backend = backend_token()

    await publish(http_port, "user:alice", "notificacao", {"to": "alice"}, backend)
    for device in (alice_desktop, alice_phone):
        assert (await device.recv_type("event"))["channel"] == "user:alice"
    await publish(http_port, "role:agent", "ticket:novo", {"to": "agents"}, backend)
    for device in (alice_desktop, alice_phone):
        assert (await device.recv_type("event"))["channel"] == "role:agent"
    await publish(http_port, "tenant", "broadcast", {"to": "everyone"}, backend)
    for client in (alice_desktop, alice_phone, bob):
        assert (await client.recv_type("event"))["channel"] == "tenant"
    assert await bob.no_frame_within(0.2)
    assert await other_tenant_agent.no_frame_within(0.1)
    for client in (alice_desktop, alice_phone, bob, other_tenant_agent):
        client.close()


@pytest.mark.gen_test
async def test_builtin_rooms_are_guarded(http_server, http_port):
    client = await Client.connect(http_port, "/ws", make_token("alice", roles=["customer"]))
    await client.recv()
    assert (await client.request({"type": "join", "channel": "role:agent", "ref": 1}))["code"] == "FORBIDDEN"
    assert (await client.request({"type": "join", "channel": "user:bob", "ref": 2}))["code"] == "FORBIDDEN"
    assert (await client.request({"type": "join", "channel": "role:customer", "ref": 3}))["type"] == "ack"
    client.close()


# Rules and the join authorizer ---------------------------------------------------

class Authorizer(tornado.web.RequestHandler):
    calls: list[dict] = []
    delay = 0.0

    async def post(self):
        body = json.loads(self.request.body)
        Authorizer.calls.append(body)
        await asyncio.sleep(Authorizer.delay)
        # The application knows ticket 1 and 2 exist in tenant acme.
        allowed = body["tenant"] == "acme" and body["channel"] in ("ticket:1", "ticket:2")
        self.set_status(200 if allowed else 403)


@pytest.fixture
def authorizer_port(io_loop):
    Authorizer.calls, Authorizer.delay = [], 0.0
    server = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/authorize", Authorizer)]))
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server.add_sockets(sockets)
    yield sockets[0].getsockname()[1]
    server.stop()


@pytest.fixture
def settings(settings, tmp_path, authorizer_port):
    path = tmp_path / "eddy.toml"
    path.write_text(RULES.format(authorizer_port=authorizer_port))
    return settings.with_changes(config=str(path), authorizer_timeout=0.5)


@pytest.mark.gen_test
async def test_rules_decide_joins_and_refusals_keep_other_rooms(http_server, http_port):
    agent = await Client.connect(http_port, "/ws", make_token("ana", roles=["agent"]))
    customer = await Client.connect(http_port, "/ws", make_token("joao", roles=["customer"]))
    await agent.recv()
    await customer.recv()
    assert (await agent.request({"type": "join", "channel": CONVERSATION, "ref": 1}))["type"] == "ack"
    assert (await customer.request({"type": "join", "channel": "orders", "ref": 1}))["type"] == "ack"
    refusals = [
        (customer, CONVERSATION, "FORBIDDEN"),            # role rule
        (agent, "conversation:not-a-uuid", "INVALID_CHANNEL"),  # id pattern
        (agent, "unlisted", "FORBIDDEN"),                 # no rule matches
        (customer, "ticket:1", "FORBIDDEN"),              # role checked before the authorizer
    ]
    for client, channel, code in refusals:
        error = await client.request({"type": "join", "channel": channel, "ref": "r"})
        assert (error["type"], error["code"], error["ref"]) == ("error", code, "r"), channel
    # The refused client is not in the room; its other rooms still work.
    await publish(http_port, CONVERSATION, "message", {"text": "oi"}, backend_token())
    await publish(http_port, "orders", "pedido_criado", {"id": 1}, backend_token())
    assert (await agent.recv_type("event"))["channel"] == CONVERSATION
    assert (await customer.recv_type("event"))["channel"] == "orders"
    assert await customer.no_frame_within(0.2)
    # REST publishing to a channel no rule covers is refused too.
    response = await http(http_port, "POST", "/api/events", {"channel": "unlisted", "event": "e"}, backend_token())
    assert response.code == 403 and json_of(response)["code"] == "FORBIDDEN"
    agent.close()
    customer.close()


@pytest.mark.gen_test
async def test_join_authorizer_allows_refuses_and_caches(http_server, http_port):
    agent = await Client.connect(http_port, "/ws", make_token("ana", roles=["agent"]))
    await agent.recv()
    assert (await agent.request({"type": "join", "channel": "ticket:1", "ref": 1}))["type"] == "ack"
    assert Authorizer.calls == [{"user_id": "ana", "tenant": "acme", "roles": ["agent"], "channel": "ticket:1"}]
    assert (await agent.request({"type": "join", "channel": "ticket:404", "ref": 2}))["code"] == "FORBIDDEN"
    await agent.request({"type": "leave", "channel": "ticket:1", "ref": 3})
    assert (await agent.request({"type": "join", "channel": "ticket:1", "ref": 4}))["type"] == "ack"
    assert len(Authorizer.calls) == 2  # the second ticket:1 answer came from the cache
    # A path channel goes through the same check at the handshake.
    with pytest.raises(HTTPClientError) as refused:
        await Client.connect(http_port, "/ws/ticket:404/stream", make_token("ana", roles=["agent"]))
    assert refused.value.code == 403
    Authorizer.delay = 2.0  # slower than authorizer_timeout
    error = await agent.request({"type": "join", "channel": "ticket:2", "ref": 5})
    assert error["code"] == "AUTHORIZER_UNAVAILABLE"
    agent.close()
