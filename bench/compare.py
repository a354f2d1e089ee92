#!/usr/bin/env python
"""fedpeft against full-model Flower, side by side in one script: the same sites, split, rounds,
local epochs, trainer and base model.

* ``fedpeft-fp32`` and ``fedpeft-int8``: ``fedpeft simulate``'s engine (LoRA, sealed and signed
  deltas, the store), with fp32 and int8 uploads.
* ``flower-full``: a plain Flower ServerApp and ClientApp (stock ``FedAvg`` of the message API,
  ``ArrayRecord`` of every parameter, nothing sealed) fine-tuning the whole model, each site
  with fedpeft's own local trainer on the same rows, so that what differs is what is shared and
  how.

Each variant runs in a process of its own (peak memory is per process), on Flower's Ray
simulation engine with one CPU per virtual site. Reported per variant: bytes each site uploads
per round (the reply as Flower serializes it), wall seconds per round (the simulation's, start
to end, over the rounds), peak resident memory of the coordinator process and of the largest
site process (each Ray worker records its own peak), and the macro AUC over the sites after the
last round (each site's AUC of the global model on its own test rows). Ratios are against
``flower-full`` measured in the same run of this script.

    .venv/bin/python bench/compare.py [--rounds 3] [--local-epochs 1] [--seed 0]

Run it on an otherwise idle machine; the full model takes several minutes a round on 2 CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

VARIANTS = ("fedpeft-fp32", "fedpeft-int8", "flower-full")
RSS_DIR_ENV = "FEDPEFT_BENCH_RSS_DIR"  # where each site process writes its peak memory
RESULT_ENV = "FEDPEFT_BENCH_RESULT"  # where the stock ServerApp writes what it measured


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _record_site_peak() -> None:
    folder = os.environ.get(RSS_DIR_ENV)
    if folder:
        Path(folder, f"{os.getpid()}.mb").write_text(f"{_peak_mb():.1f}")


def _site_peak(folder: Path) -> float:
    return max((float(p.read_text()) for p in folder.glob("*.mb")), default=float("nan"))


def _config(args: argparse.Namespace, db: str, **more: Any) -> Any:
    from fedpeft.common.config import load_config

    return load_config(
        overrides={
            "data.dataset": args.dataset,
            "federation.rounds": args.rounds,
            "train.local_epochs": args.local_epochs,
            "seed": args.seed,
            "db": db,
            **more,
        }
    )


# --- fedpeft --------------------------------------------------------------------------------


def _measured_fedpeft_app() -> Any:
    """fedpeft's ClientApp, each message followed by the process's peak memory."""
    from flwr.clientapp import ClientApp

    from fedpeft.client.app import STAGES, handle_in_context

    client = ClientApp()

    def handle(msg: Any, context: Any) -> Any:
        reply = handle_in_context(msg, context)
        _record_site_peak()
        return reply

    client.train()(handle)
    client.evaluate()(handle)
    for stage in STAGES:
        client.query(stage.split(".", 1)[1])(handle)
    return client


def stored_run(db: str, run_id: int) -> tuple[list[Any], list[Any]]:
    """Run ``run_id``'s rounds and per-site results, read back from the store ``db``."""
    from fedpeft.server.store import open_store

    store = open_store(db, create=False)
    try:
        return store.rounds(run_id), store.site_results(run_id)
    finally:
        store.close()


def run_fedpeft(args: argparse.Namespace, codec: str, work: Path) -> dict[str, float]:
    from fedpeft.simulate import run_simulation

    db = f"sqlite:///{work / 'runs.db'}"
    cfg = _config(args, db, **{"federation.codec": codec})
    started = time.perf_counter()
    result = run_simulation(
        cfg,
        client_app=_measured_fedpeft_app(),
        progress=lambda _: None,
        store_key_file=None,
    )
    seconds = time.perf_counter() - started
    rounds, results = stored_run(db, result.run_id)
    last = max(r.round for r in rounds)
    aucs = [r.auc for r in results if r.phase == "evaluate" and r.round == last and r.auc]
    uploads = [r.bytes_up for r in results if r.phase == "train" and r.status == "ok"]
    return {
        "bytes_up": sum(uploads) / len(uploads),
        "seconds_per_round": seconds / len(rounds),
        "macro_auc": sum(aucs) / len(aucs),
    }


# --- stock Flower, full model ---------------------------------------------------------------

_SESSION: dict[str, Any] = {}


def _stock_site(cfg: Any, index: int) -> dict[str, Any]:
    """The virtual site's rows, split and tokenized exactly as fedpeft's site does, and the full
    model; once per process."""
    if index not in _SESSION:
        from fedpeft.client.trainer import encode_site
        from fedpeft.common.data import load_sites, split_site
        from fedpeft.common.methods import build_model
        from fedpeft.common.model import load_tokenizer

        site = load_sites(cfg.data)[index]
        split = split_site(site, cfg.seed, cfg.data.test_fraction, cfg.train.val_fraction)
        rows = encode_site(load_tokenizer(cfg.model), site, split, cfg.model.max_length)
        model = build_model(cfg.model, cfg.method, cfg.train.dropout, cfg.seed)
        _SESSION[index] = {"name": site.name, "model": model, **rows}
    return _SESSION[index]


