"""Seeds 002 and 004 with their own clients, unchanged: socket.io-client (both transports) and python-socketio.

The server runs with examples/seed002.toml or examples/seed004.toml; every event a test sees comes through
Eddy's hub from the store (REST publishes, other sockets' typing and status), as for native clients.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from service.config import Settings
from tests.socketio_clients import Clients, NodeClients, PythonClients
from tests.support import SECRET, make_token, publish

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CONVERSATION = "158803db-8e37-421b-b6ba-4df94d82ba9e"
QUIET = 0.3  # seconds a socket is watched to show it received nothing

#: (client kind, socket.io options): socket.io-client's default (polling, then the upgrade), the seed's own
#: transports list, WebSocket only; python-socketio's default.
VARIANTS = {
    "node-default": ("node", {}),
    "node-seed-transports": ("node", {"transports": ["websocket", "polling"]}),
    "node-polling-only": ("node", {"transports": ["polling"]}),
    "python": ("python", {}),
}


def seed_settings(tmp_path: Path, example: str, **changes: Any) -> Settings:
    return Settings.from_env({}, config=str(EXAMPLES / example), storage=f"sqlite:///{tmp_path}/eddy.db",
                             jwt_secret=SECRET, keepalive_interval=0, ping_interval=0, ping_timeout=0, **changes)


async def start_clients(kind: str) -> Clients:
    return await NodeClients.start() if kind == "node" else PythonClients()


def seed002_token(sub: str, organization: str = "org-1", role: str = "agent") -> str:
    return make_token(sub, tenant=None, organization_id=organization, role=role)


def seed004_token(sub: str, empresa: str = "empresa-1", role: str = "atendente") -> str:
    return make_token(sub, tenant=None, empresaId=empresa, role=role)


async def quiet(clients: Clients, socket_id: str, event: str) -> bool:
    """True when ``socket_id`` received no ``event`` within QUIET seconds."""
    await asyncio.sleep(QUIET)
    return not clients.events(socket_id, event)


class TestSeed002:
    @pytest.fixture
    def settings(self, tmp_path):
        return seed_settings(tmp_path, "seed002.toml")

    @pytest.mark.gen_test(timeout=60)
    @pytest.mark.parametrize("variant", VARIANTS)
    async def test_conversation_flow(self, http_server, http_port, variant):
        kind, options = VARIANTS[variant]
        clients = await start_clients(kind)
        url = f"http://127.0.0.1:{http_port}"
        try:
            for sub in ("ana", "bia"):
                await clients.connected(sub, url, auth={"token": seed002_token(sub)}, **options)
                greeting = await clients.next(sub, "event", "connected")
                assert greeting["args"][0] == {"message": "Connected to PyTake WebSocket", "user_id": sub}
            await clients.connect("other", url, auth={"token": seed002_token("oscar", organization="org-2")}, **options)
            await clients.next("other", "event", "connected")

            for sub in ("ana", "bia", "other"):
                await clients.emit(sub, "join_conversation", {"conversation_id": CONVERSATION})
                joined = await clients.next(sub, "event", "joined_conversation")
                assert joined["args"][0]["conversation_id"] == CONVERSATION
            await clients.emit("ana", "join_conversation", {"conversation_id": "not-a-uuid"})
            refused = await clients.next("ana", "event", "error")
            assert "uuid" in refused["args"][0]["message"]

            # typing_start / typing_stop reach the other members, never the sender
            await clients.emit("ana", "typing_start", {"conversation_id": CONVERSATION})
            typing = await clients.next("bia", "event", "user_typing")
            assert typing["args"][0] == {"conversation_id": CONVERSATION, "user_id": "ana", "typing": True}
            await clients.emit("ana", "typing_stop", {"conversation_id": CONVERSATION})
            stopped = await clients.next("bia", "event", "user_typing")
            assert stopped["args"][0]["typing"] is False
            assert await quiet(clients, "ana", "user_typing")

            # the backend's emit_to_conversation / emit_to_user, done by publishing over REST
            backend = seed002_token("backend", role="publisher")
            message = {"id": "m-1", "conversation_id": CONVERSATION, "direction": "inbound", "content": {"text": "oi"}}
            await publish(http_port, f"conversation:{CONVERSATION}", "message:new", message, backend)
            await publish(http_port, f"conversation:{CONVERSATION}", "message:status",
                          {"message_id": "m-1", "status": "read"}, backend)
            await publish(http_port, "user:bia", "notification", {"text": "só para bia"}, backend)
            for sub in ("ana", "bia"):
                assert (await clients.next(sub, "event", "message:new"))["args"][0] == message
                assert (await clients.next(sub, "event", "message:status"))["args"][0]["status"] == "read"
            assert (await clients.next("bia", "event", "notification"))["args"][0] == {"text": "só para bia"}
            assert not clients.events("ana", "notification")
            # another organization, in a room of the same name, receives nothing
            assert await quiet(clients, "other", "message:new")

            await clients.emit("ana", "ping")
            pong = await clients.next("ana", "event", "pong")
            assert pong["args"][0]["timestamp"].endswith("Z")

            await clients.emit("ana", "leave_conversation", {"conversation_id": CONVERSATION})
            left = await clients.next("ana", "event", "left_conversation")
            assert left["args"][0] == {"conversation_id": CONVERSATION}
            await publish(http_port, f"conversation:{CONVERSATION}", "message:new", {"id": "m-2"}, backend)
            assert (await clients.next("bia", "event", "message:new"))["args"][0] == {"id": "m-2"}
            assert await quiet(clients, "ana", "message:new")

            if kind == "node":  # which transports socket.io-client actually used
                opened, upgraded = await clients.next("ana", "open"), clients.events("ana", "upgrade")
                transports = [opened["transport"], *(u["transport"] for u in upgraded)]
                if variant == "node-default":  # polling first, then the upgrade
                    assert transports == ["polling", "websocket"]
                elif variant == "node-seed-transports":
                    assert transports == ["websocket"]
                else:
                    assert transports == ["polling"]
        finally:
            await clients.close()

    @pytest.mark.gen_test(timeout=30)
    @pytest.mark.parametrize("variant", ["node-default", "python"])
    async def test_refused_token_gets_connect_error(self, http_server, http_port, variant):
        kind, options = VARIANTS[variant]
        clients = await start_clients(kind)
        try:
            await clients.connect("eve", f"http://127.0.0.1:{http_port}", auth={"token": "not-a-jwt"}, **options)
            refused = await clients.next("eve", "connect_error")
            assert "invalid token" in refused["message"]
        finally:
            await clients.close()


class TestSeed004:
    @pytest.fixture
    def settings(self, tmp_path):
        return seed_settings(tmp_path, "seed004.toml")

    @pytest.mark.gen_test(timeout=60)
    @pytest.mark.parametrize("variant", ["node-default", "node-seed-transports", "python"])
    async def test_omnichannel_flow(self, http_server, http_port, variant):
        kind, options = VARIANTS[variant]
        clients = await start_clients(kind)
        url = f"http://127.0.0.1:{http_port}/atendimento"
        header = "extraHeaders" if kind == "node" else "headers"
        try:
            # the seed's two ways to authenticate: auth.token and an Authorization header
            await clients.connect("ana", url, auth={"token": seed004_token("ana")}, **options)
            await clients.connect("beto", url, **{header: {"Authorization": f"Bearer {seed004_token('beto')}"}}, **options)
            await clients.connect("cli", url, auth={"token": seed004_token("cli", role="cliente")}, **options)
            await clients.connect("outra", url, auth={"token": seed004_token("olga", empresa="empresa-2")}, **options)
            for sub in ("ana", "beto", "cli", "outra"):
                await clients.next(sub, "connect")

            ticket = "550e8400-e29b-41d4-a716-446655440000"
            for sub in ("ana", "beto", "outra"):
                assert await clients.emit_with_ack(sub, "ticket:entrar", {"ticketId": ticket}) == \
                    [{"success": True, "ticketId": ticket}]
            refused = await clients.emit_with_ack("cli", "ticket:entrar", {"ticketId": ticket})
            assert refused[0]["success"] is False and "not allowed" in refused[0]["error"]

            await clients.emit("ana", "mensagem:digitando", {"ticketId": ticket})
            typing = await clients.next("beto", "event", "mensagem:digitando")
            assert typing["args"][0] == {"ticketId": ticket, "usuarioId": "ana"}
            assert await quiet(clients, "ana", "mensagem:digitando")

            assert await clients.emit_with_ack("ana", "atendente:status", {"status": "ocupado"}) == [{"success": True}]
            for sub in ("ana", "beto"):
                status = (await clients.next(sub, "event", "atendente:status"))["args"][0]
                assert (status["atendenteId"], status["status"]) == ("ana", "ocupado") and status["timestamp"]
            refused = await clients.emit_with_ack("cli", "atendente:status", {"status": "online"})
            assert refused[0]["success"] is False
            assert not clients.events("cli", "atendente:status")

            backend = seed004_token("api", role="publisher")
            await publish(http_port, f"ticket:{ticket}", "mensagem:nova", {"id": "m1", "ticketId": ticket,
                                                                           "conteudo": "Olá"}, backend)
            await publish(http_port, "empresa:empresa-1:atendentes", "ticket:novo", {"id": "t2", "numero": "42"},
                          backend)
            await publish(http_port, "empresa:empresa-1", "ticket:atualizado", {"ticketId": ticket}, backend)
            await publish(http_port, f"ticket:{ticket}", "ticket:status", {"ticketId": ticket, "status": "resolvido"},
                          backend)
            await publish(http_port, "user:cli", "notificacao", {"tipo": "aviso", "mensagem": "oi"}, backend)
            for sub in ("ana", "beto"):
                assert (await clients.next(sub, "event", "mensagem:nova"))["args"][0]["conteudo"] == "Olá"
                assert (await clients.next(sub, "event", "ticket:novo"))["args"][0]["numero"] == "42"
                assert (await clients.next(sub, "event", "ticket:status"))["args"][0]["status"] == "resolvido"
            assert (await clients.next("cli", "event", "ticket:atualizado"))["args"][0] == {"ticketId": ticket}
            assert (await clients.next("cli", "event", "notificacao"))["args"][0]["tipo"] == "aviso"
            assert not clients.events("cli", "ticket:novo") and not clients.events("cli", "mensagem:nova")
            # another empresa, in a ticket room of the same name, receives nothing
            assert await quiet(clients, "outra", "mensagem:nova")
            assert not clients.events("outra", "ticket:novo")

            assert await clients.emit_with_ack("beto", "ticket:sair", {"ticketId": ticket}) == \
                [{"success": True, "ticketId": ticket}]
            await publish(http_port, f"ticket:{ticket}", "mensagem:nova", {"id": "m2"}, backend)
            assert (await clients.next("ana", "event", "mensagem:nova"))["args"][0]["id"] == "m2"
            assert await quiet(clients, "beto", "mensagem:nova")
        finally:
            await clients.close()
