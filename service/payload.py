"""What event data every backend can store, checked before anything is written.

Event data is any JSON value, nested at most :data:`MAX_DATA_DEPTH` levels of
arrays and objects. The bound is the tightest any backend holds with room for
the envelope around the data: MongoDB refuses documents nested more than 100
levels (the event document and its ``data`` field are two of them), orjson
writes at most 254. Refused here, deep data never reaches a shared write
batch (see :meth:`storage.sqlite.SQLiteStorage._submit`).
"""

from __future__ import annotations

from typing import Any

from .errors import InvalidInput

#: Levels of nested arrays and objects event data may have (a scalar has 0, ``{"a": [1]}`` has 2).
MAX_DATA_DEPTH = 64


def data_depth(data: Any, stop_after: int = MAX_DATA_DEPTH) -> int:
    """How deeply ``data`` nests, counted without recursion; stops counting past ``stop_after``."""
    deepest = 0
    pending: list[tuple[Any, int]] = [(data, 0)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        depth += 1
        if depth > deepest:
            deepest = depth
            if deepest > stop_after:
                return deepest
        pending.extend((child, depth) for child in children)
    return deepest


def check_data(data: Any) -> None:
    """:class:`InvalidInput` unless every backend can store ``data``."""
    if data_depth(data) > MAX_DATA_DEPTH:
        raise InvalidInput(f"data may nest at most {MAX_DATA_DEPTH} levels of arrays and objects")
