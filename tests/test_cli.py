from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from fedpeft.cli import main
from fedpeft.common.errors import ConfigError, FedpeftError
from fedpeft.common.keys import AUC_HIGH, AUC_LOW, EPOCHS_RUN, SITE_EPSILON
from fedpeft.report import Summary, _probe_epochs, _rates_lines, summarize
from fedpeft.server.store import (
    ALL_TEST_ROWS,
    BaselineResult,
    LrCandidate,
    RoundResult,
    RunOwner,
    RunStore,
    SiteResult,
    open_store,
)


def _fedpeft(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedpeft", *args], capture_output=True, text=True, timeout=120
    )


def test_help_answers() -> None:
    out = _fedpeft("simulate", "--help")
    assert out.returncode == 0
    for flag in (
        "--dataset",
        "--method",
        "--rounds",
        "--sites-per-round",
        "--local-epochs",
        "--seed",
        "--db",
        "--device",
        "--no-baselines",
    ):
        assert flag in out.stdout
    assert "report" in _fedpeft("--help").stdout


def test_bad_config_is_a_clear_error_with_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "run.toml"
    bad.write_text("[federation]\nrounds = 0\n[train]\nlr = -1\n")
    out = _fedpeft("simulate", "--config", str(bad), "--db", f"sqlite:///{tmp_path}/x.db")
    assert out.returncode == 2
    assert "federation.rounds" in out.stderr and "train.lr" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_dataset_folder_fails_before_training(tmp_path: Path) -> None:
    (tmp_path / "site.csv").write_text("text,label\nfine,1\n,0\n")
    out = _fedpeft("simulate", "--dataset", str(tmp_path), "--db", f"sqlite:///{tmp_path}/x.db")
    assert out.returncode == 2
    assert "site.csv: row 2: field 'text' is empty" in out.stderr


def _new_run(store: RunStore, config_json: str = "{}", owner: RunOwner | None = None) -> int:
    """A run of 100 of 10,000 parameters shared, as the report tests read it."""
    return store.create_run(
        config_json=config_json,
        dataset="heart",
        method="lora",
        model_name="m",
        model_fingerprint="f",
        trainable_params=100,
        total_params=10_000,
        seed=0,
        owner=owner,
    )


def test_report_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = f"sqlite:///{tmp_path / 'r.db'}"
    store = open_store(db)
    run_id = _new_run(store)
    t = datetime(2026, 1, 1)
    store.add_round(
        run_id,
        RoundResult(1, t, t, 1.0, 0.81, 0.8, 0.5, 1, 1, True, val_loss=0.4),
        [
            SiteResult(1, "A", "train", "ok", n=30, bytes_up=400),
            SiteResult(1, "B", "train", "rejected", reason="non-finite: x", bytes_up=400),
            SiteResult(1, "A", "evaluate", "ok", n=10, auc=0.9),
            SiteResult(1, "B", "evaluate", "ok", n=12, auc=0.7),
        ],
        b"s",
    )
    # A later round with a higher validation loss: the report must show round 1's state.
    store.add_round(
        run_id,
        RoundResult(2, t, t, 1.0, 0.5, 0.5, 0.9, 2, 0, True, val_loss=0.9),
        [
            SiteResult(2, "A", "evaluate", "ok", n=10, auc=0.4),
            SiteResult(2, "B", "evaluate", "ok", n=12, auc=0.6),
        ],
        b"t",
    )
    store.add_baselines(
        run_id,
        [
            BaselineResult("alone", "A", 30, 10, 0.6, 1.0),
            BaselineResult("alone", "B", 20, 12, 0.5, 1.0),
            BaselineResult("centralized", "A", 50, 10, 0.95, 1.0),
            BaselineResult("centralized", "B", 50, 12, 0.75, 1.0),
        ],
    )
    store.finish_run(run_id, status="finished", wall_seconds=3.0)
    store.close()
    assert main(["report", "--db", db, "--plot", str(tmp_path / "auc.png")]) == 0
    out = capsys.readouterr().out
    lines = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("|")}
    assert "0.600" in lines["A"] and "0.900" in lines["A"] and "0.950" in lines["A"]
    assert "0.800" in lines["macro (mean of sites)"]  # (0.9 + 0.7) / 2
    assert "0.550" in lines["macro (mean of sites)"]  # alone (0.6 + 0.5) / 2
    assert "1.00 % of the full model" in out  # 400 bytes of 10,000 params x 4 bytes
    assert "round 1 train B: rejected (non-finite: x)" in out
    assert "global state of round 1, the lowest loss" in out
    assert "0.810" in lines["pooled (all test rows)"]
    assert (tmp_path / "auc.png").stat().st_size > 1000
    assert "ε" not in out  # no DP, no privacy lines
    assert "TF-IDF" not in out  # a run recorded without the TF-IDF reference: no such columns
    assert lines["A"].count("|") == 6  # five columns


