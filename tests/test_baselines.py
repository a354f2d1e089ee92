"""The alone and centralized baselines, trained for real on a tiny two-site folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedpeft.baselines import run_baselines
from fedpeft.common.config import load_config
from fedpeft.common.data import heart_sites

pytestmark = pytest.mark.slow


def test_alone_and_centralized_cover_every_site(tmp_path: Path) -> None:
    for site, name in zip(heart_sites()[:2], ("a", "b"), strict=True):
        idx = np.random.default_rng(0).choice(len(site), 40, replace=False)
        pd.DataFrame({"text": [site.texts[i] for i in idx], "label": site.labels[idx]}).to_csv(
            tmp_path / f"{name}.csv", index=False
        )
    cfg = load_config(
        overrides={
            "data.dataset": str(tmp_path),
            "federation.rounds": 1,
            "model.max_length": 48,
            "device": "cpu",
        }
    )
    lines: list[str] = []
    outcomes = run_baselines(cfg, workers=2, progress=lines.append)
    got = {(o.kind, o.site): o for o in outcomes}
    assert set(got) == {("alone", "a"), ("alone", "b"), ("centralized", "a"), ("centralized", "b")}
    assert (
        got[("centralized", "a")].n_train
        == got[("alone", "a")].n_train + got[("alone", "b")].n_train
    )
    assert got[("alone", "a")].n_test == got[("centralized", "a")].n_test == 12
    assert all(0.0 <= o.auc <= 1.0 for o in outcomes)
    assert len(lines) == 3 and any("centralized (all sites)" in line for line in lines)
