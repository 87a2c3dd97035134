"""Regression tests for the findings of the hostile review (issue 15), one or more per finding.

Each test names its finding; docs/SECURITY.md lists them with the fix. All run against a real server on a
real SQLite file (the ``http_server``/``http_port`` fixtures) unless the finding is about a storage backend.
"""

from __future__ import annotations

import pytest

from tests.support import Client, http, json_of, make_token, publish

TOO_BIG_ID = str(1 << 63)  # one above the largest position a store holds


# Medium: event ids above 2^63-1 gave 500 (REST, SSE) and INTERNAL_ERROR on join -------------------------------


@pytest.mark.gen_test
async def test_event_ids_above_the_64_bit_range_are_refused_everywhere(http_server, http_port):
    token = make_token()
    await publish(http_port, "orders", token=token)
    response = await http(http_port, "GET", f"/api/channels/orders/events?after={TOO_BIG_ID}", token=token)
    assert response.code == 400 and json_of(response)["code"] == "INVALID_PARAMETER"
    response = await http(http_port, "GET", f"/sse?channels=orders&since={TOO_BIG_ID}", token=token)
    assert response.code == 400 and json_of(response)["code"] == "INVALID_PARAMETER"
    response = await http(http_port, "GET", f"/ws?since={TOO_BIG_ID}", token=token,
                          headers={"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                                   "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert response.code == 400
    client = await Client.connect(http_port, "/ws", token)
    await client.recv_type("connected")
    for frame in ({"type": "join", "ref": 1, "channel": "orders", "since": TOO_BIG_ID},
                  '{"type": "join", "ref": 1, "channel": "orders", "since": %d}' % (1 << 64),
                  {"type": "sync", "ref": 1, "channel": "orders", "last_id": TOO_BIG_ID}):
        answer = await client.request(frame)  # type: ignore[arg-type]
        assert answer["type"] == "error" and answer["code"] == "INVALID_FRAME", answer
    # The room was not left subscribed: a new event on it is not delivered to this socket.
    await publish(http_port, "orders", token=token)
    assert await client.no_frame_within(0.3)
    client.close()
