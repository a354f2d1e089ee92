"""The ``fedpeft`` command: one entry point, a subcommand per role.

Parse arguments -> build the config (file, then flags, in one place) -> run -> report.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpeft import __version__
from fedpeft.common.config import (
    DECAYS,
    EXPORT_QUANTIZE,
    LOWER_RANKS,
    PERSONAL_PARTS,
    QUANTIZE,
    SERVER_OPTIMIZERS,
    MethodConfig,
    RunConfig,
)
from fedpeft.common.environment import QUIET
from fedpeft.common.errors import FedpeftError
from fedpeft.common.methods import ExportFormat, specs

if TYPE_CHECKING:
    from fedpeft.simulate import SimulationResult

DASHBOARD_TOKEN_ENV = "FEDPEFT_DASHBOARD_TOKEN"
STORE_KEY_HELP = (
    "key file for the encrypted checkpoints in the store (default: $FEDPEFT_STORE_KEY_FILE, "
    "$FEDPEFT_STORE_KEY, or DB.key beside a SQLite store, made on first use)"
)


def _listing(names: list[str], last: str = "and") -> str:
    """``a, b and c``."""
    return f" {last} ".join([", ".join(names[:-1]), names[-1]]) if len(names) > 1 else names[0]


def method_help() -> str:
    """``--method``'s help: every registered method, the default marked, and what each trains."""
    default = MethodConfig().name
    names = [s.name + (" (default)" if s.name == default else "") for s in specs()]
    shares = "; ".join(f"{s.name}: {s.shares}" for s in specs())
    return (
        f"fine-tuning method: {_listing(names, 'or')}; its own settings go in the config file's "
        f"[method.NAME] table. What each trains and shares besides the classification head: "
        f"{shares}"
    )


def export_description() -> str:
    """``fedpeft export``'s description: which methods export in which format."""

    def having(export: ExportFormat) -> str:
        return _listing([s.name for s in specs() if s.export is export])

    return (
        "Write the global state a run delivered (the round with the lowest validation loss) to "
        f"a new folder: for {having(ExportFormat.PEFT)} a peft adapter that "
        f"peft.PeftModel.from_pretrained(base, OUT) loads; for {having(ExportFormat.STATE)} a "
        "safetensors file that fedpeft.common.export.load_export(OUT) loads. "
        "fedpeft-export.json beside it records the run, round, method and base-model fingerprint; "
        "README.md is the model card (Hugging Face format): base model, lineage (the sites whose "
        "updates made each round, each site's data fingerprint), metrics with intervals, "
        "privacy settings, software versions."
    )


