"""Eddy's settings: one definition, read from defaults, then environment, then flags.

Every setting is a field of :class:`Settings` with its environment variable and
help text in the field's metadata, so the CLI flags and the configuration
reference are generated from here and cannot drift from the code.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, cast


def setting(default: Any, help: str, *, flag: bool = False, secret: bool = False) -> Any:
    """Declare a setting. ``flag=True`` also exposes it as ``eddy serve --name``."""
    return field(default=default, repr=not secret, metadata={"help": help, "flag": flag, "secret": secret})


@dataclass(frozen=True)
class Settings:
    # Network
    port: int = setting(8888, "TCP port to listen on.", flag=True)
    address: str = setting("0.0.0.0", "Interface to bind; 127.0.0.1 keeps Eddy local.", flag=True)
    processes: int = setting(1, "Worker processes sharing the port (0 = one per CPU this process may run on). "
                                "Their metrics are summed through PROMETHEUS_MULTIPROC_DIR, else through a "
                                "directory made in the temporary directory and removed when they exit.", flag=True)

    # Storage
    storage: str = setting(
        "sqlite:///eddy.db",
        "Storage URL: sqlite:///path.db (embedded default), memory:// (tests), mongodb://host/db?replicaSet=rs0.",
        flag=True,
    )
    history_size: int = setting(1000, "Events kept per channel for history and resume.")
    history_ttl: float = setting(86400.0, "Seconds an event is kept for history and resume.")

    # Configuration file
    config: str = setting("", "TOML file with any of these settings and [[channels]] rules.", flag=True)

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
    jwt_algorithms: str = setting("HS256", "Comma-separated accepted algorithms: HS256, RS256, ES256 (never none).")
    jwt_public_key_file: str = setting("", "PEM public key for RS256/ES256 tokens.")
    jwks_file: str = setting("", "JWKS (JSON) file of public keys for RS256/ES256 tokens, chosen by kid.")
    jwt_issuer: str = setting("", "Required iss claim, when set.")
    jwt_audience: str = setting("", "Required aud claim, when set.")
    user_claim: str = setting("sub", "Claim holding the user id.")
    tenant_claim: str = setting("tenant", "Claim holding the tenant (e.g. tenant_id, empresaId).")
    roles_claim: str = setting("roles", "Claim holding the list of roles.")
    auth_timeout: float = setting(
        0.0, "Seconds a socket may stay unauthenticated waiting for an authenticate frame (0 = token required at the handshake)."
    )
    token_grace: float = setting(30.0, "Seconds after TOKEN_EXPIRED to send a fresh token before the socket is closed (4003).")
    publisher_role: str = setting(
        "publisher",
        "Role of server credentials: a token holding it publishes over HTTP to any channel of its tenant, built-in "
        "rooms included, whatever the rules' publish lists say (empty: no such role).",
    )
    authorizer_timeout: float = setting(2.0, "Seconds to wait for a join authorizer's answer.")
    authorizer_cache_ttl: float = setting(30.0, "Seconds a join authorizer's answer is reused.")

    # Connections
    keepalive_interval: float = setting(30.0, "Seconds between keepalive frames to every socket (0 = off).")
    ping_interval: float = setting(25.0, "Seconds between WebSocket ping frames (0 = off).")
    ping_timeout: float = setting(20.0, "Seconds to wait for a pong before closing a dead connection.")
    max_buffered_bytes: int = setting(
        1 << 20, "Unsent bytes a socket may queue before it is closed as a slow consumer (4008)."
    )
    max_frame_bytes: int = setting(
        64 * 1024, "Largest client frame accepted, in UTF-8 bytes; a larger one is answered with FRAME_TOO_LARGE and "
        "the socket stays open; one over 4x this is not read and closes the socket with 1009."
    )
    compression: bool = setting(
        True, "Accept permessage-deflate when a WebSocket client offers it (each event is compressed once for all)."
    )
    compression_threshold: int = setting(1024, "Frames smaller than this many bytes are sent uncompressed.")
    max_channels_per_connection: int = setting(100, "Channels one socket may join.")
    max_connections_per_ip: int = setting(1000, "Sockets one client address may hold per process (429 above).")
    frame_rate: float = setting(50.0, "Client frames per second a socket may send on average (RATE_LIMITED above).")
    frame_burst: int = setting(100, "Client frames a socket may send at once; twice this many refusals in a row close it (1008).")
    handshake_timeout: float = setting(10.0, "Seconds a new TCP connection may take to send its request headers.")
    rest_rate: float = setting(
        1000.0, "HTTP requests per second one token (user) may make on average (429 above); backends publish fast."
    )
    rest_burst: int = setting(2000, "HTTP requests one token may make at once.")
    shutdown_timeout: float = setting(
        10.0, "Seconds a SIGTERM shutdown may take (clients told to reconnect, sockets closed, storage closed)."
    )
    trust_proxy_headers: bool = setting(
        False, "True behind a proxy that sets X-Forwarded-For/X-Real-Ip (client addresses for per-IP limits)."
    )
    max_connections_per_user: int = setting(
        10, "Sockets one user may hold per process; the oldest is closed (4029) when another arrives."
    )
    presence_ttl: float = setting(30.0, "Seconds a presence entry lives unless its process refreshes it (a third of it).")
    typing_timeout: float = setting(6.0, "Seconds after which a typing indicator without refresh is cleared.")
    schedule_interval: float = setting(1.0, "Seconds between checks for due scheduled events that this process "
                                       "did not schedule (its own are published at their time).")
    schedule_lease: float = setting(
        30.0, "Seconds a process holds the events it claimed; after that (it died) another process publishes them."
    )
    max_scheduled_per_tenant: int = setting(
        10000, "Scheduled events one tenant may hold at once (429 TOO_MANY_SCHEDULED above)."
    )
    max_body_bytes: int = setting(
        1 << 20, "Largest HTTP request body accepted on any route (413 on POST /api/events, 400 elsewhere)."
    )
    body_timeout: float = setting(10.0, "Seconds a client may take to send a request body on any route (0 = no limit).")
    allowed_origins: str = setting(
        "", "Comma-separated browser origins allowed to open sockets besides the same origin; * allows any."
    )

    # Dialects: the seeds' own clients (docs/DIALECTS.md)
    socketio_ping_interval: float = setting(25.0, "Socket.IO: seconds between the server's Engine.IO pings.")
    socketio_ping_timeout: float = setting(
        20.0, "Socket.IO: seconds after a ping without the client's pong before the session is closed."
    )
    socketio_max_http_buffer_size: int = setting(
        1_000_000, "Socket.IO: largest Engine.IO message or polling request body accepted (maxHttpBufferSize)."
    )
    socketio_recovery_window: float = setting(
        120.0, "Socket.IO: seconds a disconnected session can be recovered with its rooms and missed events (0 = off)."
    )

    # Logging
    log_level: str = setting("info", "debug, info, warning or error.", flag=True)
    log_format: str = setting("auto", "text, json, or auto (text on a terminal, JSON lines otherwise).", flag=True)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then the ``--config`` file, then ``EDDY_*`` variables, then ``overrides`` (None ignored)."""
        environ = os.environ if environ is None else environ
        overrides = {k: v for k, v in overrides.items() if v is not None}
        values: dict[str, Any] = {}
        config = overrides.get("config") or environ.get(env_name("config"))
        if config:
            values.update(read_config_file(config)[0])
            values["config"] = config
        for f in fields(cls):
            raw = environ.get(env_name(f.name))
            if raw is not None and raw != "":
                values[f.name] = _coerce(f.name, f.type, raw)
        values.update(overrides)
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


