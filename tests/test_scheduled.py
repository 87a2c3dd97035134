"""Scheduled and delayed events: on time, cancellable, exactly once across processes and crashes."""

from __future__ import annotations

import asyncio
import signal
import time
from datetime import UTC, datetime

import pytest

from tests.processes import EddyProcess
from tests.support import Client, http, json_of, make_token
from tests.test_chaos import stored_ids


def schedule(port: int, token: str, n: int, **when):
    return http(port, "POST", "/api/events",
                {"channel": "tickets", "event": "ticket.expiringSoon", "data": {"n": n}, **when}, token)


def parse(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


@pytest.mark.gen_test
@pytest.mark.settings(schedule_interval=0.05)
async def test_delayed_event_is_published_when_due(http_server, http_port):
    token = make_token("backend", tenant="parking")
    client = await Client.connect(http_port, "/ws/tickets/stream", token)
    await client.recv()
    response = await schedule(http_port, token, 1, delay_s=0.4)
    assert response.code == 202
    item = json_of(response)["scheduled"]
    assert item["event"] == "ticket.expiringSoon" and item["data"] == {"n": 1}
    listed = json_of(await http(http_port, "GET", "/api/scheduled?channel=tickets", token=token))["scheduled"]
    assert [i["id"] for i in listed] == [item["id"]]
    assert await client.no_frame_within(0.2)  # not early
    frame = await client.recv_type("event", timeout=3)
    assert frame["event"] == "ticket.expiringSoon" and frame["data"] == {"n": 1}
    assert parse(frame["timestamp"]) >= parse(item["deliver_at"]) - 0.001
    assert frame["meta"]["scheduled_for"] == item["deliver_at"] and frame["meta"]["late"] is False
    assert json_of(await http(http_port, "GET", "/api/scheduled", token=token))["scheduled"] == []
    client.close()


@pytest.mark.gen_test(timeout=15)
@pytest.mark.settings(schedule_interval=60)
async def test_an_event_scheduled_through_this_process_is_published_at_its_time_not_at_the_poll(
        http_server, http_port, eddy):
    """The poll is a minute away; two events scheduled through this process go out at their own times, in order
    (the later one first in the heap: scheduled first)."""
    token = make_token("backend", tenant="parking")
    client = await Client.connect(http_port, "/ws/tickets/stream", token)
    await client.recv()
    await asyncio.sleep(0.3)  # the scheduler's first check is behind it: it sleeps until the poll
    late = json_of(await schedule(http_port, token, 2, delay_s=1.2))["scheduled"]
    soon = json_of(await schedule(http_port, token, 1, delay_s=0.6))["scheduled"]
    for item in (soon, late):
        frame = await client.recv_type("event", timeout=3)
        assert frame["data"] == item["data"]
        lateness = parse(frame["timestamp"]) - parse(item["deliver_at"])
        assert -0.001 <= lateness < 0.5, lateness
    for _ in range(50):  # the check pops them once its batch is complete, just after the frame left
        if not eddy.scheduler._expected:
            break
        await asyncio.sleep(0.02)
    assert eddy.scheduler._expected == []  # every expectation passed by a check, none kept
    client.close()


@pytest.mark.gen_test(timeout=10)
async def test_the_poll_keeps_its_pace_when_the_wall_clock_is_set_back(monkeypatch):
    """Due times are wall-clock times, the poll's pace is not: a clock set back an hour must not stop the checks."""
    from service import scheduler as module

    checks = []

    class Store:
        async def claim_due(self, owner, now, lease, limit):
            checks.append(now)
            return []

    scheduler = module.Scheduler(Store(), interval=0.1)
    scheduler.start()
    await asyncio.sleep(0.05)  # the first check, then a sleep
    wall = time.time
    monkeypatch.setattr(module.time, "time", lambda: wall() - 3600)
    await asyncio.sleep(0.55)
    await scheduler.stop()
    assert len(checks) >= 4, checks


@pytest.mark.gen_test
@pytest.mark.settings(schedule_interval=0.05)
async def test_cancelled_before_due_is_never_published(http_server, http_port):
    token = make_token("backend", tenant="parking")
    deliver_at = datetime.fromtimestamp(time.time() + 0.4, tz=UTC).isoformat()
    item = json_of(await schedule(http_port, token, 7, deliver_at=deliver_at))["scheduled"]
    other_tenant = make_token("x", tenant="someone-else")
    assert (await http(http_port, "DELETE", f"/api/scheduled/{item['id']}", token=other_tenant)).code == 404
    assert (await http(http_port, "DELETE", f"/api/scheduled/{item['id']}", token=token)).code == 204
    assert (await http(http_port, "DELETE", f"/api/scheduled/{item['id']}", token=token)).code == 404
    await asyncio.sleep(0.8)
    page = json_of(await http(http_port, "GET", "/api/channels/tickets/events", token=token))
    assert page["events"] == []


@pytest.mark.gen_test
async def test_scheduling_errors(http_server, http_port):
    token = make_token()
    for when in ({"delay_s": -1}, {"delay_s": "soon"}, {"deliver_at": "tomorrow"},
                 {"deliver_at": "2030-01-01T00:00:00"}, {"delay_s": 1, "deliver_at": "2030-01-01T00:00:00Z"},
                 {"delay_s": 10 ** 9}):
        response = await schedule(http_port, token, 0, **when)
        assert response.code == 400 and json_of(response)["code"] == "INVALID_BODY", when
    # A retried scheduling request with the same key schedules once.
    first = json_of(await schedule(http_port, token, 1, delay_s=60, idempotency_key="remind-1"))["scheduled"]
    again = json_of(await schedule(http_port, token, 1, delay_s=60, idempotency_key="remind-1"))["scheduled"]
    assert first["id"] == again["id"]


FAST = {"EDDY_SCHEDULE_INTERVAL": "0.05", "EDDY_SCHEDULE_LEASE": "1", "EDDY_HISTORY_SIZE": "100000"}


@pytest.mark.gen_test(timeout=90)
async def test_two_processes_publish_each_due_event_exactly_once(tmp_path):
    storage = f"sqlite:///{tmp_path}/eddy.db"
    pair = [EddyProcess(tmp_path, storage, env=FAST) for _ in range(2)]
    try:
        for process in pair:
            process.wait_ready()
        token = make_token("backend", tenant="parking")
        due = time.time() + 6.0
        deliver = {n: due + (n % 20) * 0.1 for n in range(500)}  # 500 events due within the same two seconds
        for chunk in range(0, 500, 50):  # scheduled through both processes, 50 requests at a time
            answers = await asyncio.gather(*(
                schedule(pair[n % 2].port, token, n,
                         deliver_at=datetime.fromtimestamp(deliver[n], tz=UTC).isoformat())
                for n in range(chunk, chunk + 50)))
            assert all(answer.code == 202 for answer in answers)
        assert time.time() < due, "scheduling took too long for this test's timeline"
        for _ in range(400):
            if not json_of(await http(pair[0].port, "GET", "/api/scheduled", token=token))["scheduled"]:
                break
            await asyncio.sleep(0.1)
        events = []
        after = "0"
        while True:
            page = json_of(await http(pair[0].port, "GET", f"/api/channels/tickets/events?after={after}&limit=1000",
                                      token=token))
            events += page["events"]
            if len(page["events"]) < 1000:
                break
            after = page["events"][-1]["id"]
        numbers = [e["data"]["n"] for e in events]
        assert sorted(numbers) == list(range(500))  # every one, once
        early = [e for e in events if parse(e["timestamp"]) < deliver[e["data"]["n"]] - 0.001]
        assert early == []
        lateness = sorted(parse(e["timestamp"]) - deliver[e["data"]["n"]] for e in events)
        print(f"scheduled=500 published={len(events)} duplicates={len(numbers) - len(set(numbers))} "
              f"lateness p50={lateness[250] * 1000:.0f} ms p99={lateness[494] * 1000:.0f} ms "
              f"max={lateness[-1] * 1000:.0f} ms")
    finally:
        for process in pair:
            process.stop()


@pytest.mark.gen_test(timeout=90)
async def test_kill_9_while_publishing_and_downtime(tmp_path):
    """A process killed while it holds claims loses nothing; overdue events go out at once, flagged late."""
    storage = f"sqlite:///{tmp_path}/eddy.db"
    token = make_token("backend", tenant="parking")
    first = EddyProcess(tmp_path, storage, env=FAST)
    first.wait_ready()
    due = time.time() + 6.0  # far enough ahead that scheduling 300 events finishes first
    for chunk in range(0, 300, 50):
        # 200 due at once (being published when the kill comes), 100 due during the downtime.
        answers = await asyncio.gather(*(
            schedule(first.port, token, n, deliver_at=datetime.fromtimestamp(
                due if n < 200 else due + 1.0 + n * 0.001, tz=UTC).isoformat())
            for n in range(chunk, chunk + 50)))
        assert all(answer.code == 202 for answer in answers)
    assert time.time() < due, "scheduling took too long for this test's timeline"
    while time.time() < due:
        await asyncio.sleep(0.01)
    for _ in range(200):  # kill it in the middle of publishing
        published = len(await stored_ids(first.port, "tickets", token))
        if published:
            break
        await asyncio.sleep(0.005)
    first.process.send_signal(signal.SIGKILL)
    await asyncio.get_running_loop().run_in_executor(None, first.process.wait, 10)
    first.stop()
    await asyncio.sleep(3.0)  # downtime: the rest falls due (more than 1 s ago) with nobody running

    second = EddyProcess(tmp_path, storage, env=FAST)
    try:
        second.wait_ready()
        for _ in range(400):  # generous: CI machines can be slow
            if not json_of(await http(second.port, "GET", "/api/scheduled", token=token))["scheduled"]:
                break
            await asyncio.sleep(0.1)
        events = json_of(await http(second.port, "GET", "/api/channels/tickets/events?limit=1000", token=token))["events"]
        numbers = [e["data"]["n"] for e in events]
        print(f"published before kill={published} total={len(events)} duplicates={len(numbers) - len(set(numbers))}")
        assert sorted(numbers) == list(range(300))
        overdue = [e for e in events if e["data"]["n"] >= 200]
        assert all(e["meta"]["late"] is True and e["meta"]["late_ms"] > 1000 for e in overdue)
        assert [e["data"]["n"] for e in overdue] == sorted(e["data"]["n"] for e in overdue)  # in due order
    finally:
        second.stop()