def _add_mlflow_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--mlflow",
        metavar="URI",
        help=f"also log {what} to MLflow (needs `pip install 'fedpeft[mlflow]'`): the run's "
        "config as params, each round's pooled, macro and per-site AUC, losses and bytes as "
        "metrics, the exported adapter and its model card as artifacts. URI: an MLflow server "
        "(http://...), a database (sqlite:///mlflow.db; artifacts beside it) or a folder (MLflow's "
        "file store). Everything logged is what the coordinator already holds.",
    )
    p.add_argument(
        "--mlflow-experiment", default="fedpeft", help="MLflow experiment name (fedpeft)"
    )


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="run config TOML (flags override its values)")
    p.add_argument(
        "--dataset",
        help="heart | pima | medpar | synthetic[:N] (N sites of generated notes, default 100, "
        "for scale runs; not patient data) | PATH to a folder with one data file per site",
    )
    p.add_argument("--method", help=method_help())
    p.add_argument(
        "--full-layers",
        type=int,
        metavar="N",
        help="hybrid fine-tuning with lora: the top N encoder layers train fully (every weight, "
        "shared), LoRA the layers below ([method.lora] full_layers; default 0). One MiniLM "
        "layer is 7.1 MB of fp32 upload a round",
    )
    p.add_argument(
        "--rounds",
        type=int,
        help="federated rounds (with --patience: at most). Default: the data set's: pima, "
        "medpar and folders up to 20 with --patience 3 (to convergence); heart (the default "
        "data set) and synthetic 5, every one run (heart's baselines would take over 12 "
        "minutes at 20). Given alone (flag or config file), exactly that many rounds",
    )
    p.add_argument(
        "--patience",
        type=int,
        help="end the run once the sites' validation loss has not improved for this many rounds "
        "(0: run every round; default 3 on pima, medpar and folders, 0 on heart and synthetic "
        "or when the rounds are given or a schedule is)",
    )
    p.add_argument(
        "--schedule",
        type=_stage,
        nargs="+",
        metavar="PART:ROUNDS[:LR]",
        help="stages ([[schedule]]): for ROUNDS rounds the sites train PART of the shared "
        "parameters at LR (default --lr, or the method's own rate): all, head (the "
        "classification head alone), method (the method's own without the head), mlm (the "
        "method's own on the notes' text, no labels: see --dapt-rounds), or another "
        "method's name (its parameters and the head: e.g. --method lora --schedule prompt:3 "
        "lora:5 trains prompt tuning, then LoRA, in one model; one of prompt, prefix with one of "
        "lora, ia3). Each stage starts where the one before ended; the run's rounds are the "
        "stages' sum, e.g. --schedule head:2:0.01 all:5 (linear probing, then fine-tuning). "
        "Not with --patience",
    )
    p.add_argument(
        "--dapt-rounds",
        type=int,
        metavar="N",
        help="domain-adaptive pretraining first: for N rounds the sites train the method's "
        "parameters with masked-language modelling on their notes' text (training rows only, "
        "no labels, never test rows), aggregated like any round; the run's stages (or its "
        "--rounds) then fine-tune from there, every round run (no --patience: on pima, medpar "
        "or a folder that is all 20 default rounds, and the baselines' 20 epochs). The same as "
        "a first stage mlm:N in --schedule",
    )
    p.add_argument("--sites-per-round", type=int, help="sites sampled per round (0 = all)")
    p.add_argument("--min-sites", type=int, help="valid updates a round needs to be applied")
    p.add_argument("--local-epochs", type=int, help="local epochs per round at each site")
    p.add_argument("--batch-size", type=int, help="local batch size")
    p.add_argument(
        "--codec",
        choices=("fp32", "fp16", "int8"),
        help="how sites encode their deltas before sealing (default fp32)",
    )
    p.add_argument("--lr", type=float, help="AdamW learning rate (default: the method's own)")
    p.add_argument(
        "--class-weight",
        choices=("none", "balanced"),
        help="balanced: each class weighs in the training loss inversely to its share of a "
        "site's training rows, so a rare outcome counts (default none)",
    )
    p.add_argument(
        "--prox-mu",
        type=float,
        metavar="MU",
        help="FedProx: local training adds MU/2 ||w - w_global||^2, keeping each site's update "
        "near the global state (default 0: FedAvg)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        metavar="SHARE",
        help="learning-rate warm-up over this share of the training budget (default 0: none)",
    )
    p.add_argument(
        "--decay",
        choices=DECAYS,
        help="learning-rate decay toward 0 over the training budget (default none)",
    )
    p.add_argument(
        "--personalize",
        choices=PERSONAL_PARTS,
        help="after the run each site fine-tunes this part of the global state on its own rows "
        "and reports global vs personalized AUC; the part never leaves the site (default none)",
    )
    p.add_argument(
        "--personalize-epochs",
        type=int,
        metavar="N",
        help="most epochs of that fine-tuning, early-stopped on the site's validation rows (5)",
    )
    p.add_argument(
        "--server-optimizer",
        choices=SERVER_OPTIMIZERS,
        help="how the round's aggregated update moves the global state: fedavg adds it times "
        "--server-lr; fedadam / fedyogi (Reddi et al. 2021) step with its moments "
        "([federation] server_beta1, server_beta2, server_tau); default fedavg",
    )
    p.add_argument(
        "--server-lr",
        type=float,
        metavar="ETA",
        help="the server's learning rate (default 1: plain FedAvg; about 1e-2 for fedadam)",
    )
    p.add_argument("--seed", type=int, help="seed for splits, init, sampling and training")
    p.add_argument("--db", help="SQLAlchemy URL of the run store (default sqlite:///fedpeft.db)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="training device")
    dp = p.add_argument_group(
        "client-level differential privacy ([federation.dp]; any of these turns it on)",
        "Each site clips its update to --dp-clip; the coordinator averages the clipped updates "
        "with equal weights and adds Gaussian noise of sigma * clip to their sum (central DP: "
        "the coordinator is trusted with the updates); the run's epsilon at --dp-delta is "
        "recorded after every round and shown by `fedpeft report`.",
    )
    dp.add_argument("--dp-noise", type=float, metavar="SIGMA", help="noise multiplier sigma")
    dp.add_argument(
        "--dp-epsilon",
        type=float,
        metavar="EPSILON",
        help="privacy budget: the run stops before a round that would pass it; without "
        "--dp-noise, sigma is calibrated to reach it after --rounds rounds (the maximum: with "
        "the default 20 of pima, medpar or a folder, give --rounds for less noise a round)",
    )
    dp.add_argument("--dp-clip", type=float, metavar="C", help="L2 clip of each update (1.0)")
    dp.add_argument("--dp-delta", type=float, metavar="DELTA", help="delta of (epsilon, delta)")
    p.add_argument(
        "--secure-aggregation",
        action="store_true",
        default=None,
        help="sites upload their clipped updates masked ([federation.secure_aggregation], "
        "SecAgg): the coordinator learns only each round's sum, in three more message "
        "exchanges a round",
    )
    p.add_argument(
        "--histogram-bins",
        type=int,
        metavar="N",
        help="bins of each site's score histograms, from which the pooled AUC is computed "
        "(2..1000, default 1000): fewer tell the coordinator less of each test row's score",
    )


def _stage(text: str) -> dict[str, Any]:
    """``--schedule``'s PART:ROUNDS[:LR] -> one ``[[schedule]]`` table; PART is what trains
    (all, head, method) or a method's name (its parameters and the head)."""
    from fedpeft.common.methods import method_names

    parts = text.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        part = {"method": parts[0]} if parts[0] in method_names() else {"trains": parts[0]}
        stage: dict[str, Any] = {**part, "rounds": int(parts[1])}
        if len(parts) == 3:
            stage["lr"] = float(parts[2])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected PART:ROUNDS[:LR], e.g. head:2:0.01, all:5 or prompt:3"
        ) from None
    return stage


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """CLI flags -> dotted config keys. The one place where flags override file values."""
    return {
        "data.dataset": args.dataset,
        "method.name": args.method,
        "method.lora.full_layers": args.full_layers,
        "federation.rounds": args.rounds,
        "federation.patience": args.patience,
        "schedule": args.schedule,
        "federation.sites_per_round": args.sites_per_round,
        "federation.min_sites": args.min_sites,
        "train.local_epochs": args.local_epochs,
        "train.batch_size": args.batch_size,
        "train.lr": args.lr,
        "federation.codec": args.codec,
        "seed": args.seed,
        "db": args.db,
        "device": args.device,
        "federation.secure_aggregation.enabled": args.secure_aggregation,
        "federation.histogram_bins": args.histogram_bins,
        "train.class_weight": args.class_weight,
        "train.prox_mu": args.prox_mu,
        "train.warmup": args.warmup,
        "train.decay": args.decay,
        "federation.personalize": args.personalize,
        "federation.personalize_epochs": args.personalize_epochs,
        "federation.server_optimizer": args.server_optimizer,
        "federation.server_lr": args.server_lr,
        "tuning.lr_grid": getattr(args, "lr_grid", None),  # simulate's only
        "tuning.probe_epochs": getattr(args, "probe_epochs", None),
        "site_lora_ranks": getattr(args, "site_lora_ranks", None),
        "site_quantize": getattr(args, "site_quantize", None),
        "federation.lower_ranks": getattr(args, "lower_ranks", None),
        **_dp_overrides(args),
    }