def _stock_apps(cfg: Any, n_sites: int) -> tuple[Any, Any]:
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    from fedpeft.client.trainer import evaluate, train_local
    from fedpeft.common.methods import build_model, load_shared_state, shared_state
    from fedpeft.common.records import message_nbytes

    cpu = torch.device("cpu")
    client = ClientApp()

    def load(msg: Message, context: Context) -> dict[str, Any]:
        session = _stock_site(cfg, int(context.node_config["partition-id"]))
        state = msg.content["arrays"].to_torch_state_dict()
        load_shared_state(session["model"], dict(state))
        return session

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        session = load(msg, context)
        rnd = int(msg.content["config"]["server-round"])
        train_local(
            session["model"],
            session["train"],
            session["val"],
            cfg.train,
            cfg.train.local_epochs,
            cpu,
            cfg.seed * 1000 + rnd,
        )
        arrays = ArrayRecord(OrderedDict(shared_state(session["model"])))
        reply = Message(RecordDict({"arrays": arrays}), reply_to=msg)
        size = message_nbytes(reply)
        reply.content["metrics"] = MetricRecord(
            {"num-examples": len(session["train"]), "bytes-up": size}
        )
        _record_site_peak()
        return reply

    @client.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        session = load(msg, context)
        ev = evaluate(session["model"], session["test"], cpu)
        _record_site_peak()
        metrics = MetricRecord({"num-examples": len(session["test"]), "auc": ev.auc})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    measured: dict[str, list[float]] = {"macro_auc": [], "bytes_up": []}

    def train_metrics(records: list[RecordDict], _key: str) -> MetricRecord:
        sizes = [float(r["metrics"]["bytes-up"]) for r in records]  # type: ignore[arg-type]
        measured["bytes_up"] += sizes
        return MetricRecord({"bytes-up": sum(sizes) / len(sizes)})

    def evaluate_metrics(records: list[RecordDict], _key: str) -> MetricRecord:
        aucs = [float(r["metrics"]["auc"]) for r in records]  # type: ignore[arg-type]
        measured["macro_auc"].append(sum(aucs) / len(aucs))
        return MetricRecord({"macro-auc": measured["macro_auc"][-1]})

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        model = build_model(cfg.model, cfg.method, cfg.train.dropout, cfg.seed)
        strategy = FedAvg(
            min_train_nodes=n_sites,
            min_evaluate_nodes=n_sites,
            min_available_nodes=n_sites,
            train_metrics_aggr_fn=train_metrics,
            evaluate_metrics_aggr_fn=evaluate_metrics,
        )
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(OrderedDict(shared_state(model))),
            num_rounds=cfg.federation.rounds,
            train_config=ConfigRecord({}),
        )
        Path(os.environ[RESULT_ENV]).write_text(json.dumps(measured))

    return server, client


def run_flower_full(args: argparse.Namespace, work: Path) -> dict[str, float]:
    from flwr.simulation import run_simulation

    from fedpeft.common.data import load_sites

    cfg = _config(args, f"sqlite:///{work / 'unused.db'}", **{"method.name": "full"})
    n_sites = len(load_sites(cfg.data))
    server, client = _stock_apps(cfg, n_sites)
    os.environ[RESULT_ENV] = str(work / "flower.json")
    started = time.perf_counter()
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=n_sites,
        backend_config={  # as fedpeft simulate's: one CPU per virtual site
            "client_resources": {"num_cpus": 1, "num_gpus": 0},
            "init_args": {
                "address": "local",
                "num_cpus": os.cpu_count() or 1,
                "include_dashboard": False,
            },
        },
    )
    seconds = time.perf_counter() - started
    measured = json.loads((work / "flower.json").read_text())
    return {
        "bytes_up": sum(measured["bytes_up"]) / len(measured["bytes_up"]),
        "seconds_per_round": seconds / cfg.federation.rounds,
        "macro_auc": measured["macro_auc"][-1],
    }


def one(args: argparse.Namespace) -> None:
    """Run one variant in this process and print its numbers as JSON."""
    import logging

    logging.getLogger("flwr").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="fedpeft-compare-") as tmp:
        work = Path(tmp)
        rss = work / "rss"
        rss.mkdir()
        os.environ[RSS_DIR_ENV] = str(rss)
        if args.one == "flower-full":
            numbers = run_flower_full(args, work)
        else:
            numbers = run_fedpeft(args, args.one.removeprefix("fedpeft-"), work)
        numbers["coordinator_peak_mb"] = _peak_mb()
        numbers["site_peak_mb"] = _site_peak(rss)
    print("RESULT " + json.dumps(numbers), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="heart")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args)
        return
    rows = {}
    for variant in args.variants:
        started = time.perf_counter()
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                variant,
                "--dataset",
                args.dataset,
                "--rounds",
                str(args.rounds),
                "--local-epochs",
                str(args.local_epochs),
                "--seed",
                str(args.seed),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
        )
        lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            sys.exit(f"{variant} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        rows[variant] = json.loads(lines[-1][7:])
        print(f"{variant}: done in {time.perf_counter() - started:.0f} s", flush=True)
    ref = rows.get("flower-full")
    print(
        f"\n{args.dataset}, {args.rounds} rounds x {args.local_epochs} local epoch(s), seed "
        f"{args.seed}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}\n"
    )
    print(
        "| variant | bytes up / site / round | s / round | coordinator peak MB "
        "| largest site peak MB | macro AUC (last round) |"
    )
    print("|---|---|---|---|---|---|")
    for variant, r in rows.items():
        ratio = ""
        if ref and variant != "flower-full":
            ratio = (
                f" ({ref['bytes_up'] / r['bytes_up']:.0f}x fewer bytes, "
                f"{ref['seconds_per_round'] / r['seconds_per_round']:.1f}x faster)"
            )
        print(
            f"| {variant}{ratio} | {r['bytes_up']:,.0f} | {r['seconds_per_round']:.1f} | "
            f"{r['coordinator_peak_mb']:.0f} | {r['site_peak_mb']:.0f} | {r['macro_auc']:.3f} |"
        )


if __name__ == "__main__":
    main()
