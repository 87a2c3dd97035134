"""The service's refusals and outages as :class:`service.frames.FrameError`: the one mapping to socket error codes.

Every session operation and the replay run service calls inside :func:`refusals`,
so a storage outage, a channel refusal, a bad token, bad input or a lost
history becomes the documented code of docs/PROTOCOL.md in one place.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from . import frames
from .auth import AuthError
from .errors import ChannelRefused, HistoryLost, InvalidInput, LimitReached, StorageUnavailable
from .frames import FrameError
from .stream import parse_event_id


@contextmanager
def refusals(storage_message: str = "storage is unavailable; retry later") -> Iterator[None]:
    """Service errors raised inside become :class:`FrameError` with their documented codes."""
    try:
        yield
    except StorageUnavailable:
        raise FrameError(frames.STORAGE_UNAVAILABLE, storage_message) from None
    except (ChannelRefused, AuthError, LimitReached) as exc:
        raise FrameError(exc.code, exc.message) from None
    except HistoryLost as exc:
        raise FrameError(frames.HISTORY_LOST, exc.message) from None
    except InvalidInput as exc:
        raise FrameError(frames.INVALID_FRAME, exc.message) from None


def position_field(frame: dict[str, Any], name: str) -> int | None:
    """``frame[name]`` as a stream position (an event id), None when absent; ``INVALID_FRAME`` otherwise."""
    value = frame.get(name)
    if value is None:
        return None
    try:
        return parse_event_id(value)
    except (TypeError, ValueError):
        raise FrameError(frames.INVALID_FRAME, f"{name} must be an event id") from None
