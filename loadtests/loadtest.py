"""The Locust suite end to end: start Eddy, ramp WebSocket subscribers, publish, check the targets.

    python -m loadtests.loadtest                                   # 5,000 sockets, 1 event/s to all
    python -m loadtests.loadtest --users 1000 --publish-rate 10    # 10,000 deliveries/s
    python -m loadtests.loadtest --smoke                           # 50 sockets for ~5 s (CI)

Starts ``eddy serve`` on a temporary SQLite file (random ``EDDY_JWT_SECRET``, per-address socket limit raised,
a channel rule without presence for the test channels), runs Locust headless with ``loadtests/locustfile.py``
(a master and one worker process per core, or one process for the smoke profile) ramping to ``--users``
subscribers plus one publisher. The publisher starts once every subscriber has joined, publishes for ``--duration`` seconds and stops;
after ``--drain`` seconds the test ends. Then the same profile runs against **the floor**
(``loadtests/peers/floor.py``: one bare ``os.write()`` per socket per event, nothing else; ``--no-floor`` skips it)
and the summary shows Eddy ÷ floor, beside the load generator's own saturation (CPU of each Locust process, frames
each worker read per second): a latency measured by a saturated generator is the generator's. Locust's CSV and
HTML reports and a JSON summary go to ``loadtests/results/``. Exit status 0 when every target is met, 1 when one
is missed, 2 when the run itself failed (server or Locust did not start, no summary).

Targets: p99 WebSocket delivery latency (arrival − the event's store timestamp) ≤ ``--p99-target`` ms (100),
no failed connections or requests, no lost events (received vs published × subscribers of each channel).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from service.cli import raise_open_file_limit

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
RESULTS = Path(__file__).resolve().parent / "results"
TENANT = "loadtest"
PREFIX = "lt"
EVENT = "loadtest.tick"
MIB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=5000, help="WebSocket subscribers (plus one publisher)")
    parser.add_argument("--spawn-rate", type=float, default=None, help="subscribers started per second")
    parser.add_argument("--duration", type=float, default=60, help="seconds of publishing")
    parser.add_argument("--publish-rate", type=float, default=1.0, help="events per second (to every subscriber)")
    parser.add_argument("--event-size", type=int, default=256, help="bytes of each event's data")
    parser.add_argument("--channels", type=int, default=1, help="channels")
    parser.add_argument("--shape", choices=["one", "spread"], default="one",
                        help="one: every subscriber joins every channel; spread: one channel each")
    parser.add_argument("--sample", type=int, default=1, help="report 1 in K frames to Locust (all are counted)")
    parser.add_argument("--workers", type=int, default=None,
                        help="Locust worker processes beside a master (0: one local process; default: one per core)")
    parser.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                        help="run the same profile against the floor (loadtests/peers/floor.py) and report Eddy ÷ floor")
    parser.add_argument("--drain", type=float, default=5, help="seconds between the last event and the end")
    parser.add_argument("--publish-delay", type=float, default=2,
                        help="idle seconds after every subscriber joined (the idle-socket memory sample)")
    parser.add_argument("--p99-target", type=float, default=100, help="p99 delivery latency target, ms")
    parser.add_argument("--server-processes", type=int, default=1,
                        help="eddy serve --processes (sockets are spread over them by the kernel)")
    parser.add_argument("--presence", action="store_true",
                        help="track presence on the test channels (off by default: a broadcast channel)")
    parser.add_argument("--name", default=None, help="report file prefix (default from the profile)")
    parser.add_argument("--results-dir", default=str(RESULTS), help="where reports go (default loadtests/results)")
    parser.add_argument("--smoke", action="store_true", help="50 sockets for ~5 s: the CI profile")
    args = parser.parse_args(argv)
    if args.smoke:
        given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
        smoke = {"--users": ("users", 50), "--duration": ("duration", 5), "--publish-rate": ("publish_rate", 4),
                 "--drain": ("drain", 2), "--publish-delay": ("publish_delay", 0.5), "--workers": ("workers", 0)}
        for flag, (attr, value) in smoke.items():
            if flag not in given:
                setattr(args, attr, value)
    if args.spawn_rate is None:
        args.spawn_rate = min(args.users, 250)
    if args.workers is None:
        args.workers = os.cpu_count() or 1
    if args.name is None:
        args.name = "smoke" if args.smoke else f"u{args.users}-r{args.publish_rate:g}-{args.shape}{args.channels}"
    return args


# Server ---------------------------------------------------------------------------------------------------------


def start_server(tmp: Path, port: int, secret: str, args: argparse.Namespace, log_path: Path,
                 target: str = "eddy") -> subprocess.Popen:
    log = open(log_path, "wb")
    if target == "floor":
        return subprocess.Popen([sys.executable, "-m", "loadtests.peers.floor", "--port", str(port)],
                                env=os.environ | {"PYTHONPATH": str(ROOT)}, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    config = tmp / "eddy.toml"
    config.write_text(
        "# written by loadtests/loadtest.py\n"
        "[[channels]]\n"
        f'pattern = "{PREFIX}-*"\n'
        'join = ["tenant"]\n'
        f"presence = {'true' if args.presence else 'false'}\n"
    )
    env = os.environ | {
        "PYTHONPATH": str(ROOT),
        "EDDY_JWT_SECRET": secret,
        "EDDY_LOG_LEVEL": "warning",
        # Every socket comes from 127.0.0.1: the per-address limit (1,000) would refuse the rest with 429.
        "EDDY_MAX_CONNECTIONS_PER_IP": str(max(1000, args.users * 2 + 100)),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--port", str(port), "--address", "127.0.0.1",
         "--storage", f"sqlite:///{tmp}/eddy.db", "--config", str(config),
         "--processes", str(args.server_processes)],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )


def wait_ready(port: int, server: subprocess.Popen, timeout: float = 30, target: str = "eddy") -> None:
    """Until Eddy's /readyz answers 200 (the floor, which serves no HTTP: until it accepts a connection)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"{target} exited with {server.returncode} before it was ready")
        try:
            if target == "floor":
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
                if response.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{target} did not become ready")


