"""A run manifest: what a site's operator approves before the site trains for a run.

It names the run's method, base model (fingerprint) and site config (its SHA-256, the
:func:`config_hash` a site computes from the config it is sent), and exactly what leaves the site
each round: the shared tensors' names and shapes, the codec, the largest sealed upload, the
metrics of each reply and the bins of the score histogram. The coordinator writes it
(``fedpeft run manifest``); a site approves it (``fedpeft site approve``) and, with
``approved_runs_only``, trains for no run whose config hash it has not approved.

Pure: no torch, no Flower. :func:`sealed_size_bound` is the size a site can compute before it
trains, from the shapes and codec alone.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedpeft.common import keys
from fedpeft.common.errors import ConfigError
from fedpeft.common.metrics import HIST_BINS
from fedpeft.common.wire import CODECS, RING, encoded_size

#: Manifest format version (``format`` in the JSON).
MANIFEST_FORMAT = 1

#: Site names are at most 64 characters (``fedpeft site enroll``); run tokens are 32 hex digits
#: (uuid4) today: 64 leaves room.
MAX_SITE_NAME = 64
MAX_RUN_TOKEN = 64

#: What a site's train reply carries besides the sealed delta (client/app.py).
TRAIN_METRICS: tuple[str, ...] = (
    keys.N_TEST,
    keys.LOSS,
    keys.AUC,
    keys.AUC_LOW,
    keys.AUC_HIGH,
    keys.AUPRC,
    keys.ACCURACY,
    keys.BRIER,
    keys.N_TRAIN,
    keys.TRAIN_SECONDS,
    keys.STEPS,
    keys.EPOCHS_RUN,
    "seconds-per-step",
    keys.LORA_RANK,
    keys.MLM_LOSS,
)
#: What a site's evaluate reply carries besides the histogram.
EVALUATE_METRICS: tuple[str, ...] = (
    keys.N_TEST,
    keys.LOSS,
    keys.AUC,
    keys.AUC_LOW,
    keys.AUC_HIGH,
    keys.AUPRC,
    keys.ACCURACY,
    keys.BRIER,
    keys.VAL_LOSS,
    keys.N_VAL,
)


def config_hash(site_config_json: str) -> str:
    """SHA-256 (hex) of the site config's canonical JSON, as UTF-8: the one name of a run's
    config in approvals, manifests and the site ledger."""
    return hashlib.sha256(site_config_json.encode()).hexdigest()


def _varint_len(n: int) -> int:
    return max(1, math.ceil(n.bit_length() / 7))


def _field(n: int) -> int:
    """A length-delimited protobuf field of ``n`` bytes (field numbers below 16: one tag byte)."""
    return 1 + _varint_len(n) + n


#: ECDSA P-384 signature, DER: SEQUENCE of two INTEGERs of at most 49 bytes each.
MAX_SIGNATURE = 2 + 2 * (2 + 49)
#: X25519 public key, AES-GCM nonce and tag (common/crypto.py).
_EPK, _NONCE, _TAG = 32, 12, 16


def sealed_size_bound(
    shapes: Mapping[str, tuple[int, ...]],
    codec: str,
    *,
    method: str,
    fingerprint: str,
    site_id_len: int = MAX_SITE_NAME,
    run_token_len: int = MAX_RUN_TOKEN,
) -> int:
    """The largest a sealed delta (proto/fedpeft/v1/envelope.proto ``SealedDelta``) of these
    tensors can be, in bytes: the codec's payload (common/wire.py) plus the envelope around it,
    every varint at its widest. tests/test_policy.py holds it within a few bytes of
    ``seal_delta``'s output."""
    if codec not in (*CODECS, RING):
        raise ValueError(f"unknown codec {codec!r}; known: {', '.join((*CODECS, RING))}")
    payload = sum(encoded_size(tuple(s), codec) for s in shapes.values())
    tensors = 0
    for name, shape in shapes.items():
        spec = _field(len(name.encode()))
        if shape:
            spec += _field(sum(_varint_len(int(d)) for d in shape))
        tensors += _field(spec)
    header = (
        (1 + 5)  # schema_version
        + _field(run_token_len)
        + (1 + 5)  # round
        + _field(site_id_len)
        + _field(len(method.encode()))
        + _field(len(fingerprint.encode()))
        + (1 + 1)  # codec
        + tensors
        + (1 + 10)  # num_examples
    )
    return (
        _field(header)
        + _field(_EPK)
        + _field(_NONCE)
        + _field(payload + _TAG)
        + _field(MAX_SIGNATURE)
    )


