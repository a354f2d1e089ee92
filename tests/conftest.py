from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from fedpeft.common.environment import QUIET

# Every process the tests start (Ray workers included) inherits these, as every process that
# fedpeft starts does.
for _name, _value in QUIET.items():
    os.environ.setdefault(_name, _value)

if TYPE_CHECKING:
    from fedpeft.client.trainer import Encoded
    from fedpeft.common.config import RunConfig


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


#: Four short clinical notes, four times over: both classes, and two batches of 8.
NOTES = [
    "63 y male. typical angina. bp 145. chol 233.",
    "41 y female. atypical angina. bp 130. chol 204.",
    "67 y male. asymptomatic. bp 160. chol 286. exercise angina.",
    "37 y male. non-anginal. bp 130. chol 250.",
] * 4
NOTE_LABELS = np.array([0, 0, 1, 0] * 4)


@pytest.fixture(scope="session")
def rows() -> Encoded:
    """:data:`NOTES` encoded for the packaged base model (all-MiniLM-L6-v2), 64 tokens at most."""
    from fedpeft.client.trainer import encode
    from fedpeft.common.config import ModelConfig
    from fedpeft.common.model import load_tokenizer

    return encode(load_tokenizer(ModelConfig()), NOTES, NOTE_LABELS, 64)


@pytest.fixture
def cfg(tmp_path: Path) -> RunConfig:
    """The default run config over ``tmp_path`` as its data folder, rows cut at 32 tokens and
    5 rounds that all run (tests add schedules, which allow no patience): what the site-handler
    tests sign and send."""
    from fedpeft.common.config import load_config

    overrides = {"data.dataset": str(tmp_path), "model.max_length": 32, "federation.rounds": 5}
    return load_config(overrides=overrides)
