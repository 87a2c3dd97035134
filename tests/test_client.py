"""The Python client (service/client.py) and ``eddy publish`` / ``eddy tail`` against real servers."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from typing import Any

import orjson
import pytest

from service.client import (
    EddyClient,
    EddyError,
    backoff_bounds,
    backoff_ceiling,
    backoff_delay,
    backoff_schedule,
    close_policy,
    publish_http,
)
from tests.processes import ROOT, free_port
from tests.support import SECRET, TIMEOUT, make_token, publish

RULES = """
[[channels]]
pattern = "chat:*"
join = ["tenant"]
publish = ["tenant"]

[[channels]]
pattern = "orders"
join = ["tenant"]
"""


@pytest.fixture
def settings(settings, tmp_path):
    (tmp_path / "rules.toml").write_text(RULES)
    return settings.with_changes(config=str(tmp_path / "rules.toml"))


async def within(awaitable, timeout: float = TIMEOUT):
    return await asyncio.wait_for(awaitable, timeout)


async def until(check, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def no_event_within(stream, seconds: float) -> bool:
    try:
        frame = await asyncio.wait_for(stream.__anext__(), seconds)
    except TimeoutError:
        return True
    raise AssertionError(f"unexpected event {frame}")


class Flaky:
    """A TCP proxy in front of the server that a test can cut: open links dropped, new ones refused.

    A network failure without any close frame, and a server that stays
    unreachable for exactly as long as the test needs.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.up = True
        self.links: set[asyncio.StreamWriter] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.port = 0
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> Flaky:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        if not self.up:
            writer.transport.abort()
            return
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.links.update((writer, upstream_writer))

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                sink.transport.abort()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    def cut(self) -> None:
        self.up = False
        for writer in self.links:
            writer.transport.abort()
        self.links.clear()

    def restore(self) -> None:
        self.up = True

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def url(port: int) -> str:
    return f"ws://127.0.0.1:{port}/ws"


# Pure functions -----------------------------------------------------------------------------

def test_backoff_doubles_from_one_second_to_a_32_second_cap_with_jitter():
    assert [backoff_ceiling(n) for n in range(1, 10)] == [1, 2, 4, 8, 16, 32, 32, 32, 32]
    assert backoff_schedule(10, jitter="none") == [1, 2, 4, 8, 16, 32, 32, 32, 32, 32]
    # Equal jitter: between half the ceiling and the ceiling.
    assert backoff_schedule(7, random=lambda: 0.0) == [0.5, 1, 2, 4, 8, 16, 16]
    assert backoff_schedule(7, random=lambda: 1.0) == [1, 2, 4, 8, 16, 32, 32]
    for attempt in range(1, 40):
        low, high = backoff_bounds(attempt)
        assert high <= 32.0
        for _ in range(20):
            assert low <= backoff_delay(attempt) <= high
    assert backoff_bounds(3, jitter="full") == (0.0, 4.0)
    assert backoff_schedule(4, base_delay=0.1, max_delay=0.3, jitter="none") == pytest.approx([0.1, 0.2, 0.3, 0.3])
    assert len(set(backoff_schedule(30))) > 20  # jittered: a fleet does not come back in step
    assert [close_policy(code) for code in (4029, 4003, 1001, 1006, None, 4008)] == \
        ["stop", "refresh", "now", "retry", "retry", "retry"]


@pytest.mark.gen_test
async def test_offline_queue_keeps_the_newest_frames():
    client = EddyClient("ws://127.0.0.1:9/ws", token="never-used", queue_limit=3)
    dropped: list[dict[str, Any]] = []
    client.on("dropped", dropped.append)
    futures = [client.publish("chat:1", "message", {"n": n}) for n in range(5)]
    client.typing("chat:1")  # fire and forget, but it takes a place in the queue too
    assert client.queued == 3
    assert [d["frame"]["data"]["n"] for d in dropped] == [0, 1, 2]
    for future in futures[:3]:
        with pytest.raises(EddyError) as refused:
            await future
        assert refused.value.code == "DROPPED"
    assert not any(future.done() for future in futures[3:])

    default = EddyClient("ws://127.0.0.1:9/ws", token="never-used")
    for n in range(105):
        default.publish("chat:1", "message", {"n": n})
    assert default.queued == 100


