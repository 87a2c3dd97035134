"""Fixtures for tests that run a real Eddy: a real Tornado server on a real SQLite file."""

from __future__ import annotations

import os

import pytest

from service.app import Eddy
from service.config import Settings
from tests.support import SECRET


@pytest.fixture
def settings(request, tmp_path) -> Settings:
    """Settings for one test: a fresh SQLite file, the test secret, timers off.

    ``@pytest.mark.settings(name=value, ...)`` on a test changes any of them.
    """
    base = Settings(
        storage=os.environ.get("EDDY_TEST_STORAGE") or f"sqlite:///{tmp_path}/eddy.db",
        jwt_secret=SECRET,
        keepalive_interval=0,
        ping_interval=0,
        ping_timeout=0,
    )
    marker = request.node.get_closest_marker("settings")
    return base.with_changes(**marker.kwargs) if marker else base


@pytest.fixture
def eddy(settings, io_loop):
    service = Eddy(settings)
    io_loop.run_sync(service.start)
    yield service
    io_loop.run_sync(service.stop)


@pytest.fixture
def app(eddy):
    return eddy.make_app()