def _load_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read config file {path}: {exc}") from None


#: The TOML value types a setting of each declared type accepts.
_TOML_TYPES: dict[str, type | tuple[type, ...]] = {"int": int, "float": (int, float), "str": str, "bool": bool}


def read_config_file(path: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(settings, channel rule tables) from a TOML file; ``ValueError`` names what is wrong."""
    document = _load_toml(path)
    document.pop("collections", None)  # read by read_collection_mappings
    for table in DIALECT_TABLES:
        document.pop(table, None)  # read by read_dialect_tables
    rules = document.pop("channels", [])
    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        raise ValueError(f"{path}: channels must be an array of tables ([[channels]])")
    known = {f.name: f for f in fields(Settings)}
    settings: dict[str, Any] = {}
    for name, value in document.items():
        if name not in known:
            raise ValueError(f"{path}: unknown setting {name!r}")
        kind = str(known[name].type)
        expected = _TOML_TYPES[kind]
        if (isinstance(value, bool) and kind != "bool") or not isinstance(value, expected):
            raise ValueError(f"{path}: {name} must be a {known[name].type}")
        settings[name] = float(cast(float, value)) if kind == "float" else value
    return settings, rules


def read_collection_mappings(path: str) -> list[dict[str, Any]]:
    """The ``[[collections]]`` tables of a TOML file: application collections whose changes become events."""
    tables = _load_toml(path).get("collections", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ValueError(f"{path}: collections must be an array of tables ([[collections]])")
    return tables


#: Top-level tables of the config file that configure the dialects (service/dialects/).
DIALECT_TABLES = ("socketio", "chat", "orders")


def read_dialect_tables(path: str) -> dict[str, dict[str, Any]]:
    """The ``[socketio]``, ``[chat]`` and ``[orders]`` tables of a TOML file (absent ones left out)."""
    document = _load_toml(path)
    tables = {name: document[name] for name in DIALECT_TABLES if name in document}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ValueError(f"{path}: {name} must be a table ([{name}])")
    return tables


def env_name(name: str) -> str:
    return "EDDY_" + name.upper()


def _coerce(name: str, type_name: Any, raw: str) -> Any:
    kind = _PARSERS[str(type_name)]
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


#: How each declared type is parsed from an environment variable or a flag.
_PARSERS: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str, "bool": _parse_bool}


def described_settings() -> Iterator[tuple[str, str, str | None, Any, str]]:
    """(name, env var, flag or None, default, help) for every setting, in declaration order."""
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-") if f.metadata["flag"] else None
        yield f.name, env_name(f.name), flag, f.default, f.metadata["help"]


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """Add a ``--flag`` for each setting declared with ``flag=True`` (default None = not given)."""
    types = {f.name: _PARSERS[str(f.type)] for f in fields(Settings)}
    for name, env, flag, default, help_text in described_settings():
        if flag:
            parser.add_argument(
                flag, dest=name, type=types[name], default=None, help=f"{help_text} [{env}, default {default!r}]"
            )


def reference_markdown() -> str:
    """docs/CONFIGURATION.md, generated from the settings above (``make docs`` rewrites it)."""
    lines = [
        "# Eddy configuration reference",
        "",
        "Generated from `service/config.py` by `make docs`; a test fails when they differ.",
        "",
        "Every setting is read, in increasing precedence, from its default, the `--config` TOML file (same name,",
        "top level), its environment variable, and its `eddy serve` flag where it has one. Channel rules live in the",
        "same TOML file as `[[channels]]` tables: see `docs/eddy.example.toml`; the dialects' `[socketio]`, `[chat]`",
        "and `[orders]` tables are described in `docs/DIALECTS.md`.",
        "",
        "| setting | environment | flag | default | effect |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, env, flag, default, help_text in described_settings():
        shown = f"`{default!r}`" if default != "" else "(empty)"
        lines.append(f"| `{name}` | `{env}` | {f'`{flag}`' if flag else ''} | {shown} | {help_text} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
