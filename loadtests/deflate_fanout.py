"""permessage-deflate at fan-out: bytes on the wire and server CPU per delivery, compressed vs plain.

One process runs an Eddy hub with N WebSocket connections that all negotiated
permessage-deflate (opened and drained by a client subprocess, so its CPU is
not counted). Rounds alternate the two ways of sending the same events to the
same sockets: plain frames, and the compressed frame Eddy builds once per
event for every socket. Each round publishes K events (a ~2 KiB JSON payload)
and reports the server's CPU time per delivery and the frame bytes per
delivery (what each socket receives, before TCP/IP headers).

    python -m loadtests.deflate_fanout --sockets 5000 --events 40 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

from loadtests.fanout_paths import CLIENT, close_fanout, open_fanout, run
from service.app import Eddy
from service.frames import PreparedMessage
from storage import Event

#: The fan-out client of fanout_paths, offering permessage-deflate as browsers do.
DEFLATE_CLIENT = CLIENT.replace("Sec-WebSocket-Version: 13\\r\\n\\r\\n",
                                "Sec-WebSocket-Version: 13\\r\\n"
                                "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\\r\\n\\r\\n")
assert DEFLATE_CLIENT != CLIENT


def payload(seed: int) -> dict:
    """About 2 KiB of ordinary JSON: an order with 20 items (varied ids, names, prices)."""
    rng = random.Random(seed)
    items = [{"sku": f"SKU-{rng.randrange(10**6):06d}", "name": rng.choice(["Coffee beans", "Green tea", "Mug",
                                                                           "Filter paper", "Grinder", "Kettle"]),
              "quantity": rng.randrange(1, 9), "unit_price": f"{rng.uniform(1, 90):.2f}",
              "warehouse": rng.choice(["LIS-1", "OPO-2", "SAO-3"])} for _ in range(20)]
    return {"order_id": f"{rng.getrandbits(64):016x}", "status": "paid", "customer": {"id": rng.randrange(10**7),
            "name": "Maria da Silva", "email": "maria@example.com"}, "items": items,
            "total": f"{sum(float(i['unit_price']) * i['quantity'] for i in items):.2f}", "currency": "EUR"}


async def measure(eddy: Eddy, sockets: list, events: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {mode: {"cpu": [], "bytes": []} for mode in ("plain", "deflate")}
    position = 0
    for _ in range(rounds):
        for mode in ("plain", "deflate"):
            for socket in sockets:
                socket.deflate = mode == "deflate"
            await asyncio.sleep(0.5)
            sizes = []
            started = time.process_time()
            for _ in range(events):
                position += 1
                event = Event(position, "bench", "bench", "order.paid", payload(position), time.time())
                eddy.hub.publish(event)
                for _ in range(3):  # let the outboxes be written before the next event
                    await asyncio.sleep(0)
                message = PreparedMessage.for_event(event)
                sizes.append(len(message.rendered(eddy.deflated_frames) if mode == "deflate"
                                 else message.websocket_frame))
            await asyncio.sleep(0.05)
            results[mode]["cpu"].append((time.process_time() - started) / (events * len(sockets)) * 1e6)
            results[mode]["bytes"].append(statistics.mean(sizes))
    return results


async def main_async(args: argparse.Namespace) -> None:
    eddy, server, client = await open_fanout(args.port, args.sockets, DEFLATE_CLIENT)
    sockets = [session.transport for session in eddy.hub._channels[("bench", "bench")]]
    assert all(socket.deflate for socket in sockets), "a socket did not negotiate permessage-deflate"
    try:
        results = await measure(eddy, sockets, args.events, args.rounds)
    finally:
        await close_fanout(eddy, server, client)
    size = len(PreparedMessage.for_event(Event(1, "bench", "bench", "order.paid", payload(1), 0.0)).payload)
    print(f"sockets={args.sockets} events/round={args.events} rounds={args.rounds} payload≈{size} bytes JSON")
    print(f"{'mode':<9}{'CPU µs/delivery (runs)':>34}{'median':>9}{'bytes/delivery':>16}")
    for mode, result in results.items():
        runs = ", ".join(f"{cpu:.1f}" for cpu in result["cpu"])
        print(f"{mode:<9}{runs:>34}{statistics.median(result['cpu']):>9.1f}{statistics.median(result['bytes']):>16.0f}")
    plain, deflate = results["plain"], results["deflate"]
    print(f"deflate vs plain: {statistics.median(plain['bytes']) / statistics.median(deflate['bytes']):.2f}x fewer bytes, "
          f"{statistics.median(deflate['cpu']) / statistics.median(plain['cpu']):.2f}x the CPU per delivery")


def main() -> None:
    run(main_async, __doc__, sockets=5000, events=40, rounds=3, port=8897)


if __name__ == "__main__":
    main()
