"""Message, record and metric keys shared by the ServerApp and the ClientApp.

Keys live here, once, so that the two sides can never disagree on a spelling.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class Phase(StrEnum):
    """What a message asks a site to do: its Flower message type (``flwr.app.MessageType``),
    on which the ClientApp routes; also the phase of a site result in the store."""

    TRAIN = "train"
    EVALUATE = "evaluate"
    #: A store phase only (no message type): a site's personalized model after the run, asked
    #: for by an evaluate message with :data:`PERSONALIZE`.
    PERSONALIZE = "personalize"


#: The phases that are message types: what a site is asked to do.
MESSAGES: Final = (Phase.TRAIN, Phase.EVALUATE)


class SiteStatus(StrEnum):
    """What a site's reply says of the task (its config record's ``status``)."""

    OK = "ok"  # done: the reply carries the result
    ERROR = "error"  # failed at the site; ``error`` says how, without local detail
    REFUSED = "refused"  # refused by the site (its policy, an app it does not run, its ledger)


# Record names inside a Flower Message's RecordDict.
GLOBAL: Final = "global"  # blob: the signed global state (server -> site)
SEALED: Final = "sealed"  # blob: the sealed delta (site -> server)
SECAGG: Final = "secagg"  # blob: a secure-aggregation task (server -> site) or answer (back)
CONFIG: Final = "config"  # ConfigRecord: round info (the run's settings are in GLOBAL, signed)
METRICS: Final = "metrics"  # MetricRecord: scalar metrics of the reply
#: blob: a site's sealed evaluation of a global state (metrics and score histogram, signed and
#: encrypted: common/envelope.py), in an evaluate reply and in a train reply after round 1 (of
#: the global state it trained from, the previous round's).
EVALUATION: Final = "evaluation"

# ConfigRecord keys, server -> site.
ROUND: Final = "round"
#: An evaluate message's request that the site personalize the global state it carries first
#: (``federation.personalize``, which the signed config must name); 1 = yes.
PERSONALIZE: Final = "personalize"

# ConfigRecord keys, site -> server.
SITE: Final = "site"
STATUS: Final = "status"
ERROR: Final = "error"
#: A train reply's data fingerprint (common/data.py ``data_fingerprint``), beside the sealed delta:
#: stated by the site, not signed.
DATA_FINGERPRINT: Final = "data-sha256"

# MetricRecord keys, site -> server.
N_TRAIN: Final = "n-train"
N_TEST: Final = "n-test"
N_VAL: Final = "n-val"
VAL_LOSS: Final = "val-loss"  # of the global state on the site's validation rows
LOSS: Final = "loss"
AUC: Final = "auc"
#: The AUC's 95 % interval (DeLong), computed at the site from its scores.
AUC_LOW: Final = "auc-low"
AUC_HIGH: Final = "auc-high"
AUPRC: Final = "auprc"
ACCURACY: Final = "accuracy"
BRIER: Final = "brier"
TRAIN_SECONDS: Final = "train-seconds"
#: The site's whole time on the message: checks, evaluation, training, sealing.
TASK_SECONDS: Final = "task-seconds"
STEPS: Final = "steps"
EPOCHS_RUN: Final = "epochs-run"
#: The LoRA rank the site trained at: the run's, or lower at a site of less capacity (its
#: ``lora_rank`` setting; common/methods/lora.py). Only in a LoRA run's train replies.
LORA_RANK: Final = "lora-rank"
#: A schedule's mlm stage: the masked-language loss per chosen token on the validation rows
#: of the local model kept (client/trainer.py ``MaskedLm``).
MLM_LOSS: Final = "mlm-loss"

# SiteResult.extra keys the coordinator records for a site (besides aggregation's).
#: A DP run's epsilon for this site after the round, over the rounds it took part in
#: (``common.dp.Accountant.site_epsilon``), at the run's delta.
SITE_EPSILON: Final = "epsilon"

# Simulation node config key set by Flower for each virtual SuperNode.
PARTITION_ID: Final = "partition-id"
# Deployment node config keys (a site's SuperNode passes these to its ClientApp).
NODE_SITE: Final = "site"
NODE_SITE_SETUP: Final = "site-setup"  # the site's setup file (client/setup.py), from site.toml
