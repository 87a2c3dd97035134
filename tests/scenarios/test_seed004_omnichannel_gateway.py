"""Seed 004: the multi-tenant omnichannel gateway (user, tenant, role and ticket rooms, acks, presence)."""

from __future__ import annotations

import json

import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web

from tests.support import Client, make_token, publish

TICKET = "550e8400-e29b-41d4-a716-446655440000"
RULES = """
tenant_claim = "empresaId"

[[channels]]
pattern = "ticket:*"
join = ["role:atendente", "role:gestor", "role:admin"]
id_pattern = "uuid"
authorizer = "http://127.0.0.1:{port}/tickets/can-join"

[[channels]]
pattern = "atendentes"
join = ["role:atendente", "role:gestor"]
"""


class TicketExists(tornado.web.RequestHandler):
    """The app's check: the ticket exists in the caller's tenant (the seed's RLS set_current_tenant)."""

    def post(self):
        body = json.loads(self.request.body)
        self.set_status(200 if (body["tenant"], body["channel"]) == ("empresa-1", f"ticket:{TICKET}") else 404)


@pytest.fixture
def app_port(io_loop):
    server = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/tickets/can-join", TicketExists)]))
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server.add_sockets(sockets)
    yield sockets[0].getsockname()[1]
    server.stop()


@pytest.fixture
def settings(settings, tmp_path, app_port):
    from service.config import read_config_file

    path = tmp_path / "eddy.toml"
    path.write_text(RULES.format(port=app_port))
    return settings.with_changes(config=str(path), **read_config_file(str(path))[0])


def token(user: str, role: str, empresa: str = "empresa-1") -> str:
    return make_token(user, tenant=None, roles=[role], empresaId=empresa)


@pytest.mark.gen_test
async def test_omnichannel_gateway(http_server, http_port):
    # handleConnection: validate JWT, join user:{id}, empresa:{id} (tenant), empresa:{id}:atendentes (role)
    maria = await Client.connect(http_port, "/ws", token("maria", "atendente"))
    pedro = await Client.connect(http_port, "/ws", token("pedro", "atendente"))
    cliente = await Client.connect(http_port, "/ws", token("cliente-9", "cliente"))
    rival = await Client.connect(http_port, "/ws", token("zeca", "atendente", empresa="empresa-2"))
    rooms = (await maria.recv())["channels"]
    assert rooms == ["role:atendente", "tenant", "user:maria"]
    for client in (pedro, cliente, rival):
        await client.recv()
    backend = token("backend", "publisher")

    # ticket:entrar with ack: roles + tenant + the ticket must exist in the tenant
    ok = await maria.request({"type": "join", "channel": f"ticket:{TICKET}", "ref": 1})
    assert (ok["type"], ok["ref"], ok["channel"]) == ("ack", 1, f"ticket:{TICKET}") and int(ok["last_id"]) >= 0
    assert (await pedro.request({"type": "join", "channel": f"ticket:{TICKET}", "ref": 1}))["type"] == "ack"
    refused = [
        (cliente, f"ticket:{TICKET}", "FORBIDDEN"),   # not an internal role
        (rival, f"ticket:{TICKET}", "FORBIDDEN"),     # the ticket is not in empresa-2
        (maria, "ticket:550e8400-e29b-41d4-a716-000000000000", "FORBIDDEN"),  # no such ticket
    ]
    for client, channel, code in refused:
        assert (await client.request({"type": "join", "channel": channel, "ref": 2}))["code"] == code

    # mensagem:digitando → the ticket's participants except the sender
    maria.send({"type": "typing", "channel": f"ticket:{TICKET}", "is_typing": True})
    assert (await pedro.recv_type("typing"))["user_id"] == "maria"

    # mensagem:nova → ticket room; mensagem:nao-atribuida → every agent of the tenant only
    await publish(http_port, f"ticket:{TICKET}", "mensagem:nova", {"ticketId": TICKET, "conteudo": "Olá"}, backend)
    for client in (maria, pedro):
        assert (await client.recv_type("event"))["event"] == "mensagem:nova"
    await publish(http_port, "role:atendente", "mensagem:nao-atribuida", {"ticket": {"numero": "42"}}, backend)
    for client in (maria, pedro):
        assert (await client.recv_type("event"))["event"] == "mensagem:nao-atribuida"
    # ticket:atribuido → user:{atendenteId}
    await publish(http_port, "user:pedro", "ticket:atribuido", {"ticketId": TICKET, "atendenteId": "pedro"}, backend)
    assert (await pedro.recv_type("event"))["event"] == "ticket:atribuido"
    # ticket:novo → empresa room (tenant)
    await publish(http_port, "tenant", "ticket:novo", {"numero": "43"}, backend)
    for client in (maria, pedro, cliente):
        assert (await client.recv_type("event"))["event"] == "ticket:novo"
    assert await rival.no_frame_within(0.2)  # empresa-2 never sees empresa-1
    assert await cliente.no_frame_within(0.05)

    # atendente:status / online / offline → presence in the agents' channel
    for client in (maria, pedro):
        assert (await client.request({"type": "join", "channel": "atendentes", "ref": 3}))["type"] == "ack"
    assert (await maria.recv_type("presence"))["user_id"] == "pedro"
    assert (await pedro.request({"type": "presence", "status": "busy", "ref": 4}))["status"] == "busy"
    status = await maria.recv_type("presence")
    assert (status["user_id"], status["status"]) == ("pedro", "busy")
    listed = await maria.request({"type": "presence_query", "channel": "atendentes", "ref": 5})
    assert {u["user_id"]: u["status"] for u in listed["users"]} == {"maria": "online", "pedro": "busy"}
    pedro.close()
    # Maria shares two channels with pedro (the ticket and the agents'): one presence frame per channel.
    offline = await maria.recv_type("presence")
    while offline["channel"] != "atendentes" or offline["status"] != "offline":
        assert offline["user_id"] == "pedro" and offline["status"] in ("busy", "offline"), offline
        offline = await maria.recv_type("presence")
    assert (offline["user_id"], offline["status"]) == ("pedro", "offline")

    # ticket:sair
    assert (await maria.request({"type": "leave", "channel": f"ticket:{TICKET}", "ref": 6}))["type"] == "ack"
    for client in (maria, cliente, rival):
        client.close()
