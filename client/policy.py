"""The site policy: what a hospital allows a run to do at its site, checked before any training.

site.toml's ``[policy]`` table (read by fedpeft/settings.py into :class:`SitePolicy`; every key
has a safe default) says which coordinator keys the site trusts, which methods, codecs and
ClientApps it runs, how many local epochs and rounds it gives a run, the largest upload it sends
in a round, and whether it trains only for runs its operator approved (``fedpeft site approve``,
client/approvals.py).

:func:`check_task` is pure: it takes the facts of one task (:class:`TaskFacts`, primitives the
site reads from the signed global state and its config before it trains) and raises
:class:`PolicyRefusal` with a short public reason naming the rule and the values; the site sends
that reason to the coordinator (``refused: policy: ...``) and writes it to its ledger.
:func:`check_upload` is the second guard, on the sealed bytes themselves before they leave.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from fedpeft.common import crypto
from fedpeft.common.config import TRAINS_BASE_WEIGHTS
from fedpeft.common.errors import FedpeftError, KeyFileError
from fedpeft.common.manifest import RunManifest, sealed_size_bound
from fedpeft.common.methods import method_names
from fedpeft.common.wire import CODECS

#: The ClientApps a site runs unless its policy says otherwise: fedpeft's own, as installed.
DEFAULT_APPS: tuple[str, ...] = ("fedpeft.client.app:app",)
DEFAULT_MAX_LOCAL_EPOCHS = 5
DEFAULT_MAX_ROUNDS = 100
DEFAULT_MAX_UPLOAD_BYTES = 8 * 1024 * 1024
DEFAULT_APPROVALS = "approved-runs.jsonl"
#: The prefix of every policy reason.
POLICY = "policy"


def default_methods() -> tuple[str, ...]:
    """Every registered method except those that train, and so upload, the whole model
    (``full``: a site must opt into it)."""
    return tuple(m for m in method_names() if m not in TRAINS_BASE_WEIGHTS)


class PolicyRefusal(FedpeftError):
    """The site's policy refuses a task. ``reason`` is public: the rule and the values, no local
    detail; it starts with ``policy: ``."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class SitePolicy:
    """site.toml's ``[policy]`` table (defaults in brackets)."""

    #: Public key files of the coordinators whose global states this site accepts
    #: [the ``[site]`` coordinator_key].
    coordinator_keys: tuple[Path, ...]
    #: Methods this site trains [every method but ``full``, which uploads the whole model].
    methods: tuple[str, ...] = field(default_factory=default_methods)
    #: Most local epochs per round [5].
    max_local_epochs: int = DEFAULT_MAX_LOCAL_EPOCHS
    #: Most rounds in a run [100].
    max_rounds: int = DEFAULT_MAX_ROUNDS
    #: Delta codecs this site sends [fp32, fp16, int8].
    codecs: tuple[str, ...] = CODECS
    #: Largest sealed upload of one round, in bytes [8 MiB].
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    #: Most encoder layers a hybrid LoRA run may train whole here (``method.lora.full_layers``:
    #: their weights' deltas leave, as ``full``'s do) [0: none].
    max_full_layers: int = 0
    #: Train a schedule's mlm stages, domain-adaptive pretraining on this site's notes (their
    #: text alone; what leaves is the delta of the method and of a masked-language head)
    #: [false].
    mlm: bool = False
    #: ClientApp references (``module:attribute``) the site worker runs
    #: [``fedpeft.client.app:app``].
    apps: tuple[str, ...] = DEFAULT_APPS
    #: Refuse runs without secure aggregation / differential privacy [false]. Neither exists in
    #: fedpeft yet: a site that sets one refuses every run.
    require_secure_aggregation: bool = False
    require_dp: bool = False
    #: Train only for runs whose config hash the operator approved [false].
    approved_runs_only: bool = False
    #: The approved manifests (``fedpeft site approve``) [approved-runs.jsonl beside site.toml].
    approvals: Path = Path(DEFAULT_APPROVALS)


@dataclass(frozen=True)
class TaskFacts:
    """What a site knows about a task before it trains: read from the signed global state, the
    run's site config and its own keys. Primitives only."""

    method: str
    local_epochs: int
    rounds: int
    round: int
    codec: str
    #: The largest sealed upload this task can produce (:func:`expected_upload_bytes`).
    upload_bytes: int
    #: SHA-256 of the run's site config (common/manifest.py ``config_hash``).
    config_hash: str
    #: The base model's fingerprint the run names.
    model_fingerprint: str
    #: ``SHA256:...`` of the coordinator key that signed the global state.
    coordinator_key: str
    secure_aggregation: bool = False
    dp: bool = False
    #: A train message (else an evaluate or secure-aggregation stage message: the closing
    #: evaluation of a run with secure aggregation is its own exchange, one round past the last).
    trains: bool = True
    #: Encoder layers the run trains whole (``method.lora.full_layers``; 0 for other methods).
    full_layers: int = 0
    #: Other methods the run trains in its stages (``method.compose``), each judged as
    #: ``method`` is.
    composed: tuple[str, ...] = ()
    #: The run has mlm stages (``method.mlm``): sites pretrain on their notes' text.
    mlm: bool = False


