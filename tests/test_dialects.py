"""Seed 001's chat client at /ws/chat and seed 003's order stream at /ws/pedidos, sending exactly the seeds' frames.

The server runs with examples/seed001.toml or examples/seed003.toml. Seed 003's own test script runs as the
seed wrote it, with the ``websockets`` library at its defaults (its pings included).
"""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets

from tests.support import Client, make_token, publish
from tests.test_socketio_seeds import seed_settings

CONVERSATION = "6f1c2a9e-0000-4000-8000-000000000001"


async def frame_of(client: Client, kind: str) -> dict:
    """The next frame of ``kind``, passing over the others (signals to the sender's own devices)."""
    while True:
        frame = await client.recv()
        if frame["type"] == kind:
            return frame


class TestSeed001Chat:
    @pytest.fixture
    def settings(self, tmp_path):
        return seed_settings(tmp_path, "seed001.toml")

    @pytest.mark.gen_test(timeout=30)
    async def test_chat_frames_both_ways(self, http_server, http_port):
        # the seed: ws://api/ws?token=JWT_TOKEN (here /ws/chat)
        me = await Client.connect(http_port, "/ws/chat", None, header=False, query=f"?token={make_token('user-1', roles=['user'])}")
        peer = await Client.connect(http_port, "/ws/chat", None, header=False, query=f"?token={make_token('user-2')}")
        connected = await me.recv()
        assert (connected["type"], connected["user_id"]) == ("connected", "user-1") and connected["timestamp"]
        await peer.recv()

        for client in (me, peer):
            client.send({"type": "join", "conversation_id": CONVERSATION})
        me.send({"type": "message", "conversation_id": CONVERSATION, "content": "Hello!"})
        sent = await frame_of(me, "message_sent")
        assert sent["message_id"] and sent["timestamp"]
        message = (await frame_of(peer, "message"))["message"]
        assert message == {"id": sent["message_id"], "conversation_id": CONVERSATION, "user_id": "user-1",
                           "content": "Hello!", "role": "user", "created_at": message["created_at"]}
        assert message["created_at"].endswith("Z")

        me.send({"type": "typing", "conversation_id": CONVERSATION, "is_typing": True})
        typing = await frame_of(peer, "typing")
        assert typing == {"type": "typing", "conversation_id": CONVERSATION, "user_id": "user-1", "is_typing": True}

        peer.send({"type": "read", "conversation_id": CONVERSATION, "message_id": sent["message_id"]})
        read = await frame_of(me, "read")
        assert (read["user_id"], read["conversation_id"], read["message_id"]) == ("user-2", CONVERSATION,
                                                                                 sent["message_id"])
        assert read["read_at"]

        peer.send({"type": "presence", "status": "away"})
        presence = await frame_of(me, "presence")
        assert (presence["user_id"], presence["status"]) == ("user-2", "away") and presence["timestamp"]

        me.send({"type": "message", "conversation_id": CONVERSATION, "content": "second"})
        second = await frame_of(me, "message_sent")
        await frame_of(peer, "message")
        peer.send({"type": "sync", "conversation_id": CONVERSATION, "last_message_id": sent["message_id"]})
        sync = await frame_of(peer, "sync_data")
        assert (sync["conversation_id"], sync["count"]) == (CONVERSATION, 1)
        assert [(m["id"], m["content"]) for m in sync["messages"]] == [(second["message_id"], "second")]

        me.send({"type": "ping"})
        assert (await frame_of(me, "pong"))["timestamp"]
        assert await me.no_frame_within(0.3)  # the sender got message_sent, never its own messages back

        me.send({"type": "leave", "conversation_id": CONVERSATION})
        await asyncio.sleep(0.1)
        peer.send({"type": "message", "conversation_id": CONVERSATION, "content": "after leave"})
        await frame_of(peer, "message_sent")
        assert await me.no_frame_within(0.3)

        # errors are the seed's {type: error, error, code}; an unknown frame keeps the connection
        me.send({"type": "message", "content": "no conversation"})
        error = await frame_of(me, "error")
        assert error["code"] == "INVALID_FRAME" and "conversation_id" in error["error"]
        me.send({"type": "dance"})
        assert (await frame_of(me, "error"))["code"] == "UNKNOWN_TYPE"
        me.send({"type": "ping"})
        assert (await frame_of(me, "pong"))["type"] == "pong"
        me.close()
        peer.close()


