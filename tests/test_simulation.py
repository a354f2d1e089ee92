"""Real Flower simulations (Ray engine) of the real ServerApp and ClientApp on real records."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from site_files import write_heart_sites

from fedpeft.common import crypto, keys
from fedpeft.common.config import RunConfig, load_config
from fedpeft.common.envelope import seal_delta
from fedpeft.common.errors import FedpeftError
from fedpeft.common.methods import build_model, shared_state
from fedpeft.common.metrics import HIST_BINS
from fedpeft.common.records import blob_record, message_nbytes
from fedpeft.common.state import State
from fedpeft.common.tensors import to_numpy
from fedpeft.report import render_table, summarize
from fedpeft.server.checkpoints import open_state, read_store_key
from fedpeft.server.store import open_store
from fedpeft.simulate import run_simulation

pytestmark = pytest.mark.slow
TESTS = Path(__file__).parent
#: A train reply besides its sealed delta: the Message (metadata, ids of its records), its
#: RecordDict, the ConfigRecord (site, status) and the MetricRecord (nine metrics). About 950
#: bytes on Flower 1.39 (measured on a reply built by the site code), whatever the delta's size.
REPLY_FRAMING = 2_048


def _sealed_nbytes(state: State, site: str, method: str, fingerprint: str, codec: str) -> int:
    """What a site's sealed delta of ``state``'s names and shapes costs as Flower carries it (one
    blob record, chunked): the same envelope sealed here under throwaway keys. Its size does not
    depend on the keys or the values (the codecs are fixed-size; the ciphertext, random-looking,
    shares no chunk), except for the ECDSA signature's DER length, a few bytes, and the varint of
    ``num_examples``."""
    run_key = crypto.new_run_key()
    sealed = seal_delta(
        {k: np.zeros(v.shape, np.float32) for k, v in state.items()},
        run_token=32 * "0",  # a uuid4 in hex
        round=1,
        site_id=site,
        method=method,
        fingerprint=fingerprint,
        num_examples=60,
        codec=codec,
        run_public=crypto.raw_public(run_key),
        identity=crypto.new_identity(),
    )
    return message_nbytes(blob_record(sealed))


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real hospitals, 60 records each, as a folder of site files."""
    return write_heart_sites(tmp_path_factory.mktemp("sites"), ("a-cleveland", "b-hungary"), 60)


def _config(
    folder: Path,
    db: str,
    rounds: int = 2,
    method: str = "lora",
    schedule: list[dict[str, object]] | None = None,
    server_optimizer: str | None = None,
    server_lr: float | None = None,
) -> RunConfig:
    return load_config(
        overrides={
            "data.dataset": str(folder),
            "db": db,
            "federation.rounds": rounds,
            "method.name": method,
            "model.max_length": 64,
            "train.batch_size": 16,
            "seed": 1,
            "device": "cpu",
            "schedule": schedule,
            "federation.server_optimizer": server_optimizer,
            "federation.server_lr": server_lr,
        }
    )


