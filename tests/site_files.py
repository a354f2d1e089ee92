"""Site files for tests that run fedpeft on a folder: a few real heart hospitals, sampled."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fedpeft.common.data import heart_sites


def write_heart_sites(
    folder: Path, names: Sequence[str], rows: int, seed: int = 0, first: int = 0
) -> Path:
    """One CSV per name in ``folder`` (text, label): ``rows`` records drawn without replacement
    (``default_rng(seed)``, afresh for each site) from the shipped heart hospitals, from the
    ``first``-th on, one hospital a name."""
    hospitals = heart_sites()[first : first + len(names)]
    for site, name in zip(hospitals, names, strict=True):
        idx = np.random.default_rng(seed).choice(len(site), rows, replace=False)
        pd.DataFrame({"text": [site.texts[i] for i in idx], "label": site.labels[idx]}).to_csv(
            folder / f"{name}.csv", index=False
        )
    return folder
