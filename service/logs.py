"""Logging: readable text on a terminal, JSON lines elsewhere, and never a token or secret.

Request lines are written by :func:`log_request` (Tornado's ``log_function``),
which drops the values of credential query parameters; the default Tornado
access log would print ``?access_token=…`` in full. Every other line, from any
logger (Tornado's uncaught-exception log prints the request URI, a library's
warning may quote a header), passes :class:`RedactingFilter` on the root
handlers: credential parameters, bearer tokens and anything shaped like a JWT
are replaced by ``***`` in the message and in the traceback.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson

from storage import sqlite_file

access_log = logging.getLogger("eddy.access")

#: Query parameters whose values never reach a log line.
SECRET_PARAMETERS = frozenset({"access_token", "token", "jwt", "auth", "authorization"})


def redact_uri(uri: str) -> str:
    """``uri`` with the values of credential parameters replaced by ``***``."""
    parts = urlsplit(uri)
    if not parts.query:
        return uri
    pairs = [(k, "***" if k.lower() in SECRET_PARAMETERS else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    return parts._replace(query=urlencode(pairs, safe="*")).geturl()


#: A credential in free text: ``access_token=…`` (any of SECRET_PARAMETERS), ``Bearer …``, or a JWT on its own.
_SECRET_TEXT = re.compile(
    r"(?i)(?P<key>\b(?:" + "|".join(sorted(SECRET_PARAMETERS)) + r")=|\bbearer\s+)[^\s&\"'<>,;)]+"
    r"|(?P<jwt>\beyJ[\w-]+\.[\w-]+\.[\w-]*)"
)


def redact_text(text: str) -> str:
    """``text`` with credential values, bearer tokens and JWTs replaced by ``***``."""
    return _SECRET_TEXT.sub(lambda m: (m.group("key") or "") + "***", text)


class RedactingFilter(logging.Filter):
    """Redacts credentials from a record's message and traceback before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return True


def redacted_url(url: str) -> str:
    """A storage URL fit for logs: no password, no query string (it may carry credentials).

    A SQLite URL is shown as the absolute path of its database file, so that
    ``sqlite:///var/lib/eddy.db`` (relative: three slashes) cannot pass for
    ``/var/lib/eddy.db`` (four slashes).
    """
    database = sqlite_file(url)
    if database is not None:
        return f"sqlite file {database.absolute()}"
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def log_request(handler) -> None:
    status = handler.get_status()
    method = access_log.info if status < 400 else access_log.warning if status < 500 else access_log.error
    request = handler.request
    method("%d %s %s (%s) %.2fms", status, request.method, redact_uri(request.uri), request.remote_ip,
           1000.0 * request.request_time())


class ConnectionLogger(logging.LoggerAdapter):
    """Prefixes every line with the connection id and adds it as a field for JSON lines."""

    def process(self, msg, kwargs):
        connection_id = (self.extra or {}).get("connection_id")
        kwargs.setdefault("extra", {})["connection_id"] = connection_id
        return f"connection {connection_id}: {msg}", kwargs


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, process, message, and ``connection_id`` when given."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "process": record.process,
            "message": record.getMessage(),
        }
        connection_id = getattr(record, "connection_id", None)
        if connection_id is not None:
            line["connection_id"] = connection_id
        if record.exc_text or record.exc_info:
            line["exception"] = record.exc_text or self.formatException(record.exc_info)  # type: ignore[arg-type]
        return orjson.dumps(line).decode()


def configure_logging(level: str, log_format: str = "auto") -> None:
    """``auto`` is text on a terminal and JSON lines otherwise (containers, files)."""
    if log_format == "auto":
        log_format = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler()
    if log_format == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s")
    handler.setFormatter(formatter)
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