def _table_rows(out: str) -> list[list[str]]:
    """The cells of every line of the report's table (header and rule included)."""
    return [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines() if "|" in line]


def test_report_shows_the_tfidf_reference_when_the_run_has_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = f"sqlite:///{tmp_path / 't.db'}"
    store = open_store(db)
    run_id = _new_run(store)
    t = datetime(2026, 1, 1)
    store.add_round(
        run_id,
        RoundResult(1, t, t, 1.0, 0.81, 0.8, 0.5, 2, 0, True, val_loss=0.4),
        [
            SiteResult(1, "A", "evaluate", "ok", n=10, auc=0.9),
            SiteResult(1, "B", "evaluate", "ok", n=12, auc=0.7),
        ],
        b"s",
    )
    store.add_baselines(
        run_id,
        [
            BaselineResult("tfidf-alone", "A", 30, 10, 0.61, 0.1),
            BaselineResult("tfidf-alone", "B", 20, 12, 0.52, 0.1),
            BaselineResult("tfidf-pooled", "A", 50, 10, 0.71, 0.2),
            BaselineResult("tfidf-pooled", "B", 50, 12, 0.66, 0.2),
            BaselineResult("tfidf-pooled", ALL_TEST_ROWS, 50, 22, 0.687, 0.2),
        ],
    )
    store.finish_run(run_id, status="finished", wall_seconds=3.0)
    store.close()
    assert main(["report", "--db", db]) == 0
    out = capsys.readouterr().out
    rows = _table_rows(out)
    header, table = rows[0], {r[0]: r for r in rows[2:]}
    assert header[-2:] == ["TF-IDF alone AUC", "TF-IDF pooled AUC"]
    assert set(table) == {"A", "B", "macro (mean of sites)", "pooled (all test rows)"}
    assert table["A"][2:] == ["n/a", "0.900", "n/a", "0.610", "0.710"]
    assert table["macro (mean of sites)"][-2:] == ["0.565", "0.685"]  # (0.61+0.52)/2, (0.71+0.66)/2
    assert table["pooled (all test rows)"][2:] == ["", "0.810", "", "", "0.687"]
    assert "C chosen on the validation rows" in out


def test_report_shows_the_sites_auc_intervals_and_the_pooled_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = f"sqlite:///{tmp_path / 'i.db'}"
    store = open_store(db)
    run_id = _new_run(store)
    t = datetime(2026, 1, 1)
    interval = {AUC_LOW: 0.801, AUC_HIGH: 0.968}
    store.add_round(
        run_id,
        RoundResult(
            1, t, t, 1.0, 0.81, 0.8, 0.5, 2, 0, True, val_loss=0.4, pooled_low=0.7, pooled_high=0.9
        ),
        [
            SiteResult(1, "A", "evaluate", "ok", n=10, auc=0.9, extra=interval),
            SiteResult(1, "B", "evaluate", "ok", n=12, auc=0.7),  # a site that sent none
        ],
        b"s",
    )
    store.close()
    assert main(["report", "--db", db, "--plot", str(tmp_path / "i.png")]) == 0
    out = capsys.readouterr().out
    rows = _table_rows(out)
    table = {r[0]: r for r in rows[2:]}
    assert table["A"][3] == "0.900 [0.80, 0.97]"
    assert table["B"][3] == "0.700"
    assert table["pooled (all test rows)"][3] == "0.810 [0.70, 0.90]"
    assert "[low, high] = the AUC's 95 % interval (DeLong)" in out
    assert (tmp_path / "i.png").stat().st_size > 1000


