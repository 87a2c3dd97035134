"""The seed scenarios run on the embedded SQLite default and, when a replica set is given, on MongoDB."""

from __future__ import annotations

import os
import uuid

import pytest

from service.config import Settings
from tests.support import SECRET


@pytest.fixture(autouse=True, params=["sqlite", "mongodb"])
def storage_kind(request) -> str:
    # autouse, so that pytest sees the parameter: the server fixture reaches settings only at run time.
    return request.param


@pytest.fixture
def settings(request, tmp_path, storage_kind) -> Settings:
    if storage_kind == "mongodb":
        base_url = os.environ.get("EDDY_TEST_MONGODB_URI")
        if not base_url:
            pytest.skip("EDDY_TEST_MONGODB_URI not set: no MongoDB server on this machine")
        # Fresh collections per test on the database the URI names.
        storage = f"{base_url}{'&' if '?' in base_url else '?'}eddy_prefix=t{uuid.uuid4().hex[:12]}_"
    else:
        storage = f"sqlite:///{tmp_path}/eddy.db"
    base = Settings(storage=storage, jwt_secret=SECRET, keepalive_interval=0, ping_interval=0, ping_timeout=0)
    marker = request.node.get_closest_marker("settings")
    return base.with_changes(**marker.kwargs) if marker else base