def stop_process(process: subprocess.Popen, timeout: float = 20) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def scrape(port: int) -> dict[str, float]:
    """Eddy's /metrics (summed over its processes), each sample name summed over its labels;
    histogram buckets are kept as ``name_bucket:<le>``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"^(eddy_[a-z_]+)(?:\{([^}]*)\})? (\S+)$", line)
        if match:
            name, labels, value = match.groups()
            bound = re.search(r'le="([^"]+)"', labels or "")
            if name.endswith("_bucket") and bound:
                name = f"{name}:{bound.group(1)}"
            values[name] = values.get(name, 0.0) + float(value)
    return values


def histogram_share_over(values: dict[str, float], name: str, limit: float) -> float | None:
    """Fraction of a histogram's observations above ``limit`` seconds (``limit`` must be a bucket bound)."""
    total = values.get(f"{name}_count")
    below = values.get(f"{name}_bucket:{limit}")
    if not total or below is None:
        return None
    return (total - below) / total


class Monitor(threading.Thread):
    """Samples the server's RSS and CPU (all its processes) and the load generator's CPU; reads /metrics at the end."""

    def __init__(self, server_pid: int, port: int) -> None:
        super().__init__(daemon=True)
        self.server = psutil.Process(server_pid)
        self.port = port
        self.generators: list[psutil.Process] = []
        self.samples: list[dict[str, Any]] = []
        self.baseline_rss = self.server_usage()[0]
        self.stopped = threading.Event()

    def server_usage(self) -> tuple[int, float]:
        rss = cpu = 0.0
        for process in [self.server, *self.server.children(recursive=True)]:
            try:
                rss += process.memory_info().rss
                cpu += sum(process.cpu_times()[:2])
            except psutil.Error:
                pass
        return int(rss), cpu

    def run(self) -> None:
        while not self.stopped.wait(0.5):
            try:
                rss, cpu = self.server_usage()
            except psutil.Error:
                return
            generator_cpu = []
            for process in self.generators:
                try:
                    generator_cpu.append(sum(process.cpu_times()[:2]))
                except psutil.Error:
                    generator_cpu.append(None)
            machine = psutil.cpu_times()
            sample = {"t": time.time(), "rss": rss, "cpu": cpu, "generators": generator_cpu,
                      "machine_busy": machine.user + machine.system + machine.nice + getattr(machine, "irq", 0)
                      + getattr(machine, "softirq", 0), "machine_total": sum(machine)}
            self.samples.append(sample)

    def server_metrics(self) -> dict[str, Any]:
        """Eddy's own view: time to queue an event on every socket, store-to-fan-out delay, drops."""
        try:
            values = scrape(self.port)
        except Exception:
            return {}
        out: dict[str, Any] = {}
        for name, label in (("fanout_duration", "fanout_ms_mean"),
                            ("delivery_latency", "store_to_fanout_done_ms_mean")):
            count = values.get(f"eddy_{name}_seconds_count")
            if count:
                out[label] = round(1000 * values[f"eddy_{name}_seconds_sum"] / count, 2)
        # How often the server alone was slow: events whose fan-out ended > 50 ms after the store accepted
        # them, and fan-outs (queueing one event on every socket) that took > 50 / 100 ms.
        for label, name, limit in (("store_to_fanout_done_over_50ms", "eddy_delivery_latency_seconds", 0.05),
                                   ("fanout_over_50ms", "eddy_fanout_duration_seconds", 0.05),
                                   ("fanout_over_100ms", "eddy_fanout_duration_seconds", 0.1)):
            share = histogram_share_over(values, name, limit)
            if share is not None:
                out[label] = f"{100 * share:.1f}%"
        out["dropped"] = int(values.get("eddy_dropped_total", 0))
        out["slow_consumer_disconnects"] = int(values.get("eddy_slow_consumer_disconnects_total", 0))
        out["deliveries"] = int(values.get("eddy_deliveries_total", 0))
        return out

    def before(self, moment: float) -> dict[str, Any] | None:
        """The last sample taken before ``moment``: every subscriber joined, nothing published yet."""
        return next((s for s in reversed(self.samples) if s["t"] < moment), None)

    def window(self, start: float | None, end: float | None) -> dict[str, Any]:
        """Server, Locust and machine CPU between two moments (the first and the last publish)."""
        if start is None or end is None:
            return {}
        inside = [s for s in self.samples if start <= s["t"] <= end + 1.0]
        if len(inside) < 2 or inside[-1]["t"] - inside[0]["t"] < 0.5:
            return {}
        first, last = inside[0], inside[-1]
        seconds = last["t"] - first["t"]
        out: dict[str, Any] = {"seconds": round(seconds, 1), "server_cpu_s": round(last["cpu"] - first["cpu"], 2),
                               "server_cpu_pct": round(100 * (last["cpu"] - first["cpu"]) / seconds, 1)}
        per = []
        for a, b in zip(first["generators"], last["generators"], strict=True):
            per.append(round(100 * (b - a) / seconds, 1) if a is not None and b is not None else None)
        out["generator_cpu_pct"] = per
        out["generator_pids"] = [process.pid for process in self.generators]
        total = last["machine_total"] - first["machine_total"]
        busy = last["machine_busy"] - first["machine_busy"]
        out["machine_busy_pct"] = round(100 * busy / total, 1) if total else None
        return out


