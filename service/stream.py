"""Stream positions as clients see them: event ids, and the epoch of the store that gave them.

An event id is its position in the store, in decimal (``"42"``). Every path
that takes an id from a client parses it with :func:`parse_event_id`, so they
refuse the same things. Transports import it from here: they never touch
:mod:`storage` themselves.
"""

from __future__ import annotations

from storage import MAX_POSITION, parse_event_id

__all__ = ["MAX_POSITION", "parse_event_id"]
