"""The Locust suite's smoke profile end to end: Eddy and the floor, 50 WebSocket subscribers, one publisher, the checker."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
def test_smoke_profile_delivers_everything(tmp_path: Path) -> None:
    try:
        run = subprocess.run(
            [sys.executable, "-m", "loadtests.loadtest", "--smoke", "--results-dir", str(tmp_path)],
            cwd=ROOT, capture_output=True, text=True, timeout=90,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the smoke load test took over 90 s:\n{exc.stdout}\n{exc.stderr}")
    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(tmp_path.glob("*.log")))
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout}\n{run.stderr}\n{logs}"

    summary = json.loads((tmp_path / "smoke_summary.json").read_text())
    assert summary["passed"] is True
    assert summary["subscribers"] == 50
    assert summary["published"] > 0
    assert summary["received"] > 0
    assert summary["unique"] == summary["expected_deliveries"] == summary["published"] * 50
    assert summary["lost"] == 0
    assert summary["failed_connections"] == 0
    assert summary["duplicates"] == 0
    # Locust's own reports were written beside it.
    assert (tmp_path / "smoke_stats.csv").exists()
    assert (tmp_path / "smoke.html").exists()
    # The same profile ran against the floor, lost nothing there either, and Eddy ÷ floor is reported beside the
    # load generator's own CPU and frames read per second.
    floor = json.loads((tmp_path / "smoke-floor_summary.json").read_text())
    assert floor["target"] == "floor" and floor["passed"] is True
    assert floor["unique"] == floor["expected_deliveries"] == floor["published"] * 50
    assert summary["floor"]["eddy_over_floor"]["p50_ms"] > 0
    assert "frames/s" in summary["headline"]["generator"] and "frames/s" in floor["headline"]["generator"]
    assert "Eddy ÷ floor" in run.stdout
