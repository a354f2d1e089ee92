"""One error root for everything fedpeft raises on purpose."""

from __future__ import annotations

from enum import StrEnum


class FedpeftError(Exception):
    """Base class of every error fedpeft raises deliberately."""


class ConfigError(FedpeftError):
    """A run or site configuration is invalid. Carries every problem found, not just the first."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(self.problems))


class DataError(FedpeftError):
    """Site data is missing or malformed. The message names the file, row and field at fault."""


class ModelError(FedpeftError):
    """The base model cannot be loaded, or its fingerprint does not match the run's."""


class FingerprintMismatch(ModelError):
    """A site's base model differs from the run's: it must not train on it."""


class StoreError(FedpeftError):
    """The run store failed; wraps the database error without leaking its connection string."""


class NoStore(StoreError):
    """A command that only opens an existing store found none at its URL (nothing was created)."""


class KeyFileError(FedpeftError):
    """A key file that is missing, unreadable, of the wrong type or readable by others."""


class Reason(StrEnum):
    """Why a site's reply was refused: short and stable, recorded in the store per site and round
    (as the leading ``code:`` of the reason text)."""

    # The envelope (common/envelope.py and its codecs, common/wire.py), in the order open_delta
    # checks.
    TOO_LARGE = "too-large"
    MALFORMED = "malformed"  # also a reply whose records are missing or of the wrong type
    SCHEMA = "schema"
    UNKNOWN_SITE = "unknown-site"
    WRONG_RUN = "wrong-run"
    WRONG_ROUND = "wrong-round"
    FINGERPRINT = "fingerprint"
    METHOD = "method"
    DTYPE = "dtype"  # the codec, which fixes every tensor's wire dtype
    NAMES = "names"
    SHAPE = "shape"
    TAMPERED = "tampered"
    BAD_SIGNATURE = "bad-signature"  # also a delta sent under another site's name
    # The opened update (server/validation.py).
    NON_FINITE = "non-finite"
    EXAMPLES = "examples"
    NORM = "norm"
    RANK = "rank"  # a LoRA rank outside the run's, or a delta non-zero beyond the rank sent
    # An opened evaluation's values (server/validation.py: validate_evaluation).
    EVALUATION = "evaluation"
    # The reply around it (server/replies.py).
    SITE_ERROR = "site-error"
    REFUSED = "refused"  # the site refused the task: its policy, an app it does not run, ...
    NO_REPLY = "no-reply"
    # Secure aggregation (common/secagg.py): a stage's answer was wrong or missing, or the round's
    # sum could not be unmasked.
    SECAGG = "secagg"


class DeltaRejected(FedpeftError):
    """A site's update was refused for one round. ``reason`` is a short stable code."""

    def __init__(self, reason: Reason, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)
