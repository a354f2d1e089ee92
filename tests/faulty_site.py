"""A ClientApp with one deliberately bad site, for the simulation tests.

It runs the real site code, and at virtual site 1 only it misbehaves the way a buggy or hostile
site might: it seals a delta with NaN values ("nan") or a wrong shape ("shape"), or it alters
the ciphertext of its sealed delta on the way out ("tamper"). Lives in tests/ (added to the Ray
workers' PYTHONPATH by the test); the hook on the delta is deploy_app's, shared with site_dump.py.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from deploy_app.train_hook import train_with_hook
from flwr.clientapp import ClientApp

import fedpeft.client.app as site_app
from fedpeft.common import keys
from fedpeft.common._proto.fedpeft.v1 import envelope_pb2 as pb
from fedpeft.common.records import blob_record, from_blob_record
from fedpeft.common.state import State

FAULT_ENV = "FEDPEFT_TEST_FAULT"

app = ClientApp()


def _corrupt_delta(delta: State, metrics: dict[str, float]) -> tuple[State, dict[str, float]]:
    name = sorted(delta)[0]
    if os.environ.get(FAULT_ENV) == "nan":
        delta[name] = np.full_like(delta[name], np.nan)
    else:
        delta[name] = np.zeros(delta[name].size + 1, np.float32)
    return delta, metrics


def _tamper(reply: Any) -> None:
    sealed = pb.SealedDelta()
    sealed.ParseFromString(from_blob_record(reply.content[keys.SEALED]))
    ciphertext = bytearray(sealed.ciphertext)
    ciphertext[len(ciphertext) // 2] ^= 0x40
    sealed.ciphertext = bytes(ciphertext)
    reply.content[keys.SEALED] = blob_record(sealed.SerializeToString())


@app.train()
def train(msg: Any, context: Any) -> Any:
    if int(context.node_config[keys.PARTITION_ID]) != 1:
        return site_app.handle_in_context(msg, context)
    fault = os.environ.get(FAULT_ENV, "nan")
    if fault == "tamper":
        reply = site_app.handle_in_context(msg, context)
        _tamper(reply)
        return reply
    return train_with_hook(msg, context, _corrupt_delta)


@app.evaluate()
def evaluate(msg: Any, context: Any) -> Any:
    return site_app.handle_in_context(msg, context)