def test_two_sites_two_rounds_fill_the_store(two_sites: Path, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'run.db'}"
    lines: list[str] = []
    result = run_simulation(_config(two_sites, db), cpus=2, progress=lines.append)
    store = open_store(db)
    run = store.get_run(result.run_id)
    assert run.status == "finished" and run.method == "lora"
    assert run.model_fingerprint.startswith("sha256:")
    assert run.trainable_params == 74_498 and run.total_params > 22_000_000
    rounds = store.rounds(run.id)
    assert [r.round for r in rounds] == [1, 2]
    assert all(r.accepted == 2 and r.rejected == 0 and r.applied for r in rounds)
    assert all(r.pooled_auc is not None and 0.0 <= r.pooled_auc <= 1.0 for r in rounds)
    assert all(r.val_loss is not None and r.val_loss > 0 for r in rounds)
    results = store.site_results(run.id)
    assert len(results) == 8  # 2 rounds x 2 sites x (train, evaluate)
    for r in results:
        assert r.site in ("a-cleveland", "b-hungary") and r.status == "ok"
        assert r.n is not None and r.n > 0
        assert r.auc is not None and 0.0 <= r.auc <= 1.0
    train = [r for r in results if r.phase == "train"]
    # The stored global state moved between rounds and has the method's names and shapes; it
    # is encrypted at rest under the key made beside the database, and opens only with it.
    key = read_store_key(tmp_path / "run.db.key")
    (_, s1), (_, s2) = store.global_state(run.id, 1), store.global_state(run.id, 2)
    a, b = open_state(key, run.id, 1, s1), open_state(key, run.id, 2, s2)
    assert sum(v.size for v in a.values()) == 74_498
    # Only the shared state travels, sealed: up, its envelope in one blob and the reply's few
    # records; down, the signed fp32 state (one 5 MB Flower chunk at most: no chunk is shared)
    # with the run config as JSON.
    for r in train:
        sealed = _sealed_nbytes(a, r.site, "lora", run.model_fingerprint, "fp32")
        # After round 1 the reply also carries the evaluation of the state it trained from:
        # a few metrics and the score histogram (2 x 1,000 counts).
        evaluation = 0 if r.round == 1 else 2 * HIST_BINS * 8 + 512
        assert sealed < r.bytes_up < sealed + REPLY_FRAMING + evaluation
        assert 74_498 * 4 < r.bytes_down < 74_498 * 4 * 1.1
    assert any(not np.array_equal(a[k], b[k]) for k in a)
    on_disk = (tmp_path / "run.db").read_bytes()
    for value in b.values():
        if value.any():
            assert value.tobytes()[:64] not in on_disk
    assert any("round 2: pooled AUC" in line for line in lines)
    store.close()


def test_secure_aggregation_in_simulation_takes_every_site(two_sites: Path, tmp_path: Path) -> None:
    """Two sites in one Ray actor (one CPU), secure aggregation on: each site answers every stage
    of every round once, and neither is refused as having answered already (the once-a-round
    guard is per site: one simulation process answers for several). Both updates are in each
    round's sum, weighted by their example counts (equal here: 60 rows each)."""
    db = f"sqlite:///{tmp_path / 'run.db'}"
    cfg = load_config(
        overrides={
            "data.dataset": str(two_sites),
            "db": db,
            "federation.rounds": 2,
            "model.max_length": 64,
            "train.batch_size": 16,
            "seed": 1,
            "device": "cpu",
            "federation.secure_aggregation.enabled": True,
        }
    )
    result = run_simulation(cfg, cpus=1, progress=lambda _line: None)
    store = open_store(db)
    try:
        rounds = store.rounds(result.run_id)
        results = store.site_results(result.run_id)
    finally:
        store.close()
    train = [r for r in results if r.phase == "train"]
    evaluate = [r for r in results if r.phase == "evaluate"]
    assert [(r.round, r.accepted, r.rejected, r.applied) for r in rounds] == [
        (1, 2, 0, True),
        (2, 2, 0, True),
    ]
    assert [(r.round, r.status, r.extra["weight"]) for r in train] == [
        (n, "ok", 0.5) for n in (1, 1, 2, 2)
    ]
    # Each round's pooled AUC comes from the histograms summed under masks (round 2's from
    # the closing evaluation, an exchange of its own); each site's evaluation row is its own.
    assert all(r.pooled_auc is not None and 0.0 <= r.pooled_auc <= 1.0 for r in rounds)
    assert [(r.round, r.status) for r in evaluate] == [(n, "ok") for n in (1, 1, 2, 2)]
    assert all(r.auc is not None and r.n is not None and r.n > 0 for r in evaluate)


