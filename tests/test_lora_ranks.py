"""Sites of different capacity: a site trains the run's LoRA at a lower rank (its own setting),
sends a delta zero beyond it, and the coordinator averages each component over the sites that
trained it (HetLoRA's zero-padding with rank-aware weights)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_client import (
    RUN_KEY,
    SITE_KEY,
    _message,
    _setup,
    _site_file,
    _site_setup,
    _state,
    task_identity,  # noqa: F401  (the autouse fixture, for this module too)
)

from fedpeft.client.app import handle
from fedpeft.client.setup import read_setup_file
from fedpeft.common import keys
from fedpeft.common.config import RunConfig, build_config, load_config
from fedpeft.common.envelope import Expected, open_delta
from fedpeft.common.errors import ConfigError, DeltaRejected
from fedpeft.common.methods import build_model, count_parameters, load_shared_state, shared_state
from fedpeft.common.methods.lora import (
    LoraConfig,
    build_at_rank,
    nonzero_beyond,
    pad,
    state_rank,
    truncate,
)
from fedpeft.common.model import load_base_model, model_fingerprint, resolve_model_path
from fedpeft.common.records import from_blob_record
from fedpeft.common.tensors import to_numpy, to_torch
from fedpeft.server.aggregation import Bounds, aggregate, fedavg
from fedpeft.server.validation import validate_rank

A, B, HEAD = "m.query.lora_A.default.weight", "m.query.lora_B.default.weight", "classifier.weight"


def _delta(rank: int, full: int, value: float) -> dict[str, np.ndarray]:
    """A delta of ``value`` in the first ``rank`` components (of ``full``) and in the head."""
    a, b = np.zeros((full, 3), np.float32), np.zeros((5, full), np.float32)
    a[:rank], b[:, :rank] = value, value
    return {A: a, B: b, HEAD: np.full((2, 5), value, np.float32)}


def test_truncate_and_pad_act_on_the_rank_axis_only() -> None:
    full = _delta(4, 4, 1.0)
    low = truncate(full, 2)
    assert low[A].shape == (2, 3) and low[B].shape == (5, 2) and low[HEAD].shape == (2, 5)
    back = pad(low, {k: v.shape for k, v in full.items()})
    assert back[A].shape == (4, 3) and back[B].shape == (5, 4)
    np.testing.assert_array_equal(back[A][:2], full[A][:2])
    assert not back[A][2:].any() and not back[B][:, 2:].any()
    assert state_rank({k: v.shape for k, v in full.items()}) == 4
    assert state_rank({HEAD: (2, 5)}) == 0
    assert nonzero_beyond(back, 2) is None and nonzero_beyond(full, 2) == A


def test_each_component_is_averaged_over_the_sites_that_trained_it() -> None:
    # Site one (30 rows) trained all 4 components, site two (10 rows) the first 2.
    deltas = [(_delta(4, 4, 1.0), 30), (_delta(2, 4, 3.0), 10)]
    mixed = fedavg(deltas, ranks=[4, 2])
    both = 0.75 * 1.0 + 0.25 * 3.0
    np.testing.assert_allclose(mixed[A][:2], both)
    np.testing.assert_allclose(mixed[A][2:], 1.0)  # site one's alone, not diluted by zeros
    np.testing.assert_allclose(mixed[B][:, :2], both)
    np.testing.assert_allclose(mixed[B][:, 2:], 1.0)
    np.testing.assert_allclose(mixed[HEAD], both)  # every site trains the head
    # Plain zero-padded FedAvg would have shrunk the top components by site two's share.
    np.testing.assert_allclose(fedavg(deltas)[A][2:], 0.75)
    # A component no site trained keeps its global value (a zero update).
    low_only = fedavg([(_delta(2, 4, 1.0), 5), (_delta(1, 4, 2.0), 5)], ranks=[2, 1])
    assert not low_only[A][2:].any() and np.allclose(low_only[A][1], 1.0)
    # Through aggregate, by site name; its weights note is unchanged.
    updates = [("one", deltas[0][0], 30), ("two", deltas[1][0], 10)]
    agg, notes = aggregate(updates, Bounds(), {"one": 4, "two": 2})
    np.testing.assert_allclose(agg[A], mixed[A])
    assert notes["two"]["weight"] == pytest.approx(0.25)


def test_the_coordinator_checks_the_rank_a_site_sends() -> None:
    assert validate_rank(_delta(2, 4, 1.0), 2.0, 4) == 2
    assert validate_rank(_delta(4, 4, 1.0), None, 4) == 4  # no rank sent: the run's
    assert validate_rank({HEAD: np.ones((2, 5), np.float32)}, None, 0) == 0  # not LoRA
    for declared, why in ((5.0, "outside 1..4"), (0.0, "outside"), (2.5, "outside")):
        with pytest.raises(DeltaRejected, match=why):
            validate_rank(_delta(2, 4, 1.0), declared, 4)
    with pytest.raises(DeltaRejected, match=r"lora_A.* not zero beyond the rank 2"):
        validate_rank(_delta(3, 4, 1.0), 2.0, 4)


def test_a_lower_rank_lora_computes_the_global_model_without_its_top_components() -> None:
    """The scaling stays the run's (alpha / r): a component means the same at every rank."""
    cfg = load_config()
    lora = LoraConfig(r=8, alpha=16)
    base = load_base_model(cfg.model, 0.0, 0)
    full = build_at_rank(lora, base, 8).eval()
    rng = np.random.default_rng(0)
    state = {
        k: rng.normal(0, 0.05, v.shape).astype(np.float32)
        for k, v in to_numpy(shared_state(full)).items()
    }
    top_zeroed = pad(truncate(state, 3), {k: v.shape for k, v in state.items()})
    load_shared_state(full, to_torch(top_zeroed))
    low = build_at_rank(lora, load_base_model(cfg.model, 0.0, 0), 3).eval()
    load_shared_state(low, to_torch(truncate(state, 3)))
    lora_low = count_parameters(low).trainable - count_parameters(full).trainable
    assert lora_low == -(8 - 3) * 12 * (384 + 384)  # A rows and B columns of 12 modules gone
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        expected, got = full(input_ids=ids).logits, low(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    load_shared_state(full, to_torch(state))  # with the top components, the output differs
    with torch.no_grad():
        assert not torch.allclose(full(input_ids=ids).logits, expected, atol=1e-4)


def test_a_site_of_lower_rank_trains_and_sends_only_its_components(
    tmp_path: Path, cfg: RunConfig
) -> None:
    from dataclasses import replace

    fp = model_fingerprint(resolve_model_path(cfg.model))
    reply = handle(_message(cfg, fp), replace(_setup(_site_file(tmp_path)), lora_rank=2))
    assert reply.content[keys.CONFIG][keys.STATUS] == "ok"
    state = _state(cfg)
    shapes = {k: v.shape for k, v in state.items()}
    expected = Expected("run-token", 1, "lora", fp, shapes, 1 << 22)
    sealed = from_blob_record(reply.content[keys.SEALED])
    delta = open_delta(sealed, expected, RUN_KEY, {"site-x": SITE_KEY.public_key()}).delta
    assert reply.content[keys.METRICS][keys.LORA_RANK] == 2
    assert nonzero_beyond(delta, 2) is None  # the run's shapes, zero beyond rank 2
    lora_a = [k for k in delta if ".lora_A." in k]
    assert len(lora_a) == 12 and all(delta[k][:2].any() for k in lora_a)
    assert validate_rank(delta, 2.0, state_rank(shapes)) == 2
    # A setting above the run's rank trains the run's rank.
    high = handle(_message(cfg, fp), replace(_setup(_site_file(tmp_path)), lora_rank=64))
    assert high.content[keys.METRICS][keys.LORA_RANK] == 8


def test_site_lora_ranks_are_checked_against_the_method() -> None:
    assert build_config({"site_lora_ranks": [8, 4, 0]}).site_lora_ranks == (8, 4, 0)
    with pytest.raises(ConfigError, match=r"site_lora_ranks: each must be in 0..method.lora.r"):
        build_config({"site_lora_ranks": [16]})
    with pytest.raises(ConfigError, match="need method.name lora, not 'bitfit'"):
        build_config({"site_lora_ranks": [4], "method": {"name": "bitfit"}})


def test_build_model_at_the_run_rank_is_unchanged() -> None:
    """``build_at_rank`` at the run's rank is the method's own build (same trainable count)."""
    cfg = load_config()
    model = build_model(cfg.model, cfg.method, 0.0, 0)
    again = build_at_rank(cfg.method.lora, load_base_model(cfg.model, 0.0, 0), cfg.method.lora.r)
    assert count_parameters(model).trainable == count_parameters(again).trainable == 74_498


def test_site_toml_sets_the_sites_lora_rank(tmp_path: Path) -> None:
    def setup(folder: str, table: str = "") -> str:
        (tmp_path / folder).mkdir()
        return _site_setup(_site_file(tmp_path / folder), table)

    assert read_setup_file(Path(setup("default"))).lora_rank == 0  # the run's
    assert read_setup_file(Path(setup("four", "lora_rank = 4\n"))).lora_rank == 4
    assert read_setup_file(Path(setup("zero", "lora_rank = 0\n"))).lora_rank == 0
    with pytest.raises(ConfigError, match=r"\[site\] lora_rank: expected 0 or a positive integer"):
        setup("negative", "lora_rank = -1\n")


def test_under_secure_aggregation_every_site_trains_the_runs_rank() -> None:
    """A component fewer sites train would show their updates in the unmasked sum."""
    from fedpeft.client.app import site_lora_rank

    plain = load_config().for_sites()
    assert site_lora_rank(plain, 2) == 2 and site_lora_rank(plain, 0) == 8
    assert site_lora_rank(plain, 64) == 8
    secure = load_config(overrides={"federation.secure_aggregation.enabled": True}).for_sites()
    assert site_lora_rank(secure, 2) == 8
    with pytest.raises(ConfigError, match="site_lora_ranks: not with secure aggregation"):
        build_config(
            {"site_lora_ranks": [2], "federation": {"secure_aggregation": {"enabled": True}}}
        )


def test_the_report_lists_only_ranks_the_coordinator_checked() -> None:
    from fedpeft.report import _lora_ranks
    from fedpeft.server.store import SiteResult

    config = load_config().to_json()

    def row(site: str, rank: float, status: str = "ok") -> SiteResult:
        return SiteResult(1, site, "train", status, extra={keys.LORA_RANK: rank})  # type: ignore[arg-type]

    got = _lora_ranks(
        [row("a", 8), row("b", 2), row("c", 1, "rejected"), row("d", float("nan"))], config
    )
    assert got == {"lora_ranks": {"a": 8, "b": 2}, "run_lora_rank": 8}
    assert _lora_ranks([row("a", 8), row("c", 1, "rejected")], config) == {}  # none lower
    bitfit = load_config(overrides={"method.name": "bitfit"}).to_json()
    assert _lora_ranks([row("b", 2)], bitfit) == {}
