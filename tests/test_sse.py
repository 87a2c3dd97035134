"""Server-Sent Events (``GET /sse``) against a real server: live events, resume, refusals, accounting."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import orjson
import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.httputil import HTTPHeaders, HTTPInputError

from tests.support import TIMEOUT, Client, http, json_of, make_token, publish


class Closed(HTTPInputError):
    """Raised from the streaming callback to make the HTTP client drop the connection.

    An HTTPInputError, because Tornado's client closes on it without logging a traceback.
    """


class SSEStream:
    """An SSE response read as it arrives: its status and headers, and its messages parsed in order."""

    def __init__(self, port: int, query: str, token: str | None = None, *, headers: dict[str, str] | None = None,
                 lifetime: float = 3 * TIMEOUT) -> None:
        all_headers = dict(headers or {})
        if token:
            all_headers["Authorization"] = f"Bearer {token}"
        self.lines: list[str] = []
        self.headers = HTTPHeaders()
        self.code: int | None = None
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.comments: list[str] = []
        self.retry: int | None = None
        self._buffer = b""
        self._closing = False
        request = HTTPRequest(f"http://127.0.0.1:{port}/sse?{query}", headers=all_headers,
                              streaming_callback=self._on_chunk, header_callback=self._on_header,
                              connect_timeout=TIMEOUT, request_timeout=lifetime)
        #: Resolves when the response ends, or the connection is dropped (by either side or by `lifetime`).
        self.done = asyncio.ensure_future(self._fetch(request))

    async def _fetch(self, request: HTTPRequest) -> Any:
        try:
            return await AsyncHTTPClient().fetch(request, raise_error=False)
        except Exception as exc:  # 599: timeout, or dropped by close()
            return exc

    def _on_header(self, line: str) -> None:
        if self.code is None:
            self.code = int(line.split()[1])
        elif line.strip():
            self.headers.parse_line(line)

    def _on_chunk(self, chunk: bytes) -> None:
        if self._closing:
            raise Closed()
        self._buffer += chunk
        while b"\n\n" in self._buffer:
            block, self._buffer = self._buffer.split(b"\n\n", 1)
            message: dict[str, Any] = {}
            for line in block.decode().split("\n"):
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                    continue
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "retry":
                    self.retry = int(value)
                else:
                    message[name] = value
            if "data" in message:
                self.messages.put_nowait(message)

    async def next(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next message: ``{"id", "event", "data"}`` as far as present, ``json`` the parsed data."""
        message = await asyncio.wait_for(self.messages.get(), timeout)
        message["json"] = orjson.loads(message["data"])
        return message

    async def nothing_within(self, seconds: float) -> bool:
        try:
            message = await asyncio.wait_for(self.messages.get(), seconds)
        except TimeoutError:
            return True
        raise AssertionError(f"unexpected message {message}")

    def close(self) -> None:
        """Drop the connection when the next bytes arrive."""
        self._closing = True


async def stats(port: int) -> dict[str, Any]:
    return json_of(await http(port, "GET", "/api/stats", token=make_token()))


