"""Property: a client only ever receives events of rooms it was allowed to join, in its own tenant.

Hypothesis draws tenants, users, roles, join attempts and published events; each example runs a real Eddy with
real sockets. The expected permissions come from a model written independently of ``service/rules.py``.
"""

from __future__ import annotations

import asyncio

import pytest
import tornado.httpserver
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.app import Eddy
from service.config import Settings
from storage import EventDraft
from tests.processes import free_port
from tests.support import SECRET, Client, make_token

UUID = "158803db-1111-4c4c-8888-7f22a9c1aaaa"
RULES = """
[[channels]]
pattern = "conversation:*"
join = ["role:agent", "role:admin"]
id_pattern = "uuid"

[[channels]]
pattern = "orders"
join = ["tenant"]
"""
TENANTS = ["acme", "globex"]
USERS = ["u1", "u2", "u3"]
ROLES = ["agent", "admin", "customer"]
CHANNELS = ["orders", f"conversation:{UUID}", "conversation:not-a-uuid", "ticket:1", "user:u1", "user:u2",
            "role:agent", "role:admin", "tenant", "unlisted"]


def model_may_join(user: str, roles: frozenset[str], channel: str, rules: bool) -> bool:
    if channel.startswith("user:"):
        return channel == f"user:{user}"
    if channel.startswith("role:"):
        return channel[5:] in roles
    if channel == "tenant":
        return True
    if not rules:
        return True
    if channel == "orders":
        return True
    if channel == f"conversation:{UUID}":
        return bool(roles & {"agent", "admin"})
    return False  # bad id, or no rule matches


identities = st.tuples(st.sampled_from(TENANTS), st.sampled_from(USERS), st.frozensets(st.sampled_from(ROLES)))
clients = st.lists(st.tuples(identities, st.lists(st.sampled_from(CHANNELS), max_size=5)), min_size=1, max_size=4)
events = st.lists(st.tuples(st.sampled_from(TENANTS), st.sampled_from(CHANNELS)), min_size=1, max_size=12)


async def scenario(tmp_path, use_rules: bool, drawn_clients, drawn_events) -> None:
    config = ""
    if use_rules:
        (tmp_path / "rules.toml").write_text(RULES)
        config = str(tmp_path / "rules.toml")
    eddy = Eddy(Settings(storage="memory://", jwt_secret=SECRET, keepalive_interval=0, ping_interval=0,
                         ping_timeout=0, config=config, max_connections_per_user=100))
    await eddy.start()
    port = free_port()
    server = tornado.httpserver.HTTPServer(eddy.make_app())
    server.listen(port, "127.0.0.1")
    try:
        connected = []
        for (tenant, user, roles), joins in drawn_clients:
            client = await Client.connect(port, "/ws", make_token(user, tenant=tenant, roles=sorted(roles)))
            allowed = set((await client.recv())["channels"])
            for ref, channel in enumerate(joins):
                answer = await client.request({"type": "join", "channel": channel, "ref": ref})
                expected = model_may_join(user, roles, channel, use_rules)
                assert (answer["type"] == "ack") == expected, (user, roles, channel, answer)
                if expected:
                    allowed.add(channel)
            assert all(model_may_join(user, roles, c, use_rules) for c in allowed)
            connected.append((tenant, allowed, client))

        published = [await eddy.storage.append(EventDraft(tenant, channel, "e", {"n": n}))
                     for n, (tenant, channel) in enumerate(drawn_events)]
        while eddy.watcher.position is None or eddy.watcher.position < published[-1].position:
            await asyncio.sleep(0.005)

        for tenant, allowed, client in connected:
            expected = [e.id for e in published if e.tenant == tenant and e.channel in allowed]
            received = []
            while True:
                try:
                    frame = await client.recv(0.05)
                except TimeoutError:
                    break
                if frame["type"] == "presence":  # others joining: also only from allowed rooms
                    assert frame["channel"] in allowed
                    continue
                assert frame["type"] == "event"
                received.append(frame["id"])
            assert received == expected
            client.close()
    finally:
        server.stop()
        await eddy.stop()


@pytest.mark.parametrize("use_rules", [False, True], ids=["default-rules", "rules-file"])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(drawn_clients=clients, drawn_events=events)
def test_clients_receive_only_what_they_may(tmp_path, use_rules, drawn_clients, drawn_events):
    asyncio.run(scenario(tmp_path, use_rules, drawn_clients, drawn_events))
