"""fedpeft's site train handler with a hook on the plaintext delta before it is sealed (tests only).

One copy for two test apps: site_dump.py beside it (the test sites import it with this folder on
their PYTHONPATH, tests/test_deployment.py) and tests/faulty_site.py (imported by Ray workers
with tests/ on their path, as ``deploy_app.train_hook``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import fedpeft.client.app as site_app
from fedpeft.common.state import State

Hook = Callable[[State, dict[str, float]], tuple[State, dict[str, float]]]

# Taken once at import: restoring a handler read at call time could restore another hook.
REAL_HANDLE_TRAIN = site_app.handle_train


def train_with_hook(msg: Any, context: Any, hook: Hook) -> Any:
    """The site's reply to a train message, the delta and metrics passed through ``hook`` after
    local training and before sealing."""

    def handle_train(*args: Any, **kwargs: Any) -> tuple[State, dict[str, float]]:
        return hook(*REAL_HANDLE_TRAIN(*args, **kwargs))

    site_app.handle_train = handle_train
    try:
        return site_app.handle_in_context(msg, context)
    finally:
        site_app.handle_train = REAL_HANDLE_TRAIN