async def sse_gauge(port: int) -> float:
    text = (await http(port, "GET", "/metrics")).body.decode()
    found = re.search(r'^eddy_connections\{transport="sse"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


async def eventually(check, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# Streaming ----------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=20)
async def test_live_event_is_streamed_as_the_socket_frame(http_server, http_port):
    token = make_token()
    stream = SSEStream(http_port, "channels=tickets,orders", token)
    connected = await stream.next()
    assert stream.code == 200
    assert stream.headers["Content-Type"] == "text/event-stream"
    assert stream.headers["Cache-Control"] == "no-store"
    assert stream.headers["X-Accel-Buffering"] == "no"
    assert stream.retry == 3000
    assert connected["event"] == "connected"
    assert connected["json"]["channels"] == ["orders", "tickets"]
    assert (connected["json"]["user_id"], connected["json"]["tenant"]) == ("alice", "acme")
    socket = await Client.connect(http_port, "/ws/tickets/stream", token)
    await socket.recv()

    stored = await publish(http_port, "tickets", "ticket.created", {"plate": "ABC1D23"}, token)
    message = await stream.next()
    frame = await socket.recv_type("event")
    assert message["id"] == stored["id"] == frame["id"]
    assert "event" not in message  # a plain message: EventSource.onmessage gets every event
    assert message["json"] == frame  # the very frame a socket receives
    other = await publish(http_port, "orders", "order.created", {"n": 1}, token)
    assert (await stream.next())["id"] == other["id"]
    await publish(http_port, "elsewhere", "x", None, token)  # not subscribed
    await publish(http_port, "tickets", "x", None, make_token(tenant="globex"))  # same name, other tenant
    assert await stream.nothing_within(0.3)
    socket.close()
    stream.close()


@pytest.mark.gen_test(timeout=20)
async def test_token_in_the_query_string_as_for_a_browser(http_server, http_port):
    for name in ("access_token", "token"):
        stream = SSEStream(http_port, f"channels=tickets&{name}={make_token('bob')}")
        connected = await stream.next()
        assert connected["json"]["user_id"] == "bob"
        stream.close()


@pytest.mark.gen_test(timeout=20)
async def test_presence_and_typing_of_other_users_are_named_messages(http_server, http_port):
    stream = SSEStream(http_port, "channels=room", make_token("alice"))
    await stream.next()
    bob = await Client.connect(http_port, "/ws", make_token("bob"))
    await bob.recv()
    assert (await bob.request({"type": "join", "channel": "room", "ref": 1}))["type"] == "ack"
    message = await stream.next()
    assert message["event"] == "presence" and "id" not in message
    assert (message["json"]["user_id"], message["json"]["status"]) == ("bob", "online")
    bob.send({"type": "typing", "channel": "room", "is_typing": True})
    message = await stream.next()
    assert message["event"] == "typing" and "id" not in message
    assert message["json"] == {"type": "typing", "channel": "room", "user_id": "bob", "is_typing": True}
    bob.close()
    stream.close()


# Resume -------------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=20)
async def test_last_event_id_resumes_with_exactly_the_missed_events(http_server, http_port):
    token = make_token()
    channels = ["a", "b", "a", "other", "b", "a"]
    ids = [(await publish(http_port, channel, "n", {"n": n}, token))["id"] for n, channel in enumerate(channels)]

    stream = SSEStream(http_port, "channels=a,b", token, headers={"Last-Event-ID": ids[1]})
    connected = await stream.next()
    assert connected["event"] == "connected" and connected["id"] == ids[1]
    replayed = [await stream.next() for _ in range(3)]
    assert [m["id"] for m in replayed] == [ids[2], ids[4], ids[5]]  # in id order across both channels
    assert [m["json"]["data"]["n"] for m in replayed] == [2, 4, 5]
    live = await publish(http_port, "b", "n", {"n": 6}, token)
    assert (await stream.next())["id"] == live["id"]
    assert await stream.nothing_within(0.3)  # nothing twice
    stream.close()

    # `since` in the query does the same; the header wins, as an EventSource keeps its first URL.
    stream = SSEStream(http_port, f"channels=a,b&since={ids[0]}", token, headers={"Last-Event-ID": ids[4]})
    assert (await stream.next())["id"] == ids[4]
    assert [(await stream.next())["id"] for _ in range(2)] == [ids[5], live["id"]]
    assert await stream.nothing_within(0.2)
    stream.close()
    stream = SSEStream(http_port, f"channels=a&since={ids[3]}", token)
    await stream.next()
    assert (await stream.next())["id"] == ids[5]
    stream.close()


@pytest.mark.gen_test(timeout=20)
async def test_reconnect_without_any_event_resumes_from_the_connected_id(http_server, http_port, eddy):
    token = make_token()
    before = await publish(http_port, "a", "before", None, token)
    # Until the watcher has handed it over, that event would still reach a new stream live.
    await eddy.watcher.passed(before["position"], timeout=TIMEOUT)
    stream = SSEStream(http_port, "channels=a", token)
    start = (await stream.next())["id"]  # what an EventSource sends back as Last-Event-ID
    assert start == before["id"]
    stream.close()
    missed = (await publish(http_port, "a", "while away", None, token))["id"]
    stream = SSEStream(http_port, "channels=a", token, headers={"Last-Event-ID": start})
    await stream.next()
    assert (await stream.next())["id"] == missed
    assert await stream.nothing_within(0.2)
    stream.close()


@pytest.mark.gen_test(timeout=40)
async def test_resume_while_events_keep_coming_has_no_gap_and_no_duplicate(http_server, http_port):
    token = make_token()
    first = (await publish(http_port, "a", "n", {"n": -1}, token))["id"]
    published: list[str] = []

    async def publisher() -> None:
        for n in range(80):
            published.append((await publish(http_port, "ab"[n % 2], "n", {"n": n}, token))["id"])
            await asyncio.sleep(0.005)

    task = asyncio.ensure_future(publisher())
    received: list[str] = []
    while not task.done() or (published and (not received or received[-1] != published[-1])):
        since = received[-1] if received else first
        stream = SSEStream(http_port, "channels=a,b", token, headers={"Last-Event-ID": since})
        await stream.next()
        for _ in range(7):
            try:
                received.append((await stream.next(timeout=1.0))["id"])
            except TimeoutError:
                break
        stream.close()
    await task
    assert received == published  # every event once, in order, across the resumes


@pytest.mark.gen_test(timeout=20)
@pytest.mark.settings(history_size=2)
async def test_resume_after_trimmed_history_is_410_history_lost(http_server, http_port):
    token = make_token()
    ids = [(await publish(http_port, "a", "n", {"n": n}, token))["id"] for n in range(5)]
    response = await http(http_port, "GET", "/sse?channels=a", token=token, headers={"Last-Event-ID": ids[0]})
    assert response.code == 410
    assert json_of(response)["code"] == "HISTORY_LOST"
    stream = SSEStream(http_port, "channels=a", token, headers={"Last-Event-ID": ids[2]})
    await stream.next()
    assert [(await stream.next())["id"] for _ in range(2)] == ids[3:]
    stream.close()


# Refusals -----------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=20)
async def test_refusals_are_problem_bodies_before_streaming(http_server, http_port):
    token = make_token("alice")
    cases = [
        ("/sse?channels=tickets,user:bob", {}, 403, "FORBIDDEN"),  # another user's room
        ("/sse?channels=role:admin", {}, 403, "FORBIDDEN"),
        ("/sse?channels=bad%20name", {}, 400, "INVALID_CHANNEL"),
        ("/sse", {}, 400, "INVALID_PARAMETER"),
        ("/sse?channels=a", {"Last-Event-ID": "x"}, 400, "INVALID_PARAMETER"),
    ]
    for path, headers, status, code in cases:
        response = await http(http_port, "GET", path, token=token, headers=headers)
        assert response.code == status, (path, response.body)
        assert response.headers["Content-Type"] == "application/problem+json"
        body = json_of(response)
        assert (body["status"], body["code"]) == (status, code)
    assert (await stats(http_port))["process"]["connections"] == 0


@pytest.mark.gen_test(timeout=20)
async def test_missing_or_bad_token_is_401(http_server, http_port):
    response = await http(http_port, "GET", "/sse?channels=tickets")
    assert response.code == 401
    assert json_of(response)["code"] == "TOKEN_MISSING"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    response = await http(http_port, "GET", "/sse?channels=tickets", token=make_token(secret="x" * 40))
    assert (response.code, json_of(response)["code"]) == (401, "TOKEN_INVALID")
    response = await http(http_port, "GET", "/sse?channels=tickets", token=make_token(exp=int(time.time()) - 10))
    assert (response.code, json_of(response)["code"]) == (401, "TOKEN_EXPIRED")


# Accounting and ending ------------------------------------------------------------------

@pytest.mark.gen_test(timeout=20)
async def test_stream_is_counted_and_cleaned_up_when_the_client_goes(http_server, http_port, eddy):
    before = await sse_gauge(http_port)
    stream = SSEStream(http_port, "channels=tickets", make_token(), lifetime=1.0)
    await stream.next()
    assert await sse_gauge(http_port) == before + 1
    view = await stats(http_port)
    assert view["process"]["connections"] == 1
    assert view["channels"]["tickets"]["subscribers"] == 1
    await asyncio.wait_for(stream.done, TIMEOUT)  # the client gives up on the response and closes

    async def cleaned_up() -> bool:
        return await sse_gauge(http_port) == before and eddy.hub.connection_count == 0 \
            and eddy.hub.subscriber_count(("acme", "tickets")) == 0

    await eventually(cleaned_up)
    assert eddy.connections_from("127.0.0.1") == 0


@pytest.mark.gen_test(timeout=20)
@pytest.mark.settings(keepalive_interval=0.1)
async def test_keepalive_comments_and_shutdown_end_the_stream(http_server, http_port, eddy):
    stream = SSEStream(http_port, "channels=tickets", make_token())
    await stream.next()

    async def kept_alive() -> bool:
        return "keepalive" in stream.comments

    await eventually(kept_alive)
    eddy.hub.close_all(1001, "server shutting down")
    message = await stream.next()
    assert message["event"] == "reconnect" and message["json"]["reason"] == "server shutting down"
    response = await asyncio.wait_for(stream.done, TIMEOUT)
    assert getattr(response, "code", None) == 200  # ended cleanly: an EventSource reconnects after `retry`
    assert eddy.hub.connection_count == 0


@pytest.mark.gen_test(timeout=20)
async def test_expired_token_ends_the_stream_with_an_error_message(http_server, http_port, eddy):
    stream = SSEStream(http_port, "channels=tickets", make_token(exp=int(time.time()) + 1))
    await stream.next()
    message = await stream.next(timeout=3.0)
    assert message["event"] == "error" and message["json"]["code"] == "TOKEN_EXPIRED"
    await asyncio.wait_for(stream.done, TIMEOUT)
    assert eddy.hub.connection_count == 0


@pytest.mark.gen_test(timeout=20)
@pytest.mark.settings(max_connections_per_user=1)
async def test_streams_count_in_the_per_user_cap(http_server, http_port, eddy):
    """A user's SSE streams and sockets share EDDY_MAX_CONNECTIONS_PER_USER: the oldest is closed."""
    token = make_token()
    stream = SSEStream(http_port, "channels=tickets", token)
    assert (await stream.next())["event"] == "connected"
    socket = await Client.connect(http_port, "/ws/tickets/stream", token)
    assert (await socket.recv())["type"] == "connected"
    response = await asyncio.wait_for(stream.done, TIMEOUT)  # the stream, the oldest, was ended
    assert getattr(response, "code", None) == 200
    await publish(http_port, "tickets", "after", None)
    assert (await socket.recv_type("event"))["event"] == "after"  # the socket was kept
    socket.close()


@pytest.mark.gen_test(timeout=30)
@pytest.mark.settings(max_buffered_bytes=16 * 1024)
async def test_a_resume_larger_than_the_send_bound_is_streamed_as_the_client_reads(http_server, http_port, eddy):
    """The replay waits for the client below the bound instead of buffering the whole history (or closing it)."""
    token = make_token()
    ids = [(await publish(http_port, "tickets", "big", {"pad": "x" * 1000, "n": n}, token))["id"] for n in range(60)]
    stream = SSEStream(http_port, "channels=tickets&since=0", token)
    assert (await stream.next())["event"] == "connected"
    received = [(await stream.next())["id"] for _ in ids]
    assert received == ids  # 60 KB through a 16 KiB bound, in order, nothing lost
    stream.close()
