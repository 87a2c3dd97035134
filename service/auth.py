"""Who is connecting: JWT verification, token minting and the development secret.

Tokens are verified once, at the handshake (or per request over HTTP); the
resulting :class:`Identity` travels with the connection. Secrets and tokens are
never logged.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import jwt

log = logging.getLogger("eddy.auth")

ALGORITHMS = ["HS256"]


class AuthError(Exception):
    """A token was refused. ``code`` is one of the documented auth codes."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Identity:
    user_id: str
    tenant: str
    roles: tuple[str, ...] = ()
    #: Seconds since the epoch when the token expires, None when it never does.
    expires_at: float | None = None


class TokenVerifier:
    """Turns a JWT into an :class:`Identity` or raises :class:`AuthError`."""

    def __init__(self, secret: str, *, default_tenant: str = "default", leeway: float = 5.0) -> None:
        if not secret:
            raise ValueError("a JWT secret is required")
        self._secret = secret
        self.default_tenant = default_tenant
        self.leeway = leeway

    def verify(self, token: str | None) -> Identity:
        if not token:
            raise AuthError("TOKEN_MISSING", "no token: send Authorization: Bearer <token> or ?access_token=")
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=ALGORITHMS,
                leeway=self.leeway,
                options={"require": ["sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("TOKEN_EXPIRED", "the token has expired") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError("TOKEN_INVALID", f"invalid token: {exc}") from None
        return identity_from_claims(claims, self.default_tenant)

    def mint(self, sub: str, *, tenant: str | None = None, roles: list[str] | None = None, ttl: float | None = 3600) -> str:
        """Sign a token with this verifier's secret (``eddy token``, tests)."""
        now = int(time.time())
        claims: dict[str, object] = {"sub": sub, "iat": now}
        if tenant is not None:
            claims["tenant"] = tenant
        if roles:
            claims["roles"] = list(roles)
        if ttl is not None:
            claims["exp"] = now + int(ttl)
        return jwt.encode(claims, self._secret, algorithm="HS256")


def identity_from_claims(claims: dict, default_tenant: str) -> Identity:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise AuthError("TOKEN_INVALID", "the sub claim must be a non-empty string")
    tenant = claims.get("tenant", default_tenant)
    if not isinstance(tenant, str) or not tenant:
        raise AuthError("TOKEN_INVALID", "the tenant claim must be a non-empty string")
    roles = claims.get("roles", [])
    if isinstance(roles, str):
        roles = [roles]
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise AuthError("TOKEN_INVALID", "the roles claim must be a list of strings")
    exp = claims.get("exp")
    return Identity(user_id=sub, tenant=tenant, roles=tuple(roles), expires_at=float(exp) if exp is not None else None)


def token_from_request(headers, query_argument) -> str | None:
    """The token of a handshake or request: Bearer header, then ``access_token``, then ``token``."""
    authorization = headers.get("Authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return query_argument("access_token") or query_argument("token") or None


def default_secret_file(storage_url: str) -> Path:
    """``eddy.secret`` beside the SQLite database, or in the working directory."""
    parts = urlsplit(storage_url)
    if parts.scheme == "sqlite" and parts.path not in ("", "/"):
        # sqlite:///relative.db has path "/relative.db", sqlite:////abs.db has "//abs.db":
        # dropping the first slash gives the file path in both cases.
        return Path(parts.path[1:]).parent / "eddy.secret"
    return Path("eddy.secret")


def resolve_secret(jwt_secret: str, secret_file: str, storage_url: str, *, create: bool) -> tuple[str, Path | None]:
    """The secret to sign and verify with, and the dev secret file when one is used.

    A configured ``jwt_secret`` always wins. Otherwise the development secret
    file is read, or created (mode 0600) when ``create`` is true, so that
    ``eddy serve`` and ``eddy token`` agree with zero configuration.
    """
    if jwt_secret:
        return jwt_secret, None
    path = Path(secret_file) if secret_file else default_secret_file(storage_url)
    if path.exists():
        return path.read_text().strip(), path
    if not create:
        raise FileNotFoundError(f"no EDDY_JWT_SECRET and no development secret at {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    # Write a private temporary file, then link it into place: the link is
    # atomic, so a process racing us reads either nothing or the whole secret.
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")
    try:
        os.link(temporary, path)
    except FileExistsError:  # another process won the race: use its secret
        value = path.read_text().strip()
    finally:
        temporary.unlink()
    return value, path
