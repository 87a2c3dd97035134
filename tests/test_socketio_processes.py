"""Socket.IO across two `eddy serve` processes on one SQLite file: events cross both ways, recovery on the other.

A small TCP proxy stands in for a load balancer: socket.io-client connects through it to process A; the proxy
then sends new connections to process B and cuts the old ones, and the client's own reconnect lands on B,
which recovers the session from the store.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from tests.socketio_clients import NodeClients
from tests.support import Client, publish
from tests.test_socketio_seeds import CONVERSATION, EXAMPLES, seed002_token


class SwitchingProxy:
    """Forwards TCP connections to ``target`` port; :meth:`switch` changes it and cuts the open connections."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.connections: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self.connections.update((writer, upstream_writer))
        await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()
        self.connections.discard(writer)

    def switch(self, target: int) -> None:
        self.target = target
        for writer in list(self.connections):
            writer.close()

    async def close(self) -> None:
        self.switch(self.target)
        if self.server is not None:
            self.server.close()


@pytest.mark.gen_test(timeout=90)
@pytest.mark.parametrize("transports", [["websocket"], None])
async def test_two_processes_one_sqlite_file(processes, tmp_path, transports):  # noqa: F811
    storage = f"sqlite:///{tmp_path}/shared.db"
    args = ["--config", str(EXAMPLES / "seed002.toml")]
    a, b = processes(storage, args=args), processes(storage, args=args)
    proxy = SwitchingProxy(a.port)
    proxy_port = await proxy.start()
    clients = await NodeClients.start()
    native = None
    try:
        options = {"auth": {"token": seed002_token("ana")}, "reconnectionDelay": 1500, "reconnectionDelayMax": 1500}
        if transports:
            options["transports"] = transports
        assert (await clients.connected("ana", f"http://127.0.0.1:{proxy_port}", **options))["recovered"] is False
        await clients.emit("ana", "join_conversation", {"conversation_id": CONVERSATION})
        await clients.next("ana", "event", "joined_conversation")

        # a native client on B, in the same conversation
        native = await Client.connect(b.port, "/ws", seed002_token("bia"))
        await native.recv_type("connected")
        assert (await native.request({"type": "join", "channel": f"conversation:{CONVERSATION}", "ref": 1}))["type"] == "ack"

        # Socket.IO on A -> native on B, and native on B -> Socket.IO on A
        await clients.emit("ana", "typing_start", {"conversation_id": CONVERSATION})
        typing = await native.recv_type("typing")
        assert (typing["user_id"], typing["is_typing"]) == ("ana", True)
        native.send({"type": "typing", "channel": f"conversation:{CONVERSATION}", "is_typing": True})
        assert (await clients.next("ana", "event", "user_typing"))["args"][0]["user_id"] == "bia"
        backend = seed002_token("backend", role="publisher")
        await publish(b.port, f"conversation:{CONVERSATION}", "message:new", {"n": 0}, backend)
        assert (await clients.next("ana", "event", "message:new"))["args"][0] == {"n": 0}

        # the load balancer now sends ana to B; what is published meanwhile is recovered there
        proxy.switch(b.port)
        await clients.next("ana", "disconnect")
        for n in (1, 2):
            await publish(a.port, f"conversation:{CONVERSATION}", "message:new", {"n": n}, backend)
        assert (await clients.next("ana", "connect"))["recovered"] is True
        await publish(a.port, f"conversation:{CONVERSATION}", "message:new", {"n": 3}, backend)
        received = [(await clients.next("ana", "event", "message:new"))["args"][0]["n"] for _ in range(3)]
        assert received == [1, 2, 3]
        await asyncio.sleep(0.3)
        assert not clients.events("ana", "message:new")
        # and from B, the recovered socket still talks to the native client
        await clients.emit("ana", "typing_stop", {"conversation_id": CONVERSATION})
        frame = await native.recv()
        while frame["type"] == "event":  # the messages above reached it too
            frame = await native.recv()
        assert (frame["type"], frame["user_id"], frame["is_typing"]) == ("typing", "ana", False)
    finally:
        if native is not None:
            native.close()
        await clients.close()
        await proxy.close()


@pytest.mark.gen_test(timeout=90)
@pytest.mark.parametrize("transports", [["polling"], None])
async def test_polling_under_processes_flag(processes, tmp_path, transports):  # noqa: F811
    """``--processes 2`` on one port: each polling request may reach either worker; the session still works."""
    server = processes(f"sqlite:///{tmp_path}/eddy.db", args=["--processes", "2", "--config",
                                                             str(EXAMPLES / "seed002.toml")])
    clients = await NodeClients.start()
    names = [f"user-{n}" for n in range(6)]
    try:
        options = {"transports": transports} if transports else {}
        for name in names:
            await clients.connect(name, f"http://127.0.0.1:{server.port}", auth={"token": seed002_token(name)},
                                  **options)
        for name in names:
            await clients.next(name, "event", "connected")
            await clients.emit(name, "join_conversation", {"conversation_id": CONVERSATION})
            await clients.next(name, "event", "joined_conversation")
        backend = seed002_token("backend", role="publisher")
        for n in range(5):
            await publish(server.port, f"conversation:{CONVERSATION}", "message:new", {"n": n}, backend)
        for name in names:
            received = [(await clients.next(name, "event", "message:new"))["args"][0]["n"] for _ in range(5)]
            assert received == [0, 1, 2, 3, 4]
        await clients.emit(names[0], "typing_start", {"conversation_id": CONVERSATION})
        for name in names[1:]:
            assert (await clients.next(name, "event", "user_typing"))["args"][0]["user_id"] == names[0]
        if transports is None:  # every upgrade went through, relayed where the session lives elsewhere
            for name in names:
                assert (await clients.next(name, "upgrade"))["transport"] == "websocket"
    finally:
        await clients.close()
