"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest

from tests.processes import EddyProcess


@pytest.fixture
def processes(tmp_path):
    """``processes(storage, **kwargs)`` starts a real ``eddy serve`` and waits until it is ready; all stop after the test."""
    started: list[EddyProcess] = []

    def start(storage: str, **kwargs) -> EddyProcess:
        process = EddyProcess(tmp_path, storage, **kwargs)
        started.append(process)
        process.wait_ready()
        return process

    yield start
    for process in started:
        process.stop()
