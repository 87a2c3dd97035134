"""Eddy's settings: one definition, read from defaults, then environment, then flags.

Every setting is a field of :class:`Settings` with its environment variable and
help text in the field's metadata, so the CLI flags and the configuration
reference are generated from here and cannot drift from the code.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any


def setting(default: Any, help: str, *, flag: bool = False, secret: bool = False) -> Any:
    """Declare a setting. ``flag=True`` also exposes it as ``eddy serve --name``."""
    return field(default=default, metadata={"help": help, "flag": flag, "secret": secret})


@dataclass(frozen=True)
class Settings:
    # Network
    port: int = setting(8888, "TCP port to listen on.", flag=True)
    address: str = setting("0.0.0.0", "Interface to bind; 127.0.0.1 keeps Eddy local.", flag=True)
    processes: int = setting(1, "Worker processes sharing the port (0 = one per core).", flag=True)

    # Storage
    storage: str = setting(
        "sqlite:///eddy.db",
        "Storage URL: sqlite:///path.db (embedded default), memory:// (tests), mongodb://host/db?replicaSet=rs0.",
        flag=True,
    )
    history_size: int = setting(1000, "Events kept per channel for history and resume.")
    history_ttl: float = setting(86400.0, "Seconds an event is kept for history and resume.")

    # Authentication
    jwt_secret: str = setting(
        "",
        "HS256 secret for client tokens. Empty: a development secret is generated beside the database.",
        secret=True,
    )
    secret_file: str = setting(
        "",
        "Where the development secret is kept. Empty: eddy.secret beside the SQLite file (or the working directory).",
    )
    default_tenant: str = setting("default", "Tenant of tokens that carry no tenant claim.")

    # Connections
    keepalive_interval: float = setting(30.0, "Seconds between keepalive frames to every socket (0 = off).")
    ping_interval: float = setting(25.0, "Seconds between WebSocket ping frames (0 = off).")
    ping_timeout: float = setting(20.0, "Seconds to wait for a pong before closing a dead connection.")
    max_buffered_bytes: int = setting(
        1 << 20, "Unsent bytes a socket may queue before it is closed as a slow consumer (4008)."
    )
    max_frame_bytes: int = setting(64 * 1024, "Largest client frame accepted; larger closes with 1009.")
    max_channels_per_connection: int = setting(100, "Channels one socket may join.")
    max_body_bytes: int = setting(1 << 20, "Largest HTTP request body accepted (413 above).")
    allowed_origins: str = setting(
        "", "Comma-separated browser origins allowed to open sockets besides the same origin; * allows any."
    )

    # Logging
    log_level: str = setting("info", "debug, info, warning or error.", flag=True)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then ``EDDY_*`` variables, then ``overrides`` (``None`` values ignored)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(env_name(f.name))
            if raw is not None and raw != "":
                values[f.name] = _coerce(f.name, f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def allowed_origin_set(self) -> frozenset[str]:
        return frozenset(o.strip().lower().rstrip("/") for o in self.allowed_origins.split(",") if o.strip())

    def with_changes(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict with secrets masked: the only form that may be logged."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = "***" if f.metadata.get("secret") and value else value
        return out


def env_name(name: str) -> str:
    return "EDDY_" + name.upper()


def _coerce(name: str, type_name: Any, raw: str) -> Any:
    kind = {"int": int, "float": float, "str": str, "bool": _parse_bool}[str(type_name)]
    try:
        return kind(raw)
    except ValueError as exc:
        raise ValueError(f"{env_name(name)}={raw!r} is not a valid {type_name}") from exc


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(raw)


def described_settings() -> Iterator[tuple[str, str, str | None, Any, str]]:
    """(name, env var, flag or None, default, help) for every setting, in declaration order."""
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-") if f.metadata["flag"] else None
        yield f.name, env_name(f.name), flag, f.default, f.metadata["help"]


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """Add a ``--flag`` for each setting declared with ``flag=True`` (default None = not given)."""
    types = {f.name: {"int": int, "float": float, "str": str}[str(f.type)] for f in fields(Settings)}
    for name, env, flag, default, help_text in described_settings():
        if flag:
            parser.add_argument(
                flag, dest=name, type=types[name], default=None, help=f"{help_text} [{env}, default {default!r}]"
            )
