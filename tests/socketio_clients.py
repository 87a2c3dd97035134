"""Real Socket.IO clients for the tests, behind one small interface.

* :class:`NodeClients`: socket.io-client (npm, pinned in tests/node/socketio/package-lock.json), driven
  through tests/node/socketio/driver.js: one Node process, any number of sockets.
* :class:`PythonClients`: python-socketio's ``AsyncClient``.

Both record what each socket sees as dicts (``kind`` = connect, event, ack, connect_error, disconnect,
upgrade) that a test awaits with :meth:`Clients.next`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import socketio

NODE_DIR = Path(__file__).parent / "node" / "socketio"
TIMEOUT = 10.0


def node_ready() -> str | None:
    """None when socket.io-client can run, else why not (the reason a test is skipped with)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "node/npm not installed: the socket.io-client tests need Node"
    if not (NODE_DIR / "node_modules" / "socket.io-client").is_dir():
        result = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True, text=True,
                                timeout=300)
        if result.returncode != 0:
            return f"npm ci failed in {NODE_DIR}: {result.stderr.strip()[-500:]}"
    return None


class Clients:
    def __init__(self) -> None:
        self.seen: dict[str, list[dict[str, Any]]] = {}
        self._changed = asyncio.Event()
        self._seq = 0

    def record(self, line: dict[str, Any]) -> None:
        self.seen.setdefault(line.get("id", ""), []).append(line)
        self._changed.set()

    async def next(self, socket_id: str, kind: str, event: str | None = None, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The first unconsumed record of ``socket_id`` of that kind (and event name), waiting for it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for index, line in enumerate(self.seen.get(socket_id, [])):
                if line["kind"] == kind and (event is None or line.get("event") == event):
                    return self.seen[socket_id].pop(index)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"{socket_id}: no {kind} {event or ''} within {timeout}s; saw {self.seen.get(socket_id)}")
            self._changed.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
            except TimeoutError:
                pass

    def events(self, socket_id: str, event: str) -> list[dict[str, Any]]:
        """Every unconsumed event record of that name, or record of that kind (consumed by this call)."""
        found = [line for line in self.seen.get(socket_id, [])
                 if (line["kind"] == "event" and line["event"] == event) or line["kind"] == event]
        self.seen[socket_id] = [line for line in self.seen.get(socket_id, []) if line not in found]
        return found

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    async def emit_with_ack(self, socket_id: str, event: str, *args: Any) -> list[Any]:
        seq = self.next_seq()
        await self.emit(socket_id, event, *args, ack=seq)
        while True:
            answer = await self.next(socket_id, "ack")
            if answer["seq"] == seq:
                return answer["args"]

    async def connect(self, socket_id: str, url: str, **options: Any) -> None:
        raise NotImplementedError

    async def connected(self, socket_id: str, url: str, **options: Any) -> dict[str, Any]:
        """Connect and wait until the socket is connected; its ``connect`` record."""
        await self.connect(socket_id, url, **options)
        return await self.next(socket_id, "connect")

    async def emit(self, socket_id: str, event: str, *args: Any, ack: int | None = None) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class NodeClients(Clients):
    """socket.io-client 4.8 in a Node process; ``options`` are io()'s own (transports, auth, extraHeaders…)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        super().__init__()
        self.process = process
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def start(cls) -> NodeClients:
        reason = node_ready()
        if reason is not None:
            pytest.skip(reason)
        process = await asyncio.create_subprocess_exec(
            "node", str(NODE_DIR / "driver.js"), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "NODE_PATH": str(NODE_DIR / "node_modules")}, cwd=NODE_DIR,
        )
        return cls(process)

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            self.record(json.loads(raw))

    async def _command(self, command: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        await self.process.stdin.drain()

    async def connect(self, socket_id: str, url: str, **options: Any) -> None:
        await self._command({"op": "connect", "id": socket_id, "url": url, "options": options})

    async def emit(self, socket_id: str, event: str, *args: Any, ack: int | None = None) -> None:
        await self._command({"op": "emit", "id": socket_id, "event": event, "args": list(args), "ack": ack is not None,
                             "seq": ack})

    async def drop(self, socket_id: str) -> None:
        """Close the transport under the socket: it reconnects by itself and recovers its session."""
        await self._command({"op": "drop", "id": socket_id})

    async def disconnect(self, socket_id: str) -> None:
        await self._command({"op": "disconnect", "id": socket_id})

    async def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            async with asyncio.timeout(5):
                await self.process.wait()
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
        self._reader.cancel()


class PythonClients(Clients):
    """python-socketio's AsyncClient; ``options``: auth, headers, transports, namespaces."""

    def __init__(self) -> None:
        super().__init__()
        self.clients: dict[str, socketio.AsyncClient] = {}

    async def connect(self, socket_id: str, url: str, **options: Any) -> None:
        client = socketio.AsyncClient(reconnection=False)
        self.clients[socket_id] = client
        # socket.io-client names the namespace in the URL; python-socketio takes it apart
        parts = urlsplit(url)
        namespace = parts.path or "/"
        url = f"{parts.scheme}://{parts.netloc}"
        client.on("*", lambda event, *args: self.record({"id": socket_id, "kind": "event", "event": event,
                                                          "args": list(args)}), namespace=namespace)
        client.on("connect", lambda: self.record({"id": socket_id, "kind": "connect", "recovered": False,
                                                  "transport": client.transport()}), namespace=namespace)
        client.on("connect_error", lambda data: self.record({"id": socket_id, "kind": "connect_error",
                                                             "message": (data or {}).get("message")}),
                  namespace=namespace)
        client.on("disconnect", lambda *reason: self.record({"id": socket_id, "kind": "disconnect",
                                                             "reason": str(reason[0]) if reason else ""}),
                  namespace=namespace)
        self._namespaces = getattr(self, "_namespaces", {})
        self._namespaces[socket_id] = namespace
        try:
            await client.connect(url, namespaces=[namespace], wait_timeout=5, **options)
        except socketio.exceptions.ConnectionError as exc:
            self.record({"id": socket_id, "kind": "connect_error", "message": str(exc)})

    async def emit(self, socket_id: str, event: str, *args: Any, ack: int | None = None) -> None:
        client = self.clients[socket_id]
        data = args[0] if len(args) == 1 else (tuple(args) if args else None)
        callback = None
        if ack is not None:
            def callback(*answer: Any) -> None:
                self.record({"id": socket_id, "kind": "ack", "seq": ack, "args": list(answer)})
        await client.emit(event, data, namespace=self._namespaces[socket_id], callback=callback)

    async def disconnect(self, socket_id: str) -> None:
        await self.clients[socket_id].disconnect()

    async def close(self) -> None:
        for client in self.clients.values():
            await client.disconnect()
