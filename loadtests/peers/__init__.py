"""Peer servers that ``loadtests.bench`` measures side by side with Eddy.

Each is a runnable module taking ``--port`` and broadcasts the same message to
every connected socket: ``{"event": …, "timestamp": "…Z" (UTC, milliseconds),
"data": {"seq": n, …}}``, so one client measures all of them.
"""

from __future__ import annotations

from datetime import UTC, datetime


def iso_timestamp(seconds: float) -> str:
    """``2024-05-30T14:27:11.125Z``: UTC with milliseconds, the same format as Eddy's frames."""
    moment = datetime.fromtimestamp(seconds, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
