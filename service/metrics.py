"""Prometheus metrics (prometheus_client). Served at ``/metrics``.

With ``eddy serve --processes N`` the processes share a directory
(``PROMETHEUS_MULTIPROC_DIR``; when unset, the CLI creates one in the temporary
directory and removes it once its workers have exited, or, if it was killed,
at the next ``serve --processes N``) and ``/metrics``
on any of them reports the sum over all of them. Labels never carry tenants,
channels or users: cardinality stays fixed and nothing confidential is exposed.
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

CONNECTIONS = Gauge("eddy_connections", "Open client connections.", ["transport"], multiprocess_mode="livesum")
CHANNELS = Gauge("eddy_channels", "Channels with at least one local subscriber.", multiprocess_mode="livesum")
EVENTS_PUBLISHED = Counter("eddy_events_published_total", "Events stored through this service.", ["via"])
EVENTS_FANNED_OUT = Counter("eddy_events_fanned_out_total", "Events the watcher handed to the hub.")
DELIVERIES = Counter("eddy_deliveries_total", "Frames queued on sockets by fan-out.")
DROPPED = Counter("eddy_dropped_total", "Connections or frames given up on, by reason.", ["reason"])
DELIVERY_LATENCY = Histogram("eddy_delivery_latency_seconds",
                             "From the store accepting an event to its fan-out in this process.",
                             buckets=LATENCY_BUCKETS)
FANOUT_DURATION = Histogram("eddy_fanout_duration_seconds", "Time to queue one event on every local subscriber.",
                            buckets=LATENCY_BUCKETS)
WATCHER_LAG = Gauge("eddy_watcher_lag_seconds", "How late the watcher handed over its newest event.",
                    multiprocess_mode="max")
WATCHER_ERRORS = Counter("eddy_watcher_errors_total", "Change feed failures the watcher recovered from.")
SLOW_CONSUMERS = Counter("eddy_slow_consumer_disconnects_total", "Sockets closed for not reading fast enough.")
AUTH_FAILURES = Counter("eddy_auth_failures_total", "Refused tokens, by code.", ["reason"])
RATE_LIMITED = Counter("eddy_rate_limited_total", "Frames or requests refused by a rate limit.", ["kind"])
FRAME_ERRORS = Counter("eddy_frame_errors_total", "Client frames answered with an error, by code.", ["code"])
GC_PAUSES = Histogram("eddy_gc_pause_seconds",
                      "How long the cyclic garbage collector stopped the process (no socket is served meanwhile), "
                      "by generation.", ["generation"], buckets=LATENCY_BUCKETS)


class _GCPauses:
    """Times each collection of Python's cyclic garbage collector into :data:`GC_PAUSES` (a ``gc.callbacks`` hook).

    A collection of the oldest generation walks every object the process keeps, a few dozen per open socket, and
    nothing else runs meanwhile: with 10,000 sockets it takes ~0.5 s on the benchmark box, and it comes each time
    that generation has grown by a quarter (sockets connecting, or a burst's queued frames outliving two younger
    collections). A latency spike that this histogram's generation "2" explains is the collector's, not the
    network's. The hook costs two calls per collection.
    """

    def __init__(self) -> None:
        self._started = 0.0
        # The children are made here, in the serving process (after a fork, under a multiprocess directory).
        self._by_generation = [GC_PAUSES.labels(str(generation)) for generation in range(3)]

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._by_generation[info["generation"]].observe(time.perf_counter() - self._started)


_gc_pauses: _GCPauses | None = None


def time_gc_pauses() -> None:
    """Observe every garbage collection of this process in ``eddy_gc_pause_seconds`` from now on (once per process)."""
    global _gc_pauses
    if _gc_pauses is None:
        _gc_pauses = _GCPauses()
        gc.callbacks.append(_gc_pauses)


def histogram_counts(histogram: Histogram) -> dict[str, Any]:
    """This process's observations in ``histogram``, per bucket (not cumulative), for ``/api/stats``.

    ``{"bounds": [0.001, …, "+Inf"], "counts": [n, …], "count": N, "sum": seconds}``: ``counts[i]`` observations
    fell at or under ``bounds[i]`` and over the bound before it.
    """
    bounds: list[float | str] = []
    cumulative: list[float] = []
    total = observed = 0.0
    for family in histogram.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                bound = float(sample.labels["le"])
                bounds.append(bound if bound != float("inf") else "+Inf")
                cumulative.append(sample.value)
            elif sample.name.endswith("_count"):
                observed = sample.value
            elif sample.name.endswith("_sum"):
                total = sample.value
    counts = [int(n - previous) for n, previous in zip(cumulative, [0.0, *cumulative[:-1]], strict=True)]
    return {"bounds": bounds, "counts": counts, "count": int(observed), "sum": round(total, 6)}


def render() -> tuple[bytes, str]:
    """The exposition text and its content type, for this process or all processes."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
