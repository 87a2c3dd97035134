"""The ``[socketio]`` tables of the config file: which client event does what, and how replies look.

Read once at start (``eddy serve --config``); a mistake is a ``ValueError``
naming the table and field. Example (seed 002)::

    [[socketio.namespaces]]
    name = "/"
    rooms = ["user:{user_id}"]
    greeting = { event = "connected", data = { message = "Connected", user_id = "{user_id}" } }

    [[socketio.namespaces.events]]
    event = "join_conversation"             # what the client emits
    do = "join"                             # join | leave | typing | publish | presence | ping
    channel = "conversation:{conversation_id}"
    reply = { event = "joined_conversation", data = { conversation_id = "{conversation_id}" } }
    error = { event = "error", data = { message = "{error}" } }

    [[socketio.namespaces.signals]]         # how typing / read / presence reach this namespace
    signal = "typing"
    channel = "conversation:{conversation_id}"
    event = "user_typing"
    data = { conversation_id = "{conversation_id}", user_id = "{user_id}", typing = "{is_typing}" }

Every field is described in docs/DIALECTS.md.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from service.auth import Identity
from service.rules import automatic_rooms

from . import templates
from .templates import Template


class Operation(enum.Enum):
    """What a client event does: one of Eddy's session operations."""

    JOIN = "join"
    LEAVE = "leave"
    TYPING = "typing"
    PUBLISH = "publish"
    PRESENCE = "presence"
    PING = "ping"


#: Operations that name a channel.
CHANNEL_OPERATIONS = (Operation.JOIN, Operation.LEAVE, Operation.TYPING, Operation.PUBLISH)
#: Ephemeral events a namespace may render, by the ``signal`` name of a ``[[...signals]]`` table.
SIGNALS = ("typing", "read", "presence")


@dataclass(frozen=True)
class Emit:
    """An event the server emits: a name and a data template."""

    event: str
    data: Any = None


@dataclass(frozen=True)
class EventRule:
    event: str
    operation: Operation
    channel: Template | None = None
    reply: Emit | None = None
    error: Emit | None = None
    ack: Any = None
    ack_error: Any = None
    #: typing: the state this event sets (typing_start true, typing_stop false).
    typing: bool = True
    #: publish: the stored event's name (default: the client's event name) and data template (default: the payload).
    publish_event: str | None = None
    data: Any = None


@dataclass(frozen=True)
class RoomRule:
    room: str
    role: str | None = None


@dataclass(frozen=True)
class SignalRule:
    signal: str
    emit: Emit
    channel: Template | None = None
    when: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Namespace:
    name: str
    rooms: tuple[RoomRule, ...] | None = None
    greeting: Emit | None = None
    events: dict[str, EventRule] = field(default_factory=dict)
    signals: tuple[SignalRule, ...] = ()
    #: What a stored event's emit carries: a template over the event (``event``, ``id``, ``channel``,
    #: ``timestamp``, ``data``); None = the published data as it is (what the seeds expect).
    event_data: Any = None

    def rooms_for(self, identity: Identity) -> list[str]:
        """The automatic rooms of a connection: the templates over its token, or Eddy's own rooms."""
        if self.rooms is None:
            return automatic_rooms(identity)
        context = token_context(identity)
        return [str(templates.render(rule.room, context)) for rule in self.rooms
                if rule.role is None or rule.role in identity.roles]

    def signal_for(self, signal: str, channel: str, data: dict[str, Any]) -> tuple[SignalRule, dict[str, str]] | None:
        """The first signal table for ``signal`` whose channel template and ``when`` match."""
        for rule in self.signals:
            if rule.signal != signal:
                continue
            matched = rule.channel.match(channel) if rule.channel is not None else {}
            if matched is None:
                continue
            if all(data.get(key) == value for key, value in rule.when.items()):
                return rule, matched
        return None


def token_context(identity: Identity) -> dict[str, Any]:
    """What room and greeting templates may name: ``user_id`` (alias ``sub``), ``tenant``, ``role``, ``roles``."""
    return {"user_id": identity.user_id, "sub": identity.user_id, "tenant": identity.tenant,
            "role": identity.roles[0] if identity.roles else "", "roles": list(identity.roles)}


DEFAULT_NAMESPACES = {"/": Namespace("/")}


def parse_socketio(table: dict[str, Any] | None) -> dict[str, Namespace]:
    """The namespaces of a ``[socketio]`` table; with none, ``/`` with Eddy's automatic rooms and no events."""
    if not table:
        return dict(DEFAULT_NAMESPACES)
    _known(table, {"namespaces"}, "socketio")
    items = table.get("namespaces", [])
    if not isinstance(items, list) or not items or not all(isinstance(t, dict) for t in items):
        raise ValueError("socketio.namespaces must be an array of tables ([[socketio.namespaces]])")
    namespaces: dict[str, Namespace] = {}
    for index, item in enumerate(items):
        namespace = _namespace(item, f"socketio.namespaces[{index}]")
        if namespace.name in namespaces:
            raise ValueError(f"socketio.namespaces[{index}]: namespace {namespace.name} given twice")
        namespaces[namespace.name] = namespace
    return namespaces


