"""A ClientApp with one deliberately bad site, for the simulation tests.

It runs the real site code and then, at virtual site 1 only, corrupts the reply the way a buggy
or hostile site might. Lives in tests/ (added to the Ray workers' PYTHONPATH by the test).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from flwr.app import Array
from flwr.clientapp import ClientApp

from fedpeft.client.app import _handle
from fedpeft.common import keys

#: How site 1 corrupts its delta: "nan" (non-finite values) or "shape" (a wrong shape).
FAULT_ENV = "FEDPEFT_TEST_FAULT"

app = ClientApp()


@app.train()
def train(msg: Any, context: Any) -> Any:
    reply = _handle(msg, context, "train")
    if int(context.node_config[keys.PARTITION_ID]) == 1 and keys.ARRAYS in reply.content:
        arrays = reply.content[keys.ARRAYS]
        name = sorted(arrays.keys())[0]
        value = arrays[name].numpy()
        fault = os.environ.get(FAULT_ENV, "nan")
        bad = (
            np.full_like(value, np.nan) if fault == "nan" else np.zeros(value.size + 1, np.float32)
        )
        arrays[name] = Array(bad)
    return reply


@app.evaluate()
def evaluate(msg: Any, context: Any) -> Any:
    return _handle(msg, context, "evaluate")
