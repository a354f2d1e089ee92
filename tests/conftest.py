from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedpeft.common.environment import QUIET

# Every process the tests start (Ray workers included) inherits these, as every process that
# fedpeft starts does.
for _name, _value in QUIET.items():
    os.environ.setdefault(_name, _value)


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