# Locust -----------------------------------------------------------------------------------------------------------


def locust_commands(args: argparse.Namespace, port: int, prefix: Path, summary_prefix: Path,
                    gate_timeout: float, ceiling: float) -> tuple[list[str], list[list[str]]]:
    base = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE)]
    head = base + [
        "--headless", "-u", str(args.users + 1), "-r", str(args.spawn_rate), "--host", f"http://127.0.0.1:{port}",
        "--run-time", f"{int(ceiling)}s", "--stop-timeout", "0", "--csv", str(prefix), "--html", f"{prefix}.html",
        "--only-summary", "--exit-code-on-error", "0",
        "--eddy-channels", str(args.channels), "--eddy-shape", args.shape, "--eddy-event-size", str(args.event_size),
        "--eddy-publish-rate", str(args.publish_rate), "--eddy-sample", str(args.sample),
        "--eddy-tenant", TENANT, "--eddy-channel-prefix", PREFIX, "--eddy-event-name", EVENT,
        "--eddy-publish-seconds", str(args.duration), "--eddy-publish-delay", str(args.publish_delay),
        "--eddy-drain", str(args.drain), "--eddy-autostop", "--eddy-gate-timeout", str(gate_timeout),
        "--eddy-summary", str(summary_prefix),
    ]
    if args.workers <= 0:
        return head, []
    master_port = free_port()
    head += ["--master", "--master-bind-host", "127.0.0.1", "--master-bind-port", str(master_port),
             "--expect-workers", str(args.workers), "--expect-workers-max-wait", "60"]
    worker = base + ["--worker", "--master-host", "127.0.0.1", "--master-port", str(master_port)]
    return head, [worker] * args.workers


