"""The real-client matrix: third-party WebSocket clients at their default settings against a real `eddy serve`.

Clients: Python ``websockets`` (its keepalive pings on, every second here instead of 20 s; permessage-deflate
offered by default), ``websocket-client``, ``aiohttp`` (``heartbeat=``), Tornado's client (``ping_interval``),
Node's ``ws`` (pinned in tests/node/ws/package-lock.json) and Chromium's own WebSocket. Each client runs every
check once against one shared server (one scenario per client, cached for the module); each (client, check)
pair is its own test. A check a client cannot do (Chromium sends no protocol ping and no fragments) is
skipped with the reason, never faked.

The server pings every second and sends keepalive frames every second, so every scenario also proves that the
client survives the server's pings and keepalives.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request
from base64 import b64encode
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websocket as websocket_client
import websockets
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from tests.processes import EddyProcess
from tests.support import make_token

ROOT = Path(__file__).resolve().parent.parent
NODE_WS = ROOT / "tests" / "node" / "ws" / "node_modules" / "ws"
SCENARIO_JS = ROOT / "tests" / "js" / "matrix_scenario.js"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
LIMIT = 64 * 1024  # EDDY_MAX_FRAME_BYTES, the default
TIMEOUT = 8.0

CHECKS = ["header_auth", "query_auth", "connected", "join_ack", "rest_event", "json_ping", "protocol_ping",
          "compression", "fragmented", "message_60k", "just_over_limit", "binary_refused", "close_1000",
          "reconnect_since", "over_4x_1009"]
CLIENTS = ["websockets", "websocket-client", "aiohttp", "tornado", "node-ws", "chromium"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("real-clients")
    env = {"EDDY_PING_INTERVAL": "1", "EDDY_PING_TIMEOUT": "1", "EDDY_KEEPALIVE_INTERVAL": "1",
           "EDDY_MAX_CONNECTIONS_PER_USER": "1000", "EDDY_LOG_LEVEL": "debug"}
    process = EddyProcess(directory, f"sqlite:///{directory}/eddy.db", env=env)
    process.wait_ready()
    yield process
    process.stop()


def publish(port: int, token: str, channel: str, data: Any) -> str:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/events", method="POST",
        data=json.dumps({"channel": channel, "event": "matrix", "data": data}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        assert response.status == 201
        return json.loads(response.read())["id"]


# One connection, whatever the client ---------------------------------------------------------------

class NotSupported(Exception):
    """The client has no way to do this (the check is reported as not applicable, with this reason)."""


class Connection:
    """The few things the scenario needs from a client's connection. Subclasses adapt one library each."""

    extensions = ""
    #: Whether the client offers permessage-deflate at its default settings (then the server must accept it).
    offers_deflate = False
    #: Messages read ahead (while waiting for a keepalive to prove itself), handed out first by :meth:`frame`.
    pending: list[str]

    def __init__(self) -> None:
        self.pending = []

    async def send(self, text: str) -> None:
        raise NotImplementedError

    async def send_binary(self, data: bytes) -> None:
        raise NotImplementedError

    async def send_fragments(self, parts: list[str]) -> None:
        raise NotSupported("this client sends every message in one frame")

    async def ping(self) -> None:
        """Send a protocol PING and wait for its PONG (or let the client's own keepalive prove it)."""
        raise NotImplementedError

    async def recv(self) -> str | None:
        """The next text message; None once the server has closed (then :attr:`close_code` is set)."""
        raise NotImplementedError

    async def close(self, code: int) -> None:
        raise NotImplementedError

    close_code: int | None = None

    async def frame(self) -> dict[str, Any]:
        """The next JSON frame that is not a keepalive or presence frame."""
        async with asyncio.timeout(TIMEOUT):
            while True:
                text = self.pending.pop(0) if self.pending else await self.recv()
                if text is None:
                    raise ConnectionError(f"closed ({self.close_code})")
                frame = json.loads(text)
                if frame["type"] not in ("keepalive", "presence"):
                    return frame

    async def read_for(self, seconds: float) -> None:
        """Keep reading (so the client answers the server's pings) for ``seconds``; frames wait in :attr:`pending`."""
        deadline = asyncio.get_running_loop().time() + seconds
        while True:
            try:
                async with asyncio.timeout(max(0.01, deadline - asyncio.get_running_loop().time())):
                    text = await self.recv()
            except TimeoutError:
                return
            if text is None:
                raise ConnectionError(f"closed ({self.close_code})")
            self.pending.append(text)

    async def closed(self) -> int | None:
        """Wait for the server's close; its code."""
        async with asyncio.timeout(TIMEOUT):
            while await self.recv() is not None:
                pass
        return self.close_code


