"""The HTTP API: publish, history, health, and a problem body for every error."""

from __future__ import annotations

import asyncio

import pytest

from storage import StorageUnavailable
from tests.support import backend_token, http, json_of, make_token, publish


def problem(response, status: int, code: str) -> dict:
    assert response.code == status, response.body
    assert response.headers["Content-Type"] == "application/problem+json"
    body = json_of(response)
    assert body["status"] == status and body["code"] == code and body["detail"]
    return body


@pytest.mark.gen_test
async def test_publish_returns_the_stored_event(http_server, http_port):
    response = await http(http_port, "POST", "/api/events",
                          {"channel": "tickets", "event": "ticket.created", "data": {"plate": "ABC1D23"}}, make_token())
    assert response.code == 201
    body = json_of(response)
    assert body["type"] == "event" and body["channel"] == "tickets" and body["event"] == "ticket.created"
    assert body["data"] == {"plate": "ABC1D23"}
    assert body["id"] == str(body["position"]) and body["position"] > 0
    assert body["timestamp"].endswith("Z")


@pytest.mark.gen_test
async def test_history_pages_oldest_first(http_server, http_port):
    token = make_token()
    ids = [(await publish(http_port, "orders", "n", {"n": n}, token))["id"] for n in range(5)]
    await publish(http_port, "other", "noise", None, token)
    page = json_of(await http(http_port, "GET", "/api/channels/orders/events?limit=2", token=token))
    assert [e["id"] for e in page["events"]] == ids[:2] and page["lost"] is False
    page = json_of(await http(http_port, "GET", f"/api/channels/orders/events?after={ids[1]}", token=token))
    assert [e["data"]["n"] for e in page["events"]] == [2, 3, 4]
    assert all(e["type"] == "event" and e["channel"] == "orders" for e in page["events"])


@pytest.mark.gen_test
@pytest.mark.settings(history_size=3)
async def test_history_reports_lost_events(http_server, http_port):
    token = make_token()
    ids = [(await publish(http_port, "orders", "n", {"n": n}, token))["id"] for n in range(6)]
    for _ in range(100):  # trimming may run off the hot path
        page = json_of(await http(http_port, "GET", f"/api/channels/orders/events?after={ids[0]}", token=token))
        if page["lost"]:
            break
        await asyncio.sleep(0.05)
    assert page["lost"] is True
    assert [e["data"]["n"] for e in page["events"]] == [3, 4, 5]


@pytest.mark.gen_test
async def test_idempotency_key_stores_once(http_server, http_port):
    token = make_token()
    body = {"channel": "orders", "event": "pedido_criado", "data": {"id": 1}, "idempotency_key": "order-1"}
    first = json_of(await http(http_port, "POST", "/api/events", body, token))
    again = json_of(await http(http_port, "POST", "/api/events", body, token))
    by_header = json_of(await http(http_port, "POST", "/api/events", {k: v for k, v in body.items() if k != "idempotency_key"},
                                   token, headers={"Idempotency-Key": "order-1"}))
    assert first["id"] == again["id"] == by_header["id"]
    page = json_of(await http(http_port, "GET", "/api/channels/orders/events", token=token))
    assert len(page["events"]) == 1


@pytest.mark.gen_test
async def test_every_http_error_code(http_server, http_port, eddy, monkeypatch):
    token = make_token("alice")
    post = lambda body, **kw: http(http_port, "POST", "/api/events", body, token, **kw)  # noqa: E731
    problem(await http(http_port, "POST", "/api/events", {"channel": "c", "event": "e"}), 401, "TOKEN_MISSING")
    problem(await http(http_port, "POST", "/api/events", {"channel": "c", "event": "e"}, "junk"), 401, "TOKEN_INVALID")
    problem(await http(http_port, "GET", "/api/channels/c/events", token=make_token(exp=1)), 401, "TOKEN_EXPIRED")
    problem(await post(None, raw=b"{not json"), 400, "INVALID_BODY")
    problem(await post([1, 2]), 400, "INVALID_BODY")
    problem(await post({"channel": "c"}), 400, "INVALID_BODY")
    problem(await post({"channel": "c", "event": "e", "idempotency_key": 5}), 400, "INVALID_BODY")
    problem(await post({"channel": "bad name", "event": "e"}), 400, "INVALID_CHANNEL")
    problem(await post({"event": "e"}), 400, "INVALID_CHANNEL")
    problem(await http(http_port, "GET", "/api/channels/c/events?after=x", token=token), 400, "INVALID_PARAMETER")
    problem(await http(http_port, "GET", "/api/channels/c/events?limit=0", token=token), 400, "INVALID_PARAMETER")
    problem(await http(http_port, "GET", "/api/channels/user:bob/events", token=token), 403, "FORBIDDEN")
    problem(await http(http_port, "GET", "/nowhere", token=token), 404, "NOT_FOUND")
    problem(await http(http_port, "DELETE", "/api/events", token=token), 405, "METHOD_NOT_ALLOWED")
    big = {"channel": "c", "event": "e", "data": "x" * (eddy.settings.max_body_bytes + 1)}
    problem(await post(big), 413, "BODY_TOO_LARGE")

    async def unavailable(draft):
        raise StorageUnavailable("disk on fire")

    monkeypatch.setattr(eddy.storage, "append", unavailable)
    response = await post({"channel": "c", "event": "e"})
    problem(response, 503, "STORAGE_UNAVAILABLE")
    assert response.headers["Retry-After"] == "1"

    async def bug(draft):
        raise RuntimeError("boom")

    monkeypatch.setattr(eddy.storage, "append", bug)
    body = problem(await post({"channel": "c", "event": "e"}), 500, "INTERNAL_ERROR")
    assert "boom" not in body["detail"] and "Traceback" not in body["detail"]


@pytest.mark.gen_test
async def test_publishing_to_a_user_room_is_allowed_over_http(http_server, http_port):
    """The app notifies one user on all devices by publishing to user:<id>."""
    response = await http(http_port, "POST", "/api/events", {"channel": "user:bob", "event": "notificacao"},
                          backend_token())
    assert response.code == 201
    # Only a server credential targets built-in rooms: an end user's token (a browser holds it) cannot.
    for channel in ("user:bob", "role:agent", "tenant"):
        response = await http(http_port, "POST", "/api/events", {"channel": channel, "event": "e"}, make_token("eve"))
        assert response.code == 403 and json_of(response)["code"] == "FORBIDDEN", channel


@pytest.mark.gen_test
async def test_health_and_readiness(http_server, http_port, eddy, monkeypatch):
    assert json_of(await http(http_port, "GET", "/healthz")) == {"status": "ok"}
    ready = await http(http_port, "GET", "/readyz")
    assert ready.code == 200 and json_of(ready)["checks"] == {"storage": "ok", "watcher": "ok", "scheduler": "ok"}

    async def down():
        raise StorageUnavailable("gone")

    monkeypatch.setattr(eddy.storage, "ping", down)
    not_ready = await http(http_port, "GET", "/readyz")
    assert not_ready.code == 503
    assert json_of(not_ready)["checks"]["storage"].startswith("unavailable")
    await eddy.watcher.stop()
    assert json_of(await http(http_port, "GET", "/readyz"))["checks"]["watcher"] == "stopped"
