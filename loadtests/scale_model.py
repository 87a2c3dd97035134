"""The append path on MongoDB, played as a model: where the position counter caps throughput.

Every append batch is one transaction that increments one counter document
(``eddy_counters``) and inserts the batch's events. Two transactions writing
that document conflict, so batches commit one after another: the counter is
*held* from the transaction's ``findAndModify`` until its commit is
majority-committed (a transaction whose snapshot predates that commit
conflicts too). Per counter, then:

    hold(B)   = 2 x rtt + B x insert + majority       (the counter is busy)
    cycle(B)  = 3 x rtt + B x insert + majority       (one writer's round: findAndModify, insert, commit)
    cap       = B_max / hold(B_max)                    events/s, with full batches (B_max = 500 in Eddy)

This script plays that model as a discrete-event simulation: Poisson appends
spread over Eddy instances, each with its own group-commit writer (one
transaction at a time, up to ``--batch-limit`` appends each), a write conflict
when a writer reaches a counter that is held (the driver then retries the same
batch, after PyMongo's backoff: jitter x min(5 ms x 1.5^retry, 500 ms), or at
once as Motor does with ``--retry immediate``), and
``--partitions`` counters for the design past the cap (positions per tenant or
channel hash, each counter with its own writers). It prints one row per
(partitions, instances, offered load).

Every timing is an input, not a measurement: no MongoDB server ran where this
was written. Put in your own round trip, majority-commit wait and per-event
insert cost (e.g. from ``mongostat``/``serverStatus`` on your replica set).

    python -m loadtests.scale_model
    python -m loadtests.scale_model --rtt-ms 1.5 --majority-ms 4 --instances 1,8 --loads 5000,50000
"""

from __future__ import annotations

import argparse
import heapq
import random
import sys
from collections import deque
from dataclasses import dataclass, field

#: Eddy's group-commit batch limit (storage/mongo.py BATCH_LIMIT), repeated here so the model runs without the driver.
BATCH_LIMIT = 500
#: PyMongo's with_transaction backoff after a TransientTransactionError (pymongo/client_session_shared.py).
BACKOFF_INITIAL = 0.005
BACKOFF_MAX = 0.5


@dataclass(frozen=True)
class Costs:
    """Seconds: client-to-primary round trip, the wait for a majority at commit, the server's time per inserted event."""

    rtt: float
    majority: float
    insert: float
    batch_limit: int
    #: Back off after a write conflict as PyMongo's with_transaction does (Motor's retries at once).
    backoff: bool = True

    def hold(self, batch: int) -> float:
        return 2 * self.rtt + batch * self.insert + self.majority

    def cycle(self, batch: int) -> float:
        return 3 * self.rtt + batch * self.insert + self.majority

    def cap(self) -> float:
        """Events per second one counter lets through with full batches."""
        return self.batch_limit / self.hold(self.batch_limit)


@dataclass
class Writer:
    """One instance's group-commit writer for one counter."""

    counter: int
    rate: float
    rng: random.Random
    pending: deque[float] = field(default_factory=deque)
    next_arrival: float = 0.0
    batch: int = 0
    retries: int = 0

    def __post_init__(self) -> None:
        self.next_arrival = self.rng.expovariate(self.rate)

    def take_arrivals(self, until: float) -> None:
        while self.next_arrival <= until:
            self.pending.append(self.next_arrival)
            self.next_arrival += self.rng.expovariate(self.rate)


@dataclass
class Result:
    offered: float
    stored: float
    transactions: float
    mean_batch: float
    conflicts_per_commit: float
    p50_ms: float
    p99_ms: float
    backlog: int


