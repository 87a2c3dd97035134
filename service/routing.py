"""Which worker of ``eddy serve --processes N`` this is, and how to reach the others.

Socket.IO's HTTP long-polling keeps a session in one process, but the kernel
hands each new TCP connection of the shared port to any worker. So the CLI
gives every worker a private loopback port, and a worker that receives a
request for another worker's session passes it on (handlers/engineio.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ProcessRoute:
    #: This worker's index (0..N-1), which prefixes the session ids it creates.
    index: int
    #: Every worker's private loopback port, by index.
    ports: tuple[int, ...]

    def owner(self, sid: str) -> int | None:
        """The index of the worker holding session ``sid``, None when the id names none."""
        prefix, separator, _ = sid.partition(".")
        if not separator or not prefix.isdigit() or int(prefix) >= len(self.ports):
            return None
        return int(prefix)
