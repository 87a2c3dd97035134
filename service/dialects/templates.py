"""``{field}`` templates over a payload or a token, for channel names and reply shapes.

* A string that is exactly one placeholder (``"{typing}"``) becomes the value
  itself, keeping its JSON type (a boolean stays a boolean).
* Any other string is formatted (``"conversation:{conversation_id}"``); the
  values it uses must be strings or numbers.
* Tables and arrays are rendered member by member; other values are kept.

A channel template also reads backwards (:meth:`Template.match`): which fields
produced ``conversation:42``, so an event on a channel can be rendered with
the payload fields the client used to name it. A placeholder then matches one
segment (no ``:``).
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from typing import Any

_FORMATTER = string.Formatter()
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class TemplateError(ValueError):
    """A template names a field the payload does not have, or one of the wrong type."""


def fields_of(template: str) -> list[str]:
    """The placeholder names of ``template``; ``ValueError`` for anything but plain ``{name}`` placeholders."""
    names = []
    for _literal, name, spec, conversion in _FORMATTER.parse(template):
        if name is None:
            continue
        if not _NAME.fullmatch(name) or spec or conversion:
            raise ValueError(f"template {template!r}: placeholders are plain {{name}}")
        names.append(name)
    return names


def check(template: Any, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` if any string in ``template`` is not a valid template."""
    if isinstance(template, str):
        try:
            fields_of(template)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    elif isinstance(template, dict):
        for key, value in template.items():
            check(value, f"{where}.{key}")
    elif isinstance(template, list):
        for index, value in enumerate(template):
            check(value, f"{where}[{index}]")


def render(template: Any, context: Mapping[str, Any]) -> Any:
    if isinstance(template, str):
        names = fields_of(template)
        if not names:
            return template
        if len(names) == 1 and template == "{" + names[0] + "}":
            if names[0] not in context:
                raise TemplateError(f"{names[0]} required")
            return context[names[0]]
        values = {}
        for name in names:
            value = context.get(name)
            if isinstance(value, bool) or not isinstance(value, (str, int, float)) or value == "":
                raise TemplateError(f"{name} required")
            values[name] = value
        return template.format_map(values)
    if isinstance(template, dict):
        return {key: render(value, context) for key, value in template.items()}
    if isinstance(template, list):
        return [render(value, context) for value in template]
    return template


class Template:
    """A channel-name template, usable both ways."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.fields = fields_of(text)
        pattern = "".join(
            re.escape(literal) + (f"(?P<{name}>[^:]+)" if name is not None else "")
            for literal, name, _spec, _conversion in _FORMATTER.parse(text)
        )
        self._regex = re.compile(pattern)

    def render(self, context: Mapping[str, Any]) -> str:
        return str(render(self.text, context)) if self.fields else self.text

    def match(self, channel: str) -> dict[str, str] | None:
        found = self._regex.fullmatch(channel)
        return found.groupdict() if found else None

    def __repr__(self) -> str:
        return f"Template({self.text!r})"