class TestSeed003Orders:
    @pytest.fixture
    def settings(self, tmp_path):
        return seed_settings(tmp_path, "seed003.toml")

    @pytest.mark.gen_test(timeout=30)
    async def test_the_seeds_own_test_script(self, http_server, http_port):
        token = make_token("loja-centro", tenant="sgp")
        printed: list[str] = []

        # The seed's script, as written (print captured), with its uri pointed at this server.
        async def test_websocket():
            uri = f"ws://127.0.0.1:{http_port}/ws/pedidos?token={token}"
            async with websockets.connect(uri) as websocket:
                # Receber mensagem de conexão
                message = await websocket.recv()
                printed.append(f"Recebido: {message}")

                # Enviar ping
                await websocket.send(json.dumps({"type": "ping", "timestamp": "123"}))
                response = await websocket.recv()
                printed.append(f"Pong recebido: {response}")

        await test_websocket()
        assert json.loads(printed[0].removeprefix("Recebido: "))["type"] == "connected"
        assert json.loads(printed[1].removeprefix("Pong recebido: ")) == {"type": "pong", "timestamp": "123"}

    @pytest.mark.gen_test(timeout=30)
    async def test_websockets_protocol_pings_are_answered(self, http_server, http_port):
        """The ``websockets`` client pings every 20 s by default; here every 0.2 s, the same path, sooner."""
        uri = f"ws://127.0.0.1:{http_port}/ws/pedidos?token={make_token('loja', tenant='sgp')}"
        async with websockets.connect(uri, ping_interval=0.2, ping_timeout=1) as websocket:
            assert json.loads(await websocket.recv())["type"] == "connected"
            await asyncio.sleep(1.2)  # six protocol pings, each answered, or the client would have closed
            await websocket.send(json.dumps({"type": "ping", "timestamp": "456"}))
            assert json.loads(await websocket.recv()) == {"type": "pong", "timestamp": "456"}

    @pytest.mark.gen_test(timeout=30)
    async def test_orders_flat_and_authenticate(self, http_server, http_port):
        token = make_token("loja-centro", tenant="sgp")
        with_query = await websockets.connect(f"ws://127.0.0.1:{http_port}/ws/pedidos?token={token}")
        bare = await websockets.connect(f"ws://127.0.0.1:{http_port}/ws/pedidos")
        other = await websockets.connect(f"ws://127.0.0.1:{http_port}/ws/pedidos?token={make_token('x', tenant='outra')}")
        try:
            assert json.loads(await with_query.recv())["type"] == "connected"
            greeting = json.loads(await bare.recv())
            assert greeting["type"] == "connected" and greeting["message"]
            await bare.send(json.dumps({"type": "authenticate", "token": token}))
            authenticated = json.loads(await bare.recv())
            assert authenticated["type"] == "authenticated" and authenticated["message"]
            await other.recv()

            backend = make_token("api-sgp", tenant="sgp", roles=["publisher"])
            await publish(http_port, "pedidos", "pedido_criado", {"pedido_id": 123, "status_atual": "pendente",
                                                                  "cliente": "Nome", "valor_total": "1000.00"}, backend)
            for websocket in (with_query, bare):
                frame = json.loads(await asyncio.wait_for(websocket.recv(), 5))
                assert frame == {"type": "pedido_criado", "pedido_id": 123, "status_atual": "pendente",
                                 "cliente": "Nome", "valor_total": "1000.00", "timestamp": frame["timestamp"]}
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(other.recv(), 0.3)  # another tenant's stream stays silent
        finally:
            for websocket in (with_query, bare, other):
                await websocket.close()