# Against a real server ------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=30)
async def test_join_publish_with_ack_and_receive_events(http_server, http_port):
    client = EddyClient(url(http_port), token=make_token("ana"))
    states: list[str] = []
    client.on("state", lambda change: states.append(change["state"]))
    stream = client.events()
    connected = await within(client.connect())
    assert (connected["user_id"], client.state) == ("ana", "connected")
    assert (await within(client.join("chat:1")))["channel"] == "chat:1"

    ack = await within(client.publish("chat:1", "message", {"text": "olá"}))
    assert ack["type"] == "ack" and ack["id"] and ack["timestamp"].endswith("Z")
    frame = await within(stream.__anext__())
    assert (frame["id"], frame["event"], frame["data"]) == (ack["id"], "message", {"text": "olá"})
    stored = await publish(http_port, "chat:1", "ticket.created", {"n": 1}, make_token("backend"))
    assert (await within(stream.__anext__()))["id"] == stored["id"]

    named: list[dict[str, Any]] = []
    client.on("event:ticket.created", named.append)
    await publish(http_port, "chat:1", "ticket.created", {"n": 2}, make_token("backend"))
    await within(stream.__anext__())
    assert [f["data"] for f in named] == [{"n": 2}]

    assert (await within(client.read("chat:1", ack["id"])))["type"] == "ack"
    assert (await within(client.presence("away")))["status"] == "away"
    users = (await within(client.presence_query("chat:1")))["users"]
    assert [(u["user_id"], u["status"]) for u in users] == [("ana", "away")]
    client.typing("chat:1")

    for refused_call, code in [
        (client.join("user:bob"), "FORBIDDEN"),
        (client.join("bad name"), "INVALID_CHANNEL"),
        (client.publish("orders", "x", None), "FORBIDDEN"),  # the rule has no publish list
    ]:
        with pytest.raises(EddyError) as refused:
            await within(refused_call)
        assert refused.value.code == code
    assert client.channels == ["chat:1"]
    assert (await within(client.leave("chat:1")))["type"] == "ack"

    client.close()
    assert states == ["connecting", "connected", "disconnected"]
    with pytest.raises(StopAsyncIteration):
        await within(stream.__anext__())


@pytest.mark.gen_test(timeout=30)
async def test_a_full_offline_queue_is_flushed_on_connect_under_the_frame_rate(http_server, http_port):
    client = EddyClient(url(http_port), token=make_token("ana"))
    joined = client.join("chat:1")
    acks = [client.publish("chat:1", "message", {"n": n}, idempotency_key=f"k-{n}") for n in range(100)]
    errors: list[EddyError] = []
    client.on("error", errors.append)
    await within(client.connect())
    await within(joined)
    ids = [(await within(ack))["id"] for ack in acks]  # none refused with RATE_LIMITED
    assert len(set(ids)) == 100 and ids == sorted(ids, key=int)
    assert errors == [] and client.queued == 0
    client.close()


@pytest.mark.gen_test(timeout=30)
async def test_reconnects_by_itself_and_resumes_exactly_once(http_server, http_port):
    proxy = await Flaky(http_port).start()
    client = EddyClient(url(proxy.port), token=make_token("ana"), base_delay=0.05, max_delay=0.2, max_attempts=100)
    states: list[str] = []
    client.on("state", lambda change: states.append(change["state"]))
    duplicates: list[dict[str, Any]] = []
    client.on("duplicate", duplicates.append)
    stream = client.events()
    await within(client.connect())
    await within(client.join("chat:1"))
    await within(client.join("chat:2"))
    backend = make_token("backend")
    first = await publish(http_port, "chat:1", "message", {"n": 0}, backend)
    assert (await within(stream.__anext__()))["id"] == first["id"]

    proxy.cut()
    await until(lambda: client.state == "reconnecting")
    missed = [(await publish(http_port, f"chat:{1 + n % 2}", "message", {"n": n}, backend))["id"]
              for n in range(1, 6)]
    offline = client.publish("chat:1", "message", {"offline": True})  # waits in the offline queue
    assert client.queued == 1
    await asyncio.sleep(0.3)  # a few refused attempts
    assert not offline.done()
    proxy.restore()

    received = [await within(stream.__anext__()) for _ in range(6)]
    assert sorted((f["id"] for f in received[:5]), key=int) == missed  # every missed event, resumed with since
    for channel in ("chat:1", "chat:2"):  # each channel in order (replays come channel by channel)
        ids = [int(f["id"]) for f in received[:5] if f["channel"] == channel]
        assert ids == sorted(ids)
    assert received[5]["data"] == {"offline": True}
    assert (await within(offline))["id"] == received[5]["id"]
    live = await publish(http_port, "chat:2", "message", {"n": 6}, backend)
    assert (await within(stream.__anext__()))["id"] == live["id"]
    assert await no_event_within(stream, 0.3)  # nothing twice
    assert states[:3] == ["connecting", "connected", "reconnecting"] and states[-1] == "connected"
    assert client.last_event_id("chat:2") == live["id"]
    client.close()
    await within(proxy.close())


