"""Tornado handlers: the WebSocket protocol and the HTTP API. They talk to :class:`service.app.Eddy` only."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import tornado.web
from tornado.http1connection import HTTP1Connection
from tornado.httputil import HTTPConnection, HTTPMessageDelegate

if TYPE_CHECKING:
    from service.app import Eddy


class BoundedApplication(tornado.web.Application):
    """The Tornado application with a body bound on every route, set before any byte of a request is read.

    Tornado's defaults buffer bodies up to 100 MiB with no time limit on any
    handler that does not stream its body. Here every request (HTTP API,
    static files, the WebSocket and SSE handshakes) may carry at most
    ``max_body_bytes`` and must deliver it within ``body_timeout`` seconds:
    a larger body is answered ``400`` and the connection closed before it is
    read, a slow one is closed. ``POST /api/events`` raises its own limit by
    one byte to answer an oversize body with a ``413`` problem itself.
    """

    def __init__(self, *args: Any, max_body_bytes: int, body_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout

    def start_request(self, server_conn: object, request_conn: HTTPConnection) -> HTTPMessageDelegate:
        if isinstance(request_conn, HTTP1Connection):
            request_conn.set_max_body_size(self.max_body_bytes)
            if self.body_timeout > 0:
                request_conn.set_body_timeout(self.body_timeout)
        return super().start_request(server_conn, request_conn)


def routes(eddy: Eddy) -> list[Any]:
    from .dialects import dialect_routes
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
    from .socketio import socketio_routes
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
        *socketio_routes(eddy),
        *dialect_routes(eddy),
    ]
