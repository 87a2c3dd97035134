"""The join authorizer: asks the application whether a user may join a channel.

For checks only the application can make ("does this ticket exist in this
tenant?"). Eddy POSTs ``{"user_id","tenant","roles","channel"}`` to the rule's
URL; 200 allows, any other status refuses. Answers are cached briefly; a
timeout or a connection error refuses with ``AUTHORIZER_UNAVAILABLE`` (fail
closed) and is not cached.
"""

from __future__ import annotations

import logging
import time

import orjson
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from . import frames
from .auth import Identity

log = logging.getLogger("eddy.authorizer")


class ChannelRefused(Exception):
    """A channel the identity may not use. ``code`` is a documented error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class JoinAuthorizer:
    def __init__(self, timeout: float, cache_ttl: float) -> None:
        self.timeout = timeout
        self.cache_ttl = cache_ttl
        self._cache: dict[tuple[str, str, str, str], tuple[bool, float]] = {}
        self.requests = 0

    async def check(self, url: str, identity: Identity, channel: str) -> None:
        """Return if allowed; raise :class:`ChannelRefused` otherwise."""
        key = (url, identity.tenant, identity.user_id, channel)
        cached = self._cache.get(key)
        now = time.monotonic()
        if cached is not None and cached[1] > now:
            allowed = cached[0]
        else:
            allowed = await self._ask(url, identity, channel)
            if len(self._cache) > 100_000:
                self._cache.clear()  # bound memory; a cold cache only costs requests
            self._cache[key] = (allowed, now + self.cache_ttl)
        if not allowed:
            raise ChannelRefused(frames.FORBIDDEN, f"the application refused joining {channel}")

    async def _ask(self, url: str, identity: Identity, channel: str) -> bool:
        self.requests += 1
        body = orjson.dumps(
            {"user_id": identity.user_id, "tenant": identity.tenant, "roles": list(identity.roles), "channel": channel}
        )
        request = HTTPRequest(url, method="POST", body=body, headers={"Content-Type": "application/json"},
                              request_timeout=self.timeout, connect_timeout=self.timeout)
        try:
            response = await AsyncHTTPClient().fetch(request, raise_error=False)
        except (OSError, HTTPClientError) as exc:
            log.warning("join authorizer %s unavailable: %s", url, exc)
            raise ChannelRefused(frames.AUTHORIZER_UNAVAILABLE, "the join authorizer did not answer; retry later") from None
        if response.code == 599:  # Tornado's code for timeouts and connection errors
            log.warning("join authorizer %s unavailable: %s", url, response.error)
            raise ChannelRefused(frames.AUTHORIZER_UNAVAILABLE, "the join authorizer did not answer; retry later")
        return response.code == 200