def _dp_overrides(args: argparse.Namespace) -> dict[str, Any]:
    given = {
        "federation.dp.noise_multiplier": args.dp_noise,
        "federation.dp.target_epsilon": args.dp_epsilon,
        "federation.dp.clip": args.dp_clip,
        "federation.dp.delta": args.dp_delta,
    }
    if all(v is None for v in given.values()):
        return {}
    return {"federation.dp.enabled": True, **given}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedpeft",
        description="Federated parameter-efficient fine-tuning for hospitals: the base model is "
        "shared, each site trains and uploads only a small delta of PEFT parameters.",
    )
    p.add_argument("--version", action="version", version=f"fedpeft {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    sim = sub.add_parser(
        "simulate",
        help="run a federated fine-tuning with many virtual sites on this machine",
        description="Run the federated loop with Flower's simulation engine (one virtual site per "
        "data file or hospital), then the baselines (TF-IDF + logistic regression alone and "
        "pooled, the same method alone and centralized), and print per-site "
        "AUC. With no options: all-MiniLM-L6-v2 + LoRA on the UCI heart-disease records of four "
        "real hospitals.",
    )
    _add_run_options(sim)
    sim.add_argument(
        "--baselines",
        choices=("all", "alone", "centralized", "tfidf", "none"),
        default="all",
        help="which baselines to train after the federated run (default all; tfidf: TF-IDF + "
        "logistic regression, each site alone and all sites pooled, seconds)",
    )
    sim.add_argument("--no-baselines", action="store_true", help="same as --baselines none")
    sim.add_argument(
        "--tune-lr",
        action="store_true",
        help="the federated run picks its learning rate too: one federated run per rate of the "
        "grid (so the grid's size times the time), the lowest validation loss of the sites' "
        "delivered round chosen; the report then shows that run and the runs it was chosen from",
    )
    sim.add_argument(
        "--lr-grid",
        type=float,
        nargs="+",
        metavar="RATE",
        help="learning rates the alone and centralized baselines (and, with --tune-lr, the "
        "federated run) choose from, each by its lowest validation loss ([tuning] lr_grid; "
        "default: the run's rate, a third and a tenth "
        "of it; one rate = no choice). Each rate trains one more model per baseline",
    )
    sim.add_argument(
        "--site-lora-ranks",
        type=int,
        nargs="+",
        metavar="R",
        help="sites of different capacity (LoRA only): site i trains LoRA at rank R_i at most, "
        "its first R_i components, and sends zeros beyond them; each component is averaged "
        "over the sites that trained it, and the delivered adapter keeps the run's rank "
        "(site_lora_ranks; 0 or a site past the list: the run's rank, method.lora.r, 8 by "
        "default; not with secure aggregation)",
    )
    sim.add_argument(
        "--lower-ranks",
        choices=LOWER_RANKS,
        help="how FedAvg takes LoRA updates of sites that trained a lower rank: rank-aware "
        "averages each component over the sites that trained it; zero-padding counts the "
        "other sites' zeros ([federation] lower_ranks; default rank-aware)",
    )
    sim.add_argument(
        "--site-quantize",
        choices=QUANTIZE,
        nargs="+",
        metavar="Q",
        help="how site i holds the frozen base model: none, int8 (every linear layer and the "
        "word embeddings in int8, a quarter of the memory) or nf4 (the linear layers in 4-bit "
        "NormalFloat, QLoRA's base, the embeddings int8; needs fedpeft[nf4]); what is trained "
        "and shared stays fp32 and unchanged; not with --method full. site_quantize; a site "
        "past the list: none",
    )
    sim.add_argument(
        "--probe-epochs",
        type=int,
        metavar="K",
        help="baselines compare the grid's rates after their first K epochs and train only the "
        "chosen rate for the whole budget ([tuning] probe_epochs; default 0: every rate "
        "trains the whole budget and the best is kept, the grid's size times the time). Faster, "
        "but a probe often picks another rate than whole runs, and a weaker reference",
    )
    sim.add_argument(
        "--plot", type=Path, default=None, help="PNG of AUC per round (default fedpeft-run-ID.png)"
    )
    sim.add_argument("--cpus", type=int, help="CPUs for the simulation (default: all)")
    sim.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        help="run the virtual sites on this running Ray cluster (`ray start --head` on one "
        "machine, `ray start --address` on the others) instead of a private one here; every "
        "node needs the same fedpeft install and the data set at the same path, and must "
        "reach this machine's temporary folder (docs/architecture.md, Simulation on a Ray "
        "cluster)",
    )
    sim.add_argument(
        "--resume",
        type=int,
        metavar="RUN_ID",
        help="take up this interrupted or failed run of the store (--db) after its last "
        "recorded round, with its own config (other config flags and files are ignored)",
    )
    sim.add_argument("--store-key-file", type=Path, help=STORE_KEY_HELP)
    _add_mlflow_options(sim, "the finished run (its delivered round exported)")
    sim.add_argument("-v", "--verbose", action="store_true", help="show Flower's own log")

    dis = sub.add_parser(
        "distill",
        help="train a smaller student of a finished run across the sites (simulation)",
        description="Distill a finished run (the teacher: its delivered round) into a student: "
        "the base model with fewer encoder layers (evenly spaced, the top one kept, each "
        "initialized from the base's own) and a PEFT method, trained as a new federated run in "
        "simulation on the teacher's data set and sites. Each site computes the teacher's "
        "logits on its own training rows and trains the student on alpha x the soft labels' "
        "KL divergence at --temperature (times its square) plus (1 - alpha) x the hard labels' "
        "cross-entropy; only the student's delta leaves, sealed, as in any round. Prints the "
        "teacher and the student side by side: layers, parameters, macro AUC and the share "
        "retained, inference time per batch measured on this machine. Export the student with "
        "`fedpeft export --run STUDENT`.",
    )
    dis.add_argument("--run", type=int, required=True, help="the teacher: a finished run's id")
    dis.add_argument(
        "--layers",
        type=int,
        metavar="K",
        help="the student's encoder layers (default: half the base's, rounded up: 3 of MiniLM's 6)",
    )
    dis.add_argument(
        "--temperature", type=float, default=2.0, help="softmax temperature of the soft labels (2)"
    )
    dis.add_argument(
        "--alpha",
        type=float,
        default=0.5,
        help="weight of the soft labels' loss, the hard labels' taking 1 - alpha (0.5; 0 trains "
        "the student on the hard labels alone, with no teacher's help)",
    )
    dis.add_argument("--method", help="the student's PEFT method (default: the teacher's)")
    dis.add_argument(
        "--rounds",
        type=int,
        help="federated rounds, every one run (default: the teacher's rounds and patience)",
    )
    dis.add_argument("--lr", type=float, help="learning rate (default: the teacher's)")
    dis.add_argument(
        "--local-epochs", type=int, help="local epochs per round (default: the teacher's)"
    )
    dis.add_argument(
        "--db", default="sqlite:///fedpeft.db", help="SQLAlchemy URL of the store (must exist)"
    )
    dis.add_argument("--store-key-file", type=Path, help=STORE_KEY_HELP)
    dis.add_argument("--cpus", type=int, help="CPUs for the simulation (default: all)")
    dis.add_argument(
        "--time-batch",
        type=int,
        default=32,
        metavar="N",
        help="rows per batch of the side-by-side inference timing (32; 0 skips it)",
    )
    dis.set_defaults(ray_address=None, verbose=False)

    rep = sub.add_parser("report", help="print the summary table of a finished run from the store")
    rep.add_argument("--run", type=int, help="run id (default: the latest)")
    rep.add_argument(
        "--db", default="sqlite:///fedpeft.db", help="SQLAlchemy URL of the store (must exist)"
    )
    rep.add_argument("--plot", type=Path, help="also write the AUC-per-round PNG here")
    rep.add_argument("--list", action="store_true", help="list the runs in the store")
    rep.add_argument(
        "--format",
        choices=("text", "json", "md", "html"),
        default="text",
        help="text: the summary table (default); json, md, html: the run's model card with its "
        "lineage (what `fedpeft export` writes as README.md), as data, Markdown or a page",
    )

    dash = sub.add_parser(
        "dashboard",
        help="a read-only web view of the store: runs, rounds, sites, two runs compared",
        description="Serve a read-only web view of the store: the runs; a run's rounds, AUC per "
        "round per site with intervals, bytes per site per round, rejections, privacy settings "
        "and its config as the sites saw it (a running run's page updates as rounds land); a "
        "site across runs; two runs compared; each run's model card. Pages load nothing from the "
        "internet. It listens "
        "on 127.0.0.1 unless --host says otherwise; any other address needs an access token "
        "(--token-file, or the environment variable " + DASHBOARD_TOKEN_ENV + "), which every "
        "request must then carry (open http://HOST:PORT/?token=TOKEN once; a cookie keeps it).",
    )
    dash.add_argument(
        "--db", default="sqlite:///fedpeft.db", help="SQLAlchemy URL of the store (must exist)"
    )
    dash.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    dash.add_argument("--port", type=int, default=8050, help="port to listen on (8050)")
    dash.add_argument(
        "--token-file",
        type=Path,
        help="a file holding the access token (required for a non-loopback --host)",
    )

    exp = sub.add_parser(
        "export",
        help="write a run's final global state for peft's own loader (or safetensors)",
        description=export_description(),
    )
    exp.add_argument("--run", type=int, help="run id (default: the latest)")
    exp.add_argument("--out", type=Path, required=True, help="new or empty folder to write")
    exp.add_argument("--round", type=int, help="export this round instead of the delivered one")
    exp.add_argument(
        "--quantize",
        choices=EXPORT_QUANTIZE,
        default="none",
        help="int8: also write fedpeft_int8.safetensors, the whole model for inference with its "
        "base's linear layers and word embeddings in int8 (a quarter of the fp32 bytes); load "
        "it with fedpeft.common.export.load_export(OUT, quantized=True). Not for method full",
    )
    exp.add_argument(
        "--db", default="sqlite:///fedpeft.db", help="SQLAlchemy URL of the store (must exist)"
    )
    exp.add_argument("--store-key-file", type=Path, help=STORE_KEY_HELP)
    _add_mlflow_options(exp, "the exported run")

    site = sub.add_parser(
        "site", help="a hospital site: its keys, its SuperNode, its ledger"
    ).add_subparsers(dest="site_command", required=True)
    enr = site.add_parser(
        "enroll",
        help="make this site's identity key (ECDSA P-384, OpenSSH format)",
        description="Write NAME.key (private, 0600: it never leaves the site) and NAME.pub into "
        "--out, and print the public key and its fingerprint. Send NAME.pub to the coordinator "
        "operator, who registers it with `fedpeft coordinator add-site`. The same key "
        "authenticates the site's SuperNode to Flower and signs its deltas.",
    )
    enr.add_argument("--name", required=True, help="the site's name, as the coordinator knows it")
    enr.add_argument("--out", type=Path, default=Path("keys"), help="folder (default ./keys)")
    sst = site.add_parser(
        "start",
        help="start this site's SuperNode and worker: it dials the coordinator and trains on "
        "local data",
        description="Check the site's CA certificate, keys and data file, wait for the "
        "coordinator (retrying with backoff and saying so), then run Flower's SuperNode with "
        "the data path and keys as node config, and fedpeft's site worker, which answers its "
        "messages with the ClientApp installed here (restarted if it dies; an app the "
        "coordinator ships is never installed or run). Records never leave the site: only "
        "sealed deltas and metrics do. Runs in the foreground until interrupted.",
    )
    sst.add_argument("--config", type=Path, required=True, help="site.toml")
    sst.add_argument("--insecure", action="store_true", help="allow a start without TLS")
    # Overrides the ClientApps of the site's [policy] apps; for tests with a site-installed
    # variant of fedpeft's ClientApp.
    sst.add_argument("--allow-app", action="append", default=None, help=argparse.SUPPRESS)
    # Stock Flower's flwr-clientapp per message, for bench/worker.py only: it installs and runs
    # whatever app the coordinator ships.
    sst.add_argument("--per-message-process", action="store_true", help=argparse.SUPPRESS)
    apr = site.add_parser(
        "approve",
        help="approve a run's manifest: with approved_runs_only, the site trains for no other run",
        description="Print a run manifest (`fedpeft run manifest` writes it at the coordinator): "
        "the method, the base model, the config hash and exactly what leaves this site each "
        "round; ask for confirmation (unless --yes), then append it with the time of approval "
        "to the approvals file of site.toml's [policy] table (default approved-runs.jsonl "
        "beside it, 0600). A site whose policy sets approved_runs_only = true trains only for "
        "runs whose config hash it has approved.",
    )
    apr.add_argument("manifest", type=Path, help="the run manifest (JSON)")
    apr.add_argument("--config", type=Path, required=True, help="site.toml")
    apr.add_argument("--yes", action="store_true", help="approve without asking")
    led = site.add_parser(
        "ledger",
        help="print or verify this site's ledger of tasks received and uploads sent",
        description="Print the site ledger as a table: one line per task the site received, "
        "upload it sent or task it refused (time, run token, round, message type, method, "
        "codec, bytes, outcome, reason), then whether its hash chain is intact. It holds hashes, "
        "sizes and names only. Exits 0 if the chain is intact, 1 naming the first bad entry "
        "(edited, deleted, moved or torn).",
    )
    where = led.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--config",
        type=Path,
        help="site.toml: the ledger its [site] table names (default ledger.jsonl beside it)",
    )
    where.add_argument("--ledger", type=Path, help="the ledger file itself")
    what = led.add_mutually_exclusive_group()
    what.add_argument(
        "--verify",
        action="store_true",
        help="only check the chain: 'ledger PATH: N entries, chain intact' and exit 0, or name "
        "the first bad entry and exit 1",
    )
    what.add_argument(
        "--head",
        action="store_true",
        help="print the hash of the last entry, to keep somewhere else (another machine, the DPO's "
        "records): it shows later whether the whole file was rewritten (see --expect-head)",
    )
    led.add_argument(
        "--expect-head",
        metavar="HASH",
        type=_sha256_arg,
        help="a head printed earlier by --head: the chain must still contain it, or the file "
        "was rewritten or cut short since",
    )

    coord = sub.add_parser("coordinator", help="the coordinator's keys and register of sites")
    csub = coord.add_subparsers(dest="coordinator_command", required=True)
    init = csub.add_parser(
        "init",
        help="make the coordinator's identity key (signs every global state)",
        description="Write coordinator.key (0600) and coordinator.pub into --out. Give "
        "coordinator.pub to every site: they refuse a global state it did not sign.",
    )
    init.add_argument("--out", type=Path, default=Path("keys"), help="folder (default ./keys)")
    sites_help = "the register of sites (default ./sites.txt)"
    add = csub.add_parser(
        "add-site",
        help="register a site's public key: only registered sites' deltas are accepted",
        description="Register a site by name with its public key (the OpenSSH line, or the "
        "path of its .pub file). Refuses a name or key that is already registered.",
    )
    add.add_argument("name")
    add.add_argument("pubkey", help="'ecdsa-sha2-nistp384 AAAA...' or the path of NAME.pub")
    add.add_argument("--sites", type=Path, default=Path("sites.txt"), help=sites_help)
    flower_help = (
        "the coordinator's config: also update the running SuperLink's allow-list, and use "
        "its sites file"
    )
    add.add_argument("--config", type=Path, help=flower_help)
    rm = csub.add_parser("remove-site", help="unregister a site: its deltas are refused from now")
    rm.add_argument("name")
    rm.add_argument("--sites", type=Path, default=Path("sites.txt"), help=sites_help)
    rm.add_argument("--config", type=Path, help=flower_help)
    start = csub.add_parser(
        "start",
        help="start the coordinator: Flower's SuperLink with TLS and site authentication",
        description="Start Flower's SuperLink as coordinator.toml says (see fedpeft/settings.py "
        "for every setting): the Fleet API (gRPC, TLS) is the only port sites reach; the "
        "Control and Runtime APIs stay on the api_address (loopback by default); state in a "
        "SQLite file so a restart keeps it; no runtime dependency installation. Each run's "
        "ServerApp reads the coordinator's key, the registered sites and the store key from "
        "here. Runs in the foreground until interrupted.",
    )
    start.add_argument("--config", type=Path, required=True, help="coordinator.toml")
    start.add_argument("--insecure", action="store_true", help="allow a start without TLS")

    run = sub.add_parser("run", help="federated runs on a running coordinator").add_subparsers(
        dest="run_command", required=True
    )
    rstart = run.add_parser(
        "start",
        help="start a federated run on the coordinator and follow its progress",
        description="Submit a run (RUN_TOML: the same run config as `fedpeft simulate "
        "--config`: method, rounds, sites per round, minimum sites, timeouts, ...) to the "
        "coordinator that --coordinator describes, stream its progress, and exit 0 only if the "
        "run store records it as finished. A relative SQLite store path is taken relative to "
        "the coordinator's folder.",
    )
    rstart.add_argument("run_toml", type=Path, help="run config (TOML)")
    rstart.add_argument(
        "--coordinator", type=Path, required=True, help="the coordinator's coordinator.toml"
    )

    rres = run.add_parser(
        "resume",
        help="take up an interrupted or failed run after its last recorded round",
        description="Resume run RUN_ID of the coordinator's store: runs a dead ServerApp left "
        "running are marked interrupted first (as coordinator start does); then the run is "
        "submitted again with its own config and goes on from its last recorded round, from "
        "its encrypted checkpoint, with a new run key and token (the sites need nothing). Its "
        "progress streams as for run start; exits 0 only if the run finishes.",
    )
    rres.add_argument("run_id", type=int, help="the run to resume (see fedpeft report --list)")
    rres.add_argument(
        "--coordinator", type=Path, required=True, help="the coordinator's coordinator.toml"
    )

    man = run.add_parser(
        "manifest",
        help="write a run's manifest for the sites to approve (fedpeft site approve)",
        description="Build the run's model as the coordinator will (no coordinator needed) and "
        "write its manifest as JSON: method, base-model fingerprint, the config hash sites will "
        "see, and exactly what leaves each site per round (shared tensors' names and shapes, "
        "codec, the largest sealed upload, the metrics and histogram bins of each reply).",
    )
    man.add_argument("run_toml", type=Path, help="run config (TOML)")
    man.add_argument("--out", type=Path, help="write it here (default: standard output)")

    certs = sub.add_parser(
        "certs",
        help="make a development CA and a server certificate for the coordinator",
        description="Write ca.crt, ca.key, server.pem and server.key into --out: a private CA "
        "and a server certificate with a subject alternative name for every --name (host names "
        "and IP addresses sites dial), plus 127.0.0.1 and localhost: the coordinator's own "
        "Control API, which `coordinator add-site --config` and `run start` dial on loopback, "
        "serves the same certificate. For development and rehearsals; a consortium uses its "
        "own PKI. Never commit these files.",
    )
    certs.add_argument("--out", type=Path, default=Path("certs"), help="folder (default ./certs)")
    certs.add_argument(
        "--name", action="append", required=True, help="a host name or IP sites dial (repeat)"
    )
    ls = csub.add_parser("sites", help="list the registered sites and their key fingerprints")
    ls.add_argument("--sites", type=Path, default=Path("sites.txt"), help=sites_help)

    reh = sub.add_parser(
        "rehearsal", help="the docker compose rehearsal: one coordinator, three hospitals"
    ).add_subparsers(dest="rehearsal_command", required=True)
    rinit = reh.add_parser(
        "init",
        help="make the rehearsal's certificates, keys, configs and per-hospital records",
        description="Write OUT/coordinator (coordinator.toml, run.toml, a development CA and "
        "server certificate for the host 'coordinator', the coordinator's key, a store key, the "
        "sites' public keys) and OUT/NAME for Cleveland, Hungary and VA-Long-Beach (site.toml, "
        "the site's key, the CA certificate, the coordinator's public key, that hospital's "
        "heart-disease records). docker-compose.yml's `setup` service runs it into one volume "
        "per party. For a rehearsal only: a consortium makes each key where it stays.",
    )
    rinit.add_argument("out", type=Path, help="folder to write (its parts must not exist yet)")
    rinit.add_argument(
        "--rounds", type=int, help="rounds of the run (default 5, as fedpeft simulate's on heart)"
    )
    rco = reh.add_parser(
        "coordinator",
        help="the rehearsal coordinator: SuperLink, register the sites, one run, report",
        description="Start the SuperLink from DIR/coordinator.toml, register every "
        "DIR/site-keys/NAME.pub with fedpeft and Flower, touch /tmp/fedpeft-ready (the "
        "compose health check that lets the sites start), run DIR/run.toml, print the report "
        "and stop. Exits 0 only if the store records the run as finished.",
    )
    rco.add_argument("dir", type=Path, help="the coordinator's folder (made by rehearsal init)")
    return p


