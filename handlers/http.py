"""The HTTP API: publish, history, health. Every error is an RFC 9457 problem body with a ``code``."""

from __future__ import annotations

import ipaddress
import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import urlsplit

import orjson
import tornado.web
from tornado.http1connection import HTTP1Connection

from service import frames, metrics
from service.app import ChannelRefused, Eddy
from service.auth import AuthError, Identity, token_from_request
from service.errors import HistoryLost, InvalidInput, LimitReached, NotFound, StorageUnavailable
from service.scheduler import MAX_DELAY
from service.stream import parse_event_id

log = logging.getLogger("eddy.http")

#: Seconds a client should wait before retrying when storage is unavailable.
RETRY_AFTER_SECONDS = 1
MAX_HISTORY_LIMIT = 1000
MAX_NAME_LENGTH = 200
#: Seconds a development token lasts.
DEV_TOKEN_TTL = 12 * 3600

_CODE_FOR_STATUS = {
    400: "INVALID_BODY",
    401: "TOKEN_INVALID",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "BODY_TOO_LARGE",
    503: "STORAGE_UNAVAILABLE",
}


class ApiError(tornado.web.HTTPError):
    """An error the client caused or can act on; becomes a problem body."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, reason=HTTPStatus(status).phrase)
        self.code = code
        self.detail = detail
        self.headers = headers or {}


class ApiHandler(tornado.web.RequestHandler):
    """Base of every HTTP handler: JSON in and out, problem bodies for errors."""

    def initialize(self, eddy: Eddy) -> None:
        self.eddy = eddy

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")

    def write_json(self, body: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(orjson.dumps(body))

    def authenticate(self) -> Identity:
        """The caller's identity, within its request rate (429 ``RATE_LIMITED`` above it)."""
        token = token_from_request(self.request.headers, self.get_query_argument_or_none)
        try:
            identity = self.eddy.authenticate(token)
        except AuthError as exc:
            raise ApiError(401, exc.code, exc.message, {"WWW-Authenticate": 'Bearer realm="eddy"'}) from None
        empty = self.eddy.rest_buckets.take((identity.tenant, identity.user_id))
        if empty is not None:
            metrics.RATE_LIMITED.labels("http").inc()
            retry = max(1, round(empty.seconds_until_token() + 0.5))
            raise ApiError(429, "RATE_LIMITED", "too many requests for this token", {"Retry-After": str(retry)})
        return identity

    def get_query_argument_or_none(self, name: str) -> str | None:
        return self.get_query_argument(name, None)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ApiError):
            code, detail = exc.code, exc.detail
            for name, value in exc.headers.items():
                self.set_header(name, value)
        elif status_code >= 500:
            request_id = uuid.uuid4().hex[:12]
            code, detail = "INTERNAL_ERROR", f"internal error (request {request_id})"
            log.error("request %s failed: %s %s", request_id, self.request.method, self.request.path)
        else:
            code = _CODE_FOR_STATUS.get(status_code, "INVALID_BODY")
            detail = self._reason
        self.set_header("Content-Type", "application/problem+json")
        self.finish(
            orjson.dumps(
                {"type": "about:blank", "title": self._reason, "status": status_code, "code": code, "detail": detail}
            )
        )


class NotFoundHandler(ApiHandler):
    def prepare(self) -> None:
        raise ApiError(404, "NOT_FOUND", f"no endpoint at {self.request.path}")


@tornado.web.stream_request_body
class EventsHandler(ApiHandler):
    """``POST /api/events``: store an event; the watcher then broadcasts it."""

    def prepare(self) -> None:
        if self.request.method != "POST":
            return  # Tornado answers 405 through write_error
        self.identity = self.authenticate()
        self._body = bytearray()
        limit = self.eddy.settings.max_body_bytes
        declared = self.request.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, "BODY_TOO_LARGE", f"the body is over {limit} bytes")
        # Let Tornado read a little past the limit so that we, not it, refuse it.
        cast(HTTP1Connection, self.request.connection).set_max_body_size(limit + 1)

    def data_received(self, chunk: bytes) -> None:
        self._body += chunk
        limit = self.eddy.settings.max_body_bytes
        if len(self._body) > limit:
            raise ApiError(413, "BODY_TOO_LARGE", f"the body is over {limit} bytes")

    async def post(self) -> None:
        body = parse_object(bytes(self._body))
        channel = body.get("channel")
        event = body.get("event")
        if not frames.is_valid_event_name(event):
            raise ApiError(400, "INVALID_BODY", "event must be a string of 1-200 characters, not starting with $")
        key = body.get("idempotency_key", self.request.headers.get("Idempotency-Key"))
        if key is not None and (not isinstance(key, str) or not 0 < len(key) <= MAX_NAME_LENGTH):
            raise ApiError(400, "INVALID_BODY", "idempotency_key must be a string of 1-200 characters")
        deliver_at = scheduled_time(body)
        if deliver_at is not None:
            with service_errors():
                item = await self.eddy.schedule(self.identity, channel, event, body.get("data"), deliver_at,
                                                idempotency_key=key)
            self.write_json({"scheduled": scheduled_body(item)}, status=202)
            return
        with service_errors():
            stored = await self.eddy.publish(self.identity, channel, event, body.get("data"), idempotency_key=key)
        self.set_header("Location", f"/api/channels/{stored.channel}/events?after={stored.position - 1}&limit=1")
        self.write_json({**frames.event_body(stored), "position": stored.position}, status=201)


