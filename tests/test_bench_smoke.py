"""`make bench` still works: the side-by-side harness runs every server at 50 sockets and loses nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests.placement import format_cpus

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 120  # the smoke run takes ~20 s on an idle 2-core machine


def run_smoke(out: Path, *args: str) -> str:
    """``python -m loadtests.bench --smoke``; its output (the tables), after checking that it succeeded."""
    pytest.importorskip("uvloop")
    pytest.importorskip("socketio")
    pytest.importorskip("uvicorn")
    pytest.importorskip("websockets")
    pytest.importorskip("psutil")
    process = subprocess.Popen(
        [sys.executable, "-m", "loadtests.bench", "--smoke", "--out", str(out), *args],
        cwd=ROOT, env={**{k: v for k, v in os.environ.items() if k != "BENCH_CLIENTS_BATCH"}, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # the harness stops its servers and load generators
        try:
            output, _ = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        pytest.fail(f"the smoke benchmark did not finish within {TIMEOUT} s:\n{output[-4000:]}")
    assert process.returncode == 0, output[-4000:]
    return output


@pytest.mark.timeout(TIMEOUT + 30)
def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    output = run_smoke(out)
    results = json.loads(out.read_text())
    runs = {run["server"]: run for run in results["runs"]}
    assert set(runs) == {"eddy", "eddy-socketio", "seed003", "socketio", "websockets", "floor"}, output[-4000:]
    for server, run in runs.items():
        assert run["ok"], (server, run.get("error"), run.get("server_log"))
        assert run["connected"] == 50, (server, run["connected"])
        expected = (run["steady_events"] + run["burst_events"]) * 50
        assert run["steady_received"] + run["burst_received"] == expected, (server, run)
        assert run["lost"] == 0, (server, run["lost"])
        assert run["duplicates"] == 0, (server, run["duplicates"])
        assert run["steady_latency_p50_ms"] is not None and run["steady_latency_p50_ms"] >= 0
        assert run["burst_deliveries_per_s"] > 0
    assert "50 sockets" in output and "Eddy's ratio to each peer" in output and "× the floor" in output
    assert "Eddy's Socket.IO dialect" in output


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs: one for the server, one for the clients")
@pytest.mark.timeout(TIMEOUT + 30)
def test_bench_places_and_schedules_the_server_tree_and_the_load_generators(tmp_path: Path) -> None:
    server_cpu, client_cpu = sorted(os.sched_getaffinity(0))[:2]
    out = tmp_path / "bench.json"
    output = run_smoke(out, "--servers", f"eddy-p2@{server_cpu}/{client_cpu},floor")
    runs = {run["server"]: run for run in json.loads(out.read_text())["runs"]}
    pinned, unpinned = runs[f"eddy-p2@{server_cpu}/{client_cpu}"], runs["floor"]
    assert pinned["ok"] and pinned["lost"] == 0, (pinned.get("error"), pinned.get("server_log"))
    # --processes 2: a parent and two workers, all on the server's CPU, as the kernel reports it.
    assert pinned["server_processes"] == 2
    assert list(pinned["affinity"]["server"].values()) == [str(server_cpu)] * 3, pinned["affinity"]
    assert pinned["affinity"]["load_generators"] == [str(client_cpu)] * 2
    assert pinned["affinity"]["harness"] == str(client_cpu)
    assert sum(pinned["sockets_per_process"].values()) == 50 and len(pinned["sockets_per_process"]) == 3
    # The next run, unpinned, undoes the client side's pins: every CPU again.
    everywhere = format_cpus(frozenset(os.sched_getaffinity(0)))
    assert unpinned["ok"] and unpinned["affinity"]["load_generators"] == [everywhere] * 2, unpinned["affinity"]
    assert list(unpinned["affinity"]["server"].values()) == [everywhere]
    assert f"eddy-p2@{server_cpu}/{client_cpu}" in output and "sockets each" in output
    # The client side runs as batch tasks (a woken client never preempts the server); every server process is an
    # ordinary task all the same, though a child inherits its parent's policy.
    for run in (pinned, unpinned):
        assert run["policies"]["harness"] == "SCHED_BATCH" and run["policies"]["load_generators"] == ["SCHED_BATCH"] * 2
    assert list(pinned["policies"]["server"].values()) == ["SCHED_OTHER"] * 3, pinned["policies"]
    assert list(unpinned["policies"]["server"].values()) == ["SCHED_OTHER"], unpinned["policies"]
    assert "SCHED_BATCH / SCHED_OTHER" in output