def _file_patience(path: Path | None) -> object:
    """The ``federation.patience`` a run config file sets, if any."""
    from fedpeft.common.tomlfile import read_toml

    fed = read_toml(path).get("federation") if path is not None else None
    return fed.get("patience") if isinstance(fed, dict) else None


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedpeft.baselines import BASELINE_KINDS
    from fedpeft.common.config import load_config
    from fedpeft.recovery import mark_interrupted_runs
    from fedpeft.report import plot_auc, render_table, summarize
    from fedpeft.server.store import open_store
    from fedpeft.settings import shown_url
    from fedpeft.simulate import record_baselines

    started = time.perf_counter()
    if args.dapt_rounds is not None and args.resume is not None:
        raise FedpeftError(
            "--dapt-rounds sets a new run's stages; --resume takes up one run with its stored "
            "config: give one of them"
        )
    if args.dapt_rounds is not None and (args.patience or _file_patience(args.config)):
        raise FedpeftError(
            "--patience (or the config's federation.patience) ends a run early; --dapt-rounds "
            "makes it a schedule, which runs every round: give one of them"
        )
    if args.tune_lr and args.resume is not None:
        raise FedpeftError(
            "--tune-lr starts new runs, one per rate; --resume takes up one run with its own "
            "rate: give one of them"
        )
    if args.mlflow:
        from fedpeft.tracking import require_mlflow

        require_mlflow()  # before any training: a missing extra is found at once
    cfg = load_config(args.config, _overrides(args))
    if args.dapt_rounds is not None:
        cfg = cfg.with_dapt(args.dapt_rounds)
    if args.tune_lr and cfg.schedule:
        raise FedpeftError(
            "--tune-lr varies the run's rate; a schedule (--schedule, --dapt-rounds or the "
            "config's [[schedule]]) sets each stage's own: give one of them"
        )
    if args.resume is not None:
        cfg = stored_config(cfg.db, args.resume)
    sites = "all" if cfg.federation.sites_per_round == 0 else cfg.federation.sites_per_round
    fed = cfg.federation
    rounds = f"{fed.rounds} rounds"
    if fed.patience:
        rounds = f"up to {rounds} (patience {fed.patience})"
    _say(
        f"fedpeft simulate: dataset {cfg.data.dataset}, method {cfg.method.name}, "
        f"{rounds} x {cfg.train.local_epochs} local epoch(s), "
        f"sites per round {sites}, seed {cfg.seed}, store {shown_url(cfg.db)}"
    )
    mark_interrupted_runs(cfg.db, _say)
    if args.tune_lr:
        result, cfg = _tune_federated(cfg, args)
    else:
        result = _simulate_once(cfg, args, resume=args.resume)
        _say(f"federated run {result.run_id} done in {result.seconds:.0f} s")
    chosen = "none" if args.no_baselines else args.baselines
    kinds = BASELINE_KINDS if chosen == "all" else () if chosen == "none" else (chosen,)
    if kinds:
        _say(
            f"training the baselines ({', '.join(kinds)}: alone = each site on its own rows, "
            "centralized = all sites' training rows pooled, tfidf = TF-IDF + logistic regression "
            "both ways)"
        )
        record_baselines(
            cfg, result.run_id, progress=_say, kinds=kinds, store_key_file=args.store_key_file
        )
    store = open_store(cfg.db)
    try:
        print()
        print(render_table(summarize(store, result.run_id)))
        png = plot_auc(store, result.run_id, args.plot or Path(f"fedpeft-run-{result.run_id}.png"))
    finally:
        store.close()
    print(f"AUC per round plot: {png}")
    if args.mlflow:
        _log_simulation(args, cfg, result.run_id)
    print(f"total wall time: {time.perf_counter() - started:.0f} s")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from fedpeft import distilling
    from fedpeft.report import render_table, summarize
    from fedpeft.server.store import open_store
    from fedpeft.simulate import delivered_state

    started = time.perf_counter()
    store = open_store(args.db, create=False)
    try:
        teacher = dataclasses.replace(distilling.teacher_config(store, args.run), db=args.db)
    finally:
        store.close()
    layers = args.layers
    if layers is None:
        layers = -(-distilling.base_layers(teacher) // 2)
    cfg = distilling.student_config(
        teacher,
        args.run,
        layers=layers,
        temperature=args.temperature,
        alpha=args.alpha,
        overrides={
            "method.name": args.method,
            "federation.rounds": args.rounds,
            "train.lr": args.lr,
            "train.local_epochs": args.local_epochs,
        },
    )
    _say(
        f"fedpeft distill: run {args.run} ({teacher.method.name}) into a student of {layers} "
        f"encoder layers ({cfg.method.name}), T {cfg.distill.temperature:g}, alpha "
        f"{cfg.distill.alpha:g}, {cfg.federation.rounds} rounds on {cfg.data.dataset}"
    )
    result = _simulate_once(cfg, args)
    _say(f"student run {result.run_id} done in {result.seconds:.0f} s")
    ms: list[float | None] = [None, None]
    if args.time_batch > 0:
        states = [
            delivered_state(args.db, run, args.store_key_file) for run in (args.run, result.run_id)
        ]
        if all(s is not None for s in states):
            models = [
                distilling.delivered_model(c, s)  # type: ignore[arg-type]
                for c, s in zip((teacher, cfg), states, strict=True)
            ]
            ms = list(
                distilling.inference_ms(models, batch=args.time_batch, tokens=cfg.model.max_length)
            )
    store = open_store(args.db)
    try:
        print()
        print(render_table(summarize(store, result.run_id)))
        comparison = distilling.Comparison(
            distilling.side(store, args.run, ms[0]),
            distilling.side(store, result.run_id, ms[1]),
            batch=args.time_batch,
            tokens=cfg.model.max_length,
        )
    finally:
        store.close()
    print()
    print(distilling.render(comparison))
    print(f"export the student: fedpeft export --run {result.run_id} --db {args.db} --out DIR")
    print(f"total wall time: {time.perf_counter() - started:.0f} s")
    return 0


def _log_simulation(args: argparse.Namespace, cfg: RunConfig, run_id: int) -> None:
    """``simulate --mlflow``: export the delivered round into a temporary folder (removed after)
    and log the run with it."""
    import tempfile

    from fedpeft.exporting import export_run

    with tempfile.TemporaryDirectory(prefix="fedpeft-mlflow-") as tmp:
        out = Path(tmp) / "adapter"
        export_run(cfg.db, out, run_id=run_id, store_key_file=args.store_key_file, warn=_say)
        _log_to_mlflow(args.mlflow, args.mlflow_experiment, cfg.db, run_id, out)


def _simulate_once(
    cfg: RunConfig, args: argparse.Namespace, resume: int | None = None
) -> SimulationResult:
    from fedpeft.simulate import run_simulation

    return run_simulation(
        cfg,
        cpus=args.cpus,
        ray_address=args.ray_address,
        progress=_say,
        verbose=args.verbose,
        store_key_file=args.store_key_file,
        resume=resume,
    )


def _tune_federated(cfg: RunConfig, args: argparse.Namespace) -> tuple[SimulationResult, RunConfig]:
    """``simulate --tune-lr``: one federated run per rate of ``tuning.lr_grid``, the same in
    all else; the one whose delivered round has the lowest weighted validation loss is the
    result (ties: the larger rate), and the store records what it was chosen from."""
    from fedpeft.baselines import rate_rank
    from fedpeft.server.rounds import delivered_round
    from fedpeft.server.store import LrCandidate, open_store

    grid = cfg.tuning.lr_grid
    runs = []
    for i, lr in enumerate(grid, 1):
        _say(f"federated run at lr {lr:g} ({i} of {len(grid)}, --tune-lr)")
        one = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=lr))
        runs.append((_simulate_once(one, args), one))
    store = open_store(cfg.db)
    try:
        candidates = []
        for result, one in runs:
            delivered = delivered_round(store.rounds(result.run_id))
            loss = delivered.val_loss if delivered else None
            candidates.append(LrCandidate(result.run_id, one.train.lr, loss))
            shown = "none recorded" if loss is None else f"{loss:.4f}"
            _say(
                f"federated run {result.run_id} at lr {one.train.lr:g} done in "
                f"{result.seconds:.0f} s: validation loss {shown} "
                f"(round {delivered.round if delivered else 'none'})"
            )
        best = min(
            range(len(runs)), key=lambda i: rate_rank(candidates[i].val_loss, candidates[i].lr)
        )
        store.record_lr_choice(runs[best][0].run_id, candidates)
    finally:
        store.close()
    result, one = runs[best]
    _say(f"federated: run {result.run_id} at lr {one.train.lr:g} chosen by validation loss")
    return result, one