class HistoryHandler(ApiHandler):
    """``GET /api/channels/<channel>/events?after=&limit=&epoch=``: the polling fallback.

    The answer names the store's ``epoch``; a client that polls sends it back with ``after``, and gets
    ``410 HISTORY_LOST`` once the store has been recreated (its ids no longer mean anything).
    """

    async def get(self, channel: str) -> None:
        identity = self.authenticate()
        after = self._int_argument("after", 0, parse=parse_event_id)
        limit = self._int_argument("limit", 100, parse=int)
        if not 1 <= limit <= MAX_HISTORY_LIMIT:
            raise ApiError(400, "INVALID_PARAMETER", f"limit must be between 1 and {MAX_HISTORY_LIMIT}")
        epoch = self.get_query_argument("epoch", None)
        with service_errors():
            page = await self.eddy.history(identity, channel, after=after, limit=limit, epoch=epoch)
        self.write_json({"channel": channel, "epoch": self.eddy.epoch,
                         "events": [frames.event_body(e) for e in page.events], "lost": page.lost})

    def _int_argument(self, name: str, default: int, *, parse) -> int:
        raw = self.get_query_argument(name, None)
        if raw is None:
            return default
        try:
            return parse(raw)
        except ValueError:
            raise ApiError(400, "INVALID_PARAMETER", f"{name} must be a non-negative integer") from None


class ScheduledHandler(ApiHandler):
    """``GET /api/scheduled?channel=&limit=&cursor=`` lists pending events a page at a time (``next`` is the cursor
    of the following page); ``DELETE /api/scheduled/<id>`` cancels one. Both only on channels the caller may join."""

    async def get(self, scheduled_id: str | None = None) -> None:
        if scheduled_id:
            raise ApiError(405, "METHOD_NOT_ALLOWED", "GET /api/scheduled lists; DELETE cancels one")
        identity = self.authenticate()
        channel = self.get_query_argument("channel", None)
        limit = self.get_query_argument("limit", "100")
        if not limit.isdigit():
            raise ApiError(400, "INVALID_PARAMETER", "limit must be a positive integer")
        with service_errors(invalid="INVALID_PARAMETER"):
            page = await self.eddy.scheduled(identity, channel, cursor=self.get_query_argument("cursor", None),
                                             limit=int(limit))
        self.write_json({"scheduled": [scheduled_body(item) for item in page.items], "next": page.next})

    async def delete(self, scheduled_id: str | None = None) -> None:
        identity = self.authenticate()
        if not scheduled_id:
            raise ApiError(405, "METHOD_NOT_ALLOWED", "DELETE /api/scheduled/<id>")
        with service_errors():
            removed = await self.eddy.cancel_scheduled(identity, scheduled_id)
        if not removed:
            raise ApiError(409, "ALREADY_PUBLISHING", "the event is being published now; it cannot be cancelled")
        self.set_status(204)
        self.finish()


def scheduled_time(body: dict[str, Any]) -> float | None:
    """``deliver_at`` (ISO-8601) or ``delay_s`` (seconds) as seconds since the epoch; None when neither."""
    deliver_at, delay = body.get("deliver_at"), body.get("delay_s")
    if deliver_at is not None and delay is not None:
        raise ApiError(400, "INVALID_BODY", "give deliver_at or delay_s, not both")
    if delay is not None:
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not 0 <= delay <= MAX_DELAY:
            raise ApiError(400, "INVALID_BODY", f"delay_s must be a number of seconds from 0 to {MAX_DELAY}")
        return time.time() + delay
    if deliver_at is not None:
        try:
            moment = datetime.fromisoformat(str(deliver_at).replace("Z", "+00:00"))
        except ValueError:
            raise ApiError(400, "INVALID_BODY", "deliver_at must be an ISO-8601 time") from None
        if moment.tzinfo is None:
            raise ApiError(400, "INVALID_BODY", "deliver_at needs a time zone (e.g. Z)")
        return moment.timestamp()  # the service refuses a time too far from now
    return None


def scheduled_body(item) -> dict[str, Any]:
    return {"id": item.id, "channel": item.draft.channel, "event": item.draft.event, "data": item.draft.data,
            "deliver_at": frames.iso_timestamp_or_none(item.deliver_at), "created_at": frames.iso_timestamp(item.created_at)}


class ReadsHandler(ApiHandler):
    """``GET /api/channels/<channel>/reads``: each user's newest read receipt, for late joiners."""

    async def get(self, channel: str) -> None:
        identity = self.authenticate()
        with service_errors():
            reads = await self.eddy.reads(identity, channel)
        self.write_json({"channel": channel, "reads": [
            {"user_id": r.user_id, "message_id": r.message_id, "read_at": frames.iso_timestamp(r.read_at)}
            for r in reads]})


