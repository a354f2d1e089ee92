"""fedpeft's ClientApp, plus a site-local copy of each plaintext delta it seals (test only).

The copy goes to ``dump/`` beside the site's data file: the site's own folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.clientapp import ClientApp

import fedpeft.client.app as site_app
from fedpeft.common.state import state_to_bytes

REAL_HANDLE_TRAIN = site_app.handle_train
app = ClientApp()


@app.train()
def train(msg: Any, context: Any) -> Any:
    folder = Path(str(context.node_config["data-path"])).parent / "dump"

    def handle_train(*args: Any, **kwargs: Any) -> Any:
        delta, metrics = REAL_HANDLE_TRAIN(*args, **kwargs)
        (folder / f"delta-{msg.metadata.message_id}.safetensors").write_bytes(state_to_bytes(delta))
        return delta, metrics

    site_app.handle_train = handle_train
    try:
        return site_app._handle(msg, context, "train")
    finally:
        site_app.handle_train = REAL_HANDLE_TRAIN


@app.evaluate()
def evaluate(msg: Any, context: Any) -> Any:
    return site_app._handle(msg, context, "evaluate")
