"""Channel rules: who may join a channel, who may publish to it from a socket, whether it keeps history.

Rules come from the ``[[channels]]`` tables of the ``--config`` TOML file
(see ``docs/eddy.example.toml``). The first rule whose pattern matches a channel
decides. Who-lists use three words, any of which grants:

* ``"tenant"`` — any authenticated user of the tenant
* ``"self"`` — only the user the channel is named after (``user:<id>``)
* ``"role:<name>"`` — users holding that role

Built-in rooms are governed by the identity whatever the rules say:
``user:<id>`` only by that user, ``role:<name>`` only by holders of that role,
``tenant`` by everyone of the tenant.

With no rules at all, any authenticated user may join any other channel of its
tenant and nobody may publish from a socket. Once rules are given, a channel
that matches none is refused.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from .auth import Identity

UUID_PATTERN = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
NAMED_ID_PATTERNS = {"uuid": UUID_PATTERN, "int": r"[0-9]+"}
WHO_WORDS = ("tenant", "self")


class RuleError(ValueError):
    """The rules file is not valid; the message names the rule and field."""


@dataclass(frozen=True)
class ChannelRule:
    pattern: str
    join: tuple[str, ...] = ("tenant",)
    publish: tuple[str, ...] = ()
    history: bool = True
    #: A regular expression (or "uuid", "int") the part matched by ``*`` must match.
    id_pattern: str | None = None
    #: URL the application answers 200 to allow a join (Centrifugo's subscribe proxy).
    authorizer: str | None = None
    #: Track who is online and announce joins and leaves (off for large broadcast channels).
    presence: bool = True
    _id_regex: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def matches(self, channel: str) -> bool:
        return fnmatch.fnmatchcase(channel, self.pattern)

    def valid_id(self, channel: str) -> bool:
        if self._id_regex is None:
            return True
        prefix = self.pattern.split("*", 1)[0]
        return self._id_regex.fullmatch(channel[len(prefix):]) is not None

    def may_join(self, identity: Identity, channel: str) -> bool:
        return grants(self.join, identity, channel)

    def may_publish(self, identity: Identity, channel: str) -> bool:
        return grants(self.publish, identity, channel)


#: What a user id or role may be made of to appear as it is in its room's name (the channel charset).
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.:@-]+")
#: Starts every escaped name; a plain name never starts with it.
ESCAPE = "@"


def room_part(name: str, prefix: str = "user:") -> str:
    """How a user id (or role) appears after ``user:`` (``role:``) in its room's name: the one mapping every
    transport uses, so a socket, REST and SSE name the same room.

    A name of channel characters (A-Z a-z 0-9 _ . : @ -) not starting with ``@`` appears as it is. Any other
    (``auth0|abc``, ``José``) appears as ``@`` and its UTF-8 in lowercase unpadded base32; one too long for a
    channel name as ``@@`` and the hex SHA-256 of its UTF-8. Escaped names start with ``@``, plain ones never
    do, and base32 never holds ``@``: different names never share a room.
    """
    if _PLAIN_NAME.fullmatch(name) and not name.startswith(ESCAPE) and len(prefix) + len(name) <= 200:
        return name
    encoded = base64.b32encode(name.encode()).decode().rstrip("=").lower()
    if len(prefix) + 1 + len(encoded) <= 200:
        return ESCAPE + encoded
    return ESCAPE * 2 + hashlib.sha256(name.encode()).hexdigest()


def user_room(user_id: str) -> str:
    """The channel of one user's own room (``user:<id>``, escaped as :func:`room_part` says)."""
    return "user:" + room_part(user_id)


def role_room(role: str) -> str:
    """The channel of one role's room (``role:<name>``, escaped as :func:`room_part` says)."""
    return "role:" + room_part(role, "role:")


def grants(who: tuple[str, ...], identity: Identity, channel: str) -> bool:
    for word in who:
        if word == "tenant":
            return True
        if word == "self" and channel == user_room(identity.user_id):
            return True
        if word.startswith("role:") and word[5:] in identity.roles:
            return True
    return False


def builtin_decision(identity: Identity, channel: str) -> bool | None:
    """True/False for built-in rooms, None for every other channel."""
    if channel.startswith("user:"):
        return channel == user_room(identity.user_id)
    if channel.startswith("role:"):
        return any(channel == role_room(role) for role in identity.roles)
    if channel == "tenant":
        return True
    return None


def automatic_rooms(identity: Identity) -> list[str]:
    """The rooms every connection of ``identity`` joins on connect."""
    return [user_room(identity.user_id), "tenant", *(role_room(role) for role in identity.roles)]


class Rules:
    """The ordered rules of one configuration; ``Rules([])`` is the permissive default."""

    def __init__(self, rules: list[ChannelRule]) -> None:
        self.rules = rules

    @classmethod
    def from_config(cls, tables: list[dict[str, Any]]) -> Rules:
        return cls([parse_rule(index, table) for index, table in enumerate(tables)])

    @property
    def configured(self) -> bool:
        return bool(self.rules)

    def rule_for(self, channel: str) -> ChannelRule | None:
        for rule in self.rules:
            if rule.matches(channel):
                return rule
        return None


def parse_rule(index: int, table: dict[str, Any]) -> ChannelRule:
    where = f"channels[{index}]"
    known = {"pattern", "join", "publish", "history", "presence", "id_pattern", "authorizer"}
    unknown = set(table) - known
    if unknown:
        raise RuleError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    pattern = table.get("pattern")
    if not isinstance(pattern, str) or not pattern:
        raise RuleError(f"{where}: pattern must be a non-empty string")
    values: dict[str, Any] = {"pattern": pattern}
    for name in ("join", "publish"):
        if name in table:
            who = table[name]
            if isinstance(who, str):
                who = [who]
            if not isinstance(who, list) or not all(_valid_who(w) for w in who):
                raise RuleError(f"{where}.{name}: a list of \"tenant\", \"self\" or \"role:<name>\"")
            values[name] = tuple(who)
    for flag in ("history", "presence"):
        if flag in table:
            if not isinstance(table[flag], bool):
                raise RuleError(f"{where}.{flag}: true or false")
            values[flag] = table[flag]
    if "authorizer" in table:
        if not isinstance(table["authorizer"], str) or not table["authorizer"].startswith(("http://", "https://")):
            raise RuleError(f"{where}.authorizer: an http(s) URL")
        values["authorizer"] = table["authorizer"]
    if "id_pattern" in table:
        raw = table["id_pattern"]
        if not isinstance(raw, str) or "*" not in pattern:
            raise RuleError(f"{where}.id_pattern: a string, on a pattern with *")
        try:
            values["_id_regex"] = re.compile(NAMED_ID_PATTERNS.get(raw, raw))
        except re.error as exc:
            raise RuleError(f"{where}.id_pattern: {exc}") from None
        values["id_pattern"] = raw
    return ChannelRule(**values)


def _valid_who(word: object) -> bool:
    return isinstance(word, str) and (word in WHO_WORDS or (word.startswith("role:") and len(word) > 5))