def stored_config(db: str, run_id: int) -> RunConfig:
    """The config run ``run_id`` of store ``db`` was run with (a resumed run keeps its own)."""
    from fedpeft.server.store import open_store

    store = open_store(db, create=False)
    try:
        info = store.get_run(run_id)
    finally:
        store.close()
    return dataclasses.replace(RunConfig.from_json(info.config_json), db=db)


def cmd_report(args: argparse.Namespace) -> int:
    from fedpeft.report import plot_auc, render_table, summarize
    from fedpeft.server.store import RunStatus, open_store

    store = open_store(args.db, create=False)
    try:
        if args.list:
            for run in store.list_runs():
                status = run.status
                if status == RunStatus.INTERRUPTED:
                    last = max((r.round for r in store.rounds(run.id)), default=None)
                    status += " before round 1" if last is None else f" after round {last}"
                print(
                    f"{run.id}\t{run.created_at:%Y-%m-%d %H:%M}\t{status}\t{run.method}\t"
                    f"{run.dataset}"
                )
            return 0
        if args.format != "text":
            from fedpeft import card

            data = card.build_card(store, args.run)
            render = {"json": card.to_json, "md": card.to_markdown, "html": card.to_html}
            print(render[args.format](data))
            if args.plot:
                plot_auc(store, data["run"]["id"], args.plot)  # stdout holds the card only
            return 0
        summary = summarize(store, args.run)
        print(render_table(summary))
        if args.plot:
            print(f"AUC per round plot: {plot_auc(store, summary.run_id, args.plot)}")
    finally:
        store.close()
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    import uvicorn

    from fedpeft.dashboard import create_app
    from fedpeft.server.store import open_store
    from fedpeft.settings import is_loopback, shown_url

    token = os.environ.get(DASHBOARD_TOKEN_ENV) or None
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except OSError as exc:
            raise FedpeftError(f"{args.token_file}: cannot read the token: {exc}") from exc
    if token is not None and len(token) < 16:
        where = args.token_file or DASHBOARD_TOKEN_ENV
        raise FedpeftError(f"{where}: the token is shorter than 16 characters")
    if not is_loopback(args.host) and not token:
        raise FedpeftError(
            f"--host {args.host} is reachable from other machines: give an access token "
            f"(--token-file, or {DASHBOARD_TOKEN_ENV}), or listen on 127.0.0.1"
        )
    store = open_store(args.db, create=False)  # first: a mistyped --db names the store
    try:
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((args.host, args.port))
        except OSError as exc:
            listener.close()
            raise FedpeftError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from exc
        # No access log: a URL may carry the token.
        config = uvicorn.Config(
            create_app(store, token=token), log_level="warning", access_log=False
        )
        where = f"http://{args.host}:{args.port}/"
        _say(
            f"dashboard of {shown_url(args.db)} at {where}" + (" (token required)" if token else "")
        )
        uvicorn.Server(config).run(sockets=[listener])
    finally:
        store.close()
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fedpeft.exporting import export_run

    if args.mlflow:
        from fedpeft.tracking import require_mlflow

        require_mlflow()
    run_id, round_, files = export_run(
        args.db,
        args.out,
        run_id=args.run,
        round=args.round,
        store_key_file=args.store_key_file,
        warn=_say,
        quantize=args.quantize,
    )
    _say(f"exported run {run_id}, global state of round {round_}:")
    for f in files:
        print(f"  {f} ({f.stat().st_size:,} bytes)")
    if args.mlflow:
        _log_to_mlflow(args.mlflow, args.mlflow_experiment, args.db, run_id, args.out)
    return 0


