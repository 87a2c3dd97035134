"""Tornado handlers: the WebSocket protocol and the HTTP API. They talk to :class:`service.app.Eddy` only."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import tornado.web

if TYPE_CHECKING:
    from service.app import Eddy


def routes(eddy: Eddy) -> list[tuple[str, type, dict[str, Any]]]:
    from .http import (
        DevTokenHandler,
        EventsHandler,
        HealthHandler,
        HistoryHandler,
        MetricsHandler,
        PresenceHandler,
        ReadsHandler,
        ReadyHandler,
        ScheduledHandler,
        StatsHandler,
    )
    from .sse import SSEHandler
    from .websocket import EventSocket

    args = {"eddy": eddy}
    import service

    static = os.path.join(os.path.dirname(os.path.abspath(service.__file__)), "static")
    return [
        (r"/()", tornado.web.StaticFileHandler, {"path": static, "default_filename": "index.html"}),
        (r"/static/(.*)", tornado.web.StaticFileHandler, {"path": static}),
        (r"/api/dev-token", DevTokenHandler, args),
        (r"/ws", EventSocket, args),
        (r"/ws/([^/]+)/stream", EventSocket, args),
        (r"/sse", SSEHandler, args),
        (r"/api/events", EventsHandler, args),
        (r"/api/channels/([^/]+)/events", HistoryHandler, args),
        (r"/api/channels/([^/]+)/reads", ReadsHandler, args),
        (r"/api/channels/([^/]+)/presence", PresenceHandler, args),
        (r"/api/scheduled/?([^/]*)", ScheduledHandler, args),
        (r"/api/stats", StatsHandler, args),
        (r"/metrics", MetricsHandler, args),
        (r"/healthz", HealthHandler, args),
        (r"/readyz", ReadyHandler, args),
    ]
