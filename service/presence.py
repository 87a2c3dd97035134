"""Presence: who is online in a channel, across every Eddy process sharing the store.

Each process writes one entry per (connection, channel) into storage with an
expiry, and refreshes its entries every ``refresh`` seconds. Listing reads the
unexpired entries of all processes, so a user online on process A is listed by
process B, and a process that dies without cleaning up disappears from the list
once its entries expire. Changes are broadcast as ephemeral ``$presence``
events through the store's feed, so every process's subscribers see them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from storage import EventDraft, PresenceEntry, Storage, StorageError

from .frames import PRESENCE_EVENT, iso_timestamp

log = logging.getLogger("eddy.presence")

ChannelKey = tuple[str, str]
STATUSES = ("online", "away", "busy", "offline")


class PresenceTracker:
    def __init__(self, storage: Storage, *, ttl: float = 30.0, refresh: float = 10.0) -> None:
        self.storage = storage
        self.ttl = ttl
        self.refresh = refresh
        #: This process's entries: (connection id, channel key) -> entry.
        self._local: dict[tuple[str, ChannelKey], PresenceEntry] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._refresh_forever(), name="eddy-presence")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def join(self, key: ChannelKey, user_id: str, connection_id: str, status: str) -> None:
        """Record the connection in the channel; announce the user if it was not there yet."""
        was_present = await self._user_present(key, user_id)
        entry = self._entry(key, user_id, connection_id, status)
        self._local[(connection_id, key)] = entry
        await self.storage.save_presence([entry])
        if not was_present:
            await self._announce(key, user_id, status)

    async def leave(self, key: ChannelKey, user_id: str, connection_id: str) -> None:
        """Forget the connection; announce ``offline`` if it was the user's last one there."""
        if self._local.pop((connection_id, key), None) is None:
            return
        await self.storage.remove_presence(connection_id, [key])
        if not await self._user_present(key, user_id):
            await self._announce(key, user_id, "offline")

    async def set_status(self, keys: list[ChannelKey], user_id: str, connection_id: str, status: str) -> None:
        entries = [self._entry(key, user_id, connection_id, status) for key in keys]
        for entry in entries:
            self._local[(connection_id, (entry.tenant, entry.channel))] = entry
        await self.storage.save_presence(entries)
        for key in keys:
            await self._announce(key, user_id, status)

    async def users(self, key: ChannelKey) -> list[dict[str, Any]]:
        """``[{"user_id", "status", "connections"}]`` for the channel, one per user."""
        users: dict[str, dict[str, Any]] = {}
        for entry in await self.storage.presence(*key):
            user = users.setdefault(entry.user_id, {"user_id": entry.user_id, "status": entry.status, "connections": 0})
            user["connections"] += 1
            if entry.status == "online":  # any online device makes the user online
                user["status"] = "online"
        return sorted(users.values(), key=lambda u: u["user_id"])

    async def _user_present(self, key: ChannelKey, user_id: str) -> bool:
        return any(e.user_id == user_id for e in await self.storage.presence(*key))

    def _entry(self, key: ChannelKey, user_id: str, connection_id: str, status: str) -> PresenceEntry:
        return PresenceEntry(key[0], key[1], user_id, connection_id, status, time.time() + self.ttl)

    async def _announce(self, key: ChannelKey, user_id: str, status: str) -> None:
        data = {"user_id": user_id, "status": status, "timestamp": iso_timestamp(time.time())}
        await self.storage.append(EventDraft(key[0], key[1], PRESENCE_EVENT, data, ephemeral=True))

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh)
            if not self._local:
                continue
            expires_at = time.time() + self.ttl
            refreshed = {k: PresenceEntry(e.tenant, e.channel, e.user_id, e.connection_id, e.status, expires_at)
                         for k, e in self._local.items()}
            self._local.update(refreshed)
            try:
                await self.storage.save_presence(list(refreshed.values()))
            except StorageError as exc:
                log.warning("presence refresh failed (%s); entries may expire until storage returns", exc)
