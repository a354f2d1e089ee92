"""fedpeft's ClientApp, plus a site-local copy of each plaintext delta it seals (test only).

The copy goes to ``dump/`` beside the site's data file: the site's own folder.
"""

from __future__ import annotations

from typing import Any

from flwr.clientapp import ClientApp
from train_hook import train_with_hook

import fedpeft.client.app as site_app
from fedpeft.client.setup import setup_from_node_config
from fedpeft.common.state import State, state_to_bytes

app = ClientApp()


@app.train()
def train(msg: Any, context: Any) -> Any:
    data_file = setup_from_node_config(dict(context.node_config)).data_file
    assert data_file is not None
    folder = data_file.parent / "dump"

    def keep_a_copy(delta: State, metrics: dict[str, float]) -> tuple[State, dict[str, float]]:
        (folder / f"delta-{msg.metadata.message_id}.safetensors").write_bytes(state_to_bytes(delta))
        return delta, metrics

    return train_with_hook(msg, context, keep_a_copy)


@app.evaluate()
def evaluate(msg: Any, context: Any) -> Any:
    return site_app.handle_in_context(msg, context)
