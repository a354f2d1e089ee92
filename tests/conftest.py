from __future__ import annotations

import os
from pathlib import Path

import pytest

# Every process the tests start (Ray workers included) inherits these.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(params=["sqlite-memory", "sqlite-file", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every store test runs against each back end; PostgreSQL when CI provides it."""
    if request.param == "sqlite-memory":
        return "sqlite://"
    if request.param == "sqlite-file":
        return f"sqlite:///{tmp_path / 'store.db'}"
    url = os.environ.get("FEDPEFT_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("FEDPEFT_TEST_POSTGRES_URL is not set (.ci/run sets it)")
    return url