def _namespace(table: dict[str, Any], where: str) -> Namespace:
    _known(table, {"name", "rooms", "greeting", "events", "signals", "event_data"}, where)
    name = table.get("name", "/")
    if not isinstance(name, str) or not name.startswith("/") or "," in name or len(name) > 100:
        raise ValueError(f"{where}.name: a namespace starts with / (e.g. \"/atendimento\")")
    rooms = None
    if "rooms" in table:
        if not isinstance(table["rooms"], list):
            raise ValueError(f"{where}.rooms: an array of room templates")
        rooms = tuple(_room(room, f"{where}.rooms[{i}]") for i, room in enumerate(table["rooms"]))
    greeting = _emit(table["greeting"], f"{where}.greeting") if "greeting" in table else None
    events: dict[str, EventRule] = {}
    for index, item in enumerate(_tables(table, "events", where)):
        rule = _event(item, f"{where}.events[{index}]")
        if rule.event in events:
            raise ValueError(f"{where}.events[{index}]: event {rule.event!r} mapped twice")
        events[rule.event] = rule
    signals = tuple(_signal(item, f"{where}.signals[{i}]") for i, item in enumerate(_tables(table, "signals", where)))
    templates.check(table.get("event_data"), f"{where}.event_data")
    return Namespace(name, rooms, greeting, events, signals, table.get("event_data"))


def _event(table: dict[str, Any], where: str) -> EventRule:
    _known(table, {"event", "do", "channel", "reply", "error", "ack", "ack_error", "typing", "publish_event", "data"},
           where)
    event = table.get("event")
    if not isinstance(event, str) or not event:
        raise ValueError(f"{where}.event: the client's event name")
    try:
        operation = Operation(table.get("do"))
    except ValueError:
        raise ValueError(f"{where}.do: one of {', '.join(o.value for o in Operation)}") from None
    channel = _template(table, "channel", where) if "channel" in table else None
    if operation in CHANNEL_OPERATIONS and channel is None:
        raise ValueError(f"{where}.channel: {operation.value} needs a channel template over the payload")
    typing = table.get("typing", True)
    if not isinstance(typing, bool):
        raise ValueError(f"{where}.typing: true or false")
    publish_event = table.get("publish_event")
    if publish_event is not None and (not isinstance(publish_event, str) or not publish_event
                                      or publish_event.startswith("$")):
        raise ValueError(f"{where}.publish_event: an event name not starting with $")
    for name in ("ack", "ack_error", "data"):
        templates.check(table.get(name), f"{where}.{name}")
    return EventRule(
        event, operation, channel,
        reply=_emit(table["reply"], f"{where}.reply") if "reply" in table else None,
        error=_emit(table["error"], f"{where}.error") if "error" in table else None,
        ack=table.get("ack"), ack_error=table.get("ack_error"), typing=typing,
        publish_event=publish_event, data=table.get("data"),
    )


def _signal(table: dict[str, Any], where: str) -> SignalRule:
    _known(table, {"signal", "channel", "event", "data", "when"}, where)
    signal = table.get("signal")
    if signal not in SIGNALS:
        raise ValueError(f"{where}.signal: one of {', '.join(SIGNALS)}")
    when = table.get("when", {})
    if not isinstance(when, dict):
        raise ValueError(f"{where}.when: a table of field = value")
    channel = _template(table, "channel", where) if "channel" in table else None
    return SignalRule(signal, _emit({"event": table.get("event"), "data": table.get("data")}, where), channel, when)


def _room(value: Any, where: str) -> RoomRule:
    if isinstance(value, str):
        templates.check(value, where)
        return RoomRule(value)
    if isinstance(value, dict):
        _known(value, {"room", "role"}, where)
        room, role = value.get("room"), value.get("role")
        if isinstance(room, str) and (role is None or isinstance(role, str)):
            templates.check(room, where)
            return RoomRule(room, role)
    raise ValueError(f"{where}: a room template, or {{ room = \"...\", role = \"...\" }}")


def _emit(value: Any, where: str) -> Emit:
    if not isinstance(value, dict) or not isinstance(value.get("event"), str) or not value["event"]:
        raise ValueError(f"{where}: {{ event = \"name\", data = {{ ... }} }}")
    _known(value, {"event", "data"}, where)
    templates.check(value.get("data"), f"{where}.data")
    return Emit(value["event"], value.get("data"))


def _template(table: dict[str, Any], name: str, where: str) -> Template:
    value = table[name]
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}.{name}: a template string")
    try:
        return Template(value)
    except ValueError as exc:
        raise ValueError(f"{where}.{name}: {exc}") from None


def _tables(table: dict[str, Any], name: str, where: str) -> list[dict[str, Any]]:
    items = table.get(name, [])
    if not isinstance(items, list) or not all(isinstance(t, dict) for t in items):
        raise ValueError(f"{where}.{name}: an array of tables")
    return items


def _known(table: dict[str, Any], names: set[str], where: str) -> None:
    unknown = set(table) - names
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