def expected_upload_bytes(
    shapes: Mapping[str, tuple[int, ...]],
    codec: str,
    *,
    method: str,
    fingerprint: str,
    site_id: str,
    run_token: str,
) -> int:
    """The largest sealed delta this site can send for a state of ``shapes`` under ``codec``:
    known before training (common/manifest.py ``sealed_size_bound``)."""
    return sealed_size_bound(
        shapes,
        codec,
        method=method,
        fingerprint=fingerprint,
        site_id_len=len(site_id.encode()),
        run_token_len=len(run_token.encode()),
    )


def _short(digest: str) -> str:
    return digest[:12] + "…" if len(digest) > 12 else digest


def _refuse(reason: str) -> None:
    raise PolicyRefusal(f"{POLICY}: {reason}")


def check_task(
    policy: SitePolicy,
    task: TaskFacts,
    approvals: Mapping[str, RunManifest],
    trusted_keys: Collection[str],
) -> None:
    """Refuse ``task`` (:class:`PolicyRefusal`) unless every rule of ``policy`` allows it.

    ``approvals``: the approved manifests by config hash (client/approvals.py);
    ``trusted_keys``: the fingerprints of the policy's coordinator keys
    (:func:`read_coordinator_keys`). The first rule broken is named, in this order: coordinator
    key, method, layers trained whole, mlm stages, codec, local epochs, rounds, upload size, secure
    aggregation, DP, approval."""
    if task.coordinator_key not in trusted_keys:
        _refuse(f"coordinator key {task.coordinator_key} is not trusted at this site")
    for method in (task.method, *task.composed):
        if method not in policy.methods:
            _refuse(
                f"method {method!r} is not allowed at this site "
                f"(allowed: {', '.join(policy.methods) or 'none'})"
            )
    if task.full_layers > policy.max_full_layers:
        _refuse(
            f"{task.full_layers} encoder layer(s) trained whole (method.lora.full_layers), above "
            f"the site's maximum of {policy.max_full_layers} (max_full_layers)"
        )
    if task.mlm and not policy.mlm:
        _refuse(
            "the run pretrains on the notes (a schedule's mlm stage); this site's policy "
            "does not allow it (mlm = false)"
        )
    if task.codec not in policy.codecs:
        _refuse(
            f"codec {task.codec!r} is not allowed at this site "
            f"(allowed: {', '.join(policy.codecs) or 'none'})"
        )
    if task.local_epochs > policy.max_local_epochs:
        _refuse(
            f"{task.local_epochs} local epochs above the site's maximum of "
            f"{policy.max_local_epochs}"
        )
    if task.rounds > policy.max_rounds:
        _refuse(f"{task.rounds} rounds above the site's maximum of {policy.max_rounds}")
    if task.round > policy.max_rounds + (0 if task.trains else 1):
        _refuse(f"round {task.round} above the site's maximum of {policy.max_rounds} rounds")
    if task.upload_bytes > policy.max_upload_bytes:
        _refuse(
            f"upload of {task.upload_bytes:,} bytes above the site's maximum of "
            f"{policy.max_upload_bytes:,}"
        )
    if policy.require_secure_aggregation and not task.secure_aggregation:
        _refuse("secure aggregation required, the run does not use it")
    if policy.require_dp and not task.dp:
        _refuse("differential privacy required, the run does not use it")
    if policy.approved_runs_only:
        approved = approvals.get(task.config_hash)
        if approved is None:
            _refuse(f"run not approved (config sha256 {_short(task.config_hash)})")
            return
        if approved.model_fingerprint != task.model_fingerprint:
            _refuse(
                f"run approved for base model {_short(approved.model_fingerprint)}, this one "
                f"names {_short(task.model_fingerprint)} (config sha256 "
                f"{_short(task.config_hash)})"
            )
        if task.upload_bytes > approved.upload_bytes:
            _refuse(
                f"upload of {task.upload_bytes:,} bytes above the approved "
                f"{approved.upload_bytes:,} (config sha256 {_short(task.config_hash)})"
            )


def check_upload(policy: SitePolicy, sealed: bytes) -> None:
    """The second guard, on the sealed upload itself just before it leaves the site."""
    if len(sealed) > policy.max_upload_bytes:
        _refuse(
            f"upload of {len(sealed):,} bytes above the site's maximum of "
            f"{policy.max_upload_bytes:,}"
        )


def read_coordinator_keys(policy: SitePolicy) -> dict[str, ec.EllipticCurvePublicKey]:
    """The policy's coordinator keys by fingerprint; ``KeyFileError`` naming a file that cannot
    be read or is not an ECDSA P-384 public key."""
    trusted: dict[str, ec.EllipticCurvePublicKey] = {}
    for path in policy.coordinator_keys:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise KeyFileError(
                f"{path}: cannot read the coordinator key ({exc.strerror})"
            ) from None
        try:
            key = crypto.parse_public_key(text)
        except KeyFileError as exc:
            raise KeyFileError(f"{path}: {exc}") from None
        trusted[crypto.fingerprint(key)] = key
    return trusted
