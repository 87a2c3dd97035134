"""Operations: /metrics moves by the right amounts end to end, /api/stats, the configuration reference."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import Client, http, json_of, make_token, publish

ROOT = Path(__file__).resolve().parent.parent


async def scrape(port: int) -> dict[tuple[str, tuple], float]:
    response = await http(port, "GET", "/metrics")
    assert response.code == 200 and response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def delta(before, after, name, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


@pytest.mark.gen_test
async def test_metrics_count_what_happened(http_server, http_port):
    before = await scrape(http_port)
    subscribers = [await Client.connect(http_port, "/ws/orders/stream", make_token(f"u{n}")) for n in range(2)]
    for client in subscribers:
        await client.recv()
    middle = await scrape(http_port)
    assert delta(before, middle, "eddy_connections", transport="websocket") == 2
    for n in range(3):
        await publish(http_port, "orders", "pedido_criado", {"n": n})
    for client in subscribers:
        for _ in range(3):
            await client.recv_type("event")
    subscribers[0].send("not json")
    await subscribers[0].recv()
    await http(http_port, "GET", "/api/channels/orders/events", token="junk")
    await asyncio.sleep(0.05)
    after = await scrape(http_port)
    assert delta(before, after, "eddy_events_published_total", via="http") == 3
    assert delta(before, after, "eddy_events_fanned_out_total") == 3
    assert delta(before, after, "eddy_deliveries_total") == 6
    assert delta(before, after, "eddy_frame_errors_total", code="INVALID_JSON") == 1
    assert delta(before, after, "eddy_auth_failures_total", reason="TOKEN_INVALID") == 1
    assert delta(before, after, "eddy_delivery_latency_seconds_count") == 3
    assert delta(before, after, "eddy_fanout_duration_seconds_count") == 3
    assert after[("eddy_watcher_lag_seconds", ())] >= 0
    for client in subscribers:
        client.close()


@pytest.mark.gen_test
async def test_metrics_time_the_garbage_collectors_pauses(http_server, http_port):
    before = await scrape(http_port)
    garbage = [[] for _ in range(50_000)]
    for a, b in zip(garbage, garbage[1:], strict=False):  # cycles the full collection must find and free
        a.append(b)
        b.append(a)
    del garbage, a, b
    gc.collect()  # the server runs in this process: a full collection stops it too
    after = await scrape(http_port)
    assert delta(before, after, "eddy_gc_pause_seconds_count", generation="2") >= 1
    assert delta(before, after, "eddy_gc_pause_seconds_sum", generation="2") > 0.001  # 50,000 lists take > 1 ms


@pytest.mark.gen_test
async def test_stats_show_this_tenants_channels_only(http_server, http_port):
    acme = await Client.connect(http_port, "/ws/orders/stream", make_token("a", tenant="acme"))
    globex = await Client.connect(http_port, "/ws/secret-plans/stream", make_token("g", tenant="globex"))
    await acme.recv()
    await globex.recv()
    await publish(http_port, "orders", "n", token=make_token("a", tenant="acme"))
    await acme.recv_type("event")
    stats = json_of(await http(http_port, "GET", "/api/stats", token=make_token("a", tenant="acme")))
    assert stats["process"]["connections"] == 2 and stats["process"]["pid"] > 0
    assert stats["channels"]["orders"]["subscribers"] == 1 and stats["channels"]["orders"]["events"] == 1
    assert "secret-plans" not in stats["channels"]
    assert (await http(http_port, "GET", "/api/stats")).code == 401
    # The live figures: the watcher's lag, and this process's delivery-latency histogram counting the event.
    assert stats["watcher"]["position"] == stats["process"]["watcher_position"] and stats["watcher"]["connected"]
    assert 0 <= stats["watcher"]["lag_seconds"] < 5
    latency = stats["delivery_latency"]
    assert len(latency["bounds"]) == len(latency["counts"]) and latency["bounds"][-1] == "+Inf"
    assert sum(latency["counts"]) == latency["count"] >= 1
    assert isinstance(stats["slowest_consumers"], list)
    acme.close()
    globex.close()


def test_configuration_reference_matches_the_code():
    from service.config import reference_markdown

    assert (ROOT / "docs" / "CONFIGURATION.md").read_text() == reference_markdown(), "run `make docs`"


def test_dockerfile_lints_clean_and_runs_what_make_serve_runs():
    import shutil
    import subprocess
    import sys

    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pip install" in dockerfile and 'ENTRYPOINT ["eddy", "serve"]' in dockerfile
    assert "HEALTHCHECK" in dockerfile and "/healthz" in dockerfile and "USER 10001" in dockerfile