def _log_to_mlflow(uri: str, experiment: str, db: str, run_id: int, export_dir: Path) -> None:
    from fedpeft.server.store import open_store
    from fedpeft.tracking import log_run

    store = open_store(db, create=False)
    try:
        logged = log_run(store, run_id, uri, export_dir=export_dir, experiment=experiment)
    finally:
        store.close()
    _say(f"logged run {run_id} to MLflow at {uri}: experiment {experiment!r}, run {logged}")


def _sha256_arg(text: str) -> str:
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text.lower()):
        raise argparse.ArgumentTypeError("expected the 64 hex digits --head prints")
    return text.lower()


def cmd_site(args: argparse.Namespace) -> int:
    from fedpeft.identity import enroll

    if args.site_command == "start":
        return _start_site(args)
    if args.site_command == "ledger":
        return _site_ledger(args)
    if args.site_command == "approve":
        return _site_approve(args)
    done = enroll(args.out, args.name)
    print(f"private key: {done.private_key} (0600; keep it at the site, never send it)")
    print(f"public key:  {done.public_key}")
    print(f"fingerprint: {done.fingerprint}")
    print(f"send {done.public_key.name} to the coordinator operator, who runs:")
    print(f"  fedpeft coordinator add-site {args.name} {done.public_key.name}")
    return 0