def test_report_shows_each_site_s_personalized_auc_beside_the_global_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = f"sqlite:///{tmp_path / 'p.db'}"
    store = open_store(db)
    run_id = _new_run(store, '{"federation": {"personalize": "head"}}')
    t = datetime(2026, 1, 1)
    store.add_round(
        run_id,
        RoundResult(1, t, t, 1.0, 0.81, 0.8, 0.5, 2, 0, True, val_loss=0.4),
        [
            SiteResult(1, "A", "evaluate", "ok", n=10, auc=0.9),
            SiteResult(1, "B", "evaluate", "ok", n=12, auc=0.6),
            SiteResult(1, "C", "evaluate", "ok", n=12, auc=0.7),
        ],
        b"s",
    )
    store.add_site_results(
        run_id,
        [
            SiteResult(1, "A", "personalize", "ok", n=10, auc=0.9, extra={EPOCHS_RUN: 0}),
            SiteResult(
                1,
                "B",
                "personalize",
                "ok",
                n=12,
                auc=0.7,
                extra={EPOCHS_RUN: 2, AUC_LOW: 0.6, AUC_HIGH: 0.8},
            ),
            SiteResult(1, "C", "personalize", "failed", reason="no-reply: no reply"),
        ],
    )
    store.close()
    assert main(["report", "--db", db]) == 0
    out = capsys.readouterr().out
    rows = _table_rows(out)
    header, table = rows[0], {r[0]: r for r in rows[2:]}
    assert header[3:5] == ["federated AUC", "personalized AUC"]
    assert table["A"][3:5] == ["0.900", "0.900 (kept global)"]
    assert table["B"][3:5] == ["0.600", "0.700 [0.60, 0.80]"]
    assert table["C"][3:5] == ["0.700", "n/a"]
    assert table["macro (mean of sites)"][4] == "n/a"  # C has none: no mean over fewer sites
    assert "fine-tuning the head of round 1's state on its own training rows" in out
    assert "round 1 personalize C: failed (no-reply: no reply)" in out


