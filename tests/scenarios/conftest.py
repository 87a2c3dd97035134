"""The seed scenarios run on the embedded SQLite default and, when a replica set is given, on MongoDB (both drivers)."""

from __future__ import annotations

import pytest

from service.config import Settings
from tests.support import MONGODB_KINDS, SECRET, mongodb_test_url


@pytest.fixture(autouse=True, params=["sqlite", *MONGODB_KINDS])
def storage_kind(request) -> str:
    # autouse, so that pytest sees the parameter: the server fixture reaches settings only at run time.
    return request.param


@pytest.fixture
def settings(request, tmp_path, storage_kind) -> Settings:
    if storage_kind in MONGODB_KINDS:
        storage = mongodb_test_url(storage_kind)  # fresh collections per test, on each driver
    else:
        storage = f"sqlite:///{tmp_path}/eddy.db"
    base = Settings(storage=storage, jwt_secret=SECRET, keepalive_interval=0, ping_interval=0, ping_timeout=0)
    marker = request.node.get_closest_marker("settings")
    return base.with_changes(**marker.kwargs) if marker else base
