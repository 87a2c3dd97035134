"""`make bench` still works: the side-by-side harness runs every server at 50 sockets and loses nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 120  # the smoke run takes ~20 s on an idle 2-core machine


@pytest.mark.timeout(TIMEOUT + 30)
def test_bench_smoke(tmp_path: Path) -> None:
    pytest.importorskip("uvloop")
    pytest.importorskip("socketio")
    pytest.importorskip("uvicorn")
    pytest.importorskip("websockets")
    pytest.importorskip("psutil")
    out = tmp_path / "bench.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "loadtests.bench", "--smoke", "--out", str(out)],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
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