def cmd_coordinator(args: argparse.Namespace) -> int:
    from fedpeft.allowlist import flower_unregister, register_site
    from fedpeft.common import crypto
    from fedpeft.common.trust import read_sites_file
    from fedpeft.identity import add_site, enroll, remove_site
    from fedpeft.settings import load_coordinator_config

    if args.coordinator_command == "init":
        done = enroll(args.out, "coordinator")
        print(f"private key: {done.private_key} (0600; only the coordinator's ServerApp reads it)")
        print(f"public key:  {done.public_key} (give it to every site)")
        print(f"fingerprint: {done.fingerprint}")
    elif args.coordinator_command == "start":
        return _start_coordinator(args)
    elif args.coordinator_command == "add-site":
        cfg = load_coordinator_config(args.config) if args.config else None
        sites = cfg.sites if cfg else args.sites
        if cfg is not None:  # both registers or neither
            fingerprint, node = register_site(args.config, cfg, args.name, args.pubkey)
            print(f"allow-listed site {args.name} in the SuperLink (node {node})")
        else:
            fingerprint = add_site(sites, args.name, args.pubkey)
        print(f"registered site {args.name} ({fingerprint}) in {sites}")
    elif args.coordinator_command == "remove-site":
        cfg = load_coordinator_config(args.config) if args.config else None
        sites = cfg.sites if cfg else args.sites
        if cfg is not None:
            gone = flower_unregister(args.config, cfg, args.name)
            if gone is not None:
                print(f"removed site {args.name} (node {gone}) from the SuperLink's allow-list")
        remove_site(sites, args.name)
        print(
            f"removed site {args.name} from {sites}: its deltas are refused from now on (a "
            "running run reads the register again for every round's replies)"
        )
    else:
        for name, key in read_sites_file(args.sites).items():
            print(f"{name}\t{crypto.fingerprint(key)}")
    return 0


