"""The Locust suite end to end: start Eddy, ramp WebSocket subscribers, publish, check the targets.

    python -m loadtests.loadtest                                   # 5,000 sockets, 1 event/s to all
    python -m loadtests.loadtest --users 1000 --publish-rate 10    # 10,000 deliveries/s
    python -m loadtests.loadtest --smoke                           # 50 sockets for ~5 s (CI)

Starts ``eddy serve`` on a temporary SQLite file (random ``EDDY_JWT_SECRET``, per-address socket limit raised,
a channel rule without presence for the test channels), runs Locust headless with ``loadtests/locustfile.py``
(one process, or a master and ``--workers`` worker processes) ramping to ``--users`` subscribers plus one
publisher. The publisher starts once every subscriber has joined, publishes for ``--duration`` seconds and stops;
after ``--drain`` seconds the test ends. Locust's CSV and HTML reports and a JSON summary go to
``loadtests/results/``. Exit status 0 when every target is met, 1 when one is missed, 2 when the run itself
failed (server or Locust did not start, no summary).

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
                        help="Locust worker processes beside a master (0: one local process; default 0 up to 1,000 "
                             "users, else 1). One process reads ~30,000 frames/s on one core")
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
        args.workers = 0 if args.users <= 1000 else 1
    if args.name is None:
        args.name = "smoke" if args.smoke else f"u{args.users}-r{args.publish_rate:g}-{args.shape}{args.channels}"
    return args


# Server ---------------------------------------------------------------------------------------------------------


def start_server(tmp: Path, port: int, secret: str, args: argparse.Namespace, log_path: Path) -> subprocess.Popen:
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
    log = open(log_path, "wb")
    return subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--port", str(port), "--address", "127.0.0.1",
         "--storage", f"sqlite:///{tmp}/eddy.db", "--config", str(config),
         "--processes", str(args.server_processes)],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )


def wait_ready(port: int, server: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"eddy exited with {server.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
                if response.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.1)
    raise TimeoutError("eddy did not become ready")


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
    """Samples the server's RSS and CPU (all its processes), its /metrics, and the load generator's CPU."""

    def __init__(self, server_pid: int, port: int, subscribers: int) -> None:
        super().__init__(daemon=True)
        self.server = psutil.Process(server_pid)
        self.port = port
        self.subscribers = subscribers
        self.generators: list[psutil.Process] = []
        self.samples: list[dict[str, Any]] = []
        self.baseline_rss = self.server_usage()[0]
        self.idle: dict[str, Any] | None = None
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
            try:
                metrics = scrape(self.port)
                sample["connections"] = int(metrics.get("eddy_connections", 0))
                sample["deliveries"] = int(metrics.get("eddy_deliveries_total", 0))
            except Exception:
                pass
            self.samples.append(sample)
            if (self.idle is None and sample.get("connections", 0) >= self.subscribers
                    and sample.get("deliveries", 1) == 0):
                self.idle = sample

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

    def window(self) -> dict[str, Any]:
        """Server and generator CPU while deliveries were growing."""
        growing = [s for s in self.samples if "deliveries" in s]
        first = next((s for s in growing if s["deliveries"] > 0), None)
        last = None
        for previous, current in zip(growing, growing[1:]):
            if current["deliveries"] > previous["deliveries"]:
                last = current
        if first is None or last is None or last["t"] - first["t"] < 0.5:
            return {}
        seconds = last["t"] - first["t"]
        out: dict[str, Any] = {"seconds": round(seconds, 1),
                               "deliveries_per_s": round((last["deliveries"] - first["deliveries"]) / seconds),
                               "server_cpu_pct": round(100 * (last["cpu"] - first["cpu"]) / seconds, 1)}
        per = []
        for a, b in zip(first["generators"], last["generators"]):
            per.append(round(100 * (b - a) / seconds, 1) if a is not None and b is not None else None)
        out["generator_cpu_pct"] = per
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
    for path in paths:
        node = json.loads(path.read_text())
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
    prefix = results / args.name
    nodes_dir = results / f"{args.name}.nodes"
    shutil.rmtree(nodes_dir, ignore_errors=True)
    nodes_dir.mkdir()
    for stale in results.glob(f"{args.name}_*.csv"):
        stale.unlink()

    secret = secrets.token_urlsafe(32)
    port = free_port()
    ramp = args.users / max(args.spawn_rate, 0.1)
    gate_timeout = 2 * ramp + 60
    ceiling = gate_timeout + args.publish_delay + args.duration + args.drain + 60
    started = time.time()
    print(f"eddy loadtest {args.name}: {args.users} subscribers ({args.shape}, {args.channels} channel(s)), "
          f"{args.publish_rate:g} event/s for {args.duration:g} s, {args.event_size} B, "
          f"locust {'1 process' if args.workers <= 0 else f'master + {args.workers} workers'}", flush=True)

    processes: list[subprocess.Popen] = []
    monitor = None
    status = 2
    with tempfile.TemporaryDirectory(prefix="eddy-loadtest-") as tmp:
        server = start_server(Path(tmp), port, secret, args, results / f"{args.name}_server.log")
        try:
            wait_ready(port, server)
            monitor = Monitor(server.pid, port, args.users)
            head, workers = locust_commands(args, port, prefix, nodes_dir / "node", gate_timeout, ceiling)
            env = os.environ | {"EDDY_JWT_SECRET": secret, "PYTHONPATH": str(ROOT)}
            log = open(results / f"{args.name}_locust.log", "wb")
            master = subprocess.Popen(head, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
            processes.append(master)
            for index, command in enumerate(workers):
                worker_log = open(results / f"{args.name}_worker{index + 1}.log", "wb")
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
            status = report(args, prefix, nodes_dir, monitor, monitor.server_metrics(), started)
        except Exception as exc:
            print(f"loadtest failed to run: {type(exc).__name__}: {exc}", flush=True)
            status = 2
        finally:
            for process in processes:
                stop_process(process, 5)
            stop_process(server)
            if server.returncode not in (0, -signal.SIGTERM):
                print(f"eddy exited with {server.returncode}; see {results / (args.name + '_server.log')}")
    return status


def report(args: argparse.Namespace, prefix: Path, nodes_dir: Path, monitor: Monitor, server_metrics: dict[str, Any],
           started: float) -> int:
    paths = sorted(nodes_dir.glob("*.json"))
    if not paths:
        print("no summary was written by the Locust processes: see the *_locust.log / *_worker*.log files")
        return 2
    totals = merge_summaries(paths)
    stats = read_locust_stats(prefix)
    ws = stats["rows"].get(("WS", EVENT))
    connect = stats["rows"].get(("WSCONN", "connect"))
    post = stats["rows"].get(("POST", "/api/events"))
    aggregated = stats["rows"].get(("", "Aggregated"))
    p50, p99, p_max = number(ws, "50%"), number(ws, "99%"), number(ws, "100%")
    window = monitor.window()
    idle = monitor.idle
    peak_rss = max((s["rss"] for s in monitor.samples), default=monitor.baseline_rss)
    per_socket_kib = None
    if idle and idle.get("connections"):
        per_socket_kib = (idle["rss"] - monitor.baseline_rss) / idle["connections"] / 1024
    saturated = []
    for log in sorted(prefix.parent.glob(f"{args.name}_*.log")):
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
    summary = {
        "name": args.name, "passed": passed, "checks": checks, "elapsed_s": round(elapsed, 1),
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
        "server": {"baseline_rss_mib": round(monitor.baseline_rss / MIB, 1),
                   "idle_rss_mib": round(idle["rss"] / MIB, 1) if idle else None,
                   "idle_connections": idle.get("connections") if idle else None,
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
        generators = "+".join("?" if c is None else f"{c:g}" for c in window["generator_cpu_pct"])
        rows.append(("deliveries/s measured", f"{window['deliveries_per_s']:,}", "", None))
        rows.append(("CPU % server / locust / machine",
                     f"{window['server_cpu_pct']:g} / {generators} / {window['machine_busy_pct']}", "", None))
    if server_metrics.get("fanout_ms_mean") is not None:
        rows.append(("server fan-out of one event, mean", ms(server_metrics["fanout_ms_mean"]), "", None))
        rows.append(("server fan-outs > 50 / > 100 ms",
                     f"{server_metrics.get('fanout_over_50ms')} / {server_metrics.get('fanout_over_100ms')}", "", None))
    lines = ["", f"Eddy load test '{args.name}': {'PASSED' if passed else 'TARGET MISSED'}  ({elapsed:.0f} s)"]
    for title, value, target, ok in rows:
        mark = "" if ok is None else ("ok" if ok else "MISSED")
        lines.append(f"  {title:<33} {value:>27}  {target:<14} {mark}".rstrip())
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
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
