"""fedpeft's ClientApp, with one hostile site (tests only): tests/test_deployment.py's fault (c).

The site named in ``FEDPEFT_TEST_FORGER`` (its environment, set by the test) sends, each round,
a different reply that a buggy or hostile site might send, signed with its own key wherever a
signature is possible; every other site runs fedpeft's code unchanged. ``app`` forges;
``withholding`` is the same site sending no update at all (an error reply to each train
message), the reference run the forging one must equal.

Train replies, by round (:data:`FORGED_DELTAS`):
  1. a delta under another site's name (signed with the forger's own key);
  2. a delta of NaN values, honestly sealed and signed;
  3. a delta whose ciphertext was altered after signing;
  4. round 3's delta, as it was signed (a replay).

Evaluations of the global state, by the round evaluated (:data:`FORGED_EVALUATIONS`):
  1. ``n-val`` of 10^300 rows and a validation loss of 0 (to pick the delivered round);
  2. a histogram one bin short;
  3. ``n-test`` NaN;
  4. under another site's name.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from flwr.clientapp import ClientApp

import fedpeft.client.app as site_app
from fedpeft.client.setup import setup_from_node_config
from fedpeft.common import keys
from fedpeft.common._proto.fedpeft.v1 import envelope_pb2 as pb
from fedpeft.common.keys import SiteStatus

FORGER_ENV = "FEDPEFT_TEST_FORGER"
#: The site whose name the forger signs under.
VICTIM_ENV = "FEDPEFT_TEST_VICTIM"

FORGED_DELTAS = {1: "another site's name", 2: "NaN values", 3: "altered ciphertext", 4: "replay"}
FORGED_EVALUATIONS = {1: "n-val 1e300", 2: "short histogram", 3: "n-test NaN", 4: "another name"}

# Taken once at import, restored after each forged reply.
REAL_SEAL_DELTA = site_app.seal_delta
REAL_SEAL_EVALUATION = site_app.seal_evaluation
#: Round 3's delta as the forger signed it, replayed in round 4 (the worker stays warm).
_signed: dict[int, bytes] = {}


def _altered(sealed: bytes) -> bytes:
    message = pb.SealedDelta()
    message.ParseFromString(sealed)
    ciphertext = bytearray(message.ciphertext)
    ciphertext[len(ciphertext) // 2] ^= 0x40
    message.ciphertext = bytes(ciphertext)
    return message.SerializeToString(deterministic=True)


def _forged_delta(delta: Any, **kw: Any) -> bytes:
    rnd = kw["round"]
    if rnd == 1:
        return REAL_SEAL_DELTA(delta, **{**kw, "site_id": os.environ[VICTIM_ENV]})
    if rnd == 2:
        return REAL_SEAL_DELTA({k: np.full_like(v, np.nan) for k, v in delta.items()}, **kw)
    if rnd == 3:
        _signed[3] = REAL_SEAL_DELTA(delta, **kw)
        return _altered(_signed[3])
    if rnd == 4:
        return _signed[3]
    return REAL_SEAL_DELTA(delta, **kw)


def _forged_evaluation(metrics: Any, hist_pos: Any, hist_neg: Any, **kw: Any) -> bytes:
    rnd, metrics, hist_pos = kw["round"], dict(metrics), list(hist_pos)
    if rnd == 1:
        metrics[keys.N_VAL], metrics[keys.VAL_LOSS] = 1e300, 0.0
    elif rnd == 2:
        hist_pos = hist_pos[:-1]
    elif rnd == 3:
        metrics[keys.N_TEST] = float("nan")
    elif rnd == 4:
        kw["site_id"] = os.environ[VICTIM_ENV]
    return REAL_SEAL_EVALUATION(metrics, hist_pos, hist_neg, **kw)


def _forger(context: Any) -> bool:
    return setup_from_node_config(dict(context.node_config)).site == os.environ.get(FORGER_ENV)


def _forging(msg: Any, context: Any) -> Any:
    if not _forger(context):
        return site_app.handle_in_context(msg, context)
    site_app.seal_delta, site_app.seal_evaluation = _forged_delta, _forged_evaluation
    try:
        return site_app.handle_in_context(msg, context)
    finally:
        site_app.seal_delta, site_app.seal_evaluation = REAL_SEAL_DELTA, REAL_SEAL_EVALUATION


app = ClientApp()
app.train()(_forging)
app.evaluate()(_forging)

withholding = ClientApp()


@withholding.train()
def withhold(msg: Any, context: Any) -> Any:
    if not _forger(context):
        return site_app.handle_in_context(msg, context)
    site = setup_from_node_config(dict(context.node_config)).site
    return site_app.error_reply(msg, site, SiteStatus.ERROR, "this site sends no update")


@withholding.evaluate()
def evaluate(msg: Any, context: Any) -> Any:
    return site_app.handle_in_context(msg, context)
