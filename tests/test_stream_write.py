"""The send() fast path relies on one private IOStream attribute: this fails loudly if a Tornado release moves it."""

from __future__ import annotations

import json

import pytest
from tornado.iostream import IOStream

from handlers import stream_write
from handlers.websocket import EventSocket
from service.frames import PreparedMessage
from tests.support import Client, RawSocket, make_token, only_session


def server_stream(eddy) -> IOStream:
    return only_session(eddy).transport.ws_connection.stream


@pytest.mark.gen_test
async def test_tornado_still_has_what_the_fast_path_needs(http_server, http_port, eddy, monkeypatch):
    client = await Client.connect(http_port, "/ws", make_token())
    await client.recv()
    stream = server_stream(eddy)
    assert stream_write.has_fast_path(stream), (
        "Tornado's IOStream no longer has _write_buffer/socket: every write now takes the slow IOStream.write "
        "path; update handlers/stream_write.py for this Tornado release")
    writes = []
    monkeypatch.setattr(IOStream, "write", lambda self, data: writes.append(data))
    stream_write.write(stream, PreparedMessage(b'{"type":"fast"}').websocket_frame)
    assert writes == []  # one send(), no IOStream.write
    assert (await client.recv())["type"] == "fast"
    client.close()


@pytest.mark.gen_test
async def test_without_the_private_attribute_writes_fall_back_to_iostream_write(http_server, http_port, eddy,
                                                                                 monkeypatch):
    client = await Client.connect(http_port, "/ws", make_token())
    await client.recv()
    stream = server_stream(eddy)
    monkeypatch.setattr(stream_write, "PRIVATE_BUFFER", "_renamed_by_a_future_tornado")
    assert not stream_write.has_fast_path(stream)
    writes = []
    original = IOStream.write
    monkeypatch.setattr(IOStream, "write", lambda self, data: writes.append(data) or original(self, data))
    stream_write.write(stream, PreparedMessage(b'{"type":"slow"}').websocket_frame)
    assert len(writes) == 1
    assert (await client.recv())["type"] == "slow"
    client.close()


@pytest.mark.gen_test
async def test_tornado_still_has_what_a_lane_needs(http_server, http_port, eddy):
    client = await Client.connect(http_port, "/ws/room/stream", make_token())
    await client.recv()
    session = only_session(eddy)
    assert stream_write.has_lane(server_stream(eddy)), (
        "Tornado's IOStream no longer has _total_write_index/_total_write_done_index: lone events now take the "
        "transport's slower path; update handlers/stream_write.py for this Tornado release")
    assert eddy.hub._channels[("acme", "room")][session] is session.transport.lane is not None
    client.close()


@pytest.mark.gen_test(timeout=60)
@pytest.mark.settings(max_buffered_bytes=64 << 20)
async def test_lone_events_to_a_client_that_stops_reading_arrive_whole_and_in_order(http_server, http_port, eddy,
                                                                                   monkeypatch):
    """The lane writes what the kernel takes, queues the rest, and declines while bytes are queued.

    The client is the ``websockets`` library at its defaults (permessage-deflate offered and agreed, so the lane
    renders compressed frames; pings every 20 s). It reads nothing until every event is published.
    """
    import base64
    import os

    import websockets

    outcomes = {"written": 0, "declined": 0, "rest": 0}
    write_all, write_rest = stream_write.Lane.write_all, EventSocket.write_rest

    def counting_write_all(lanes, message):
        declined = write_all(lanes, message)
        outcomes["written"] += len(lanes) - len(declined)
        outcomes["declined"] += len(declined)
        return declined

    def counting_write_rest(self, data):
        outcomes["rest"] += 1
        write_rest(self, data)

    monkeypatch.setattr(stream_write.Lane, "write_all", counting_write_all)
    monkeypatch.setattr(EventSocket, "write_rest", counting_write_rest)
    async with websockets.connect(f"ws://127.0.0.1:{http_port}/ws/room/stream?access_token={make_token()}") as ws:
        assert "permessage-deflate" in ws.response.headers["Sec-WebSocket-Extensions"]
        await ws.recv()  # connected
        session = only_session(eddy)
        stream = session.transport.ws_connection.stream
        sent = []
        # Lone events (each fanned out before the next is stored) of 48 KiB that do not compress away,
        # until the kernel refused part of one and the stream holds it, then a few more behind it.
        while len(sent) < 400 and (not stream_write.buffered(stream) or outcomes["declined"] < 3):
            data = base64.b64encode(os.urandom(36 << 10)).decode()
            stored = await eddy.append("acme", "room", "blob", {"n": len(sent), "blob": data})
            await eddy.watcher.passed(stored.position, timeout=5)
            sent.append(data)
        assert outcomes["rest"] >= 1 and outcomes["declined"] >= 3, outcomes
        for n, data in enumerate(sent):
            event = json.loads(await ws.recv())
            assert event["data"] == {"n": n, "blob": data}


@pytest.mark.gen_test
async def test_a_lane_sends_nothing_after_the_close_frame(http_server, http_port, eddy):
    """The server's close frame goes through the stream's ``write``; the lane must look again, and decline.

    The client does not answer the close, so it stays subscribed while the server waits for its close frame: a lone
    event in that time would follow the close frame on the wire (RFC 6455 forbids any frame after it).
    """
    import asyncio

    client = await RawSocket.connect(http_port, "alice", "/ws/room/stream")
    session = only_session(eddy)
    lane = session.transport.lane
    stored = await eddy.append("acme", "room", "before", {})
    await eddy.watcher.passed(stored.position, timeout=5)
    assert lane.clear  # the lane sent that one without looking at the stream again
    session.transport.close(1000, "bye")
    assert eddy.hub._channels[("acme", "room")][session] is lane  # still subscribed: the client has not answered
    stored = await eddy.append("acme", "room", "after", {})
    await eddy.watcher.passed(stored.position, timeout=5)
    frames = [await client.frame()]
    while frames[-1][0] != 0x8:
        frames.append(await client.frame())
    assert [json.loads(payload).get("event") for opcode, payload in frames if opcode == 0x1] == [None, "before"]
    assert frames[-1][1][:2] == (1000).to_bytes(2, "big")
    try:
        after = await asyncio.wait_for(client.reader.read(1), 0.5)
    except TimeoutError:
        after = b""
    assert after == b"", "a frame followed the close frame"
    client.writer.close()