def test_report_shows_the_delivered_round_s_calibration_and_its_reliability_curve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import matplotlib.pyplot as plt

    db = f"sqlite:///{tmp_path / 'c.db'}"
    store = open_store(db)
    run_id = _new_run(store)
    t = datetime(2026, 1, 1)
    curve = ((0.12, 0.1, 30), (0.55, 0.4, 12), (0.91, 0.95, 20))
    for rnd, val_loss in ((1, 0.4), (2, 0.6)):  # round 1 is delivered (lower validation loss)
        store.add_round(
            run_id,
            RoundResult(
                rnd,
                t,
                t,
                1.0,
                0.8,
                0.8,
                0.5,
                2,
                0,
                True,
                val_loss=val_loss,
                pooled_brier=0.1 * rnd,
                pooled_ece=0.05 * rnd,
                pooled_reliability=curve,
            ),
            [
                SiteResult(rnd, "A", "evaluate", "ok", n=30, auc=0.8, brier=0.12),
                SiteResult(rnd, "B", "evaluate", "ok", n=32, auc=0.7, brier=0.2),
            ],
            b"s",
        )
    store.close()
    assert main(["report", "--db", db, "--plot", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert (
        "calibration of round 1, all test rows (from the pooled score histograms, 10 bins): "
        "Brier 0.100, expected calibration error 0.050"
    ) in out
    assert "Brier per site (at the site): A 0.120, B 0.200" in out
    # The plot has the reliability panel under the AUC one: twice as tall as without.
    height = plt.imread(tmp_path / "c.png").shape[0]
    assert height > 900, height


def test_report_flags_a_degenerate_reference_and_never_passes_it_as_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A centralized model below chance at B (stored degenerate), and a federated AUC below 0.5
    at A: each cell and the macro of its column say so, a line names them, and the plot draws
    the alone and centralized references with the flag."""
    db = f"sqlite:///{tmp_path / 'd.db'}"
    store = open_store(db)
    run_id = _new_run(store)
    t = datetime(2026, 1, 1)
    store.add_round(
        run_id,
        RoundResult(1, t, t, 1.0, 0.6, 0.6, 0.5, 2, 0, True, val_loss=0.4),
        [
            SiteResult(1, "A", "evaluate", "ok", n=10, auc=0.45),
            SiteResult(1, "B", "evaluate", "ok", n=12, auc=0.75),
        ],
        b"s",
    )
    store.add_baselines(
        run_id,
        [
            BaselineResult("alone", "A", 30, 10, 0.6, 1.0),
            BaselineResult("alone", "B", 20, 12, 0.7, 1.0),
            BaselineResult("centralized", "A", 50, 10, 0.52, 1.0),
            BaselineResult("centralized", "B", 50, 12, 0.38, 1.0, degenerate=True),
        ],
    )
    store.finish_run(run_id, status="finished", wall_seconds=3.0)
    store.close()
    assert main(["report", "--db", db, "--plot", str(tmp_path / "d.png")]) == 0
    out = capsys.readouterr().out
    rows = _table_rows(out)
    table = {r[0]: r for r in rows[2:]}
    assert table["A"][2:] == ["0.600", "0.450 (degenerate)", "0.520"]
    assert table["B"][2:] == ["0.700", "0.750", "0.380 (degenerate)"]
    assert table["macro (mean of sites)"][2:] == [
        "0.650",
        "0.600 (degenerate)",
        "0.450 (degenerate)",
    ]
    assert (
        "(degenerate) = AUC below 0.5 or constant scores on that site's test rows: no reference "
        "to judge the federated model by (federated AUC at A; centralized AUC at B)"
    ) in out
    assert (tmp_path / "d.png").stat().st_size > 1000


def test_report_says_which_learning_rate_each_mode_used(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = f"sqlite:///{tmp_path / 'lr.db'}"
    store = open_store(db)
    config = json.dumps({"train": {"lr": 5e-3}, "tuning": {"lr_grid": [5e-3, 1.67e-3, 5e-4]}})
    run_id = _new_run(store, config)
    t = datetime(2026, 1, 1)
    store.add_round(
        run_id,
        RoundResult(1, t, t, 1.0, 0.7, 0.7, 0.5, 2, 0, True, val_loss=0.4),
        [SiteResult(1, s, "evaluate", "ok", n=10, auc=0.7) for s in ("A", "B")],
        b"s",
    )
    store.add_baselines(
        run_id,
        [
            BaselineResult("alone", "A", 30, 10, 0.6, 1.0, lr=5e-3, diff=0.1, diff_se=0.03),
            BaselineResult("alone", "B", 20, 10, 0.7, 1.0, lr=5e-4, diff=0.0, diff_se=0.04),
            BaselineResult("centralized", "A", 50, 10, 0.8, 1.0, lr=1.67e-3),
            BaselineResult("centralized", "B", 50, 10, 0.8, 1.0, lr=1.67e-3),
            BaselineResult("tfidf-alone", "A", 30, 10, 0.6, 0.1),
        ],
    )
    store.finish_run(run_id, status="finished", wall_seconds=3.0)
    store.close()
    assert main(["report", "--db", db]) == 0
    out = capsys.readouterr().out
    assert (
        "learning rate, chosen by validation loss from 0.005, 0.00167, 0.0005: "
        "alone A 0.005, B 0.0005; centralized 0.00167"
    ) in out
    assert "learning rate, federated: 0.005 (train.lr, the same at every site and round; " in out
    # Had the baselines chosen by probes, the line would say so.
    probed = _rates_lines(dataclasses.replace(_summary(db, run_id), probe_epochs=2))
    assert probed[0].startswith(
        "learning rate, chosen by validation loss after each rate's first 2 epochs (then only "
        "that rate trained the whole budget) from 0.005, 0.00167, 0.0005: alone A 0.005"
    )
    # Federated minus alone, paired, per site and macro (se sqrt(0.03² + 0.04²) / 2 = 0.025).
    assert (
        "federated − alone AUC, same test rows: A +0.100 [+0.041, +0.159]; "
        "B +0.000 [-0.078, +0.078]; macro +0.050 [+0.001, +0.099]"
    ) in out
    assert "federated − centralized" not in out  # recorded without differences: no line

    # A run whose rate was chosen from federated runs at each rate says so, and which.
    store = open_store(db)
    store.record_lr_choice(run_id, [LrCandidate(run_id, 5e-3, 0.4), LrCandidate(9, 5e-4, 0.52)])
    store.close()
    assert main(["report", "--db", db]) == 0
    assert (
        "learning rate, federated: 0.005, chosen by the validation loss of each run's delivered "
        "round from run 1 (lr 0.005: 0.4000), run 9 (lr 0.0005: 0.5200)"
    ) in capsys.readouterr().out


def test_report_shows_a_dp_run_s_epsilon_per_round_and_per_site(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = f"sqlite:///{tmp_path / 'dp.db'}"
    store = open_store(db)
    run_id = _new_run(
        store, config_json=json.dumps({"federation": {"dp": {"enabled": True, "delta": 1e-6}}})
    )
    t = datetime(2026, 1, 1)
    site_eps = {(1, "A"): 0.5, (1, "B"): 0.5, (2, "A"): 0.702}
    for n, eps, trained in ((1, 0.514, ["A", "B"]), (2, 0.733, ["A"])):
        store.add_round(
            run_id,
            RoundResult(n, t, t, 1.0, 0.8, 0.8, 0.5, 2, 0, True, epsilon=eps, sample_rate=1.0),
            [
                SiteResult(n, s, "train", "ok", n=30, extra={SITE_EPSILON: site_eps[n, s]})
                for s in trained
            ],
            b"s",
        )
    store.close()
    assert main(["report", "--db", db]) == 0
    out = capsys.readouterr().out
    assert "the run's ε after each round (δ = 1e-06): round 1 0.51, round 2 0.73" in out
    # B's is round 1's: it did not take part in round 2.
    assert "ε per site, over the rounds it took part in: A 0.70, B 0.50" in out


def test_report_on_an_empty_store_is_a_clear_error(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'e.db'}"
    open_store(db).close()
    out = _fedpeft("report", "--db", db)
    assert out.returncode == 2 and "holds no runs" in out.stderr


@pytest.mark.parametrize(
    "command",
    [["report"], ["report", "--list"], ["export", "--out", "adapter", "--run", "1"]],
    ids=["report", "report-list", "export"],
)
def test_commands_that_only_read_never_create_a_store(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    typo = tmp_path / "typo.db"
    command = [c if c != "adapter" else str(tmp_path / "adapter") for c in command]
    assert main([*command, "--db", f"sqlite:///{typo}"]) == 2
    err = capsys.readouterr().err
    assert f"fedpeft: error: no store at {typo}" in err and "does not exist" in err
    assert list(tmp_path.iterdir()) == []  # no database, no key, no export folder


def test_cuda_without_a_gpu_is_a_clear_error(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal is for machines without it")
    out = _fedpeft("simulate", "--device", "cuda", "--db", f"sqlite:///{tmp_path}/x.db")
    assert out.returncode == 2
    assert "no CUDA device is available" in out.stderr


def _dead_pid() -> int:
    """The PID of a process that has exited and been reaped."""
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(child.stdout)


def _left_running(db: str, pid: int, rounds: int) -> int:
    """A run as a process that died after ``rounds`` rounds left it: still ``running``."""
    store = open_store(db)
    run_id = _new_run(store, owner=RunOwner(socket.gethostname(), pid))
    t = datetime(2026, 1, 1)
    for n in range(1, rounds + 1):
        store.add_round(
            run_id,
            RoundResult(n, t, t, 1.0, 0.8, 0.8, 0.5, 1, 0, True, val_loss=1 / n),
            [SiteResult(n, "A", "evaluate", "ok", n=10, auc=0.8)],
            bytes([n]),
        )
    store.close()
    return run_id


def test_simulate_first_marks_the_runs_a_dead_process_left_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedpeft.simulate

    db = f"sqlite:///{tmp_path / 'runs.db'}"
    pid = _dead_pid()
    dead = _left_running(db, pid, rounds=2)
    alive = _left_running(db, os.getpid(), rounds=1)  # this process: still running its run

    def no_simulation(*_: object, **__: object) -> None:
        raise FedpeftError("no simulation in this test")

    monkeypatch.setattr(fedpeft.simulate, "run_simulation", no_simulation)
    assert main(["simulate", "--db", db, "--no-baselines"]) == 2
    captured = capsys.readouterr()
    assert "no simulation in this test" in captured.err
    host = socket.gethostname()
    assert (
        f"run {dead} was left running by process {pid} on host {host}, which is gone: "
        "marked interrupted after round 2"
    ) in captured.out
    assert f"run {alive} " not in captured.out
    store = open_store(db, create=False)
    assert [(r.id, r.status) for r in store.list_runs()] == [
        (dead, "interrupted"),
        (alive, "running"),
    ]
    store.close()

    assert main(["report", "--list", "--db", db]) == 0
    listed = {line.split("\t")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "\tinterrupted after round 2\t" in listed[str(dead)]
    assert "\trunning\t" in listed[str(alive)]
    assert main(["report", "--run", str(dead), "--db", db]) == 0
    out = capsys.readouterr().out
    assert f"run {dead} (interrupted)" in out
    assert f"run {dead} was interrupted after round 2: the process running it died" in out
    assert f"process {pid} on host {host}" in out

    # A store that does not exist yet is not made by the check.
    missing = tmp_path / "new" / "runs.db"
    missing.parent.mkdir()
    assert main(["simulate", "--db", f"sqlite:///{missing}", "--no-baselines"]) == 2
    assert "no simulation in this test" in capsys.readouterr().err  # not "no store"
    assert list(missing.parent.iterdir()) == []


def test_the_coordinator_start_marks_the_runs_its_dead_serverapps_left_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse

    import fedpeft.common.crypto as crypto
    import fedpeft.common.trust as trust
    import fedpeft.server.checkpoints as checkpoints
    from fedpeft import processes
    from fedpeft.cli import _start_coordinator

    toml = tmp_path / "coordinator.toml"
    for name in ("keys/coordinator.key", "sites.txt", "store.key"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("")
    toml.write_text("[coordinator]\n")  # its store: runs.db beside it
    pid = _dead_pid()
    dead = _left_running(f"sqlite:///{tmp_path / 'runs.db'}", pid, rounds=1)

    class Stop(Exception):
        pass

    def stop(*_: object, **__: object) -> None:
        raise Stop  # the start-up checks are done by then; nothing is started

    monkeypatch.setattr(crypto, "read_private_key", lambda *_: None)
    monkeypatch.setattr(trust, "read_sites_file", lambda *_: {})
    monkeypatch.setattr(checkpoints, "read_store_key", lambda *_: b"")
    monkeypatch.setattr(processes, "coordinator_env", stop)
    with pytest.raises(Stop):
        _start_coordinator(argparse.Namespace(config=toml, insecure=True))
    assert (
        f"run {dead} was left running by process {pid} on host {socket.gethostname()}, which "
        "is gone: marked interrupted after round 1"
    ) in capsys.readouterr().out
    store = open_store(f"sqlite:///{tmp_path / 'runs.db'}", create=False)
    assert store.get_run(dead).status == "interrupted"
    store.close()


def test_any_dp_flag_turns_differential_privacy_on_with_its_settings() -> None:
    from fedpeft.cli import _overrides, parser
    from fedpeft.common.config import load_config

    plain = load_config(overrides=_overrides(parser().parse_args(["simulate"])))
    assert not plain.federation.dp.enabled
    args = parser().parse_args(["simulate", "--dp-epsilon", "3", "--dp-clip", "0.5"])
    dp = load_config(overrides=_overrides(args)).federation.dp
    assert (dp.enabled, dp.target_epsilon, dp.clip, dp.noise_multiplier) == (True, 3.0, 0.5, 0.0)
    args = parser().parse_args(["simulate", "--dp-noise", "1.1", "--dp-delta", "1e-6"])
    dp = load_config(overrides=_overrides(args)).federation.dp
    assert (dp.enabled, dp.noise_multiplier, dp.delta) == (True, 1.1, 1e-6)


def test_lr_grid_flag_sets_the_baselines_grid() -> None:
    from fedpeft.cli import _overrides, parser
    from fedpeft.common.config import load_config

    args = parser().parse_args(["simulate", "--lr-grid", "0.01", "0.001"])
    assert load_config(overrides=_overrides(args)).tuning.lr_grid == (0.01, 0.001)
    assert load_config(overrides=_overrides(parser().parse_args(["simulate"]))).tuning.lr_grid == (
        5e-3,
        1.67e-3,
        5e-4,
    )


def test_class_weight_and_prox_mu_flags_reach_the_sites_config() -> None:
    from fedpeft.cli import _overrides, parser
    from fedpeft.common.config import load_config

    args = parser().parse_args(["simulate", "--class-weight", "balanced", "--prox-mu", "0.01"])
    site = load_config(overrides=_overrides(args)).for_sites()
    assert (site.train.class_weight, site.train.prox_mu) == ("balanced", 0.01)
    with pytest.raises(ConfigError, match="train.prox_mu: must be 0"):
        load_config(overrides=_overrides(parser().parse_args(["simulate", "--prox-mu", "-1"])))


def test_schedule_flags_reach_the_sites_config_and_bad_ones_are_refused() -> None:
    from fedpeft.cli import _overrides, parser
    from fedpeft.common.config import load_config

    args = parser().parse_args(["simulate", "--warmup", "0.1", "--decay", "cosine"])
    site = load_config(overrides=_overrides(args)).for_sites()
    assert (site.train.warmup, site.train.decay) == (0.1, "cosine")
    with pytest.raises(ConfigError, match=r"train.warmup: must be in \[0, 1\)"):
        load_config(overrides=_overrides(parser().parse_args(["simulate", "--warmup", "1"])))
    with pytest.raises(ConfigError, match="train.decay: 'step' is not one of none, linear"):
        load_config(overrides={"train.decay": "step"})


def test_tune_lr_and_resume_are_refused_together(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = f"sqlite:///{tmp_path / 'none.db'}"
    assert main(["simulate", "--tune-lr", "--resume", "1", "--db", db]) == 2
    assert "--tune-lr starts new runs" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()  # refused before anything was opened


def test_baselines_are_stored_when_the_federated_comparison_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedpeft.baselines
    import fedpeft.simulate
    from fedpeft.baselines import BaselineOutcome
    from fedpeft.common.config import load_config
    from fedpeft.common.errors import KeyFileError

    db = f"sqlite:///{tmp_path / 'b.db'}"
    store = open_store(db)
    run_id = _new_run(store)
    store.close()
    trained = [BaselineOutcome("alone", "A", 30, 10, 0.7, 5.0, lr=5e-3, scores=(0.1, 0.9))]
    monkeypatch.setattr(fedpeft.baselines, "run_baselines", lambda *a, **k: trained)

    def no_key(*_: object) -> None:
        raise KeyFileError("no store key at /x/b.db.key")

    monkeypatch.setattr(fedpeft.simulate, "delivered_state", no_key)
    said: list[str] = []
    fedpeft.simulate.record_baselines(load_config(overrides={"db": db}), run_id, said.append)
    store = open_store(db)
    (kept,) = store.baselines(run_id)
    store.close()
    assert (kept.kind, kept.site, kept.auc, kept.lr, kept.diff) == ("alone", "A", 0.7, 5e-3, None)
    assert said == [
        f"warning: no federated − baseline differences for run {run_id} (the baselines are "
        "stored without them): no store key at /x/b.db.key"
    ]


def test_the_plot_of_many_sites_draws_them_as_one_band_and_a_median(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 20 sites: a legend entry each would overflow the figure; one faint line each instead,
    # under one legend entry, and the median site's AUC per round.
    import matplotlib.figure

    from fedpeft.report import plot_auc

    store = open_store(f"sqlite:///{tmp_path / 'many.db'}")
    run_id = _new_run(store)
    t = datetime(2026, 1, 1)
    for rnd in (1, 2):
        aucs = [0.5 + 0.02 * i + 0.05 * rnd for i in range(20)]
        store.add_round(
            run_id,
            RoundResult(rnd, t, t, 1.0, 0.8, 0.7, 0.5, 20, 0, True, val_loss=0.5),
            [SiteResult(rnd, f"S{i}", "evaluate", "ok", n=9, auc=a) for i, a in enumerate(aucs)],
            b"s",
        )
    drawn: dict[str, list[str]] = {}
    save = matplotlib.figure.Figure.savefig

    def saved(fig: matplotlib.figure.Figure, *args: object, **kw: object) -> None:
        ax = fig.axes[0]
        drawn["legend"] = [x.get_text() for x in ax.get_legend().get_texts()]
        drawn["median"] = [
            list(line.get_ydata()) for line in ax.get_lines() if line.get_label() == "median site"
        ]
        save(fig, *args, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", saved)
    path = plot_auc(store, run_id, tmp_path / "many.png")
    store.close()
    assert path.stat().st_size > 0
    assert drawn["legend"][:2] == ["each of 20 sites", "median site"]
    assert not any(label.startswith("S1") for label in drawn["legend"])
    assert drawn["median"] == [[pytest.approx(0.74), pytest.approx(0.79)]]


def _summary(db: str, run_id: int) -> Summary:
    store = open_store(db)
    try:
        return summarize(store, run_id)
    finally:
        store.close()


@pytest.mark.parametrize(
    ("config", "probe"),
    [
        ({"federation": {"rounds": 20}, "train": {"local_epochs": 1}}, 2),
        ({"federation": {"rounds": 2}, "train": {"local_epochs": 1}}, 0),  # the whole budget
        ({"federation": {"rounds": 20}, "train": {"local_epochs": 1}, "grid": [5e-3]}, 0),
        ({"federation": {"rounds": 20}, "train": {"local_epochs": 1}, "probe": 0}, 0),
        ({"federation": {"rounds": 20}, "train": {"local_epochs": 1}, "probe": None}, 0),
    ],
)
def test_the_report_knows_when_the_baselines_chose_by_probes(config: dict, probe: int) -> None:
    """As ``baselines.run_baselines`` decides: probes with a grid of several rates and a probe
    shorter than the budget; runs stored before the setting existed had none."""
    tuning = {"lr_grid": config.pop("grid", [5e-3, 5e-4]), "probe_epochs": config.pop("probe", 2)}
    if tuning["probe_epochs"] is None:
        del tuning["probe_epochs"]
    assert _probe_epochs(json.dumps({**config, "tuning": tuning})) == probe