class WebsocketsConnection(Connection):
    offers_deflate = True

    @classmethod
    async def open(cls, url: str, headers: dict[str, str]) -> Connection:
        self = cls()
        self.ws = await websockets.connect(url, additional_headers=headers, ping_interval=1.0)
        self.extensions = self.ws.response.headers.get("Sec-WebSocket-Extensions", "")
        return self

    async def send(self, text: str) -> None:
        await self.ws.send(text)

    async def send_binary(self, data: bytes) -> None:
        await self.ws.send(data)

    async def send_fragments(self, parts: list[str]) -> None:
        await self.ws.send(iter(parts))  # an iterable is sent as one fragmented message

    async def ping(self) -> None:
        waiter = await self.ws.ping(b"matrix")
        async with asyncio.timeout(TIMEOUT):
            await waiter

    async def recv(self) -> str | None:
        try:
            message = await self.ws.recv()
        except websockets.ConnectionClosed:
            self.close_code = self.ws.close_code
            return None
        return message if isinstance(message, str) else "{}"

    async def close(self, code: int) -> None:
        await self.ws.close(code)
        self.close_code = self.ws.close_code


class AiohttpConnection(Connection):
    """aiohttp answers pings (and sees pongs) only inside ``receive()``, so a task keeps receiving, as an app would."""

    @classmethod
    async def open(cls, url: str, headers: dict[str, str], heartbeat: float | None = 1.0) -> Connection:
        self = cls()
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(url, headers=headers, heartbeat=heartbeat)
        self.extensions = self.ws._response.headers.get("Sec-WebSocket-Extensions", "")
        self.inbox: asyncio.Queue[str | None] = asyncio.Queue()
        self.pump = asyncio.get_running_loop().create_task(self._receive_forever())
        return self

    async def _receive_forever(self) -> None:
        while True:
            message = await self.ws.receive()
            if message.type == aiohttp.WSMsgType.TEXT:
                self.inbox.put_nowait(message.data)
            elif message.type == aiohttp.WSMsgType.BINARY:
                self.inbox.put_nowait("{}")
            else:
                self.close_code = message.data if message.type == aiohttp.WSMsgType.CLOSE else self.ws.close_code
                self.inbox.put_nowait(None)
                return

    async def send(self, text: str) -> None:
        await self.ws.send_str(text)

    async def send_binary(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def ping(self) -> None:
        # aiohttp swallows pongs; with heartbeat= it closes the connection when one does not come in
        # time. Ping, then outlive two heartbeats.
        await self.ws.ping(b"matrix")
        await self.read_for(2.5)

    async def recv(self) -> str | None:
        text = await self.inbox.get()
        if text is None:
            self.inbox.put_nowait(None)
            await self.session.close()
        return text

    async def close(self, code: int) -> None:
        await self.ws.close(code=code)
        self.close_code = self.ws.close_code
        await self.pump
        await self.session.close()


class TornadoConnection(Connection):
    @classmethod
    async def open(cls, url: str, headers: dict[str, str]) -> Connection:
        self = cls()
        self.ws = await websocket_connect(HTTPRequest(url, headers=headers), ping_interval=1.0)
        self.extensions = self.ws.headers.get("Sec-WebSocket-Extensions", "") if self.ws.headers else ""
        return self

    async def send(self, text: str) -> None:
        await self.ws.write_message(text)

    async def send_binary(self, data: bytes) -> None:
        await self.ws.write_message(data, binary=True)

    async def ping(self) -> None:
        # Tornado's client does not surface pongs; its ping_interval (with the default ping timeout)
        # closes the connection if one does not come. Ping, then outlive two intervals, reading.
        self.ws.ping(b"matrix")
        await self.read_for(2.5)

    async def recv(self) -> str | None:
        message = await self.ws.read_message()
        if message is None:
            self.close_code = self.ws.close_code
            return None
        return message if isinstance(message, str) else "{}"

    async def close(self, code: int) -> None:
        self.ws.close(code)
        while await self.ws.read_message() is not None:
            pass
        self.close_code = self.ws.close_code


class WebsocketClientConnection(Connection):
    """websocket-client is synchronous: every call runs in a thread."""

    @classmethod
    async def open(cls, url: str, headers: dict[str, str]) -> Connection:
        self = cls()
        self.ws = await asyncio.to_thread(websocket_client.create_connection, url, timeout=TIMEOUT,
                                          header=[f"{k}: {v}" for k, v in headers.items()])
        self.extensions = self.ws.getheaders().get("sec-websocket-extensions", "")
        return self

    async def send(self, text: str) -> None:
        await asyncio.to_thread(self.ws.send, text)

    async def send_binary(self, data: bytes) -> None:
        await asyncio.to_thread(self.ws.send_binary, data)

    async def send_fragments(self, parts: list[str]) -> None:
        def send() -> None:
            for n, part in enumerate(parts):
                opcode = websocket_client.ABNF.OPCODE_TEXT if n == 0 else websocket_client.ABNF.OPCODE_CONT
                self.ws.send_frame(websocket_client.ABNF.create_frame(part, opcode, fin=int(n == len(parts) - 1)))
        await asyncio.to_thread(send)

    async def ping(self) -> None:
        def ping() -> None:
            self.ws.ping("matrix")
            while True:
                opcode, _ = self.ws.recv_data(control_frame=True)
                if opcode == websocket_client.ABNF.OPCODE_PONG:
                    return
        await asyncio.to_thread(ping)

    async def recv(self) -> str | None:
        def receive() -> str | None:
            try:
                opcode, data = self.ws.recv_data(control_frame=True)
            except (websocket_client.WebSocketConnectionClosedException, ConnectionError, OSError):
                return None
            if opcode == websocket_client.ABNF.OPCODE_CLOSE:
                self.close_code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else None
                return None
            if opcode == websocket_client.ABNF.OPCODE_TEXT:
                return data.decode()
            return "" if opcode in (websocket_client.ABNF.OPCODE_PING, websocket_client.ABNF.OPCODE_PONG) else "{}"

        while True:
            text = await asyncio.to_thread(receive)
            if text != "":
                return text

    async def read_for(self, seconds: float) -> None:
        def read() -> None:
            deadline = time.monotonic() + seconds
            self.ws.settimeout(0.1)
            try:
                while time.monotonic() < deadline:
                    try:
                        opcode, data = self.ws.recv_data(control_frame=True)
                    except websocket_client.WebSocketTimeoutException:
                        continue
                    if opcode == websocket_client.ABNF.OPCODE_CLOSE:
                        raise ConnectionError("closed")
                    if opcode == websocket_client.ABNF.OPCODE_TEXT:
                        self.pending.append(data.decode())
            finally:
                self.ws.settimeout(TIMEOUT)
        await asyncio.to_thread(read)

    async def close(self, code: int) -> None:
        await asyncio.to_thread(self.ws.send_close, code)
        while await self.recv() is not None:
            pass
        self.ws.shutdown()


PYTHON_CLIENTS: dict[str, Callable[[str, dict[str, str]], Awaitable[Connection]]] = {
    "websockets": WebsocketsConnection.open,
    "websocket-client": WebsocketClientConnection.open,
    "aiohttp": AiohttpConnection.open,
    "tornado": TornadoConnection.open,
}


async def python_scenario(port: int, client: str) -> dict[str, tuple[str, str]]:
    """Every check with one Python client: {check: ("ok" | "na" | "fail", detail)}."""
    open_connection = PYTHON_CLIENTS[client]
    user = f"matrix-{client}"
    token = make_token(user)
    room = f"room-{client}"
    base = f"ws://127.0.0.1:{port}"
    query = f"?access_token={token}"
    results: dict[str, tuple[str, str]] = {}
    state: dict[str, Any] = {}

    async def check(name: str, body: Callable[[], Awaitable[str | None]]) -> None:
        try:
            async with asyncio.timeout(3 * TIMEOUT):
                results[name] = ("ok", (await body()) or "")
        except NotSupported as reason:
            results[name] = ("na", str(reason))
        except Exception as exc:  # noqa: BLE001 - a failed check is a result of the matrix, reported by its own test
            results[name] = ("fail", f"{type(exc).__name__}: {exc}")

    async def header_auth() -> None:
        conn = await open_connection(f"{base}/ws", {"Authorization": f"Bearer {token}"})
        frame = await conn.frame()
        await conn.close(1000)
        assert frame["type"] == "connected", frame

    async def query_auth() -> None:
        state["main"] = conn = await open_connection(f"{base}/ws{query}", {})
        state["connected"] = await conn.frame()
        assert state["connected"]["type"] == "connected"

    async def connected() -> None:
        frame = state["connected"]
        assert frame["user_id"] == user and frame["connection_id"], frame

    async def join_ack() -> None:
        await state["main"].send(json.dumps({"type": "join", "channel": room, "ref": 1}))
        frame = await state["main"].frame()
        assert frame == {"type": "ack", "ref": 1, "channel": room, "last_id": frame.get("last_id")}, frame

    async def rest_event() -> None:
        event_id = await asyncio.to_thread(publish, port, token, room, {"n": 1})
        frame = await state["main"].frame()
        assert frame["type"] == "event" and frame["id"] == event_id, frame
        state["last_id"] = event_id

    async def json_ping() -> None:
        await state["main"].send(json.dumps({"type": "ping", "ref": 2, "timestamp": "t"}))
        assert await state["main"].frame() == {"type": "pong", "ref": 2, "timestamp": "t"}

    async def protocol_ping() -> None:  # on a connection of its own: before issue 13 a PING dropped it
        conn = await open_connection(f"{base}/ws{query}", {})
        await conn.frame()
        await conn.ping()
        await conn.send(json.dumps({"type": "ping", "ref": "after-ping"}))
        assert (await conn.frame())["ref"] == "after-ping"
        await conn.close(1000)

    async def compression() -> str:
        extensions = state["main"].extensions
        if not state["main"].offers_deflate:
            raise NotSupported("the client does not offer permessage-deflate at its default settings")
        assert "permessage-deflate" in extensions and "server_no_context_takeover" in extensions, extensions
        data = {"text": "compressible " * 400}
        event_id = await asyncio.to_thread(publish, port, token, room, data)
        frame = await state["main"].frame()
        assert frame["id"] == event_id and frame["data"] == data
        state["last_id"] = event_id
        return extensions

    async def fragmented() -> None:
        await state["main"].send_fragments(['{"type":"pi', 'ng","ref":"frag', 'mented"}'])
        frame = await state["main"].frame()
        assert frame["type"] == "pong" and frame["ref"] == "fragmented", frame

    async def message_60k() -> None:
        stamp = "x" * 60_000
        await state["main"].send(json.dumps({"type": "ping", "ref": 60, "timestamp": stamp}))
        frame = await state["main"].frame()
        assert frame["type"] == "pong" and frame["timestamp"] == stamp

    async def just_over_limit() -> None:
        await state["main"].send(json.dumps({"type": "ping", "timestamp": "x" * (LIMIT + 10)}))
        assert (await state["main"].frame())["code"] == "FRAME_TOO_LARGE"
        await state["main"].send(json.dumps({"type": "ping", "ref": "kept"}))
        assert (await state["main"].frame())["ref"] == "kept"

    async def binary_refused() -> None:
        await state["main"].send_binary(b"\x01\x02\x03")
        assert (await state["main"].frame())["code"] == "UNSUPPORTED_BINARY"

    async def over_4x() -> None:
        conn = await open_connection(f"{base}/ws{query}", {})
        await conn.frame()
        try:
            await conn.send("x" * (4 * LIMIT + 1000))
        except Exception:  # noqa: BLE001, S110 - the server may close while the client still writes; the code tells
            pass
        code = await conn.closed()
        assert code == 1009, f"closed with {code} (None: no close frame, the connection was reset)"

    async def close_1000() -> None:
        await state["main"].close(1000)
        assert state["main"].close_code == 1000, state["main"].close_code

    async def reconnect_since() -> None:
        missed = await asyncio.to_thread(publish, port, token, room, {"n": "missed"})
        conn = await open_connection(f"{base}/ws/{room}/stream{query}&since={state['last_id']}", {})
        assert (await conn.frame())["type"] == "connected"
        frame = await conn.frame()
        await conn.close(1000)
        assert frame["id"] == missed, frame

    bodies = [header_auth, query_auth, connected, join_ack, rest_event, json_ping, protocol_ping, compression,
              fragmented, message_60k, just_over_limit, binary_refused, close_1000, reconnect_since, over_4x]
    for name, body in zip(CHECKS, bodies, strict=True):
        await check(name, body)
    return results


def node_scenario(port: int) -> dict[str, tuple[str, str]]:
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    if not NODE_WS.exists():
        pytest.skip("Node's ws is not installed: make test runs npm ci in tests/node/ws")
    env = {"wsBase": f"ws://127.0.0.1:{port}", "httpBase": f"http://127.0.0.1:{port}", "token": make_token("matrix-node"),
           "user": "matrix-node", "room": "room-node", "maxFrameBytes": LIMIT}
    out = subprocess.run(["node", str(ROOT / "tests" / "js" / "node_ws_runner.js"), json.dumps(env)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return {name: tuple(value) for name, value in json.loads(out.stdout).items()}


def chromium_scenario(port: int) -> dict[str, tuple[str, str]]:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_AVOID_STATS"] = "true"
    profile = tempfile.mkdtemp(prefix="eddy-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--no-first-run", f"--user-data-dir={profile}"):
        options.add_argument(argument)
    browser = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        browser.set_script_timeout(120)
        browser.get(f"http://127.0.0.1:{port}/healthz")
        env = {"wsBase": f"ws://127.0.0.1:{port}", "httpBase": f"http://127.0.0.1:{port}",
               "token": make_token("matrix-chromium"), "user": "matrix-chromium", "room": "room-chromium",
               "maxFrameBytes": LIMIT, "headers": False}
        script = SCENARIO_JS.read_text() + (
            "\nconst done = arguments[arguments.length - 1];"
            f"\nconst env = {json.dumps(env)}; env.open = (url) => new WebSocket(url);"
            "\nscenario(env).then(done, (e) => done({error: String(e)}));")
        results = browser.execute_async_script(script)
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)
    assert "error" not in results, results
    return {name: tuple(value) for name, value in results.items()}


@pytest.fixture(scope="module")
def matrix(server):
    """Runs each client's scenario once, on first use: {client: {check: (outcome, detail)}}."""
    cache: dict[str, dict[str, tuple[str, str]]] = {}

    def results(client: str) -> dict[str, tuple[str, str]]:
        if client not in cache:
            if client == "node-ws":
                cache[client] = node_scenario(server.port)
            elif client == "chromium":
                cache[client] = chromium_scenario(server.port)
            else:
                cache[client] = asyncio.run(python_scenario(server.port, client))
        return cache[client]

    return results


@pytest.mark.timeout(300)
@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("client", CLIENTS)
def test_matrix(matrix, client, check):
    outcome, detail = matrix(client)[check]
    if outcome == "na":
        pytest.skip(f"{client} cannot: {detail}")
    assert outcome == "ok", f"{client} {check}: {detail}"


def test_close_1009_reaches_websocket_client_while_it_is_still_sending(server):
    """The server closes as soon as it has read the header of a frame over 4x the limit; the client is still
    writing the rest. Without a lingering close the kernel resets the connection and the close frame is lost
    (19 times in 20 before handlers/linger.py)."""
    codes = []
    for _ in range(10):
        ws = websocket_client.create_connection(
            f"ws://127.0.0.1:{server.port}/ws?access_token={make_token('oversize')}", timeout=TIMEOUT)
        ws.recv()
        ws.send("x" * (4 * LIMIT + 1000))
        try:
            while True:
                opcode, data = ws.recv_data(control_frame=True)
                if opcode == websocket_client.ABNF.OPCODE_CLOSE:
                    codes.append(struct.unpack("!H", data[:2])[0])
                    break
        except (OSError, websocket_client.WebSocketException) as exc:
            codes.append(type(exc).__name__)
        ws.shutdown()
    assert codes == [1009] * 10


# The server's keepalive, against clients that stop answering or stay idle ---------------------------------

def test_server_ping_timeout_closes_a_client_that_never_answers(server):
    """A raw socket that reads but never sends a pong gets the server's PING, then a close frame."""
    token = make_token("silent")
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
    key = b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws?access_token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    started = time.monotonic()
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    data = data.split(b"\r\n\r\n", 1)[1]
    opcodes = []
    while True:
        while len(data) < 2:
            chunk = sock.recv(65536)
            assert chunk, f"connection dropped without a close frame after {opcodes}"
            data += chunk
        size, start = data[1] & 0x7F, 2
        if size == 126:
            while len(data) < 4:
                data += sock.recv(65536)
            size, start = struct.unpack("!H", data[2:4])[0], 4
        while len(data) < start + size:
            data += sock.recv(65536)
        opcodes.append(data[0] & 0x0F)
        data = data[start + size:]
        if opcodes[-1] == 0x8:
            break
    sock.close()
    assert 0x9 in opcodes, opcodes  # pinged
    assert time.monotonic() - started < 2 * 1 + 1 + 3  # interval + timeout, with room for a busy machine


@pytest.mark.parametrize("client", ["websockets", "websocket-client", "aiohttp", "tornado"])
def test_idle_client_with_default_settings_outlives_two_keepalive_intervals(server, client):
    """An application idling in its receive loop, client at its defaults, while the server pings every second.

    (aiohttp, Tornado and websocket-client answer the server's pings only while the application reads.)
    """
    token = make_token(f"idle-{client}")
    url = f"ws://127.0.0.1:{server.port}/ws?access_token={token}"

    async def idle() -> None:
        if client == "websockets":
            conn: Connection = WebsocketsConnection()
            conn.ws = await websockets.connect(url)  # type: ignore[attr-defined]
        elif client == "aiohttp":
            conn = await AiohttpConnection.open(url, {}, heartbeat=None)  # the default: no heartbeat
        elif client == "tornado":
            conn = TornadoConnection()
            conn.ws = await websocket_connect(url)  # type: ignore[attr-defined]
        else:
            conn = WebsocketClientConnection()
            conn.ws = await asyncio.to_thread(websocket_client.create_connection, url)  # type: ignore[attr-defined]
        await conn.read_for(3.5)
        await conn.send(json.dumps({"type": "ping", "ref": "idle"}))
        while (await conn.frame()).get("ref") != "idle":
            pass
        await conn.close(1000)

    asyncio.run(idle())
