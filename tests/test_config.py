"""Settings and rules files: precedence, the shipped example, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import Settings, read_config_file
from service.rules import RuleError, Rules

ROOT = Path(__file__).resolve().parent.parent


def test_precedence_defaults_file_env_flags(tmp_path):
    config = tmp_path / "eddy.toml"
    config.write_text('port = 9000\nhistory_size = 50\nkeepalive_interval = 5\n')
    settings = Settings.from_env({"EDDY_CONFIG": str(config), "EDDY_HISTORY_SIZE": "70"}, port=9100)
    assert (settings.port, settings.history_size, settings.keepalive_interval) == (9100, 70, 5.0)
    assert Settings.from_env({}).port == 8888


def test_the_example_config_is_valid():
    values, tables = read_config_file(str(ROOT / "docs" / "eddy.example.toml"))
    settings = Settings(**values)
    rules = Rules.from_config(tables)
    assert settings.tenant_claim == "empresaId"
    assert rules.rule_for("conversation:158803db-1111-4c4c-8888-7f22a9c1aaaa").valid_id(
        "conversation:158803db-1111-4c4c-8888-7f22a9c1aaaa")
    assert not rules.rule_for("conversation:x").valid_id("conversation:x")
    assert rules.rule_for("ticket:9").authorizer.startswith("http://")
    assert rules.rule_for("nothing") is None


@pytest.mark.parametrize("text, message", [
    ("prot = 1", "unknown setting 'prot'"),
    ('port = "eighty"', "port must be a int"),
    ("port = [", "cannot read config file"),
    ("channels = 3", "array of tables"),
])
def test_config_errors_name_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_config_file(str(path))


@pytest.mark.parametrize("table, message", [
    ({}, "pattern"),
    ({"pattern": "x", "join": ["everyone"]}, "join"),
    ({"pattern": "x", "colour": "red"}, "unknown field"),
    ({"pattern": "x", "id_pattern": "uuid"}, "id_pattern"),
    ({"pattern": "x:*", "id_pattern": "("}, "id_pattern"),
    ({"pattern": "x", "authorizer": "ftp://x"}, "authorizer"),
    ({"pattern": "x", "history": "yes"}, "history"),
    ({"pattern": "x", "presence": 1}, "presence"),
])
def test_rule_errors_name_the_rule(table, message):
    with pytest.raises(RuleError, match=message):
        Rules.from_config([table])


def test_secrets_are_redacted():
    settings = Settings(jwt_secret="hunter2-hunter2-hunter2-hunter2-xx")
    assert settings.redacted()["jwt_secret"] == "***"
    assert "hunter2" not in repr(settings.redacted())
    assert "hunter2" not in repr(settings)
