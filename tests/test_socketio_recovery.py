"""Socket.IO connection state recovery, backed by the store: socket.io-client's own reconnect, unchanged.

After its transport drops, socket.io-client reconnects with the session id and the offset it kept; within
``socketio_recovery_window`` it gets its rooms back and every event it missed, once (``socket.recovered``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.socketio_clients import NodeClients
from tests.support import publish
from tests.test_socketio_seeds import seed004_token, seed_settings

TICKET = "550e8400-e29b-41d4-a716-446655440000"


@pytest.fixture
def settings(tmp_path: Path):
    return seed_settings(tmp_path, "seed004.toml")


async def join_ticket(clients: NodeClients, socket_id: str) -> None:
    assert await clients.emit_with_ack(socket_id, "ticket:entrar", {"ticketId": TICKET}) == \
        [{"success": True, "ticketId": TICKET}]


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("transports", [["websocket"], ["polling"], None])
async def test_recovery_after_a_dropped_transport(http_server, http_port, transports):
    clients = await NodeClients.start()
    backend = seed004_token("api", role="publisher")
    options = {"auth": {"token": seed004_token("ana")}, "reconnectionDelay": 1500, "reconnectionDelayMax": 1500}
    if transports:
        options["transports"] = transports
    try:
        assert (await clients.connected("ana", f"http://127.0.0.1:{http_port}/atendimento", **options))["recovered"] is False
        await join_ticket(clients, "ana")
        await publish(http_port, f"ticket:{TICKET}", "mensagem:nova", {"n": 0}, backend)
        assert (await clients.next("ana", "event", "mensagem:nova"))["args"][0] == {"n": 0}

        await clients.drop("ana")
        await clients.next("ana", "disconnect")
        # missed while away: on the joined ticket room, and on an automatic room (user:ana)
        for n in (1, 2, 3):
            await publish(http_port, f"ticket:{TICKET}", "mensagem:nova", {"n": n}, backend)
        await publish(http_port, "user:ana", "notificacao", {"tipo": "enquanto fora"}, backend)

        assert (await clients.next("ana", "connect"))["recovered"] is True
        await publish(http_port, f"ticket:{TICKET}", "mensagem:nova", {"n": 4}, backend)  # the room is back
        received = [(await clients.next("ana", "event", "mensagem:nova"))["args"][0]["n"] for _ in range(4)]
        assert received == [1, 2, 3, 4]
        assert (await clients.next("ana", "event", "notificacao"))["args"][0] == {"tipo": "enquanto fora"}
        await asyncio.sleep(0.3)
        assert not clients.events("ana", "mensagem:nova")  # nothing twice, not even n=0
    finally:
        await clients.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_client_that_leaves_on_purpose_is_not_recovered(http_server, http_port):
    clients = await NodeClients.start()
    try:
        url = f"http://127.0.0.1:{http_port}/atendimento"
        await clients.connected("ana", url, auth={"token": seed004_token("ana")}, transports=["websocket"])
        await clients.disconnect("ana")  # socket.disconnect(): a DISCONNECT packet, the record is forgotten
        await clients.next("ana", "disconnect")
        await asyncio.sleep(0.2)
        await clients._command({"op": "reconnect", "id": "ana"})
        assert (await clients.next("ana", "connect"))["recovered"] is False
    finally:
        await clients.close()
