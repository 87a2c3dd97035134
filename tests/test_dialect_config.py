"""The [socketio] mapping and its templates: read once at start, mistakes named by table and field."""

from __future__ import annotations

import pytest

from service.auth import Identity
from service.dialects.mapping import Operation, parse_socketio
from service.dialects.templates import Template, TemplateError, render


def test_templates_both_ways():
    template = Template("conversation:{conversation_id}")
    assert template.render({"conversation_id": "42"}) == "conversation:42"
    assert template.match("conversation:42") == {"conversation_id": "42"}
    assert template.match("conversation:42:extra") is None  # a placeholder is one segment
    assert Template("empresa:{tenant}:atendentes").match("empresa:acme:atendentes") == {"tenant": "acme"}
    # one placeholder alone keeps the JSON type; otherwise formatted
    assert render({"typing": "{is_typing}", "text": "id {n}"}, {"is_typing": False, "n": 7}) == \
        {"typing": False, "text": "id 7"}
    with pytest.raises(TemplateError, match="conversation_id required"):
        template.render({})
    with pytest.raises(TemplateError):
        template.render({"conversation_id": {"nested": 1}})


def test_seed_mappings_and_rooms_from_the_token():
    namespaces = parse_socketio({"namespaces": [{
        "name": "/atendimento",
        "rooms": ["user:{user_id}", "empresa:{tenant}", {"room": "empresa:{tenant}:atendentes", "role": "atendente"}],
        "events": [{"event": "ticket:entrar", "do": "join", "channel": "ticket:{ticketId}",
                    "ack": {"success": True, "ticketId": "{ticketId}"}}],
    }]})
    namespace = namespaces["/atendimento"]
    assert namespace.events["ticket:entrar"].operation is Operation.JOIN
    assert namespace.rooms_for(Identity("ana", "e1", ("atendente",))) == \
        ["user:ana", "empresa:e1", "empresa:e1:atendentes"]
    assert namespace.rooms_for(Identity("cli", "e1", ("cliente",))) == ["user:cli", "empresa:e1"]
    # no [socketio] table: "/" with Eddy's own automatic rooms
    assert parse_socketio(None)["/"].rooms_for(Identity("ana", "e1", ("agent",))) == ["user:ana", "tenant", "role:agent"]


@pytest.mark.parametrize("table, message", [
    ({"namespaces": [{"name": "atendimento"}]}, r"socketio.namespaces\[0\].name"),
    ({"namespaces": [{"events": [{"event": "x", "do": "fly"}]}]}, r"events\[0\].do: one of join"),
    ({"namespaces": [{"events": [{"event": "x", "do": "join"}]}]}, r"events\[0\].channel: join needs a channel"),
    ({"namespaces": [{"events": [{"event": "x", "do": "join", "channel": "c:{a.b}"}]}]}, r"events\[0\].channel"),
    ({"namespaces": [{"events": [{"event": "x", "do": "ping", "colour": 1}]}]}, r"unknown field\(s\) colour"),
    ({"namespaces": [{"signals": [{"signal": "wave", "event": "w"}]}]}, r"signals\[0\].signal"),
    ({"namespaces": [{"name": "/"}, {"name": "/"}]}, r"namespace / given twice"),
    ({"namespaces": [{"rooms": [{"room": 1}]}]}, r"rooms\[0\]"),
])
def test_mistakes_name_the_table_and_field(table, message):
    with pytest.raises(ValueError, match=message):
        parse_socketio(table)


@pytest.mark.gen_test
async def test_a_stale_socket_does_not_overwrite_the_record_of_the_one_that_recovered_it():
    from service.dialects.recovery import RecoveryStore, SessionRecord
    from storage import open_storage

    storage = open_storage("memory://")
    await storage.open()
    try:
        store, identity = RecoveryStore(storage, window=60), Identity("ana", "e1")
        stale = SessionRecord("pid-1", "sid-1", "/", {"ticket:1": 10})
        await store.save(identity, stale)
        recovered = await store.load(identity, "pid-1", "/")
        assert recovered is not None and recovered.rooms == {"ticket:1": 10}
        recovered.holder = "the-new-socket"
        recovered.rooms["ticket:2"] = 20
        await store.save(identity, recovered)
        await store.release(identity, stale)  # the old transport's ping timeout, later
        current = await store.load(identity, "pid-1", "/")
        assert current is not None and current.rooms == {"ticket:1": 10, "ticket:2": 20}
        assert await store.load(Identity("eve", "e1"), "pid-1", "/") is None  # another user cannot recover it
        assert await store.load(identity, "pid-1", "/other") is None
        await store.forget(identity, recovered)
        assert await store.load(identity, "pid-1", "/") is None
    finally:
        await storage.close()
