"""Helpers for tests: tokens, a small WebSocket client, HTTP calls against a running Eddy."""

from __future__ import annotations

import asyncio
import os
import struct
import time
import uuid
from base64 import b64encode
from typing import Any

import jwt
import orjson
import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse
from tornado.websocket import WebSocketClientConnection, websocket_connect

SECRET = "test-secret-of-at-least-thirty-two-bytes!"
# Tests fire dozens of requests at once; Tornado's default is 10 in flight.
AsyncHTTPClient.configure(None, max_clients=100)
TIMEOUT = 5.0
#: The MongoDB storage kinds the contract and scenario suites run on: one per driver.
MONGODB_KINDS = {"mongodb": "pymongo", "mongodb-motor": "motor"}


def mongodb_test_url(kind: str) -> str:
    """Fresh collections on the replica set EDDY_TEST_MONGODB_URI names, through the driver ``kind`` stands for."""
    base = os.environ.get("EDDY_TEST_MONGODB_URI")
    if not base:
        pytest.skip("EDDY_TEST_MONGODB_URI not set: no MongoDB server on this machine")
    return f"{base}{'&' if '?' in base else '?'}eddy_prefix=t{uuid.uuid4().hex[:12]}_&driver={MONGODB_KINDS[kind]}"


def make_token(sub: str = "alice", tenant: str | None = "acme", roles: list[str] | None = None,
               secret: str = SECRET, algorithm: str = "HS256", **claims: Any) -> str:
    payload: dict[str, Any] = {"sub": sub, "iat": int(time.time()), "exp": int(time.time()) + 3600}
    if tenant is not None:
        payload["tenant"] = tenant
    if roles is not None:
        payload["roles"] = roles
    payload.update(claims)
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, secret, algorithm=algorithm)


def backend_token(tenant: str | None = "acme", **claims: Any) -> str:
    """A server credential: a token holding the publisher role (EDDY_PUBLISHER_ROLE), as a backend would use."""
    return make_token("backend", tenant=tenant, roles=["publisher"], **claims)


class Client:
    """A test WebSocket client that reads JSON frames with timeouts."""

    def __init__(self, connection: WebSocketClientConnection) -> None:
        self.connection = connection

    @classmethod
    async def connect(cls, port: int, path: str = "/ws", token: str | None = None, *,
                      header: bool = True, query: str = "") -> Client:
        url = f"ws://127.0.0.1:{port}{path}{query}"
        headers = {"Authorization": f"Bearer {token}"} if token and header else {}
        connection = await asyncio.wait_for(websocket_connect(HTTPRequest(url, headers=headers)), TIMEOUT)
        return cls(connection)

    def send(self, frame: dict[str, Any] | str | bytes) -> None:
        if isinstance(frame, dict):
            frame = orjson.dumps(frame).decode()
        self.connection.write_message(frame, binary=isinstance(frame, bytes))

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        message = await asyncio.wait_for(self.connection.read_message(), timeout)
        if message is None:
            raise ConnectionError(f"closed: {self.connection.close_code} {self.connection.close_reason}")
        return orjson.loads(message)

    #: Frames other clients cause at any moment; skipped unless a test asks for them.
    BACKGROUND = ("keepalive", "presence")

    async def recv_type(self, kind: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next frame of type ``kind``, skipping keepalive and presence frames."""
        while True:
            frame = await self.recv(timeout)
            if frame["type"] == kind:
                return frame
            if frame["type"] not in self.BACKGROUND:
                raise AssertionError(f"expected {kind}, got {frame}")

    async def request(self, frame: dict[str, Any]) -> dict[str, Any]:
        """Send ``frame`` and return the next frame that is not keepalive or presence."""
        self.send(frame)
        while True:
            answer = await self.recv()
            if answer["type"] not in self.BACKGROUND:
                return answer

    async def no_frame_within(self, seconds: float) -> bool:
        """True when nothing but keepalive/presence frames arrives for ``seconds``."""
        deadline = asyncio.get_running_loop().time() + seconds
        while True:
            left = deadline - asyncio.get_running_loop().time()
            try:
                frame = await self.recv(max(left, 0.001))
            except TimeoutError:
                return True
            if frame["type"] not in self.BACKGROUND:
                raise AssertionError(f"unexpected frame {frame}")

    def close(self) -> None:
        self.connection.close()


async def http(port: int, method: str, path: str, body: Any = None, token: str | None = None,
               headers: dict[str, str] | None = None, raw: bytes | None = None) -> HTTPResponse:
    """An HTTP call that returns the response for every status (no raising on 4xx/5xx)."""
    all_headers = dict(headers or {})
    if token:
        all_headers["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
    if method in ("POST", "PUT") and data is None:
        data = b""
    request = HTTPRequest(f"http://127.0.0.1:{port}{path}", method=method, headers=all_headers, body=data,
                          request_timeout=TIMEOUT)
    try:
        return await AsyncHTTPClient().fetch(request)
    except HTTPClientError as exc:
        assert exc.response is not None
        return exc.response


def json_of(response: HTTPResponse) -> Any:
    return orjson.loads(response.body)


async def publish(port: int, channel: str, event: str = "ticket.created", data: Any = None,
                  token: str | None = None) -> dict[str, Any]:
    response = await http(port, "POST", "/api/events", {"channel": channel, "event": event, "data": data},
                          token or make_token())
    assert response.code == 201, response.body
    return json_of(response)


def only_session(eddy: Any) -> Any:
    """The one session connected to ``eddy`` (a test's only client); its ``transport`` is the server's handler."""
    (session,) = tuple(eddy.hub._connections)
    return session


class RawSocket:
    """A WebSocket client that answers a server ping only when told to, and notes when each one came."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, opened: float) -> None:
        self.reader, self.writer, self.opened = reader, writer, opened
        self.pings: list[float] = []

    @classmethod
    async def connect(cls, port: int, user: str, path: str = "/ws") -> RawSocket:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = b64encode(os.urandom(16)).decode()
        writer.write(f"GET {path}?access_token={make_token(user)} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                     f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        assert b" 101 " in await reader.readuntil(b"\r\n\r\n")
        return cls(reader, writer, asyncio.get_running_loop().time())

    async def frame(self) -> tuple[int, bytes]:
        head = await self.reader.readexactly(2)
        size = head[1] & 0x7F
        if size == 126:
            size = struct.unpack("!H", await self.reader.readexactly(2))[0]
        return head[0] & 0x0F, await self.reader.readexactly(size)

    def pong(self, payload: bytes) -> None:
        mask = os.urandom(4)
        self.writer.write(bytes([0x8A, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    async def run(self, answer: int, until: float) -> tuple[int, bytes] | None:
        """Read until ``until`` (loop time), answering the first ``answer`` pings; the close frame if one came."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                async with asyncio.timeout(until - loop.time()):
                    opcode, payload = await self.frame()
            except TimeoutError:
                return None
            if opcode == 0x9:
                self.pings.append(loop.time() - self.opened)
                if len(self.pings) <= answer:
                    self.pong(payload)
            elif opcode == 0x8:
                return opcode, payload