class PresenceHandler(ApiHandler):
    """``GET /api/channels/<channel>/presence``: who is online there, across every process."""

    async def get(self, channel: str) -> None:
        identity = self.authenticate()
        with service_errors():
            users = await self.eddy.presence_users(identity, channel)
        self.write_json({"channel": channel, "users": users})


class MetricsHandler(ApiHandler):
    """``GET /metrics``: Prometheus exposition (no labels carry tenants, channels or users)."""

    def get(self) -> None:
        body, content_type = metrics.render()
        self.set_header("Content-Type", content_type)
        self.finish(body)


class StatsHandler(ApiHandler):
    """``GET /api/stats``: this process's connections, and its subscribers and rates for the caller's tenant."""

    def get(self) -> None:
        identity = self.authenticate()
        self.write_json(self.eddy.stats(identity.tenant))


class DevTokenHandler(ApiHandler):
    """``POST /api/dev-token``: a token for the dashboard's development button.

    Only while the development secret is in use (no ``EDDY_JWT_SECRET``) and
    only to a caller on this machine; anywhere else it does not exist (404).
    """

    #: Headers a proxy adds: a request carrying one came from somewhere else, whatever its socket says.
    FORWARDING_HEADERS = ("X-Forwarded-For", "Forwarded", "X-Real-IP", "X-Forwarded-Host")

    def post(self) -> None:
        if self.eddy.dev_secret_file is None or not self._from_this_machine():
            raise ApiError(404, "NOT_FOUND", f"no endpoint at {self.request.path}")
        body = parse_object(self.request.body or b"{}")
        sub, tenant = body.get("sub", "dev"), body.get("tenant", "dev")
        roles = body.get("roles", [])
        if not (isinstance(sub, str) and isinstance(tenant, str) and 0 < len(sub) <= MAX_NAME_LENGTH
                and 0 < len(tenant) <= MAX_NAME_LENGTH and isinstance(roles, list)
                and all(isinstance(r, str) for r in roles)):
            raise ApiError(400, "INVALID_BODY", "sub and tenant are strings of 1-200 characters, roles a list")
        token = self.eddy.verifier.mint(sub, tenant=tenant, roles=roles, ttl=DEV_TOKEN_TTL)
        self.write_json({"token": token, "sub": sub, "tenant": tenant, "roles": roles, "expires_in": DEV_TOKEN_TTL})


    def _from_this_machine(self) -> bool:
        """A loopback socket, no forwarding header, and a loopback ``Host`` (and ``Origin``, when sent).

        A reverse proxy on the same host connects from loopback too: its forwarding headers, or the public
        name in ``Host``/``Origin``, give it away.
        """
        headers = self.request.headers
        if any(name in headers for name in self.FORWARDING_HEADERS):
            return False
        origin = headers.get("Origin")
        return (is_loopback_host(self.request.remote_ip or "") and is_loopback_host(headers.get("Host", ""), port=True)
                and (origin is None or is_loopback_host(urlsplit(origin).netloc, port=True)))


def is_loopback_host(value: str, *, port: bool = False) -> bool:
    """Whether ``value`` (an address, or with ``port`` a ``host[:port]`` as in ``Host``) names this machine."""
    host = value
    if port:
        try:
            host = urlsplit(f"//{value}").hostname or ""
        except ValueError:  # e.g. an unbalanced "[" in Host
            return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HealthHandler(ApiHandler):
    def get(self) -> None:
        self.write_json({"status": "ok"})


class ReadyHandler(ApiHandler):
    async def get(self) -> None:
        checks = await self.eddy.readiness()
        ready = all(state == "ok" for state in checks.values())
        self.write_json({"status": "ok" if ready else "unavailable", "checks": checks}, status=200 if ready else 503)


@contextmanager
def service_errors(invalid: str = "INVALID_BODY") -> Iterator[None]:
    """Turn the service's refusals and storage outages into problem responses (bad input: 400 ``invalid``)."""
    try:
        yield
    except ChannelRefused as exc:
        if exc.code == frames.AUTHORIZER_UNAVAILABLE:
            raise ApiError(503, exc.code, exc.message, {"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        raise ApiError(400 if exc.code == frames.INVALID_CHANNEL else 403, exc.code, exc.message) from None
    except InvalidInput as exc:
        raise ApiError(400, invalid, exc.message) from None
    except NotFound as exc:
        raise ApiError(404, "NOT_FOUND", exc.message) from None
    except HistoryLost as exc:
        raise ApiError(410, frames.HISTORY_LOST, exc.message) from None
    except LimitReached as exc:
        raise ApiError(429, exc.code, exc.message) from None
    except StorageUnavailable as exc:
        log.warning("storage unavailable: %s", exc)
        raise ApiError(
            503, "STORAGE_UNAVAILABLE", "storage is unavailable; retry later",
            {"Retry-After": str(RETRY_AFTER_SECONDS)},
        ) from None


def parse_object(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(400, "INVALID_BODY", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "INVALID_BODY", "the body must be a JSON object")
    return body
