"""Shared test setup: keep every cache inside the test session's temp dir."""

import pytest


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path_factory.getbasetemp() / "loraforge-cache"))
