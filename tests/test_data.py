from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedpeft.common.config import DataConfig, DataSchema
from fedpeft.common.data import (
    HEART_SITES,
    data_fingerprint,
    heart_sites,
    load_site_file,
    load_site_folder,
    load_sites,
    medpar_sites,
    pima_sites,
    split_site,
    synthetic_sites,
)
from fedpeft.common.errors import DataError

CFG = DataSchema()


def _rows(n: int = 20) -> list[dict[str, object]]:
    return [{"text": f"note {i}", "label": i % 2} for i in range(n)]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_each_format_loads(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"site{suffix}"
    frame = pd.DataFrame(_rows())
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in _rows()))
    else:
        frame.to_parquet(path)
    site = load_site_file(path, CFG)
    assert site.name == "site"
    assert len(site) == 20
    assert site.labels.tolist() == [i % 2 for i in range(20)]
    assert site.texts[3] == "note 3"


def test_the_data_fingerprint_names_the_rows_whatever_the_format(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text(pd.DataFrame(_rows()).to_csv(index=False))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in _rows()))
    csv, jsonl = (load_site_file(tmp_path / f"a.{s}", CFG) for s in ("csv", "jsonl"))
    fingerprint = data_fingerprint(csv)
    assert fingerprint == data_fingerprint(jsonl)  # same rows, same fingerprint
    assert fingerprint.startswith("sha256:") and len(fingerprint) == 7 + 64
    assert "note" not in fingerprint
    changed = _rows()
    changed[7]["label"] = 1 - int(changed[7]["label"])  # one label flipped
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in changed))
    assert data_fingerprint(load_site_file(tmp_path / "b.jsonl", CFG)) != fingerprint
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in _rows()[::-1]))
    assert data_fingerprint(load_site_file(tmp_path / "c.jsonl", CFG)) != fingerprint


def test_configurable_columns(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    pd.DataFrame({"note": ["x", "y"], "y": [1, 0]}).to_csv(path, index=False)
    site = load_site_file(path, DataSchema(text_column="note", label_column="y"))
    assert site.labels.tolist() == [1, 0]


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="absent.csv: no such file"):
        load_site_file(tmp_path / "absent.csv", CFG)


def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    pd.DataFrame({"text": ["x"], "outcome": [1]}).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"a.csv: missing column 'label'"):
        load_site_file(path, CFG)


def test_empty_text_names_file_and_row(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    pd.DataFrame({"text": ["ok", "  ", "ok"], "label": [0, 1, 0]}).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"a.csv: row 2: field 'text' is empty"):
        load_site_file(path, CFG)


def test_bad_label_names_file_row_and_value(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 2}\n')
    with pytest.raises(DataError, match=r"a.jsonl: row 2: field 'label' is 2, not 0 or 1"):
        load_site_file(path, CFG)


