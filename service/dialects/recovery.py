"""Socket.IO connection state recovery, kept in the store so that any process can recover any session.

socket.io-client keeps two things across a reconnect: the private session id
(``pid``) the server gave it in CONNECT, and the offset of the last event it
received (the last argument of every broadcast event; Eddy's offset is the
event id). It sends both back in its next CONNECT. If the record of that
``pid`` is still in the store (within ``socketio_recovery_window``) and
belongs to the same user and tenant, the server puts the socket back in its
rooms and sends every event of those rooms after the offset, once.

A record is a row of the store's presence table (it already is "small
mutable state beside the log, with an expiry", shared by every process):
channel ``$socketio:<pid>`` of the tenant, which no client can name (``$`` is
not allowed in channel names), ``status`` holding the record as JSON. The
process holding a live session rewrites its record on every join and leave,
and refreshes all of them every third of the window, so a killed process's
sessions stay recoverable for at least two thirds of it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import orjson

from service.auth import Identity
from storage import PresenceEntry, Storage, StorageError

if TYPE_CHECKING:
    from service.app import Eddy

log = logging.getLogger("eddy.socketio")

CHANNEL_PREFIX = "$socketio:"


@dataclass
class SessionRecord:
    """What a recovered socket gets back: its id, namespace and rooms (with the position each was joined at)."""

    pid: str
    sid: str
    namespace: str
    #: channel -> the position after which the socket received that room's events
    rooms: dict[str, int] = field(default_factory=dict)
    #: Which socket wrote it last: a stale socket of a recovered session (its transport silently dead, noticed
    #: only at its ping timeout) must not overwrite what the socket that recovered it wrote since.
    holder: str = field(default_factory=lambda: secrets.token_hex(8))
    #: The store's epoch when the positions above were taken: they are resumed only in that epoch.
    epoch: str = ""

    def to_json(self) -> str:
        return orjson.dumps({"sid": self.sid, "ns": self.namespace, "rooms": self.rooms, "holder": self.holder,
                             "epoch": self.epoch}).decode()

    @classmethod
    def from_json(cls, pid: str, text: str) -> SessionRecord | None:
        try:
            value = orjson.loads(text)
            rooms = {str(k): int(v) for k, v in value["rooms"].items()}
            return cls(pid, str(value["sid"]), str(value["ns"]), rooms, str(value["holder"]), str(value["epoch"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            return None


class RecoveryStore:
    """Reads and writes session records; refreshes the live ones while they last."""

    @classmethod
    def of(cls, eddy: Eddy) -> RecoveryStore:
        """The store of ``eddy``'s storage, with its ``socketio_recovery_window``."""
        return cls(eddy.storage, eddy.settings.socketio_recovery_window)

    def __init__(self, storage: Storage, window: float) -> None:
        self.storage = storage
        self.window = window
        #: Live sessions of this process: pid -> (identity, record).
        self._live: dict[str, tuple[Identity, SessionRecord]] = {}
        self._refresher: asyncio.TimerHandle | None = None
        self._writes: set[asyncio.Task[None]] = set()

    @property
    def enabled(self) -> bool:
        return self.window > 0

    def _entry(self, identity: Identity, record: SessionRecord) -> PresenceEntry:
        return PresenceEntry(identity.tenant, CHANNEL_PREFIX + record.pid, identity.user_id, record.pid,
                             record.to_json(), time.time() + self.window)

    async def save(self, identity: Identity, record: SessionRecord) -> None:
        """Write the record now; keep refreshing it while the session is live."""
        if not self.enabled:
            return
        self._live[record.pid] = (identity, record)
        self._start_refresher()
        await self._write([self._entry(identity, record)])

    async def release(self, identity: Identity, record: SessionRecord) -> None:
        """The session's transport is gone: keep the record for the window, stop refreshing it.

        Unless another socket has recovered the session meanwhile (here or on another process): then its
        record stands.
        """
        if not self.enabled:
            return
        self._stop_refreshing(record)
        current = await self.load(identity, record.pid, record.namespace)
        if current is None or current.holder == record.holder:
            await self._write([self._entry(identity, record)])

    async def forget(self, identity: Identity, record: SessionRecord) -> None:
        """The client left on purpose (a DISCONNECT packet): nothing to recover."""
        self._stop_refreshing(record)
        pid = record.pid
        if self.enabled:
            try:
                await self.storage.remove_presence(pid, [(identity.tenant, CHANNEL_PREFIX + pid)])
            except StorageError as exc:
                log.warning("recovery record of a session left to expire (%s)", exc)

    def _stop_refreshing(self, record: SessionRecord) -> None:
        live = self._live.get(record.pid)
        if live is not None and live[1] is record:
            del self._live[record.pid]

    async def load(self, identity: Identity, pid: object, namespace: str) -> SessionRecord | None:
        """The unexpired record ``pid`` of this user and namespace, or None."""
        if not self.enabled or not isinstance(pid, str) or not 0 < len(pid) <= 100:
            return None
        try:
            entries = await self.storage.presence(identity.tenant, CHANNEL_PREFIX + pid)
        except StorageError as exc:
            log.warning("recovery record unreadable (%s): a new session starts", exc)
            return None
        for entry in entries:
            if entry.user_id == identity.user_id and entry.connection_id == pid:
                record = SessionRecord.from_json(pid, entry.status)
                if record is not None and record.namespace == namespace:
                    return record
        return None

    async def _write(self, entries: list[PresenceEntry]) -> None:
        try:
            await self.storage.save_presence(entries)
        except StorageError as exc:
            log.warning("recovery record not written (%s)", exc)

    def _start_refresher(self) -> None:
        if self._refresher is None:
            self._refresher = asyncio.get_running_loop().call_later(self.window / 3, self._refresh)

    def _refresh(self) -> None:
        """Rewrite every live record (one batch), and again a third of the window later while any is live."""
        self._refresher = None
        if not self._live:
            return
        entries = [self._entry(identity, record) for identity, record in self._live.values()]
        task = asyncio.get_running_loop().create_task(self._write(entries))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        self._start_refresher()
