"""Two Eddy processes on one SQLite file, publishers running, clients dropped and resumed at random.

At the end every client's received ids equal the stored ids of its channels: no gap, no duplicate,
in commit order per channel. Presence is shared by both processes and heals when one is killed.
"""

from __future__ import annotations

import asyncio
import random
import signal

import pytest

from tests.processes import EddyProcess
from tests.support import Client, http, json_of, make_token, publish

CHANNELS = ["conv-a", "conv-b"]


@pytest.fixture
def pair(tmp_path):
    storage = f"sqlite:///{tmp_path}/shared.db"
    env = {"EDDY_PRESENCE_TTL": "1.5", "EDDY_HISTORY_SIZE": "100000"}
    processes = [EddyProcess(tmp_path, storage, env=env) for _ in range(2)]
    for process in processes:
        process.wait_ready()
    yield processes
    for process in processes:
        process.stop()


async def stored_ids(port: int, channel: str, token: str) -> list[str]:
    ids: list[str] = []
    while True:
        after = ids[-1] if ids else "0"
        page = json_of(await http(port, "GET", f"/api/channels/{channel}/events?after={after}&limit=1000", token=token))
        ids += [e["id"] for e in page["events"]]
        if len(page["events"]) < 1000:
            return ids


@pytest.mark.gen_test(timeout=120)
async def test_no_gap_no_duplicate_while_clients_drop_and_resume(pair):
    rng = random.Random(20261125)
    token = make_token("chaos")
    stop = asyncio.Event()
    published = 0

    async def publisher(index: int) -> None:
        nonlocal published
        n = 0
        while not stop.is_set():
            target = pair[(index + n) % 2]
            await publish(target.port, CHANNELS[n % 2], "message", {"p": index, "n": n}, token)
            published += 1
            n += 1

    received: dict[int, dict[str, list[str]]] = {c: {ch: [] for ch in CHANNELS} for c in range(4)}
    reconnects = 0

    async def session(client_id: int, until: asyncio.Event | None, want: dict[str, int] | None = None) -> None:
        """One connection: join every channel from the last id seen, read until dropped or complete."""
        process = rng.choice(pair)
        client = await Client.connect(process.port, "/ws", make_token(f"user-{client_id}"))
        await client.recv()
        mine = received[client_id]
        for ref, channel in enumerate(CHANNELS):
            join = {"type": "join", "channel": channel, "ref": ref}
            if mine[channel]:
                join["since"] = mine[channel][-1]
            client.send(join)
        acks = 0
        deadline = asyncio.get_running_loop().time() + rng.uniform(0.05, 0.5)
        while True:
            if want is not None and all(len(mine[ch]) >= want[ch] for ch in CHANNELS):
                break
            if until is not None and asyncio.get_running_loop().time() > deadline:
                break
            try:
                frame = await client.recv(0.05 if until is not None else 10)
            except TimeoutError:
                if until is None:
                    break  # the final drain got nothing for 10 s: the comparison below will say what is missing
                continue
            if frame["type"] == "ack":
                acks += 1
            elif frame["type"] == "event":
                mine[frame["channel"]].append(frame["id"])
            elif frame["type"] not in ("presence", "keepalive"):
                raise AssertionError(frame)
        client.connection.close()  # an abrupt drop, mid-stream

    async def flaky_client(client_id: int) -> None:
        nonlocal reconnects
        while not stop.is_set():
            await session(client_id, stop)
            reconnects += 1

    publishers = [asyncio.ensure_future(publisher(i)) for i in range(2)]
    clients = [asyncio.ensure_future(flaky_client(c)) for c in range(4)]
    await asyncio.sleep(0.3)  # let every client join once before the chaos window counts
    await asyncio.sleep(4)
    stop.set()
    await asyncio.gather(*publishers, *clients)

    expected = {ch: await stored_ids(pair[0].port, ch, token) for ch in CHANNELS}
    assert sum(len(v) for v in expected.values()) == published
    for client_id, channels in received.items():
        # A client first joined a moment after publishing began: it owes everything from its first id on.
        want = {ch: len(expected[ch]) - (expected[ch].index(ids[0]) if ids else 0) for ch, ids in channels.items()}
        await session(client_id, None, want=want)
    lost = duplicated = 0
    for client_id, channels in received.items():
        for channel, ids in channels.items():
            first = expected[channel].index(ids[0]) if ids else 0
            should = expected[channel][first:]
            duplicated += len(ids) - len(set(ids))
            lost += len(set(should) - set(ids))
            if ids != should:
                at = next(i for i, (x, y) in enumerate(zip(ids, should, strict=False)) if x != y)
                print("MISMATCH", client_id, channel, "received", ids[at-5:at+5], "expected", should[at-5:at+5])
            assert ids == should, f"client {client_id} {channel}"
    print(f"published={published} delivered={sum(len(i) for c in received.values() for i in c.values())} "
          f"reconnects={reconnects} lost={lost} duplicated={duplicated}")
    assert reconnects >= 8 and published >= 100
    assert lost == 0 and duplicated == 0


@pytest.mark.gen_test(timeout=60)
async def test_presence_is_shared_and_heals_after_kill(pair):
    a, b = pair
    on_a = await Client.connect(a.port, "/ws", make_token("ana"))
    await on_a.recv()
    assert (await on_a.request({"type": "join", "channel": "room", "ref": 1}))["type"] == "ack"
    on_b = await Client.connect(b.port, "/ws", make_token("bia"))
    await on_b.recv()
    assert (await on_b.request({"type": "join", "channel": "room", "ref": 1}))["type"] == "ack"
    # ana, on process A, hears that bia (on B) came online: the announcement crossed processes.
    assert (await on_a.recv_type("presence"))["user_id"] == "bia"
    for process in (a, b):
        users = json_of(await http(process.port, "GET", "/api/channels/room/presence", token=make_token("x")))["users"]
        assert [u["user_id"] for u in users] == ["ana", "bia"]

    a.process.send_signal(signal.SIGKILL)  # no clean-up: only expiry can remove ana
    await asyncio.get_running_loop().run_in_executor(None, a.process.wait, 10)
    for _ in range(100):
        users = json_of(await http(b.port, "GET", "/api/channels/room/presence", token=make_token("x")))["users"]
        if [u["user_id"] for u in users] == ["bia"]:
            break
        await asyncio.sleep(0.1)
    assert [u["user_id"] for u in users] == ["bia"]
    on_b.close()
