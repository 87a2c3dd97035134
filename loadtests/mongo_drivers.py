"""PyMongo's asyncio client against Motor: what one MongoDB call costs the Eddy process, side by side.

A mockupdb server in a child process answers every ``find`` with one small
document, so its own cost is not counted in this process. This process makes
the same ``find_one`` calls through each driver, as storage/mongo.py makes
them (``Driver`` / ``MotorDriver``), one at a time and with several in flight,
and reports wall time and this process's CPU time per call (Motor's thread
pool included) for every round, then the medians and the ratio.

Both sides are real drivers on real sockets; the server is a Python mock, so the
absolute wall times say more about it than about MongoDB. The CPU per call on
the client side is the figure to compare.

    python -m loadtests.mongo_drivers --calls 2000 --concurrency 1,32 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time

from storage.mongo import DRIVERS

HELLO = {"ismaster": True, "isWritablePrimary": True, "helloOk": True, "minWireVersion": 0, "maxWireVersion": 21,
         "maxBsonObjectSize": 16 * 1024 * 1024, "maxMessageSizeBytes": 48_000_000, "maxWriteBatchSize": 100_000,
         "logicalSessionTimeoutMinutes": 30}


def serve() -> None:
    """The child: a mockupdb server answering hello and find until its stdin closes."""
    from mockupdb import MockupDB

    server = MockupDB(max_wire_version=21)
    for name in ("ismaster", "isMaster", "hello"):
        server.autoresponds(name, HELLO)
    found = {"cursor": {"id": 0, "ns": "bench.items", "firstBatch": [{"_id": 1, "n": 1}]}}

    def answer(request) -> bool:  # a command name alone would only match {find: 1}
        if request.command_name == "find":
            request.reply(found)
        elif request.command_name == "endSessions":
            request.ok()
        else:
            return False
        return True

    server.autoresponds(answer)
    print(server.run(), flush=True)
    sys.stdin.read()
    server.stop()


async def calls(driver_name: str, url: str, count: int, concurrency: int) -> tuple[float, float]:
    """Seconds of wall time and of process CPU time per call."""
    driver = DRIVERS[driver_name]
    client = driver.client(url)
    items = client["bench"]["items"]
    try:
        await items.find_one({"_id": 1})  # connect outside the measurement

        async def worker(n: int) -> None:
            for _ in range(n):
                document = await items.find_one({"_id": 1})
                assert document == {"_id": 1, "n": 1}

        wall, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(count // concurrency) for _ in range(concurrency)))
        done = (count // concurrency) * concurrency
        return (time.perf_counter() - wall) / done, (time.process_time() - cpu) / done
    finally:
        await driver.close(client)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="find_one calls per run")
    parser.add_argument("--concurrency", default="1,32", help="calls in flight (comma-separated)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve()
        return 0
    child = subprocess.Popen([sys.executable, "-m", "loadtests.mongo_drivers", "--serve"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        url = f"mongodb://127.0.0.1:{child.stdout.readline().strip()}/?directConnection=true"
        names = list(DRIVERS)
        print(f"{args.calls} find_one calls per run against mockupdb in a child process; µs per call")
        print(f"{'in flight':>9} {'round':>5} {'driver':>8} {'wall':>8} {'cpu':>8}")
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            results: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
            for round_ in range(1, args.rounds + 1):
                for name in names if round_ % 2 else reversed(names):  # alternate who goes first
                    wall, cpu = asyncio.run(calls(name, url, args.calls, concurrency))
                    results[name].append((wall, cpu))
                    print(f"{concurrency:>9} {round_:>5} {name:>8} {wall * 1e6:>8.1f} {cpu * 1e6:>8.1f}")
            medians = {n: (statistics.median(w for w, _ in r), statistics.median(c for _, c in r))
                       for n, r in results.items()}
            for name, (wall, cpu) in medians.items():
                print(f"{concurrency:>9} {'med':>5} {name:>8} {wall * 1e6:>8.1f} {cpu * 1e6:>8.1f}")
            (pw, pc), (mw, mc) = medians["pymongo"], medians["motor"]
            print(f"{concurrency:>9} {'':>5} {'ratio':>8} {pw / mw:>8.2f} {pc / mc:>8.2f}   (pymongo / motor)")
    finally:
        child.communicate(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
