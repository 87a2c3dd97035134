"""handlers/detached.py: an open WebSocket drops what only its handshake needed, and still works.

If a Tornado release renames what it rests on, the first test fails: update
``HANDSHAKE_ONLY`` (the second shows that sockets keep working meanwhile).
"""

from __future__ import annotations

import sys

import pytest

from handlers import detached
from handlers.websocket import EventSocket
from tests.support import Client, make_token


@pytest.fixture
def opened(monkeypatch):
    """The server-side handlers of the sockets opened in the test, with what forget_handshake returned."""
    seen: list[tuple[EventSocket, bool, bool]] = []
    forget = detached.forget_handshake

    def spy(handler, also=()):
        was_supported = detached.supported(handler)
        seen.append((handler, was_supported, forget(handler, also)))
        return seen[-1][2]

    monkeypatch.setattr(detached, "forget_handshake", spy)
    return seen


async def still_works(port: int, user: str) -> None:
    client = await Client.connect(port, "/ws", make_token(user), query="?since=0")
    assert (await client.recv())["type"] == "connected"
    assert await client.request({"type": "ping", "timestamp": "t"}) == {"type": "pong", "timestamp": "t"}
    assert (await client.request({"type": "join", "channel": "orders", "ref": 1}))["type"] == "ack"
    client.close()


@pytest.mark.gen_test
async def test_tornado_still_has_what_forget_handshake_needs(http_server, http_port, opened):
    await still_works(http_port, "alice")
    [(handler, was_supported, done)] = opened
    assert was_supported and done, "Tornado's RequestHandler changed: update handlers/detached.HANDSHAKE_ONLY"
    state = vars(handler)
    assert not set(detached.HANDSHAKE_ONLY) & set(state)
    # Tornado's guard against HTTP methods on a WebSocket still holds, from the class now.
    for name in ("write", "finish", "set_header", "set_status", "flush", "redirect", "set_cookie"):
        assert name not in state
        with pytest.raises(RuntimeError, match="not supported for Web Sockets"):
            getattr(handler, name)("x")
    assert isinstance(handler, EventSocket) and type(handler).__name__ == "EventSocket"
    assert handler.request.connection is None and handler.request.server_connection is None
    assert len(handler.request.headers) == 0 and handler.request.query == "" and "access_token" not in handler.request.uri
    assert sys.getsizeof(state) <= 464  # a small table; 1,584 bytes with Tornado's seven raisers in it


@pytest.mark.gen_test
async def test_a_tornado_without_those_attributes_leaves_the_handler_as_it_was(http_server, http_port, opened,
                                                                              monkeypatch):
    monkeypatch.setattr(detached, "HANDSHAKE_ONLY", (*detached.HANDSHAKE_ONLY, "_renamed_by_a_future_tornado"))
    await still_works(http_port, "bob")
    [(handler, was_supported, done)] = opened
    assert not was_supported and not done
    assert "write" in vars(handler) and "_headers" in vars(handler)  # Tornado's own state, untouched
    assert handler.request.connection is not None
    assert len(handler.request.headers) == 0  # the request's public fields are cleared all the same
