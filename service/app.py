"""The Eddy service: wires storage, hub, watcher and auth, and builds the Tornado app.

Handlers talk to :class:`Eddy` only; it is the one place that knows both the
storage contract and the rules about who may do what.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import tornado.web

from storage import Event, EventDraft, History, Storage, StorageError, open_storage

from . import frames
from .auth import Identity, TokenVerifier, resolve_secret
from .config import Settings
from .hub import ChannelKey, Hub
from .watcher import Watcher

log = logging.getLogger("eddy")


class ChannelRefused(Exception):
    """A channel the identity may not use. ``code`` is a documented error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Eddy:
    """One Eddy process: its storage, hub, watcher and keepalive timer."""

    def __init__(self, settings: Settings, storage: Storage | None = None) -> None:
        self.settings = settings
        self.storage = storage or open_storage(
            settings.storage, history_size=settings.history_size, history_ttl=settings.history_ttl
        )
        secret, self.dev_secret_file = resolve_secret(
            settings.jwt_secret, settings.secret_file, settings.storage, create=True
        )
        self.verifier = TokenVerifier(secret, default_tenant=settings.default_tenant)
        self.hub = Hub()
        self.watcher = Watcher(self.storage, self.hub)
        self.started_at = time.time()
        self._keepalive: asyncio.Task[None] | None = None

    # Lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Open storage and start following its feed from the current end."""
        if self.dev_secret_file is not None:
            log.warning(
                "DEVELOPMENT SECRET IN USE: no EDDY_JWT_SECRET set, tokens are signed with the secret in %s. "
                "Set EDDY_JWT_SECRET in production.",
                self.dev_secret_file,
            )
        await self.storage.open()
        self.watcher.start(after=await self.storage.last_position())
        if self.settings.keepalive_interval > 0:
            self._keepalive = asyncio.get_running_loop().create_task(self._send_keepalives(), name="eddy-keepalive")

    async def stop(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        await self.watcher.stop()
        await self.storage.close()

    async def _send_keepalives(self) -> None:
        while True:
            await asyncio.sleep(self.settings.keepalive_interval)
            frame = {"type": "keepalive", "timestamp": frames.iso_timestamp(time.time())}
            self.hub.broadcast(frames.PreparedMessage(frames.encode(frame)))

    # What handlers may ask --------------------------------------------------

    def authenticate(self, token: str | None) -> Identity:
        """The identity behind ``token``; raises :class:`service.auth.AuthError`."""
        return self.verifier.verify(token)

    def check_join(self, identity: Identity, channel: object) -> ChannelKey:
        """The key of ``channel`` in the identity's tenant if it may subscribe to it."""
        if not frames.is_valid_channel(channel):
            raise ChannelRefused(frames.INVALID_CHANNEL, frames.CHANNEL_RULE_TEXT)
        assert isinstance(channel, str)
        if channel.startswith("user:") and channel != f"user:{identity.user_id}":
            raise ChannelRefused(frames.FORBIDDEN, "a user: room belongs to that user only")
        return (identity.tenant, channel)

    def check_publish(self, identity: Identity, channel: object) -> ChannelKey:
        """The key of ``channel`` if the identity may publish to it over HTTP."""
        if not frames.is_valid_channel(channel):
            raise ChannelRefused(frames.INVALID_CHANNEL, frames.CHANNEL_RULE_TEXT)
        assert isinstance(channel, str)
        return (identity.tenant, channel)

    async def publish(
        self, identity: Identity, channel: str, event: str, data: Any, *, idempotency_key: str | None = None
    ) -> Event:
        tenant, channel = self.check_publish(identity, channel)
        draft = EventDraft(tenant=tenant, channel=channel, event=event, data=data, idempotency_key=idempotency_key)
        return await self.storage.append(draft)

    async def history(self, identity: Identity, channel: str, *, after: int, limit: int) -> History:
        tenant, channel = self.check_join(identity, channel)
        return await self.storage.history(tenant, channel, after=after, limit=limit)

    async def readiness(self) -> dict[str, str]:
        """Each check's state; all ``"ok"`` means ready to serve."""
        checks = {"storage": "ok", "watcher": "ok"}
        try:
            await asyncio.wait_for(self.storage.ping(), timeout=2.0)
        except (StorageError, asyncio.TimeoutError, OSError) as exc:
            checks["storage"] = f"unavailable: {type(exc).__name__}"
        if not self.watcher.running:
            checks["watcher"] = "stopped"
        elif not self.watcher.connected:
            checks["watcher"] = f"retrying: {self.watcher.last_error}"
        return checks

    # Tornado ---------------------------------------------------------------

    def make_app(self, **extra_settings: Any) -> tornado.web.Application:
        from handlers import routes
        from handlers.http import NotFoundHandler

        return tornado.web.Application(
            routes(self),
            default_handler_class=NotFoundHandler,
            default_handler_args={"eddy": self},
            websocket_ping_interval=self.settings.ping_interval or None,
            websocket_ping_timeout=self.settings.ping_timeout or None,
            websocket_max_message_size=self.settings.max_frame_bytes,
            **extra_settings,
        )