def read_locust_stats(prefix: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"rows": {}, "failures": []}
    stats = Path(f"{prefix}_stats.csv")
    if stats.exists():
        with stats.open() as f:
            for row in csv.DictReader(f):
                out["rows"][(row["Type"], row["Name"])] = row
    failures = Path(f"{prefix}_failures.csv")
    if failures.exists():
        with failures.open() as f:
            out["failures"] = [row for row in csv.DictReader(f)]
    return out


def number(row: dict[str, str] | None, column: str) -> float | None:
    if not row or row.get(column) in (None, "", "N/A"):
        return None
    return float(row[column])


# Checking --------------------------------------------------------------------------------------------------------


def merge_summaries(paths: list[Path]) -> dict[str, Any]:
    publishers: list[dict] = []
    subscribers: list[dict] = []
    per_event: dict[tuple[str, int], list[float]] = {}
    received_per_node: dict[str, int] = {}
    for path in paths:
        node = json.loads(path.read_text())
        received_per_node[node["node"]] = sum(s["received"] for s in node["subscribers"])
        publishers += node["publishers"]
        subscribers += node["subscribers"]
        for pub, seq, n, total, worst in node.get("per_event", []):
            entry = per_event.setdefault((pub, seq), [0, 0.0, 0.0])
            entry[0] += n
            entry[1] += total
            entry[2] = max(entry[2], worst)
    published_to: dict[str, int] = {}
    for publisher in publishers:
        for channel, count in publisher["per_channel"].items():
            published_to[channel] = published_to.get(channel, 0) + count
    first_sent = min((p["first_sent"] for p in publishers if p["first_sent"]), default=None)
    last_sent = max((p["last_sent"] for p in publishers if p["last_sent"]), default=None)
    expected = received = unique = duplicates = out_of_order = lost = extra = 0
    failed = closed = late = errors = 0
    lost_by: list[tuple[str, int]] = []
    for s in subscribers:
        if s["failed"]:
            failed += 1
            continue
        closed += bool(s["closed_early"])
        errors += s["errors"]
        if first_sent is not None and s["joined_at"] is not None and s["joined_at"] > first_sent:
            late += 1
        mine = sum(published_to.get(channel, 0) for channel in s["channels"])
        expected += mine
        received += s["received"]
        unique += s["unique"]
        duplicates += s["duplicates"]
        out_of_order += s["out_of_order"]
        if s["unique"] < mine:
            lost += mine - s["unique"]
            lost_by.append((s["id"], mine - s["unique"]))
        else:
            extra += s["unique"] - mine
    return {
        "nodes": len(paths),
        "published": sum(p["published"] for p in publishers),
        "publish_failed": sum(p["failed"] for p in publishers),
        "publish_ticks_skipped": sum(p["ticks_skipped"] for p in publishers),
        "published_per_channel": published_to,
        "gate_timed_out": any(p["gate_timed_out"] for p in publishers),
        "gate_waited_s": max((p["gate_waited_s"] or 0 for p in publishers), default=None),
        "publishers": len(publishers),
        "first_sent": first_sent,
        "last_sent": last_sent,
        "received_per_node": received_per_node,
        "subscribers": len(subscribers),
        "connect_failed": failed,
        "connect_failures_sample": [s["failed"] for s in subscribers if s["failed"]][:5],
        "closed_early": closed,
        "close_reasons_sample": [s["close_reason"] for s in subscribers if s["closed_early"]][:5],
        "error_frames": errors,
        "late_joiners": late,
        "expected_deliveries": expected,
        "received": received,
        "unique": unique,
        "duplicates": duplicates,
        "out_of_order": out_of_order,
        "lost": lost,
        "lost_sample": sorted(lost_by, key=lambda x: -x[1])[:5],
        "unexpected": extra,
        "reported_to_locust": sum(s["reported"] for s in subscribers),
        # Per event: the mean and the slowest delivery of each published event (ms), in publishing order.
        "per_event_ms": [{"seq": seq, "deliveries": int(n), "mean": round(total / n, 1), "max": round(worst, 1)}
                         for (pub, seq), (n, total, worst) in sorted(per_event.items())],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    limit = raise_open_file_limit()
    if limit < args.users * 2 + 200:
        print(f"warning: open-file limit {limit} is low for {args.users} sockets in client and server", flush=True)
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    gitignore = results / ".gitignore"
    if results.resolve() == RESULTS.resolve() and not gitignore.exists():
        gitignore.write_text("*\n!.gitignore\n")
    status, summary = run_profile(args, "eddy", args.name, results)
    if args.floor and args.shape == "one" and summary is not None:  # the floor has one broadcast: no spread
        _, floor = run_profile(args, "floor", f"{args.name}-floor", results)
        compare_with_floor(summary, floor, results / f"{args.name}_summary.json")
    return status


def run_profile(args: argparse.Namespace, target: str, name: str, results: Path) -> tuple[int, dict[str, Any] | None]:
    """One server (``eddy`` or ``floor``) under the profile: its exit status (0 met, 1 missed, 2 failed) and summary."""
    prefix = results / name
    nodes_dir = results / f"{name}.nodes"
    shutil.rmtree(nodes_dir, ignore_errors=True)
    nodes_dir.mkdir()
    for stale in results.glob(f"{name}_*.csv"):
        stale.unlink()

    secret = secrets.token_urlsafe(32)
    port = free_port()
    ramp = args.users / max(args.spawn_rate, 0.1)
    gate_timeout = 2 * ramp + 60
    ceiling = gate_timeout + args.publish_delay + args.duration + args.drain + 60
    started = time.time()
    print(f"{target} loadtest {name}: {args.users} subscribers ({args.shape}, {args.channels} channel(s)), "
          f"{args.publish_rate:g} event/s for {args.duration:g} s, {args.event_size} B, "
          f"locust {'1 process' if args.workers <= 0 else f'master + {args.workers} workers'}", flush=True)

    processes: list[subprocess.Popen] = []
    monitor = None
    outcome: tuple[int, dict[str, Any] | None] = (2, None)
    with tempfile.TemporaryDirectory(prefix="eddy-loadtest-") as tmp:
        server = start_server(Path(tmp), port, secret, args, results / f"{name}_server.log", target)
        try:
            wait_ready(port, server, target=target)
            monitor = Monitor(server.pid, port)
            head, workers = locust_commands(args, port, prefix, nodes_dir / "node", gate_timeout, ceiling)
            head += ["--eddy-target", target]
            env = os.environ | {"EDDY_JWT_SECRET": secret, "PYTHONPATH": str(ROOT)}
            log = open(results / f"{name}_locust.log", "wb")
            master = subprocess.Popen(head, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
            processes.append(master)
            for index, command in enumerate(workers):
                worker_log = open(results / f"{name}_worker{index + 1}.log", "wb")
                processes.append(subprocess.Popen(command, env=env, cwd=ROOT, stdout=worker_log,
                                                  stderr=subprocess.STDOUT, start_new_session=True))
            monitor.generators = [psutil.Process(p.pid) for p in processes]
            monitor.start()
            try:
                master.wait(ceiling + 60)
            except subprocess.TimeoutExpired:
                print("locust did not finish in time; stopping it", flush=True)
            for process in processes:
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    pass
                stop_process(process, 10)
            monitor.stopped.set()
            monitor.join(5)
            outcome = report(args, name, target, prefix, nodes_dir, monitor, monitor.server_metrics(), started)
        except Exception as exc:
            print(f"loadtest failed to run: {type(exc).__name__}: {exc}", flush=True)
        finally:
            for process in processes:
                stop_process(process, 5)
            stop_process(server)
            if server.returncode not in (0, -signal.SIGTERM):
                print(f"{target} exited with {server.returncode}; see {results / (name + '_server.log')}")
    return outcome


#: What Eddy ÷ floor compares: (label, key in a summary's "headline", True when higher is better).
FLOOR_RATIOS = (
    ("WS latency p50", "p50_ms", False),
    ("WS latency p99", "p99_ms", False),
    ("server CPU per delivery", "server_cpu_us_per_delivery", False),
    ("server RSS per idle socket", "kib_per_idle_socket", False),
)


def compare_with_floor(eddy: dict[str, Any], floor: dict[str, Any] | None, path: Path) -> None:
    """Print Eddy ÷ floor (> 1: Eddy slower or heavier) and add it to Eddy's summary file."""
    if floor is None:
        print("  ! the floor run failed: no Eddy ÷ floor", flush=True)
        return
    ratios: dict[str, float | None] = {}
    lines = ["", "Eddy ÷ floor, same profile (> 1: Eddy slower or heavier; Locust's own load beside each figure)"]
    for label, key, _ in FLOOR_RATIOS:
        mine, theirs = eddy["headline"].get(key), floor["headline"].get(key)
        ratios[key] = round(mine / theirs, 2) if mine and theirs else None
        shown = "n/a" if ratios[key] is None else f"{ratios[key]:.2f}×"
        lines.append(f"  {label:<33} {str(mine):>10} ÷ {str(theirs):<10} = {shown}")
    for run, summary in (("eddy", eddy), ("floor", floor)):
        lines.append(f"  load generator during {run:<5} {summary['headline']['generator']}")
    print("\n".join(lines), flush=True)
    eddy["floor"] = {"name": floor["name"], "headline": floor["headline"], "eddy_over_floor": ratios}
    path.write_text(json.dumps(eddy, indent=2, default=str))


def generator_load(window: dict[str, Any], totals: dict[str, Any]) -> str:
    """CPU % of each Locust process and the frames each worker read per second, e.g. ``master 3 %, w1 71 % 2,480/s``."""
    if not window:
        return "n/a"
    frames = {int(node.rsplit("-", 2)[1]): count for node, count in totals["received_per_node"].items()}
    parts = []
    for index, (pid, cpu) in enumerate(zip(window["generator_pids"], window["generator_cpu_pct"], strict=True)):
        label = "master" if index == 0 and len(window["generator_pids"]) > 1 else f"w{index}" if index else "locust"
        part = f"{label} {'?' if cpu is None else f'{cpu:g}'} % CPU"
        if pid in frames:
            part += f" {frames[pid] / window['seconds']:,.0f} frames/s"
        parts.append(part)
    return ", ".join(parts)


def report(args: argparse.Namespace, name: str, target: str, prefix: Path, nodes_dir: Path, monitor: Monitor,
           server_metrics: dict[str, Any], started: float) -> tuple[int, dict[str, Any] | None]:
    paths = sorted(nodes_dir.glob("*.json"))
    if not paths:
        print("no summary was written by the Locust processes: see the *_locust.log / *_worker*.log files")
        return 2, None
    totals = merge_summaries(paths)
    stats = read_locust_stats(prefix)
    ws = stats["rows"].get(("WS", EVENT))
    connect = stats["rows"].get(("WSCONN", "connect"))
    post = stats["rows"].get(("POST", "/api/events"))
    aggregated = stats["rows"].get(("", "Aggregated"))
    p50, p99, p_max = number(ws, "50%"), number(ws, "99%"), number(ws, "100%")
    window = monitor.window(totals["first_sent"], totals["last_sent"])
    if window:
        window["deliveries_per_s"] = round(totals["unique"] / max(totals["last_sent"] - totals["first_sent"], 1e-3))
    # Memory with every subscriber joined, just before the first event.
    idle = monitor.before(totals["first_sent"]) if totals["first_sent"] else None
    connected = totals["subscribers"] - totals["connect_failed"]
    peak_rss = max((s["rss"] for s in monitor.samples), default=monitor.baseline_rss)
    per_socket_kib = None
    if idle and connected:
        per_socket_kib = (idle["rss"] - monitor.baseline_rss) / connected / 1024
    saturated = []
    for log in sorted(prefix.parent.glob(f"{name}_*.log")):
        text = log.read_text(errors="replace")
        if re.search(r"CPU usage (above|was too high)", text):
            saturated.append(log.name)

    failed_connections = totals["connect_failed"] + totals["closed_early"]
    other_failures = totals["error_frames"] + totals["publish_failed"]
    checks = {
        "p99_latency": p99 is not None and p99 <= args.p99_target,
        "failed_connections": failed_connections == 0 and totals["subscribers"] == args.users,
        "failed_requests": other_failures == 0,
        "lost_events": totals["lost"] == 0 and totals["late_joiners"] == 0 and not totals["gate_timed_out"],
        "ran": totals["published"] > 0 and totals["received"] > 0,
    }
    passed = all(checks.values())
    elapsed = time.time() - started
    cpu_per_delivery = (round(window["server_cpu_s"] / totals["unique"] * 1e6, 1)
                        if window and totals["unique"] else None)
    summary = {
        "name": name, "target": target, "passed": passed, "checks": checks, "elapsed_s": round(elapsed, 1),
        "profile": {k: getattr(args, k) for k in ("users", "spawn_rate", "duration", "publish_rate", "event_size",
                                                   "channels", "shape", "sample", "workers", "drain", "smoke",
                                                   "p99_target", "server_processes")},
        "latency_ms": {"p50": p50, "p99": p99, "max": p_max, "p99_target": args.p99_target,
                       "samples": int(number(ws, "Request Count") or 0),
                       "connect_p50": number(connect, "50%"), "connect_p99": number(connect, "99%"),
                       "post_p50": number(post, "50%"), "post_p99": number(post, "99%")},
        "failed_connections": failed_connections,
        "locust_failures": int(number(aggregated, "Failure Count") or 0),
        "locust_failure_rows": stats["failures"][:10],
        # What Eddy ÷ floor compares, and the load generator's own load beside it.
        "headline": {"p50_ms": p50, "p99_ms": p99, "server_cpu_us_per_delivery": cpu_per_delivery,
                     "kib_per_idle_socket": round(per_socket_kib, 1) if per_socket_kib is not None else None,
                     "generator": generator_load(window, totals)},
        "server": {"baseline_rss_mib": round(monitor.baseline_rss / MIB, 1),
                   "idle_rss_mib": round(idle["rss"] / MIB, 1) if idle else None,
                   "idle_connections": connected if idle else None,
                   "peak_rss_mib": round(peak_rss / MIB, 1),
                   "kib_per_idle_socket": round(per_socket_kib, 1) if per_socket_kib is not None else None},
        "publishing_window": window,
        "server_metrics": server_metrics,
        "generator_cpu_warnings": saturated,
        **totals,
        "reports": {"csv": f"{prefix}_stats.csv", "html": f"{prefix}.html", "nodes": str(nodes_dir)},
    }
    path = Path(f"{prefix}_summary.json")
    path.write_text(json.dumps(summary, indent=2, default=str))

    def ms(value: float | None) -> str:
        return "n/a" if value is None else f"{value:g} ms"

    def mib(value: float | None) -> str:
        return "n/a" if value is None else f"{value:g}"

    server = summary["server"]
    rows = [
        ("subscribers (sockets)", f"{totals['subscribers']:,} of {args.users:,}", "", None),
        ("events published", f"{totals['published']:,}", f"{args.publish_rate:g}/s x {args.duration:g} s", None),
        ("deliveries expected / received", f"{totals['expected_deliveries']:,} / {totals['unique']:,}", "", None),
        ("WS latency p50 / max", f"{ms(p50)} / {ms(p_max)}", "", None),
        ("WS latency p99", ms(p99), f"<= {args.p99_target:g} ms", checks["p99_latency"]),
        ("  measured by (load generator)", summary["headline"]["generator"], "", None),
        ("failed connections", f"{failed_connections:,}", "0", checks["failed_connections"]),
        ("failed requests / error frames", f"{other_failures:,}", "0", checks["failed_requests"]),
        ("lost events", f"{totals['lost']:,}", "0", checks["lost_events"]),
        ("duplicates / out of order", f"{totals['duplicates']:,} / {totals['out_of_order']:,}", "", None),
        ("handshake p50 / p99", f"{ms(number(connect, '50%'))} / {ms(number(connect, '99%'))}", "", None),
        ("POST /api/events p50 / p99", f"{ms(number(post, '50%'))} / {ms(number(post, '99%'))}", "", None),
        ("server RSS MiB before/idle/peak", f"{mib(server['baseline_rss_mib'])} / {mib(server['idle_rss_mib'])} / "
                                            f"{mib(server['peak_rss_mib'])}", "", None),
        ("server RSS per idle socket", "n/a" if per_socket_kib is None else f"{per_socket_kib:.1f} KiB", "", None),
    ]
    if window:
        rows.append(("deliveries/s measured", f"{window['deliveries_per_s']:,}", "", None))
        rows.append(("CPU % server / machine busy", f"{window['server_cpu_pct']:g} / {window['machine_busy_pct']}",
                     "", None))
        rows.append(("server CPU per delivery", f"{cpu_per_delivery:g} µs" if cpu_per_delivery else "n/a", "", None))
    if server_metrics.get("fanout_ms_mean") is not None:
        rows.append(("server fan-out of one event, mean", ms(server_metrics["fanout_ms_mean"]), "", None))
        rows.append(("server fan-outs > 50 / > 100 ms",
                     f"{server_metrics.get('fanout_over_50ms')} / {server_metrics.get('fanout_over_100ms')}", "", None))
    lines = ["", f"{target} load test '{name}': {'PASSED' if passed else 'TARGET MISSED'}  ({elapsed:.0f} s)"]
    for title, value, goal, ok in rows:
        mark = "" if ok is None else ("ok" if ok else "MISSED")
        lines.append(f"  {title:<33} {value:>27}  {goal:<14} {mark}".rstrip())
    events_ms = totals["per_event_ms"]
    if events_ms:
        slow = sorted(events_ms, key=lambda e: -e["max"])[:3]
        lines.append("  slowest events (seq: mean/max ms): "
                     + ", ".join(f"{e['seq']}: {e['mean']:g}/{e['max']:g}" for e in slow))
    if server_metrics.get("dropped") or server_metrics.get("slow_consumer_disconnects"):
        lines.append(f"  ! server dropped {server_metrics['dropped']} "
                     f"(slow consumers: {server_metrics['slow_consumer_disconnects']})")
    if totals["late_joiners"] or totals["gate_timed_out"]:
        lines.append(f"  ! {totals['late_joiners']} subscribers joined after publishing began "
                     f"(gate timed out: {totals['gate_timed_out']})")
    if totals["connect_failures_sample"] or totals["close_reasons_sample"]:
        lines.append(f"  ! failures: {(totals['connect_failures_sample'] + totals['close_reasons_sample'])[:3]}")
    if saturated:
        lines.append(f"  ! Locust warned of high CPU ({', '.join(saturated)}): latency includes the generator")
    lines.append(f"  reports: {prefix}.html, {prefix}_stats.csv, {path}")
    print("\n".join(lines), flush=True)
    return (0 if passed else 1), summary


if __name__ == "__main__":
    sys.exit(main())