def test_skip_bad_rows_counts_them(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    pd.DataFrame({"text": ["a", "", "c", "d"], "label": ["1", "0", "yes", "0"]}).to_csv(
        path, index=False
    )
    site = load_site_file(path, DataSchema(skip_bad_rows=True))
    assert len(site) == 2
    assert site.skipped_rows == 2


def test_single_class_test_split_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    rows = _rows(10)
    frame = pd.DataFrame(rows)
    frame["split"] = ["train"] * 6 + ["test"] * 4
    frame.loc[6:, "label"] = 1
    frame.to_csv(path, index=False)
    site = load_site_file(path, CFG)
    with pytest.raises(DataError, match="test split of site 'a' holds a single class"):
        split_site(site, 0, 0.3, 0.15)


def test_split_column_is_respected(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    frame = pd.DataFrame(_rows(20))
    frame["split"] = ["train"] * 16 + ["test"] * 4
    frame.to_csv(path, index=False)
    split = split_site(load_site_file(path, CFG), 0, 0.3, 0.25)
    assert split.test.tolist() == [16, 17, 18, 19]
    assert sorted(split.train.tolist() + split.val.tolist()) == list(range(16))


def test_split_is_deterministic_and_disjoint() -> None:
    site = heart_sites()[0]
    a, b = split_site(site, 5, 0.3, 0.15), split_site(site, 5, 0.3, 0.15)
    assert np.array_equal(a.test, b.test) and np.array_equal(a.train, b.train)
    parts = [set(a.train), set(a.val), set(a.test)]
    assert sum(map(len, parts)) == len(site) == len(set().union(*parts))
    assert not np.array_equal(split_site(site, 6, 0.3, 0.15).test, a.test)


def test_folder_loads_one_site_per_file(tmp_path: Path) -> None:
    for name in ("b", "a"):
        pd.DataFrame(_rows()).to_csv(tmp_path / f"{name}.csv", index=False)
    (tmp_path / "notes.txt").write_text("ignored")
    assert [s.name for s in load_site_folder(tmp_path, CFG)] == ["a", "b"]


def test_heart_benchmark_is_the_four_real_hospitals() -> None:
    sites = heart_sites()
    assert [s.name for s in sites] == list(HEART_SITES)
    assert [len(s) for s in sites] == [304, 293, 200, 123]
    assert int((sites[3].labels == 0).sum()) == 8  # Switzerland: 8 negatives
    for site in sites:
        for text in site.texts:
            lowered = text.lower()
            assert not any(h.lower() in lowered for h in HEART_SITES)
            assert "num" not in lowered and "disease" not in lowered
    first = sites[0].texts[0]
    assert first.startswith("63 y male. typical angina. bp 145. chol 233.")


def test_pima_benchmark_four_age_bands() -> None:
    sites = pima_sites()
    assert len(sites) == 4
    assert sum(len(s) for s in sites) == 532
    assert all(0 < s.labels.mean() < 1 for s in sites)
    assert all("Yes" not in t and "No" not in t for s in sites for t in s.texts)


def test_medpar_benchmark_is_seven_real_hospitals() -> None:
    sites = medpar_sites()
    assert [s.name for s in sites] == [
        f"provider {p}" for p in (30002, 30006, 30013, 30014, 30061, 30088, 30089)
    ]
    assert [len(s) for s in sites] == [61, 74, 61, 66, 92, 71, 64]
    assert [int(s.labels.sum()) for s in sites] == [19, 23, 19, 18, 38, 32, 14]  # died
    assert sites[4].texts[0] == (
        "elective admission. length of stay 18 days. under 80. white. not in an HMO."
    )
    for site in sites:  # neither the outcome nor the hospital is in a note
        assert not any("died" in t or "300" in t or "provider" in t for t in site.texts)
        split_site(site, 0, 0.3, 0.2)
    assert [s.name for s in load_sites(DataConfig(dataset="medpar"))] == [s.name for s in sites]


def test_synthetic_sites_are_a_fixed_data_set_of_that_many_sites() -> None:
    sites = load_sites(DataConfig(dataset="synthetic:100"))
    assert [s.name for s in sites[:2]] == ["site-001", "site-002"]
    assert len(sites) == 100 and len({s.name for s in sites}) == 100
    assert all(20 <= len(s) <= 60 for s in sites)
    # Fixed whatever the run: the same rows twice, and site i's rows for any count above i.
    again = synthetic_sites(100)
    assert [data_fingerprint(s) for s in sites] == [data_fingerprint(s) for s in again]
    assert sites[4].texts == synthetic_sites(5)[4].texts
    assert len(load_sites(DataConfig(dataset="synthetic"))) == 100
    # Shifted sites: their outcome rates and note styles differ.
    rates = [float(s.labels.mean()) for s in sites]
    assert max(rates) - min(rates) > 0.3
    assert {s.texts[0].split(".")[0].split()[1] for s in sites} == {"y", "year"}
    for site in sites:  # every site has an AUC under any seed: both outcomes in every split
        for seed in (0, 1, 2):
            split = split_site(site, seed, 0.3, 0.2)
            assert set(site.labels[split.test].tolist()) == {0, 1}
            assert set(site.labels[split.train].tolist()) == {0, 1}
        assert "site" not in " ".join(site.texts)


def test_synthetic_notes_carry_the_outcome_signal() -> None:
    # A note's findings follow the outcome (exercise angina here), so there is something to
    # learn; a check of the generator, not of any model.
    sites = synthetic_sites(100)
    texts = [t for s in sites for t in s.texts]
    labels = np.concatenate([s.labels for s in sites])
    angina = np.asarray(
        [
            "exercise angina" in t
            and "no exercise angina" not in t
            or "angina on exercise" in t
            and "no angina" not in t
            for t in texts
        ]
    )
    assert angina[labels == 1].mean() > angina[labels == 0].mean() + 0.3
