"""Pluggable event storage. :func:`open_storage` picks a backend from a URL.

Built in: ``sqlite:///path.db`` (the embedded default), ``memory://`` (tests),
``mongodb://…`` (production, change streams). Third-party backends register a
factory ``(url, **options) -> Storage`` under the entry point group
``eddy.storage`` with the URL scheme as the name::

    [options.entry_points]
    eddy.storage =
        postgresql = eddy_pg:PostgresStorage
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from importlib.metadata import entry_points
from pathlib import Path
from urllib.parse import urlsplit

from .base import (
    MAX_POSITION,
    BoundedCounts,
    CollectionFeed,
    Event,
    EventDraft,
    EventLog,
    History,
    PresenceEntry,
    PresenceStore,
    ReadReceipt,
    ReadReceiptStore,
    RecordRefused,
    ScheduledEvent,
    Scheduling,
    Storage,
    StorageError,
    StorageUnavailable,
    parse_event_id,
    publication_key,
)

__all__ = [
    "MAX_POSITION",
    "BoundedCounts",
    "CollectionFeed",
    "Event",
    "EventDraft",
    "EventLog",
    "History",
    "PresenceEntry",
    "PresenceStore",
    "ReadReceipt",
    "ReadReceiptStore",
    "RecordRefused",
    "ScheduledEvent",
    "Scheduling",
    "Storage",
    "StorageError",
    "StorageUnavailable",
    "open_storage",
    "parse_event_id",
    "publication_key",
    "sqlite_file",
    "ENTRY_POINT_GROUP",
]

ENTRY_POINT_GROUP = "eddy.storage"

#: scheme -> "module:ClassName", imported only when used (motor is optional).
BUILTIN_BACKENDS = {
    "memory": "storage.memory:MemoryStorage",
    "sqlite": "storage.sqlite:SQLiteStorage",
    "mongodb": "storage.mongo:MongoStorage",
    "mongodb+srv": "storage.mongo:MongoStorage",
}


def _load(target: str) -> Callable[..., Storage]:
    module_name, _, attribute = target.partition(":")
    return getattr(import_module(module_name), attribute)


def backend_for(url: str) -> Callable[..., Storage]:
    """The factory for ``url``'s scheme; ``ValueError`` for an unknown one."""
    scheme = urlsplit(url).scheme.lower()
    if not scheme:
        raise ValueError(f"storage URL needs a scheme (sqlite://, memory://, mongodb://): {url!r}")
    if scheme in BUILTIN_BACKENDS:
        return _load(BUILTIN_BACKENDS[scheme])
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name == scheme:
            return entry_point.load()
    raise ValueError(f"no storage backend for scheme {scheme!r}")


def sqlite_file(url: str) -> Path | None:
    """The database file a ``sqlite://`` URL names; None for other schemes or no path.

    Like SQLAlchemy's URLs: ``sqlite:///eddy.db`` (three slashes) is ``eddy.db``
    relative to the working directory, ``sqlite:////var/lib/eddy/eddy.db``
    (four) is the absolute path ``/var/lib/eddy/eddy.db``.
    """
    parts = urlsplit(url)
    if parts.scheme != "sqlite" or parts.path in ("", "/"):
        return None
    return Path(parts.path[1:])  # "/rel.db" -> "rel.db", "//abs.db" -> "/abs.db"


def open_storage(url: str, **options: float) -> Storage:
    """Create (not yet open) the backend for ``url``. Options: ``history_size``, ``history_ttl``."""
    return backend_for(url)(url, **options)
