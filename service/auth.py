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

import jwt

from storage import sqlite_file

log = logging.getLogger("eddy.auth")

SYMMETRIC = ("HS256", "HS384", "HS512")
#: The latest ``exp`` accepted: 9999-12-31T23:59:59Z (later ones cannot be written as a date).
MAX_EXPIRY = 253402300799
ASYMMETRIC = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512")


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


@dataclass(frozen=True)
class ClaimNames:
    user: str = "sub"
    tenant: str = "tenant"
    roles: str = "roles"


class TokenVerifier:
    """Turns a JWT into an :class:`Identity` or raises :class:`AuthError`.

    The token's ``alg`` header must be one of the configured algorithms, and
    the key is chosen by that algorithm's family: the shared secret for HS*,
    the public key or the JWKS entry named by ``kid`` for RS*/ES*/PS*. So a
    token HMAC-signed with the public key (algorithm confusion) never
    verifies, and ``alg: none`` is never accepted.
    """

    def __init__(
        self,
        secret: str | None = None,
        *,
        algorithms: tuple[str, ...] = ("HS256",),
        public_key: str | None = None,
        jwks: jwt.PyJWKSet | None = None,
        issuer: str | None = None,
        audience: str | None = None,
        claims: ClaimNames = ClaimNames(),
        default_tenant: str = "default",
        leeway: float = 5.0,
    ) -> None:
        unknown = [a for a in algorithms if a not in SYMMETRIC + ASYMMETRIC]
        if unknown or not algorithms:
            raise ValueError(f"unsupported JWT algorithm(s): {', '.join(unknown) or 'none given'}")
        if any(a in SYMMETRIC for a in algorithms) and not secret:
            raise ValueError("HS* algorithms need a secret")
        if any(a in ASYMMETRIC for a in algorithms) and public_key is None and jwks is None:
            raise ValueError("RS*/ES* algorithms need a public key file or a JWKS file")
        self._secret = secret
        self.algorithms = tuple(algorithms)
        self._public_key = public_key
        self._jwks = jwks
        self.issuer = issuer or None
        self.audience = audience or None
        self.claims = claims
        self.default_tenant = default_tenant
        self.leeway = leeway

    @classmethod
    def from_settings(cls, settings, secret: str | None) -> TokenVerifier:
        public_key = Path(settings.jwt_public_key_file).read_text() if settings.jwt_public_key_file else None
        jwks = jwt.PyJWKSet.from_json(Path(settings.jwks_file).read_text()) if settings.jwks_file else None
        return cls(
            secret,
            algorithms=tuple(a.strip().upper() for a in settings.jwt_algorithms.split(",") if a.strip()),
            public_key=public_key,
            jwks=jwks,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            claims=ClaimNames(settings.user_claim, settings.tenant_claim, settings.roles_claim),
            default_tenant=settings.default_tenant,
        )

    @property
    def uses_secret(self) -> bool:
        return any(a in SYMMETRIC for a in self.algorithms)

    def verify(self, token: str | None) -> Identity:
        if not token:
            raise AuthError("TOKEN_MISSING", "no token: send Authorization: Bearer <token> or ?access_token=")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise AuthError("TOKEN_INVALID", "invalid token: not a JWT") from None
        algorithm = header.get("alg")
        if algorithm not in self.algorithms:
            raise AuthError("TOKEN_INVALID", f"invalid token: algorithm {str(algorithm)[:10]!r} is not accepted")
        key = self._key_for(algorithm, header.get("kid"))
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                leeway=self.leeway,
                issuer=self.issuer,
                audience=self.audience,
                options={"verify_aud": self.audience is not None, "require": ["iss"] if self.issuer else []},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("TOKEN_EXPIRED", "the token has expired") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError("TOKEN_INVALID", f"invalid token: {exc}") from None
        return identity_from_claims(claims, self.default_tenant, self.claims)

    def _key_for(self, algorithm: str, kid: object):
        if algorithm in SYMMETRIC:
            return self._secret
        if self._jwks is not None:
            try:
                return self._jwks[str(kid)].key
            except KeyError:
                if self._public_key is None:
                    raise AuthError("TOKEN_INVALID", "invalid token: unknown key id") from None
        return self._public_key

    def mint(self, sub: str, *, tenant: str | None = None, roles: list[str] | None = None, ttl: float | None = 3600) -> str:
        """Sign a token this verifier accepts, with its secret and first HS* algorithm (``eddy token``, tests)."""
        algorithm = next((a for a in self.algorithms if a in SYMMETRIC), None)
        if not self._secret or algorithm is None:
            raise ValueError("minting needs an HS* algorithm and its secret")
        now = int(time.time())
        claims: dict[str, object] = {self.claims.user: sub, "iat": now}
        if tenant is not None:
            claims[self.claims.tenant] = tenant
        if roles:
            claims[self.claims.roles] = list(roles)
        if ttl is not None:
            claims["exp"] = now + int(ttl)
        if self.issuer:
            claims["iss"] = self.issuer
        if self.audience:
            claims["aud"] = self.audience
        return jwt.encode(claims, self._secret, algorithm=algorithm)


def identity_from_claims(claims: dict, default_tenant: str, names: ClaimNames = ClaimNames()) -> Identity:
    sub = claims.get(names.user)
    if isinstance(sub, int) and not isinstance(sub, bool):
        sub = str(sub)
    if not isinstance(sub, str) or not sub:
        raise AuthError("TOKEN_INVALID", f"the {names.user} claim must be a non-empty string")
    tenant = claims.get(names.tenant, default_tenant)
    if isinstance(tenant, int) and not isinstance(tenant, bool):
        tenant = str(tenant)
    if not isinstance(tenant, str) or not tenant:
        raise AuthError("TOKEN_INVALID", f"the {names.tenant} claim must be a non-empty string")
    roles = claims.get(names.roles, [])
    if isinstance(roles, str):
        roles = [roles]
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise AuthError("TOKEN_INVALID", f"the {names.roles} claim must be a list of strings")
    exp = claims.get("exp")
    if exp is not None and not (isinstance(exp, (int, float)) and 0 <= exp <= MAX_EXPIRY):
        # pyjwt accepts any number; a time no calendar holds would fail wherever it is shown or timed.
        raise AuthError("TOKEN_INVALID", "invalid token: exp is not a time before the year 10000")
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
    database = sqlite_file(storage_url)
    return database.parent / "eddy.secret" if database is not None else Path("eddy.secret")


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