@pytest.mark.gen_test(timeout=30)
async def test_server_going_away_means_reconnect_at_once(http_server, http_port, eddy):
    client = EddyClient(url(http_port), token=make_token("ana"), base_delay=0.05)
    notices: list[dict[str, Any]] = []
    client.on("reconnect", notices.append)
    stream = client.events()
    first = (await within(client.connect()))["connection_id"]
    await within(client.join("chat:1"))
    eddy.hub.close_all(1001, "server shutting down")
    await until(lambda: client.connected and client.user["connection_id"] != first)
    assert notices == [{"type": "reconnect", "reason": "server shutting down"}]
    await until(lambda: eddy.hub.subscriber_count(("acme", "chat:1")) == 1)  # re-joined
    stored = await publish(http_port, "chat:1", "message", None, make_token("backend"))
    assert (await within(stream.__anext__()))["id"] == stored["id"]
    client.close()


@pytest.mark.gen_test(timeout=30)
@pytest.mark.settings(token_grace=10)
async def test_token_provider_on_every_connect_and_on_token_expired(http_server, http_port, eddy):
    calls: list[float] = []

    async def provider() -> str:
        calls.append(time.time())
        ttl = 2 if len(calls) == 1 else 3600  # the first token expires during the test
        return make_token("ana", exp=int(time.time()) + ttl)

    client = EddyClient(url(http_port), token_provider=provider, base_delay=0.05)
    refreshed: list[dict[str, Any]] = []
    client.on("ack", lambda frame: refreshed.append(frame) if "expires_at" in frame else None)
    first = (await within(client.connect()))["connection_id"]
    assert len(calls) == 1
    await until(lambda: refreshed, timeout=5)  # TOKEN_EXPIRED -> provider -> authenticate on the same socket
    assert len(calls) == 2 and client.user["connection_id"] == first and client.connected
    eddy.hub.close_all(1001, "server shutting down")
    await until(lambda: client.connected and client.user["connection_id"] != first)
    assert len(calls) == 3
    client.close()


@pytest.mark.gen_test(timeout=30)
async def test_refused_tokens_and_unreachable_servers_make_the_client_give_up(http_server, http_port):
    client = EddyClient(url(http_port), token="not-a-jwt")
    with pytest.raises(EddyError) as refused:
        await within(client.connect())
    assert refused.value.code == "TOKEN_INVALID" and client.state == "error"

    tokens = iter(["not-a-jwt", make_token("ana")])
    errors: list[EddyError] = []
    client = EddyClient(url(http_port), token_provider=lambda: next(tokens), base_delay=0.01)
    client.on("error", errors.append)
    assert (await within(client.connect()))["user_id"] == "ana"  # the provider's next token is good
    assert [e.code for e in errors] == ["TOKEN_INVALID"]
    client.close()

    changes: list[dict[str, Any]] = []
    client = EddyClient(url(free_port()), token=make_token(), max_attempts=3, base_delay=0.01, max_delay=0.04)
    client.on("state", changes.append)
    with pytest.raises(EddyError) as gave_up:
        await within(client.connect())
    assert gave_up.value.code == "MAX_ATTEMPTS"
    assert [c["state"] for c in changes] == ["connecting", "reconnecting", "reconnecting", "reconnecting", "error"]
    delays = [c["delay"] for c in changes if c["state"] == "reconnecting"]
    for attempt, delay in enumerate(delays, 1):
        low, high = backoff_bounds(attempt, base_delay=0.01, max_delay=0.04)
        assert low <= delay <= high


# Real processes -------------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=60)
async def test_resume_across_a_real_server_restart(processes, tmp_path):
    storage = f"sqlite:///{tmp_path}/eddy.db"
    loop = asyncio.get_running_loop()
    a, b = processes(storage), processes(storage)
    client = EddyClient(url(a.port), token=make_token("ana"), base_delay=0.1, max_delay=0.5, max_attempts=100)
    stream = client.events()
    await within(client.connect())
    await within(client.join("tickets"))
    backend = make_token("backend")
    first = await publish(a.port, "tickets", "ticket.created", {"n": 0}, backend)
    assert (await within(stream.__anext__()))["id"] == first["id"]

    a.process.kill()  # no close frame, no reconnect notice
    await loop.run_in_executor(None, a.process.wait, 10)
    await until(lambda: client.state == "reconnecting")
    missed = [(await publish(b.port, "tickets", "ticket.created", {"n": n}, backend))["id"] for n in range(1, 6)]
    restarted = await loop.run_in_executor(None, lambda: processes(storage, port=a.port))
    assert restarted.port == a.port

    received = [(await within(stream.__anext__(), 15))["id"] for _ in missed]
    assert received == missed
    live = await publish(b.port, "tickets", "ticket.created", {"n": 6}, backend)
    assert (await within(stream.__anext__()))["id"] == live["id"]
    assert await no_event_within(stream, 0.3)
    client.close()


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDDY_")}
    return env | {"PYTHONPATH": str(ROOT), "EDDY_JWT_SECRET": SECRET} | extra


