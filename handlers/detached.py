"""What an open WebSocket keeps of its handshake: the third use of Tornado's private state.

A WebSocket handler is a ``RequestHandler`` that lives as long as its
connection, but most of what it holds served only the handshake's HTTP
response. :func:`forget_handshake` drops it once the socket is open:

- the request's headers, query string and arguments (so no token either);
  the path stays, for log lines;
- the request's links to the finished HTTP/1 exchange (``connection``,
  ``server_connection``): after the upgrade Tornado's WebSocket reads and
  writes the detached stream only, and those objects (the request and
  response start lines, the request's headers again, two futures, the
  connection context) would otherwise live as long as the socket;
- the handler's response state, which Tornado keeps in private attributes
  (:data:`HANDSHAKE_ONLY`: the response headers and body buffer, the
  template ``ui``, the output transforms, the path and ``open()`` arguments);
- the seven ``RequestHandler`` methods Tornado's ``_detach_stream`` replaces
  with raisers on every instance: they move, unchanged, to one subclass per
  handler class (the socket's class becomes that subclass), so the guard
  stays and the instance dictionary stays small (those seven made the
  handler's attributes outgrow Python's compact per-class layout into a
  1,584-byte dictionary of their own; rebuilt without them, 464 bytes);
- the stream's two empty write queues (``IOStream._write_futures`` and its
  write buffer's ``_buffers``, :data:`STREAM_QUEUES`): a ``collections.deque``
  allocates a block of 64 slots as it is made, ~0.7 KB each, and Eddy's
  one-``send()`` fast path (:mod:`handlers.stream_write`) leaves them empty on
  most sockets, and empty again after a ping or a backlog. Each becomes a
  :class:`LazyDeque`, which holds a deque only while it has items.

It rests on private attribute names. When any of :data:`HANDSHAKE_ONLY` is
missing (a future Tornado), :func:`forget_handshake` leaves the handler's own
state as it is (only the request's public fields are cleared); a stream whose
queues are not where, or what, this expects keeps them. Either way
``tests/test_detached.py`` fails loudly so this gets updated.
"""

from __future__ import annotations

import collections
import types
from typing import Any

from tornado.websocket import WebSocketHandler

#: ``RequestHandler`` attributes that only the handshake's response uses (Tornado 6.6).
#: (``_execute`` reads ``_finished``, ``_auto_finish`` and ``_prepared_future`` when the socket ends: they stay.)
HANDSHAKE_ONLY = ("ui", "_headers", "_write_buffer", "_transforms", "_reason", "path_args", "path_kwargs",
                  "open_args", "open_kwargs")

#: (object, attribute) paths from a WebSocket's ``IOStream`` to its empty write queues (deques).
STREAM_QUEUES = (("", "_write_futures"), ("_write_buffer", "_buffers"))

#: (handler class, the methods Tornado replaced) -> the subclass that has those replacements as its own.
_DETACHED: dict[tuple[type, tuple[tuple[str, Any], ...]], type] = {}


def supported(handler: WebSocketHandler) -> bool:
    """True when ``handler`` holds every attribute :data:`HANDSHAKE_ONLY` names (Tornado as this was written for)."""
    state = vars(handler)
    return all(name in state for name in HANDSHAKE_ONLY)


def forget_handshake(handler: WebSocketHandler, also: tuple[str, ...] = ()) -> bool:
    """Drop what only the handshake needed (call it from ``open()``); ``also``: the subclass's own such attributes.

    Returns False when Tornado's private state is not what this expects: the handler is then left as it was,
    but for the request's headers, query and arguments.
    """
    request = handler.request
    # Emptied in place: the suspended handshake coroutine (WebSocketHandler.get) still holds this object.
    request.headers.__init__()  # type: ignore[misc]
    request.uri, request.query = request.path, ""
    request.arguments, request.query_arguments = {}, {}
    if not supported(handler):
        return False
    request.connection = None
    request.server_connection = None
    state = vars(handler)
    cls = type(handler)
    replaced = tuple(sorted((name, value) for name, value in state.items() if _is_replaced_method(cls, name, value)))
    if replaced:
        handler.__class__ = _detached_class(cls, replaced)
    dropped = set(HANDSHAKE_ONLY).union(also, (name for name, _ in replaced))
    # A new dictionary: deleting keys would leave the big one's table allocated.
    handler.__dict__ = {name: value for name, value in state.items() if name not in dropped}
    connection = handler.ws_connection
    if connection is not None and connection.stream is not None:
        lighten_queues(connection.stream)
    return True


def _is_replaced_method(cls: type, name: str, value: Any) -> bool:
    """An instance attribute that shadows a method of the class with a plain module-level function."""
    return (isinstance(value, types.FunctionType) and value.__closure__ is None
            and callable(getattr(cls, name, None)))


def _detached_class(cls: type, replaced: tuple[tuple[str, Any], ...]) -> type:
    detached = _DETACHED.get((cls, replaced))
    if detached is None:
        namespace: dict[str, Any] = {name: staticmethod(value) for name, value in replaced}
        namespace.update(__module__=cls.__module__, __qualname__=cls.__qualname__,
                         __doc__=f"{cls.__name__} once open: {', '.join(name for name, _ in replaced)} raise.")
        detached = _DETACHED[(cls, replaced)] = type(cls.__name__, (cls,), namespace)
    return detached


def lighten_queues(stream: Any) -> int:
    """Replace the stream's empty write queues (:data:`STREAM_QUEUES`) by :class:`LazyDeque`; how many were."""
    replaced = 0
    for path, name in STREAM_QUEUES:
        owner = getattr(stream, path, None) if path else stream
        queue = getattr(owner, name, None)
        if type(queue) is collections.deque and not queue:
            setattr(owner, name, LazyDeque())
            replaced += 1
    return replaced


class LazyDeque:
    """A ``collections.deque`` that holds one only while it has items.

    A socket's write queues fill for a moment (a ping, a close frame, a
    backlog the kernel did not take) and are empty the rest of its life; a
    real deque's 64-slot block would stay allocated all that time. This one
    makes the deque on the first ``append`` and drops it when ``popleft`` or
    ``clear`` empties it. The operations IOStream uses are written out; any
    other is forwarded to a real deque (made if needed).
    """

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: collections.deque[Any] | None = None

    def __len__(self) -> int:
        return len(self._items) if self._items is not None else 0

    def __iter__(self) -> Any:
        return iter(self._items) if self._items is not None else iter(())

    def __getitem__(self, index: int) -> Any:
        if self._items is None:
            raise IndexError("deque index out of range")
        return self._items[index]

    def append(self, item: Any) -> None:
        if self._items is None:
            self._items = collections.deque()
        self._items.append(item)

    def popleft(self) -> Any:
        if self._items is None:
            raise IndexError("pop from an empty deque")
        item = self._items.popleft()
        if not self._items:
            self._items = None
        return item

    def clear(self) -> None:
        self._items = None

    def __getattr__(self, name: str) -> Any:
        if self._items is None:
            self._items = collections.deque()
        return getattr(self._items, name)
