"""What the service answers instead of a result: the refusals and outages every transport maps to its own codes.

Handlers import these from here (never from :mod:`storage`): the service is
the only layer that talks to the store, so its errors are part of its API.
"""

from __future__ import annotations

from storage import StorageError, StorageUnavailable

from .authorizer import ChannelRefused

__all__ = ["ChannelRefused", "HistoryLost", "InvalidInput", "LimitReached", "NotFound", "StorageError",
           "StorageUnavailable"]


class InvalidInput(ValueError):
    """The caller's input cannot be accepted as given (a time out of range, data nested too deep).

    Transports answer it as bad input: ``400 INVALID_BODY`` over HTTP, ``INVALID_FRAME`` on a socket.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class HistoryLost(Exception):
    """A resume cannot be answered without a gap: events after ``since`` were trimmed, or ``since`` belongs
    to another epoch of the store (the store was recreated). Transports answer ``HISTORY_LOST`` (410 over HTTP)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(LookupError):
    """Nothing the caller may see has that id (whether it does not exist or belongs to someone else)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class LimitReached(Exception):
    """A configured bound (scheduled events per tenant) is reached; ``429`` over HTTP."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
