"""Log lines: credentials redacted from request lines, JSON lines parse, connection ids carried."""

from __future__ import annotations

import logging

import orjson

from service.logs import JsonFormatter, redact_uri, redacted_url


def test_credential_parameters_are_redacted():
    assert redact_uri("/ws?access_token=abc.def.ghi&channel=x") == "/ws?access_token=***&channel=x"
    assert redact_uri("/ws/t/stream?token=abc") == "/ws/t/stream?token=***"
    assert redact_uri("/api/channels/c/events?after=3") == "/api/channels/c/events?after=3"
    assert "secret" not in redact_uri("/ws?TOKEN=secret&Access_Token=secret")


def test_storage_urls_in_logs_hide_credentials_and_name_the_sqlite_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    here = tmp_path.resolve()
    assert redacted_url("sqlite:///var/lib/eddy/eddy.db") == f"sqlite file {here}/var/lib/eddy/eddy.db"
    assert redacted_url("sqlite:////var/lib/eddy/eddy.db") == "sqlite file /var/lib/eddy/eddy.db"
    assert redacted_url("mongodb://eddy:hunter2@db:27017/eddy?authSource=admin") == "mongodb://***@db:27017/eddy"


def test_json_lines_carry_connection_ids_and_exceptions():
    record = logging.LogRecord("eddy.ws", logging.WARNING, __file__, 1, "closed %s", ("slow",), None)
    record.connection_id = "c0ffee"
    line = orjson.loads(JsonFormatter().format(record))
    assert line["message"] == "closed slow" and line["level"] == "warning" and line["connection_id"] == "c0ffee"
    assert line["logger"] == "eddy.ws" and line["time"].endswith("Z")
    try:
        raise ValueError("boom")
    except ValueError:
        import sys
        record = logging.LogRecord("eddy", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "ValueError: boom" in orjson.loads(JsonFormatter().format(record))["exception"]