async def eddy_cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "service", *args, env=env,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await within(process.communicate(), 20)
    return process.returncode, out.decode(), err.decode()


@pytest.mark.gen_test(timeout=90)
async def test_tail_prints_what_publish_stores_across_a_restart(processes, tmp_path):
    storage = f"sqlite:///{tmp_path}/eddy.db"
    loop = asyncio.get_running_loop()
    server = processes(storage)
    env = cli_env(EDDY_TOKEN=make_token("ops"))
    http_url, ws_url = f"http://127.0.0.1:{server.port}", url(server.port)
    early = [orjson.loads((await eddy_cli("publish", "tickets", "ticket.created", f'{{"n":{n}}}', "--url", http_url,
                                          env=env))[1]) for n in range(2)]

    # Ctrl-C as at a terminal: a test run in the background of a script inherits SIGINT ignored (POSIX), and so
    # would `eddy tail`, which then could not be stopped the way this test stops it.
    tail = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "tail", "tickets", "orders", "--since", early[0]["id"], "--url", ws_url,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    async def line() -> dict[str, Any]:
        raw = await within(tail.stdout.readline(), 15)
        assert raw, "eddy tail ended"
        return orjson.loads(raw)

    try:
        assert (await line())["type"] == "connected"
        frames = [await line() for _ in range(3)]
        assert [(f["type"], f.get("channel")) for f in frames] == [("ack", "tickets"), ("event", "tickets"),
                                                                    ("ack", "orders")]
        assert frames[1]["id"] == early[1]["id"]  # replayed: stored after --since
        code, out, err = await eddy_cli("publish", "tickets", "ticket.created", '{"plate":"ABC1D23"}',
                                        "--url", http_url, env=env)
        assert code == 0, err
        stored = orjson.loads(out)
        assert (stored["channel"], stored["data"]) == ("tickets", {"plate": "ABC1D23"})
        event = await line()
        while event["type"] != "event":
            event = await line()
        assert event == {k: v for k, v in stored.items() if k != "position"}

        server.stop()  # kill -9, then the same port and the same file again
        server = await loop.run_in_executor(None, lambda: processes(storage, port=int(http_url.rsplit(":", 1)[1])))
        code, out, _ = await eddy_cli("publish", "orders", "order.created", "null", "--url", http_url, env=env)
        after = orjson.loads(out)
        seen = []
        while not seen or seen[-1]["id"] != after["id"]:
            frame = await line()
            if frame["type"] == "event":
                seen.append(frame)
        assert [f["id"] for f in seen] == [after["id"]]  # once, whether live or resumed
        assert b"reconnecting" in await within(tail.stderr.readline(), 5)
    finally:
        if tail.returncode is None:
            tail.send_signal(signal.SIGINT)
        await within(tail.wait(), 10)
    assert tail.returncode == 0


@pytest.mark.gen_test(timeout=60)
async def test_publish_and_tail_errors_are_clear(processes, tmp_path):
    server = processes(f"sqlite:///{tmp_path}/eddy.db")
    http_url = f"http://127.0.0.1:{server.port}"
    code, out, err = await eddy_cli("publish", "tickets", "x", "{}", "--url", http_url, env=cli_env())
    assert code == 2 and "no token" in err and "EDDY_TOKEN" in err and out == ""
    code, out, err = await eddy_cli("tail", "tickets", "--url", url(server.port), env=cli_env())
    assert code == 2 and "no token" in err
    code, out, err = await eddy_cli("publish", "tickets", "x", "{}", "--url", http_url, "--token", "bad",
                                    env=cli_env())
    assert code == 1 and out == ""
    problem = orjson.loads(err)
    assert (problem["status"], problem["code"]) == (401, "TOKEN_INVALID")
    code, _, err = await eddy_cli("publish", "bad name", "x", "{}", "--url", http_url,
                                  env=cli_env(EDDY_TOKEN=make_token()))
    assert code == 1 and orjson.loads(err)["code"] == "INVALID_CHANNEL"
    code, _, err = await eddy_cli("publish", "tickets", "x", "{not json", env=cli_env(EDDY_TOKEN=make_token()))
    assert code == 2 and "JSON" in err
    code, _, err = await eddy_cli("tail", "user:bob", "--url", url(server.port), env=cli_env(EDDY_TOKEN=make_token()))
    assert code == 1 and "FORBIDDEN" in err
    with pytest.raises(EddyError) as refused:
        await publish_http(http_url, "bad", "tickets", "x", None)
    assert refused.value.code == "TOKEN_INVALID"