def simulate(costs: Costs, instances: int, partitions: int, load: float, seconds: float, seed: int) -> Result:
    """Play ``seconds`` of appends at ``load`` events/s over ``instances`` writers per counter."""
    rng = random.Random(seed)
    writers = [Writer(p, load / (instances * partitions), random.Random(rng.random()))
               for _ in range(instances) for p in range(partitions)]
    held_until = [0.0] * partitions
    latencies: list[float] = []
    commits = conflicts = 0
    queue = [(w.next_arrival, n) for n, w in enumerate(writers)]
    heapq.heapify(queue)
    while queue:
        now, n = heapq.heappop(queue)
        if now > seconds:
            break
        writer = writers[n]
        writer.take_arrivals(now)
        if not writer.pending:
            heapq.heappush(queue, (writer.next_arrival, n))
            continue
        if writer.retries == 0:  # a new transaction takes what is pending; a retry keeps its batch
            writer.batch = min(len(writer.pending), costs.batch_limit)
        at_server = now + costs.rtt / 2
        if at_server < held_until[writer.counter]:  # WriteConflict on the counter: retry the same batch
            conflicts += 1
            writer.retries += 1
            backoff = rng.random() * min(BACKOFF_INITIAL * 1.5 ** writer.retries, BACKOFF_MAX) if costs.backoff else 0.0
            heapq.heappush(queue, (now + costs.rtt + backoff, n))
            continue
        held_until[writer.counter] = at_server + costs.hold(writer.batch)
        done = now + costs.cycle(writer.batch)
        if done <= seconds:
            latencies.extend(done - writer.pending.popleft() for _ in range(writer.batch))
            commits += 1
        writer.retries = 0
        heapq.heappush(queue, (done, n))
    for writer in writers:
        writer.take_arrivals(seconds)
    backlog = sum(len(w.pending) for w in writers)
    latencies.sort()

    def percentile(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")

    return Result(offered=load, stored=len(latencies) / seconds, transactions=commits / seconds,
                  mean_batch=len(latencies) / commits if commits else 0.0,
                  conflicts_per_commit=conflicts / commits if commits else float(conflicts),
                  p50_ms=percentile(0.50), p99_ms=percentile(0.99), backlog=backlog)


def numbers(text: str, kind: type = float) -> list:
    return [kind(part) for part in text.split(",") if part]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rtt-ms", type=float, default=0.5, help="client <-> primary round trip (same zone)")
    parser.add_argument("--majority-ms", type=float, default=1.0,
                        help="extra wait at commit until a majority has the transaction (primary <-> secondary)")
    parser.add_argument("--insert-us", type=float, default=20.0,
                        help="server time per event inserted in the transaction (document + 5 index entries)")
    parser.add_argument("--batch-limit", type=int, default=BATCH_LIMIT)
    parser.add_argument("--retry", choices=["backoff", "immediate"], default="backoff",
                        help="after a write conflict: PyMongo's backoff (the default driver) or Motor's immediate retry")
    parser.add_argument("--instances", default="1,4,16", help="Eddy instances writing (comma-separated)")
    parser.add_argument("--partitions", default="1,16", help="position counters: 1 is Eddy today (comma-separated)")
    parser.add_argument("--loads", default="1000,10000,30000,100000,300000", help="offered events/s in total")
    parser.add_argument("--seconds", type=float, default=1.0, help="simulated time per row")
    parser.add_argument("--seed", type=int, default=17)
    args = parser.parse_args(argv)
    costs = Costs(args.rtt_ms / 1000, args.majority_ms / 1000, args.insert_us / 1e6, args.batch_limit,
                  backoff=args.retry == "backoff")

    print(f"inputs (assumed, not measured): rtt {args.rtt_ms} ms, majority wait {args.majority_ms} ms, "
          f"insert {args.insert_us} us/event, batch limit {args.batch_limit}, retry after a conflict: {args.retry}")
    print(f"one counter: hold(1) = {costs.hold(1) * 1000:.2f} ms -> {1 / costs.hold(1):,.0f} transactions/s; "
          f"full batches: hold({args.batch_limit}) = {costs.hold(args.batch_limit) * 1000:.2f} ms "
          f"-> cap {costs.cap():,.0f} events/s per counter")
    header = (f"{'counters':>8} {'instances':>9} {'offered/s':>10} {'stored/s':>10} {'txn/s':>7} {'batch':>6} "
              f"{'conflicts/txn':>13} {'p50 ms':>7} {'p99 ms':>7} {'backlog':>8}")
    print(header)
    print("-" * len(header))
    for partitions in numbers(args.partitions, int):
        for instances in numbers(args.instances, int):
            for load in numbers(args.loads):
                r = simulate(costs, instances, partitions, load, args.seconds, args.seed)
                print(f"{partitions:>8} {instances:>9} {r.offered:>10,.0f} {r.stored:>10,.0f} {r.transactions:>7,.0f} "
                      f"{r.mean_batch:>6.1f} {r.conflicts_per_commit:>13.2f} {r.p50_ms:>7.2f} {r.p99_ms:>7.2f} "
                      f"{r.backlog:>8,}")
            sys.stdout.flush()
    print("backlog: appends still waiting when the simulated time ran out (growing = the offered load is past the cap)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
