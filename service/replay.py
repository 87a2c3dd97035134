"""Replay: the stored events of one or more channels after a position, merged in position order, page by page.

A resuming connection first reads what it missed, then goes live. Positions
are global and a connection receives its channels' events in commit order, so
the replay of several channels is merged into one ascending sequence: the last
id a client received is then a resume point for all of them, even if it drops
in the middle of the replay. Only one storage page per channel is in memory at
a time; the caller writes each batch before asking for the next (see
:meth:`service.session.Session.resume`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

from .frames import HISTORY_LOST, FrameError
from .hub import ChannelKey
from .refusals import refusals

if TYPE_CHECKING:
    from storage import Event, History

#: Reads a page of a channel's history after a position: (key, after, limit) -> History (the service's history).
PageReader = Callable[[ChannelKey, int, int], Awaitable["History"]]

#: Events read per channel per storage call.
REPLAY_PAGE = 500


class Replay:
    """Stored events of ``keys`` after ``since`` (one position for all, or one per channel).

    :meth:`start` reads each channel's first page and says which channels
    cannot be replayed (trimmed history, storage down); :meth:`batches` then
    yields the events of the others in ascending position order.
    """

    def __init__(self, read: PageReader, keys: list[ChannelKey], since: int | Mapping[ChannelKey, int], *,
                 page_size: int = REPLAY_PAGE) -> None:
        self.read = read
        self.page_size = page_size
        #: The position each channel has been replayed up to (its cursor); read it after the replay.
        #: ``since`` may give each channel its own start (a recovered Socket.IO session's rooms).
        self.sent: dict[ChannelKey, int] = {key: since[key] if isinstance(since, Mapping) else since for key in keys}
        self._pages: dict[ChannelKey, deque[Event]] = {}
        self._exhausted: set[ChannelKey] = set()

    async def start(self) -> dict[ChannelKey, FrameError]:
        """Read the first page of every channel; the channels that cannot be replayed, with why.

        Those channels are dropped from the replay (and from :attr:`sent`).
        """
        refused: dict[ChannelKey, FrameError] = {}
        for key in list(self.sent):
            try:
                await self._read_page(key, first=True)
            except FrameError as error:
                refused[key] = error
                del self.sent[key]
        return refused

    async def batches(self) -> AsyncIterator[list[Event]]:
        """Ascending batches of events; raises :class:`FrameError` (``STORAGE_UNAVAILABLE``) if a page fails.

        A batch ends at the lowest last position among the pages of channels
        that still have more to read, so nothing later in another channel can
        come before it.
        """
        while True:
            for key in self.sent:
                if not self._pages.get(key) and key not in self._exhausted:
                    await self._read_page(key, first=False)
            waiting = [key for key, page in self._pages.items() if page]
            if not waiting:
                return
            bound = min((self._pages[key][-1].position for key in waiting if key not in self._exhausted),
                        default=None)
            batch: list[Event] = []
            for key in waiting:
                page = self._pages[key]
                while page and (bound is None or page[0].position <= bound):
                    event = page.popleft()
                    batch.append(event)
                    self.sent[key] = event.position
            batch.sort(key=lambda event: event.position)
            yield batch

    async def _read_page(self, key: ChannelKey, *, first: bool) -> None:
        with refusals("storage is unavailable; retry the join"):
            page = await self.read(key, self.sent[key], self.page_size)
        if first and page.lost:
            raise FrameError(HISTORY_LOST, "events after since have been trimmed; join without since and reload")
        self._pages[key] = deque(page.events)
        if len(page.events) < self.page_size:
            self._exhausted.add(key)