@pytest.mark.parametrize(
    ("fault", "reason"), [("nan", "non-finite"), ("shape", "shape"), ("tamper", "tampered")]
)
def test_a_bad_site_is_rejected_and_the_run_goes_on(
    two_sites: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str, reason: str
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(TESTS))  # Ray workers import the faulty app from here
    monkeypatch.setenv("FEDPEFT_TEST_FAULT", fault)
    monkeypatch.syspath_prepend(str(TESTS))
    import faulty_site

    db = f"sqlite:///{tmp_path / 'run.db'}"
    result = run_simulation(
        _config(two_sites, db, rounds=1),
        client_app=faulty_site.app,
        cpus=2,
        progress=lambda _: None,
    )
    store = open_store(db)
    assert store.get_run(result.run_id).status == "finished"
    (rnd,) = store.rounds(result.run_id)
    assert rnd.accepted == 1 and rnd.rejected == 1 and rnd.applied
    train = {r.site: r for r in store.site_results(result.run_id) if r.phase == "train"}
    assert train["a-cleveland"].status == "ok"
    assert train["b-hungary"].status == "rejected"
    assert train["b-hungary"].reason is not None and train["b-hungary"].reason.startswith(reason)
    # The bad site still evaluates the (good) global model.
    evals = [r for r in store.site_results(result.run_id) if r.phase == "evaluate"]
    assert {r.site for r in evals if r.status == "ok"} == {"a-cleveland", "b-hungary"}
    store.close()


