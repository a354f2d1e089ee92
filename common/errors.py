"""One error root for everything fedpeft raises on purpose."""

from __future__ import annotations


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


class KeyFileError(FedpeftError):
    """A key file that is missing, unreadable, of the wrong type or readable by others."""


# Reason codes of DeltaRejected: short and stable, recorded in the store per site and round.
NAMES = "names"
SHAPE = "shape"
DTYPE = "dtype"
NON_FINITE = "non-finite"
NORM = "norm"
EXAMPLES = "examples"
SITE_ERROR = "site-error"
NO_REPLY = "no-reply"
MALFORMED = "malformed"
TOO_LARGE = "too-large"
UNKNOWN_SITE = "unknown-site"
BAD_SIGNATURE = "bad-signature"
WRONG_RUN = "wrong-run"
WRONG_ROUND = "wrong-round"
TAMPERED = "tampered"
FINGERPRINT = "fingerprint"
METHOD = "method"
SCHEMA = "schema"


class DeltaRejected(FedpeftError):
    """A site's update was refused for one round. ``reason`` is a short stable code."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)
