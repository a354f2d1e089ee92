"""What the stages of secure aggregation carry between the coordinator and a site.

The protocol is common/secagg.py's; this module is its wire: a stage's task (coordinator to site)
and a site's signed answer, as canonical JSON (bytes as base64, Shamir shares as integers) in a
blob record. Pure: no Flower, no network.

A round with ``federation.secure_aggregation`` on has four exchanges (server/strategy.py):

1. ``query.secagg_keys``: the site answers its two public keys (:func:`SiteSecAgg.advertise`)
   and its training example count;
2. ``query.secagg_shares``: with the roster of every answering site's keys, the site answers its
   encrypted key shares, one per other site;
3. the train message, with the shares addressed to the site and its weight: it answers its
   update times its weight, then (after round 1) the score histograms of its evaluation of the
   round before's state, masked, sealed and signed as any update (codec ``ring32``); a site
   that only evaluates gets an evaluate message with its task and masks zeros and histograms;
4. ``query.secagg_unmask``: with the sites whose masked update arrived (survivors) and those
   that shared keys but sent none (dropped), the site answers its shares of the survivors' seeds
   and the dropped sites' keys.

Each answer is signed with the site's identity key over the round's context
(:func:`fedpeft.common.secagg.round_context`), the stage and the payload: the coordinator knows
which registered site said what. The global state that comes with stages 1, 2 and 4 is signed
like any other but holds no tensors: only the run's settings and round travel.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from fedpeft.common import crypto
from fedpeft.common.metrics import HIST_BINS
from fedpeft.common.secagg import PublicKeys, Revealed, SecAggError

KEYS, SHARES, UNMASK = "query.secagg_keys", "query.secagg_shares", "query.secagg_unmask"
#: The message types of the stages other than training.
STAGES = (KEYS, SHARES, UNMASK)
#: The one tensor of a masked upload (codec ``ring32``): the flattened update, fixed-point and
#: masked.
MASKED = "secagg.masked"
_ANSWER_DOMAIN = b"fedpeft/v1 secagg-answer\x00"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise SecAggError(f"{what}: expected base64 text")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise SecAggError(f"{what}: not base64") from None


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _loads(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise SecAggError(f"{what}: not JSON") from None
    if not isinstance(obj, dict):
        raise SecAggError(f"{what}: expected a JSON object")
    return obj


@dataclass(frozen=True)
class StageTask:
    """What the coordinator sends a site for one stage of one round (``stage`` one of
    :data:`STAGES`, or ``train`` for the masked update)."""

    stage: str
    #: Every site that advertised keys this round (U1): site -> (c public key, s public key).
    roster: Mapping[str, PublicKeys] = field(default_factory=dict)
    #: Shares needed to unmask (t).
    threshold: int = 0
    #: The key shares other sites encrypted to this one: sender -> ciphertext (U2's).
    ciphertexts: Mapping[str, bytes] = field(default_factory=dict)
    #: Unmask: the sites whose masked update arrived, and those that shared keys but sent none.
    survivors: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    #: Entries of the flattened update (the masked vector's length).
    length: int = 0
    #: Train: the factor in (0, 1] the site multiplies its clipped update by before masking (its
    #: bounded example count over the roster's largest; 1 in a DP run, whose weights are equal).
    weight: float = 1.0
    #: Train or evaluate: the masked vector ends with the score histograms (positives', then
    #: negatives', this many bins each: the run's ``histogram_bins``; 0: none) of the site's
    #: evaluation of the global state of the round before, summed with the others' under the
    #: same masks.
    bins: int = 0

    @property
    def histograms(self) -> bool:
        """Whether the masked vector ends with score histograms."""
        return self.bins > 0

    @property
    def entries(self) -> int:
        """The masked vector's length: the update's entries, then the histograms' bins."""
        return self.length + 2 * self.bins

    def to_bytes(self) -> bytes:
        return _dumps(
            {
                "stage": self.stage,
                "roster": {s: [_b64(c), _b64(k)] for s, (c, k) in self.roster.items()},
                "threshold": self.threshold,
                "ciphertexts": {s: _b64(c) for s, c in self.ciphertexts.items()},
                "survivors": list(self.survivors),
                "dropped": list(self.dropped),
                "length": self.length,
                "weight": self.weight,
                "bins": self.bins,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> StageTask:
        obj = _loads(data, "secure aggregation task")
        try:
            roster = {
                str(s): (_unb64(c, f"roster {s}"), _unb64(k, f"roster {s}"))
                for s, (c, k) in obj["roster"].items()
            }
            task = cls(
                stage=str(obj["stage"]),
                roster=roster,
                threshold=int(obj["threshold"]),
                ciphertexts={
                    str(s): _unb64(c, f"share from {s}") for s, c in obj["ciphertexts"].items()
                },
                survivors=tuple(str(s) for s in obj["survivors"]),
                dropped=tuple(str(s) for s in obj["dropped"]),
                length=int(obj["length"]),
                weight=float(obj.get("weight", 1.0)),
                bins=int(obj.get("bins", 0)),
            )
            if not 0 <= task.bins <= HIST_BINS:
                raise ValueError(f"{task.bins} histogram bins")
            return task
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SecAggError(f"secure aggregation task: malformed ({exc})") from None


def keys_answer(keys: PublicKeys, examples: int) -> dict[str, Any]:
    """The keys stage's answer: the site's two public keys and its training example count (what
    its update's weight is computed from; its sealed update signs the same count)."""
    return {"keys": [_b64(keys[0]), _b64(keys[1])], "examples": examples}


def shares_answer(ciphertexts: Mapping[str, bytes]) -> dict[str, Any]:
    return {"ciphertexts": {v: _b64(c) for v, c in ciphertexts.items()}}


def unmask_answer(revealed: Revealed) -> dict[str, Any]:
    # Shares as decimal text: a share of GF(2**521 - 1) is no JSON number every reader keeps.
    return {
        "seeds": {v: str(x) for v, x in revealed.seeds.items()},
        "keys": {v: str(x) for v, x in revealed.keys.items()},
    }


def sign_answer(
    identity: ec.EllipticCurvePrivateKey,
    context: bytes,
    site: str,
    stage: str,
    body: dict[str, Any],
) -> bytes:
    """A site's signed answer to ``stage``: the body, its site and stage, and its signature over
    the round's context, site, stage and body."""
    payload = _dumps({"site": site, "stage": stage, "body": body})
    signature = crypto.sign(identity, _ANSWER_DOMAIN, context, payload)
    return _dumps({"payload": _b64(payload), "signature": _b64(signature)})


@dataclass(frozen=True)
class Answer:
    site: str
    stage: str
    body: dict[str, Any]


def open_answer(
    data: bytes, context: bytes, stage: str, sites: Mapping[str, ec.EllipticCurvePublicKey]
) -> Answer:
    """A site's answer to ``stage`` of this round, checked: signed by the registered key of the
    site it names; :class:`SecAggError` naming what is wrong otherwise."""
    outer = _loads(data, "secure aggregation answer")
    payload = _unb64(outer.get("payload"), "answer payload")
    signature = _unb64(outer.get("signature"), "answer signature")
    inner = _loads(payload, "secure aggregation answer")
    site, said = inner.get("site"), inner.get("stage")
    if not isinstance(site, str) or site not in sites:
        raise SecAggError(f"an answer from an unknown site {str(site)[:64]!r}")
    if not crypto.verify(sites[site], signature, _ANSWER_DOMAIN, context, payload):
        raise SecAggError(f"an answer not signed by the key of site {site!r}", site)
    if said != stage or not isinstance(inner.get("body"), dict):
        raise SecAggError(f"site {site!r} answered stage {str(said)[:32]!r}, not {stage}", site)
    return Answer(site, stage, inner["body"])


def answer_keys(answer: Answer) -> PublicKeys:
    c, s = answer.body["keys"]
    return _unb64(c, f"{answer.site}'s c key"), _unb64(s, f"{answer.site}'s s key")


def answer_examples(answer: Answer, most: int) -> int:
    """The training example count a keys answer states: an integer in 1..``most``."""
    n = answer.body["examples"]
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= most:
        raise SecAggError(f"an example count of {str(n)[:32]}; expected an integer in 1..{most}")
    return n


def answer_ciphertexts(answer: Answer) -> dict[str, bytes]:
    return {
        str(v): _unb64(c, f"{answer.site}'s share for {v}")
        for v, c in answer.body["ciphertexts"].items()
    }


def answer_revealed(answer: Answer) -> Revealed:
    return Revealed(
        seeds={str(v): int(x) for v, x in answer.body["seeds"].items()},
        keys={str(v): int(x) for v, x in answer.body["keys"].items()},
    )
