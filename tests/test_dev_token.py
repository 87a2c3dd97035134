"""The dashboard's development-token button: only with the development secret, only from this machine."""

from __future__ import annotations

import pytest

from tests.support import Client, http, json_of, make_token


@pytest.mark.gen_test
@pytest.mark.settings(jwt_secret="")
async def test_development_token_is_minted_for_loopback_callers(http_server, http_port, eddy):
    assert eddy.dev_secret_file is not None
    response = await http(http_port, "POST", "/api/dev-token", {"sub": "ana", "tenant": "demo", "roles": ["agent"]})
    assert response.code == 200
    body = json_of(response)
    assert (body["sub"], body["tenant"], body["roles"]) == ("ana", "demo", ["agent"])
    client = await Client.connect(http_port, "/ws", body["token"])
    connected = await client.recv()
    assert (connected["user_id"], connected["tenant"]) == ("ana", "demo")
    bad = await http(http_port, "POST", "/api/dev-token", {"sub": 5})
    assert bad.code == 400 and json_of(bad)["code"] == "INVALID_BODY"


@pytest.mark.gen_test
async def test_no_development_token_when_a_real_secret_is_configured(http_server, http_port):
    response = await http(http_port, "POST", "/api/dev-token", {"sub": "ana"}, make_token())
    assert response.code == 404 and json_of(response)["code"] == "NOT_FOUND"


@pytest.mark.gen_test
@pytest.mark.settings(jwt_secret="")
async def test_no_development_token_through_a_proxy_or_for_another_host(http_server, http_port):
    """Issue 15 (Medium): a reverse proxy on the same host connects from loopback; its headers give it away."""
    body = {"sub": "ana", "tenant": "victim", "roles": ["admin"]}
    refused = [{"X-Forwarded-For": "203.0.113.9"}, {"Forwarded": "for=203.0.113.9"}, {"X-Real-IP": "203.0.113.9"},
               {"Host": "eddy.example.com"}, {"Origin": "https://eddy.example.com"},
               {"Host": "localhost.example.com:8888"}]
    for headers in refused:
        response = await http(http_port, "POST", "/api/dev-token", body, headers=headers)
        assert response.code == 404 and json_of(response)["code"] == "NOT_FOUND", headers
    for headers in ({}, {"Host": f"localhost:{http_port}", "Origin": f"http://localhost:{http_port}"},
                    {"Host": f"[::1]:{http_port}"}):
        assert (await http(http_port, "POST", "/api/dev-token", body, headers=headers)).code == 200, headers