@dataclass(frozen=True)
class RunManifest:
    """What a run does at a site and what leaves it: the thing a site operator approves."""

    #: The fine-tuning method.
    method: str
    #: The base model's fingerprint (common/model.py ``model_fingerprint``).
    model_fingerprint: str
    #: SHA-256 of the site config (:func:`config_hash`).
    config_sha256: str
    #: Rounds and local epochs per round.
    rounds: int
    local_epochs: int
    #: The delta's codec.
    codec: str
    #: The shared tensors, by name and shape, in the order they are uploaded.
    tensors: tuple[tuple[str, tuple[int, ...]], ...]
    #: The largest sealed upload of one round (:func:`sealed_size_bound`), in bytes.
    upload_bytes: int
    #: The metric names of a train reply and of an evaluate reply.
    train_metrics: tuple[str, ...] = TRAIN_METRICS
    evaluate_metrics: tuple[str, ...] = EVALUATE_METRICS
    #: The evaluate reply's score histogram: this many bins, counted for each label.
    histogram_bins: int = HIST_BINS

    @property
    def shared_values(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors)

    def to_json(self) -> str:
        """The manifest as JSON (sorted keys, indented: people read it)."""
        return json.dumps(
            {
                "format": MANIFEST_FORMAT,
                "method": self.method,
                "model_fingerprint": self.model_fingerprint,
                "config_sha256": self.config_sha256,
                "rounds": self.rounds,
                "local_epochs": self.local_epochs,
                "codec": self.codec,
                "tensors": [{"name": n, "shape": list(s)} for n, s in self.tensors],
                "upload_bytes": self.upload_bytes,
                "train_metrics": list(self.train_metrics),
                "evaluate_metrics": list(self.evaluate_metrics),
                "histogram_bins": self.histogram_bins,
            },
            sort_keys=True,
            indent=1,
        )

    @classmethod
    def from_dict(cls, values: Any, where: str = "manifest") -> RunManifest:
        """A manifest from its JSON object; ``ConfigError`` naming every problem."""
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: expected a JSON object")
        problems: list[str] = []

        def get(key: str, kind: type | tuple[type, ...]) -> Any:
            value = values.get(key)
            if not isinstance(value, kind) or isinstance(value, bool):
                problems.append(f"{where}: {key}: missing or of the wrong type")
                return None
            return value

        if values.get("format") != MANIFEST_FORMAT:
            problems.append(f"{where}: format: expected {MANIFEST_FORMAT}")
        method, fingerprint = get("method", str), get("model_fingerprint", str)
        digest, codec = get("config_sha256", str), get("codec", str)
        rounds, epochs = get("rounds", int), get("local_epochs", int)
        upload, bins = get("upload_bytes", int), get("histogram_bins", int)
        metrics = {k: get(k, list) for k in ("train_metrics", "evaluate_metrics")}
        raw_tensors = get("tensors", list)
        if digest is not None and not _is_sha256(digest):
            problems.append(f"{where}: config_sha256: expected 64 hex digits")
        if codec is not None and codec not in CODECS:
            problems.append(f"{where}: codec: expected one of {', '.join(CODECS)}")
        tensors: list[tuple[str, tuple[int, ...]]] = []
        for i, t in enumerate(raw_tensors or []):
            shape = t.get("shape") if isinstance(t, dict) else None
            name = t.get("name") if isinstance(t, dict) else None
            if (
                not isinstance(name, str)
                or not isinstance(shape, list)
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            ):
                problems.append(f"{where}: tensors[{i}]: expected a name and a shape")
                continue
            tensors.append((name, tuple(shape)))
        for key, names in metrics.items():
            if names is not None and not all(isinstance(n, str) for n in names):
                problems.append(f"{where}: {key}: expected metric names")
        unknown = sorted(set(values) - {"format", *_FIELDS})
        problems += [f"{where}: {k}: unknown field" for k in unknown]
        if problems:
            raise ConfigError(problems)
        return cls(
            method=method,
            model_fingerprint=fingerprint,
            config_sha256=digest,
            rounds=rounds,
            local_epochs=epochs,
            codec=codec,
            tensors=tuple(tensors),
            upload_bytes=upload,
            train_metrics=tuple(metrics["train_metrics"]),
            evaluate_metrics=tuple(metrics["evaluate_metrics"]),
            histogram_bins=bins,
        )

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> RunManifest:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON ({exc})") from None
        return cls.from_dict(values, where)

    def describe(self) -> str:
        """The manifest for a person: what the run does here and what leaves the site."""
        lines = [
            f"method:        {self.method}",
            f"base model:    {self.model_fingerprint}",
            f"config sha256: {self.config_sha256}",
            f"rounds:        {self.rounds} x {self.local_epochs} local epoch(s)",
            "",
            "What leaves this site:",
            f"  each train round: one sealed delta of {len(self.tensors)} tensor(s), "
            f"{self.shared_values:,} values, codec {self.codec}, at most "
            f"{self.upload_bytes:,} bytes",
        ]
        width = max((len(n) for n, _ in self.tensors), default=0)
        lines += [f"    {n:<{width}}  {'x'.join(map(str, s)) or 'scalar'}" for n, s in self.tensors]
        lines += [
            f"  with metrics: {', '.join(self.train_metrics)}",
            f"  each evaluate round: metrics {', '.join(self.evaluate_metrics)}",
            f"    and a score histogram: {self.histogram_bins} bins, counted for each label",
            "  never: records, predictions of single rows, keys",
        ]
        return "\n".join(lines)


_FIELDS = (
    "method",
    "model_fingerprint",
    "config_sha256",
    "rounds",
    "local_epochs",
    "codec",
    "tensors",
    "upload_bytes",
    "train_metrics",
    "evaluate_metrics",
    "histogram_bins",
)


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)
