"""The send() fast path relies on one private IOStream attribute: this fails loudly if a Tornado release moves it."""

from __future__ import annotations

import pytest
from tornado.iostream import IOStream

from handlers import stream_write
from service.frames import PreparedMessage
from tests.support import Client, make_token


def server_stream(eddy) -> IOStream:
    (session,) = tuple(eddy.hub._connections)
    return session.transport.ws_connection.stream


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