def _start_coordinator(args: argparse.Namespace) -> int:
    from fedpeft import processes
    from fedpeft.common.crypto import read_private_key
    from fedpeft.common.trust import read_sites_file
    from fedpeft.recovery import mark_interrupted_runs, stop_serverapps
    from fedpeft.server.checkpoints import read_store_key
    from fedpeft.server.store.base import utcnow
    from fedpeft.settings import load_coordinator_config

    cfg = load_coordinator_config(args.config)
    cmd = processes.superlink_command(cfg, args.insecure)
    read_private_key(cfg.identity_key)  # every key is checked before anything starts
    sites = read_sites_file(cfg.sites)
    read_store_key(cfg.store_key_file)
    if cfg.tls is None:
        print(processes.INSECURE_WARNING, file=sys.stderr, flush=True)
    if cfg.expose_api:
        print(
            processes.EXPOSED_API_WARNING.format(address=cfg.api_address),
            file=sys.stderr,
            flush=True,
        )
    _say(
        f"coordinator: Fleet API (sites) on {cfg.fleet_address}, Control/Runtime APIs on "
        f"{cfg.api_address}, state in {cfg.state}, {len(sites)} registered site(s)"
    )
    # A run whose ServerApp died (with an earlier coordinator, or alone) is otherwise "running"
    # for ever; one whose ServerApp still lives is left alone.
    mark_interrupted_runs(cfg.store, _say)
    folder = args.config.resolve().parent
    env = processes.coordinator_env(cfg, processes.flwr_home(args.config))
    started = utcnow()
    code = processes.run_foreground(cmd, env, folder)
    # Its ServerApps outlive it, waiting on it for ever: stopped, their runs left resumable.
    # One that marked its run interrupted itself may still be exiting: it is waited for too.
    stop_serverapps(cfg.store, _say, since=started)
    return code


def _start_site(args: argparse.Namespace) -> int:
    from fedpeft import processes
    from fedpeft.common.data import load_site_file
    from fedpeft.common.trust import site_trust
    from fedpeft.settings import load_site_config

    cfg = load_site_config(args.config, args.insecure)
    processes.supernode_command(cfg, args.insecure)  # ConfigError before anything is written
    site_trust(cfg.identity_key, cfg.coordinator_key)  # keys readable, private, right type
    rows = load_site_file(cfg.data, cfg.schema, name=cfg.name)
    if cfg.ca is None:
        print(processes.INSECURE_WARNING, file=sys.stderr, flush=True)
    _say(f"site {cfg.name}: {len(rows.labels)} records in {cfg.data}; dialing {cfg.coordinator}")
    processes.wait_for(cfg.coordinator, _say)
    folder = args.config.resolve().parent
    home = processes.flwr_home(args.config)
    env = processes.site_env(home)
    setup = processes.write_site_setup(cfg, home)
    if args.per_message_process:
        cmd = processes.supernode_command(cfg, args.insecure, worker=False, setup_file=setup)
        return processes.run_foreground(cmd, env, folder)
    secret = processes.write_auth_secret(home)
    cmd = processes.supernode_command(cfg, args.insecure, auth_secret_file=secret, setup_file=setup)
    # The worker runs the policy's apps (from the setup file) unless --allow-app names others.
    worker = processes.worker_command(cfg, secret, args.allow_app or (), setup_file=setup)
    return processes.supervise_site(cmd, worker, env, folder, _say)


def _site_ledger(args: argparse.Namespace) -> int:
    from fedpeft.client.ledger import Ledger, LedgerError, format_table, parse_line, verify
    from fedpeft.settings import site_ledger_path

    ledger = Ledger(args.ledger if args.ledger else site_ledger_path(args.config))
    lines = ledger.lines()
    result = verify(lines, args.expect_head)
    if not (args.verify or args.head):
        records, unreadable = [], []
        for number, line in enumerate(lines, start=1):
            try:
                records.append(parse_line(line))
            except LedgerError as exc:
                unreadable.append(f"line {number} not shown: {exc}")
        print(format_table(records))
        print("\n".join(["", *unreadable]))
    if not result.ok:
        print(f"ledger {ledger.path}: {result.message}")
        if result.line and result.line > 1:
            print(f"(the entries before line {result.line} verify)")
        return 1
    if args.head:
        print(f"ledger {ledger.path}: head {result.head} (entry {result.entries})")
    else:
        print(f"ledger {ledger.path}: {result.message}")
    return 0


def _site_approve(args: argparse.Namespace) -> int:
    from fedpeft.client.approvals import approve
    from fedpeft.common.errors import ConfigError
    from fedpeft.common.manifest import RunManifest
    from fedpeft.settings import site_approvals_path

    approvals = site_approvals_path(args.config)
    try:
        text = args.manifest.read_text()
    except OSError as exc:
        raise ConfigError(f"{args.manifest}: cannot read the manifest ({exc.strerror})") from None
    manifest = RunManifest.from_json(text, str(args.manifest))
    print(f"run manifest {args.manifest}:\n")
    print(manifest.describe())
    print()
    if not args.yes:
        try:
            answer = input(f"approve this run at this site (appends to {approvals})? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("not approved")
            return 1
    done = approve(approvals, manifest)
    print(f"approved run {manifest.config_sha256} at {done.approved_at} (in {approvals})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from fedpeft.runs import resume_and_report, run_and_report
    from fedpeft.settings import load_coordinator_config

    if args.run_command == "manifest":
        return _run_manifest(args)

    coordinator = load_coordinator_config(args.coordinator)
    if args.run_command == "resume":
        resume_and_report(args.run_id, args.coordinator, coordinator, say=_say)
    else:
        run_and_report(args.run_toml, args.coordinator, coordinator, say=_say)
    return 0


def _run_manifest(args: argparse.Namespace) -> int:
    from fedpeft.common.config import load_config
    from fedpeft.server.manifest import build_manifest

    text = build_manifest(load_config(args.run_toml)).to_json() + "\n"
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text)
        _say(f"wrote the run manifest to {args.out}: give it to the sites to approve")
    return 0


def cmd_rehearsal(args: argparse.Namespace) -> int:
    from fedpeft import rehearsal

    if args.rehearsal_command == "coordinator":
        return rehearsal.coordinator(args.dir, _say)
    rounds = {} if args.rounds is None else {"rounds": args.rounds}
    for folder in rehearsal.init(args.out, **rounds):
        print(f"wrote {folder}")
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from fedpeft.certs import LOOPBACK_NAMES, make_pki

    names = args.name + [n for n in LOOPBACK_NAMES if n not in args.name]
    pki = make_pki(args.out, names)
    print(f"CA certificate:     {pki.ca_cert} (give it to every site)")
    print(f"server certificate: {pki.server_cert} (for: {', '.join(names)})")
    print(f"server key:         {pki.server_key} (0600; the coordinator only)")
    print(f"CA key:             {args.out / 'ca.key'} (0600; keep it offline)")
    return 0


def _say(text: str) -> None:
    print(f"[fedpeft {time.strftime('%H:%M:%S')}] {text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.environ.update(QUIET)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    commands = {
        "simulate": cmd_simulate,
        "distill": cmd_distill,
        "report": cmd_report,
        "export": cmd_export,
        "dashboard": cmd_dashboard,
        "site": cmd_site,
        "coordinator": cmd_coordinator,
        "certs": cmd_certs,
        "run": cmd_run,
        "rehearsal": cmd_rehearsal,
    }
    try:
        return commands[args.command](args)
    except FedpeftError as exc:
        print(f"fedpeft: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedpeft: interrupted", file=sys.stderr)
        return 130
