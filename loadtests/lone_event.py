"""A lone event's fan-out in one process: Eddy's hub beside a bare ``os.write()`` loop over the same sockets.

One process holds N WebSockets on one channel (opened and drained by a client
subprocess, as in :mod:`loadtests.fanout_paths`). Rounds alternate two ways of
writing one event to every socket: ``Hub.publish`` (the lanes, or whatever path
this tree's hub takes) and the floor's loop (one prepared frame, ``os.write()``
on each descriptor). Before each event the process sleeps and walks a buffer
larger than the CPU caches, as other work leaves them between real events, so
what is measured is a cold fan-out: wall time per socket, median of the rounds.

    python -m loadtests.lone_event --sockets 5000 --rounds 9
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

from service.frames import PreparedMessage
from storage import Event

from .fanout_paths import close_fanout, open_fanout, run

#: Bytes walked before each event to push the sockets' objects out of the caches.
EVICT_BYTES = 8 << 20


async def main_async(args: argparse.Namespace) -> None:
    eddy, server, client = await open_fanout(args.port, args.sockets)
    try:
        descriptors = [s.transport.ws_connection.stream.socket.fileno() for s in eddy.hub._channels[("bench", "bench")]]
        evict = bytearray(EVICT_BYTES)
        times: dict[str, list[float]] = {"eddy hub": [], "floor loop": []}
        position = 0
        for _ in range(args.rounds):
            for name in times:
                await asyncio.sleep(0.2)
                for i in range(0, EVICT_BYTES, 64):
                    evict[i] = 1
                position += 1
                event = Event(position, "bench", "bench", "pedido_criado", {"n": position}, time.time())
                started = time.perf_counter()
                if name == "eddy hub":
                    eddy.hub.publish(event)
                else:
                    frame = PreparedMessage.for_event(event).websocket_frame
                    for fd in descriptors:
                        os.write(fd, frame)
                times[name].append((time.perf_counter() - started) / args.sockets * 1e6)
    finally:
        await close_fanout(eddy, server, client)
    print(f"sockets={args.sockets} rounds={args.rounds} (µs per socket, each round; median)")
    for name, values in times.items():
        print(f"{name:<11} {' / '.join(f'{v:.1f}' for v in values)} -> {statistics.median(values):.2f}")
    ratio = statistics.median(times["eddy hub"]) / statistics.median(times["floor loop"])
    print(f"eddy hub / floor loop: {ratio:.2f}x")


def main() -> None:
    run(main_async, __doc__, sockets=5000, events=1, rounds=9, port=8897)


if __name__ == "__main__":
    main()