def test_a_run_in_which_no_round_gets_its_minimum_of_sites_fails(
    two_sites: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    monkeypatch.setenv("FEDPEFT_TEST_FAULT", "tamper")
    monkeypatch.syspath_prepend(str(TESTS))
    import faulty_site

    db = f"sqlite:///{tmp_path / 'run.db'}"
    base = _config(two_sites, db, rounds=1)
    cfg = replace(base, federation=replace(base.federation, min_sites=2))
    with pytest.raises(FedpeftError, match="no round had the 2 valid update"):
        run_simulation(cfg, client_app=faulty_site.app, cpus=2, progress=lambda _: None)
    store = open_store(db)
    (run,) = store.list_runs()
    assert run.status == "failed" and "min_sites" in (run.error or "")
    (rnd,) = store.rounds(run.id)  # the round itself is still recorded, not applied
    assert rnd.accepted == 1 and not rnd.applied
    store.close()


def test_sites_of_lower_lora_rank_train_only_their_components(
    two_sites: Path, tmp_path: Path
) -> None:
    """Site a trains LoRA at rank 2, site b at rank 1 (of the run's 8): the round applies, the
    store records each site's rank, and the components above 2, which no site trained, keep
    their initial values while component 1 (site a's alone) moves."""
    db = f"sqlite:///{tmp_path / 'run.db'}"
    cfg = replace(_config(two_sites, db, rounds=1), site_lora_ranks=(2, 1))
    result = run_simulation(cfg, cpus=2, progress=lambda _: None)
    store = open_store(db)
    (rnd,) = store.rounds(result.run_id)
    assert rnd.accepted == 2 and rnd.applied
    train = {r.site: r for r in store.site_results(result.run_id) if r.phase == "train"}
    assert {s: r.extra[keys.LORA_RANK] for s, r in train.items()} == {
        "a-cleveland": 2,
        "b-hungary": 1,
    }
    key = read_store_key(tmp_path / "run.db.key")
    after = open_state(key, result.run_id, 1, store.global_state(result.run_id, 1)[1])
    initial = to_numpy(
        shared_state(build_model(cfg.model, cfg.method, cfg.train.dropout, cfg.seed))
    )
    lora_a = [k for k in after if ".lora_A." in k]
    assert len(lora_a) == 12
    for name in lora_a:
        assert after[name].shape == (8, 384)  # the delivered adapter keeps the run's rank
        np.testing.assert_array_equal(after[name][2:], initial[name][2:])
        assert not np.array_equal(after[name][1], initial[name][1])
    # The report names each site's rank.
    summary = summarize(store, result.run_id)
    assert summary.lora_ranks == {"a-cleveland": 2, "b-hungary": 1}
    assert "LoRA rank each site trained (the run's 8; " in render_table(summary)
    weight_a = train["a-cleveland"].n / (train["a-cleveland"].n + train["b-hungary"].n)
    store.close()
    # The same round with plain zero-padding: component 0 (both sites trained it) is the same;
    # component 1 (site a's alone) moves by site a's weight times what it moved rank-aware.
    db = f"sqlite:///{tmp_path / 'padded.db'}"
    padded_cfg = replace(cfg, db=db, federation=replace(cfg.federation, lower_ranks="zero-padding"))
    padded_run = run_simulation(padded_cfg, cpus=2, progress=lambda _: None).run_id
    store = open_store(db)
    key = read_store_key(tmp_path / "padded.db.key")
    padded = open_state(key, padded_run, 1, store.global_state(padded_run, 1)[1])
    store.close()
    for name in lora_a:
        np.testing.assert_allclose(padded[name][0], after[name][0], rtol=1e-6, atol=1e-7)
        moved, moved_padded = after[name][1] - initial[name][1], padded[name][1] - initial[name][1]
        np.testing.assert_allclose(moved_padded, weight_a * moved, rtol=1e-4, atol=1e-7)


def test_a_site_with_an_int8_base_takes_part_in_a_round(two_sites: Path, tmp_path: Path) -> None:
    """Site a holds its base in int8, site b in fp32: both updates are accepted and applied."""
    db = f"sqlite:///{tmp_path / 'run.db'}"
    cfg = replace(_config(two_sites, db, rounds=1), site_quantize=("int8",))
    result = run_simulation(cfg, cpus=2, progress=lambda _: None)
    store = open_store(db)
    (rnd,) = store.rounds(result.run_id)
    assert rnd.accepted == 2 and rnd.rejected == 0 and rnd.applied
    assert all(r.status == "ok" for r in store.site_results(result.run_id))
    store.close()


def test_lora_with_a_fully_trained_top_layer_runs_a_round(two_sites: Path, tmp_path: Path) -> None:
    """Hybrid fine-tuning: the top layer's 1.77 M values travel with LoRA's, and apply."""
    db = f"sqlite:///{tmp_path / 'run.db'}"
    cfg = _config(two_sites, db, rounds=1)
    cfg = replace(cfg, method=replace(cfg.method, lora=replace(cfg.method.lora, full_layers=1)))
    result = run_simulation(cfg, cpus=2, progress=lambda _: None)
    store = open_store(db)
    run = store.get_run(result.run_id)
    (rnd,) = store.rounds(run.id)
    assert rnd.accepted == 2 and rnd.applied
    assert run.trainable_params == 1_774_464 + 10 * 6_144 + 770
    train = [r for r in store.site_results(run.id) if r.phase == "train"]
    assert all(run.trainable_params * 4 < r.bytes_up < run.trainable_params * 4.1 for r in train)
    store.close()


@pytest.mark.parametrize("method", ["prefix", "prompt", "ia3", "adapter", "bitfit", "full"])
def test_other_methods_run_a_federated_round(two_sites: Path, tmp_path: Path, method: str) -> None:
    db = f"sqlite:///{tmp_path / 'run.db'}"
    cfg = _config(two_sites, db, rounds=1, method=method)
    result = run_simulation(cfg, cpus=2, progress=lambda _: None)
    store = open_store(db)
    run = store.get_run(result.run_id)
    assert run.status == "finished" and run.method == method
    (rnd,) = store.rounds(run.id)
    assert rnd.accepted == 2 and rnd.applied
    train = [r for r in store.site_results(run.id) if r.phase == "train"]
    # The upload is one sealed blob: the fp32 delta, its envelope (a name and shape per tensor in
    # the header, keys, nonce, tag, signature) and Flower's framing of the blob and the reply.
    key = read_store_key(tmp_path / "run.db.key")
    state = open_state(key, run.id, 1, store.global_state(run.id)[1])
    assert sum(v.size for v in state.values()) == run.trainable_params
    for r in train:
        sealed = _sealed_nbytes(state, r.site, method, run.model_fingerprint, "fp32")
        assert run.trainable_params * 4 < sealed < r.bytes_up < sealed + REPLY_FRAMING
    store.close()


@pytest.mark.parametrize(("codec", "bytes_per_value"), [("fp16", 2), ("int8", 1)])
def test_compressed_codecs_shrink_the_upload(
    two_sites: Path, tmp_path: Path, codec: str, bytes_per_value: int
) -> None:
    db = f"sqlite:///{tmp_path / 'run.db'}"
    base = _config(two_sites, db, rounds=1)
    cfg = replace(base, federation=replace(base.federation, codec=codec))
    result = run_simulation(cfg, cpus=2, progress=lambda _: None)
    store = open_store(db)
    run = store.get_run(result.run_id)
    (rnd,) = store.rounds(run.id)
    assert rnd.accepted == 2 and rnd.applied
    train = [r for r in store.site_results(run.id) if r.phase == "train"]
    # int8 adds one fp32 scale per row (of 64 values or more); both add the envelope and
    # Flower's framing, as for fp32.
    key = read_store_key(tmp_path / "run.db.key")
    state = open_state(key, run.id, 1, store.global_state(run.id)[1])
    for r in train:
        sealed = _sealed_nbytes(state, r.site, "lora", run.model_fingerprint, codec)
        assert 74_498 * bytes_per_value < sealed < r.bytes_up < sealed + REPLY_FRAMING
        assert r.bytes_up < 74_498 * 4  # smaller than the fp32 payload alone
    store.close()


def test_a_hundred_sites_with_ten_training_a_round(tmp_path: Path) -> None:
    # Issue 17: 100 virtual sites on this machine's CPUs (2 Ray actors serve them all). Each
    # round trains 10 of them, every other site evaluates the round's state in the same
    # exchange, and the store gets every site's evaluation of every round.
    db = f"sqlite:///{tmp_path / 'run.db'}"
    cfg = load_config(
        overrides={
            "data.dataset": "synthetic:100",
            "db": db,
            "federation.rounds": 2,
            "federation.sites_per_round": 10,
            "model.max_length": 64,
            "train.batch_size": 16,
            "seed": 1,
            "device": "cpu",
        }
    )
    lines: list[str] = []
    result = run_simulation(cfg, cpus=2, progress=lines.append)
    store = open_store(db)
    rounds = store.rounds(result.run_id)
    results = store.site_results(result.run_id)
    store.close()
    assert [(r.round, r.accepted, r.rejected, r.applied) for r in rounds] == [
        (1, 10, 0, True),
        (2, 10, 0, True),
    ]
    names = {f"site-{i:03d}" for i in range(1, 101)}
    trained = {}
    for rnd in (1, 2):
        train = [r for r in results if r.round == rnd and r.phase == "train"]
        evaluate = [r for r in results if r.round == rnd and r.phase == "evaluate"]
        assert len(train) == 10 and all(r.status == "ok" for r in train)
        trained[rnd] = {r.site for r in train}
        assert len(trained[rnd]) == 10 and trained[rnd] <= names
        assert {r.site for r in evaluate} == names  # every site evaluated every round's state
        assert all(r.status == "ok" and r.auc is not None for r in evaluate)
    assert trained[1] != trained[2]
    assert sum("100 sites evaluated, site AUC median" in line for line in lines) == 2


def _two_rounds(db: str, run_id: int, key_file: Path) -> tuple[str, State, State]:
    """A two-round run's report table and its global states after rounds 1 and 2, once both
    rounds took every site's update and applied."""
    store = open_store(db)
    try:
        rounds = store.rounds(run_id)
        assert [(r.round, r.accepted, r.applied) for r in rounds] == [(1, 2, True), (2, 2, True)]
        key = read_store_key(key_file)
        one, two = (open_state(key, run_id, r, store.global_state(run_id, r)[1]) for r in (1, 2))
        return render_table(summarize(store, run_id)), one, two
    finally:
        store.close()


def test_a_staged_run_in_simulation(two_sites: Path, tmp_path: Path) -> None:
    """Prompt tuning for a round, then LoRA, in Flower's simulation: both rounds take every
    site and apply, and the report names the stages."""
    db = f"sqlite:///{tmp_path / 'run.db'}"
    cfg = _config(
        two_sites,
        db,
        schedule=[{"rounds": 1, "method": "prompt"}, {"rounds": 1, "method": "lora"}],
        # FedAdam's momentum would move what a stage froze: the coordinator keeps it.
        server_optimizer="fedadam",
        server_lr=0.01,
    )
    result = run_simulation(cfg, cpus=2, progress=lambda _: None)
    initial = to_numpy(shared_state(build_model(cfg.model, cfg.method, cfg.train.dropout, 1)))
    text, one, two = _two_rounds(db, result.run_id, tmp_path / "run.db.key")
    prompt = [n for n in initial if "prompt_encoder." in n]
    lora = [n for n in initial if ".lora_" in n]
    assert not any(np.array_equal(one[n], initial[n]) for n in prompt)  # round 1 trained it
    assert all(np.array_equal(one[n], initial[n]) for n in lora)  # and left LoRA as it was
    assert all(np.array_equal(two[n], one[n]) for n in prompt)  # round 2 left the prompt
    assert any(not np.array_equal(two[n], one[n]) for n in lora)
    assert "round 1: prompt (all) at lr 0.03; round 2: lora (all) at lr 0.005" in text


def test_domain_adaptive_pretraining_in_simulation(two_sites: Path, tmp_path: Path) -> None:
    """A round of masked-language pretraining, then fine-tuning, in Flower's simulation: the
    mlm round moves LoRA and the masked-language head but not the classifier, each site's row
    records its masked-language loss, and the fine-tuning round leaves the head as it was,
    under FedAdam too (whose momentum the coordinator keeps off what a stage froze). The
    pretraining round is no candidate for the delivered model: it has no validation loss."""
    db = f"sqlite:///{tmp_path / 'run.db'}"
    cfg = _config(two_sites, db, rounds=1, server_optimizer="fedadam", server_lr=0.01)
    cfg = cfg.with_dapt(1)
    result = run_simulation(cfg, cpus=2, progress=lambda _: None)
    initial = to_numpy(shared_state(build_model(cfg.model, cfg.method, cfg.train.dropout, 1)))
    text, one, two = _two_rounds(db, result.run_id, tmp_path / "run.db.key")
    store = open_store(db)
    try:
        train = [r for r in store.site_results(result.run_id) if r.phase == "train"]
        assert [r.val_loss is None for r in store.rounds(result.run_id)] == [True, False]
    finally:
        store.close()
    losses = {r.round: r.extra.get(keys.MLM_LOSS) for r in train}
    assert losses[1] is not None and 0 < losses[1] < 11 and losses[2] is None
    head = [n for n in initial if "classifier." in n]
    mlm = [n for n in initial if n.startswith("mlm_head.")]
    lora = [n for n in initial if ".lora_" in n]
    assert all(np.array_equal(one[n], initial[n]) for n in head)  # pretraining: no labels
    assert not any(np.array_equal(one[n], initial[n]) for n in mlm)
    assert any(not np.array_equal(one[n], initial[n]) for n in lora)
    assert all(np.array_equal(two[n], one[n]) for n in mlm)  # fine-tuning left the head
    assert any(not np.array_equal(two[n], one[n]) for n in head)
    assert "round 1: mlm at lr 0.005; round 2: all at lr 0.005" in text
