"""The MongoDB scripts under loadtests/: the scale model keeps to its own formulas (docs/SCALE.md reads from it), the
driver benchmark measures both drivers side by side."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from loadtests.scale_model import BATCH_LIMIT, Costs, simulate

ROOT = Path(__file__).resolve().parent.parent
COSTS = Costs(rtt=0.0005, majority=0.001, insert=20e-6, batch_limit=500)


def test_the_batch_limit_is_eddys():
    from storage.mongo import BATCH_LIMIT as eddys

    assert BATCH_LIMIT == eddys


def test_below_the_cap_one_writer_keeps_up_without_conflicts():
    result = simulate(COSTS, instances=1, partitions=1, load=2000, seconds=2.0, seed=1)
    assert result.stored == pytest.approx(2000, rel=0.05)
    assert result.conflicts_per_commit == 0
    assert result.p50_ms >= COSTS.cycle(1) * 1000  # no append is stored faster than one transaction
    assert result.mean_batch > 1  # appends that arrive during a transaction go together in the next one


def test_past_the_cap_one_counter_stores_full_batches_at_its_rate():
    result = simulate(COSTS, instances=1, partitions=1, load=200_000, seconds=2.0, seed=1)
    assert result.mean_batch > 0.95 * COSTS.batch_limit
    assert result.stored <= COSTS.cap()
    assert result.stored == pytest.approx(COSTS.batch_limit / COSTS.cycle(COSTS.batch_limit), rel=0.05)
    assert result.backlog > 100_000


def test_writers_sharing_a_counter_collide_and_separate_counters_do_not():
    shared = simulate(COSTS, instances=4, partitions=1, load=5000, seconds=2.0, seed=1)
    owned = simulate(COSTS, instances=1, partitions=4, load=5000, seconds=2.0, seed=1)
    assert shared.conflicts_per_commit > 0 and owned.conflicts_per_commit == 0
    assert owned.p99_ms < shared.p99_ms


def test_the_script_prints_one_row_per_case():
    run = subprocess.run([sys.executable, "-m", "loadtests.scale_model", "--seconds", "0.2", "--loads", "1000,5000",
                          "--instances", "1,2", "--partitions", "1"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert "assumed, not measured" in lines[0] and "cap 41,667 events/s per counter" in lines[1]
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["counters", "instances"])
    rows = [line.split() for line in lines[header + 2:] if line.strip() and line.split()[0].isdigit()]
    assert [(r[0], r[1], r[2]) for r in rows] == [("1", "1", "1,000"), ("1", "1", "5,000"), ("1", "2", "1,000"),
                                                  ("1", "2", "5,000")]


def test_the_driver_benchmark_runs_both_drivers_side_by_side():
    run = subprocess.run([sys.executable, "-m", "loadtests.mongo_drivers", "--calls", "40", "--concurrency", "1,4",
                          "--rounds", "1"], cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert run.returncode == 0, run.stderr
    rows = [line.split() for line in run.stdout.splitlines()[2:]]
    measured = [(r[0], r[2]) for r in rows if r[1] == "1"]
    assert sorted(measured) == [("1", "motor"), ("1", "pymongo"), ("4", "motor"), ("4", "pymongo")]
    assert all(float(r[3]) > 0 and float(r[4]) > 0 for r in rows if r[1] == "1")
    assert [r[0] for r in rows if r[1] == "ratio"] == ["1", "4"]
