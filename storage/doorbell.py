"""A doorbell beside an SQLite file: a process that commits wakes every process that follows the file.

SQLite tells a reader that another connection committed only when the reader asks
(``PRAGMA data_version``), so following a file shared by several processes used to mean
asking every few milliseconds, forever, idle or not. The doorbell replaces that: the writer
*rings* after each transaction that changed something, by writing one byte in place to
``<database>-wake``, and every process *listens* to that file with Linux inotify (through
``inotify_simple``), so it wakes when, and only when, a commit happened.

The ring comes after the commit, so a woken reader always finds the rows that rang it (an
inotify watch on SQLite's own ``-wal`` file would fire on the write, before the commit is
visible, and miss it). Anything that writes the database file directly can ring too:
``touch eddy.db-wake``.

A doorbell can fail to ring (a process killed between commit and ring, a file system
without inotify): the storage keeps a slow safety poll for that, and polls fast where
``listen`` reports that it cannot listen.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

try:
    from inotify_simple import INotify, flags
except ImportError:  # not Linux, or the package is missing: the storage polls
    INotify = None


class Doorbell:
    """Ring after a commit (any thread); listen on an event loop (one callback per burst of rings)."""

    def __init__(self, database: Path) -> None:
        self.path = database.with_name(database.name + "-wake")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._inotify: INotify | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def ring(self) -> None:
        """Tell every listener, in every process, that a commit happened."""
        os.pwrite(self._fd, b"\n", 0)

    def listen(self, callback: Callable[[], None]) -> bool:
        """Call ``callback`` on the running loop after rings; False when this system cannot listen."""
        if INotify is None:
            return False
        try:
            inotify = INotify(nonblocking=True)
        except OSError:  # no inotify, or the per-user instance limit reached
            return False
        try:
            inotify.add_watch(self.path, flags.MODIFY | flags.ATTRIB)
        except OSError:  # the per-user watch limit reached
            inotify.close()
            return False

        def drain() -> None:
            inotify.read(timeout=0)  # many rings since the last drain wake the listener once
            callback()

        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(inotify.fileno(), drain)
        self._inotify = inotify
        return True

    def close(self) -> None:
        if self._inotify is not None and self._loop is not None:
            self._loop.remove_reader(self._inotify.fileno())
            self._inotify.close()
        self._inotify = self._loop = None
        os.close(self._fd)
