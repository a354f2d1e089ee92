#!/usr/bin/env python
"""A quantized frozen base at the site (``quantize = "int8"``): memory and local step time side
by side with the fp32 base, then the AUC cost on heart over seeds.

    .venv/bin/python bench/quantize.py [--seeds 0 1 2] [--steps 20] [--device cpu] [--no-runs]
        [--bases fp32 int8 nf4]

Part 1, in this process: the default model + LoRA built on the fp32 base, on the base in bf16,
on the int8 base and on the nf4 base (bitsandbytes);
bytes of parameters and buffers held, and seconds per training step (batch 16 of 128 tokens),
the models' steps interleaved so that all see the same machine.
Part 2: `fedpeft simulate --baselines none` per seed, every site fp32, every site int8
(`--site-quantize int8 ...`) and every site nf4 (or those of `--bases`), macro and pooled AUC of
the delivered round.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedpeft.common.config import load_config
from fedpeft.common.methods import build_method
from fedpeft.common.model import load_base_model
from fedpeft.common.quantize import quantize_base, weight_bytes
from fedpeft.report import summarize
from fedpeft.server.store import open_store


def steps(args: argparse.Namespace) -> None:
    cfg = load_config()
    device = torch.device(args.device)
    base = load_base_model(cfg.model, 0.0, 0)
    models = {
        "fp32": build_method(cfg.method, copy.deepcopy(base)).to(device),
        # The base held in bf16 (peft keeps LoRA's own weights in fp32 beside it).
        "bf16": build_method(cfg.method, copy.deepcopy(base).to(torch.bfloat16)).to(device),
        "int8": build_method(cfg.method, quantize_base(copy.deepcopy(base))).to(device),
        "nf4": build_method(cfg.method, quantize_base(copy.deepcopy(base), "nf4")).to(device),
    }
    del base
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 29000, (16, 128), generator=g).to(device)
    labels = torch.randint(0, 2, (16,), generator=g).to(device)
    optimizers = {
        k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
        for k, m in models.items()
    }
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(args.steps + 2):
        for name, model in models.items():
            model.train()
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            loss = model(input_ids=ids, labels=labels).loss
            optimizers[name].zero_grad()
            loss.backward()
            optimizers[name].step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:  # two warm-up steps each
                times[name].append(time.perf_counter() - started)
    print(
        f"\n{args.device}, batch 16 x 128 tokens, LoRA r=8, {args.steps} steps each, interleaved\n"
    )
    print("| base | bytes held (parameters + buffers) | s / step (median) | ratio to fp32 |")
    print("|---|---|---|---|")
    fp32 = statistics.median(times["fp32"])
    for name, model in models.items():
        t = statistics.median(times[name])
        print(f"| {name} | {weight_bytes(model):,} | {t:.3f} | {t / fp32:.2f} |")


def runs(args: argparse.Namespace) -> None:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    every = {"fp32": [], **{k: ["--site-quantize", *[k] * 4] for k in ("int8", "nf4")}}
    settings = {k: every[k] for k in args.bases}
    found: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, flags in settings.items():
            for seed in args.seeds:
                db = f"sqlite:///{Path(tmp) / f'{name}-{seed}.db'}"
                cmd = [sys.executable, "-m", "fedpeft", "simulate", "--seed", str(seed)]
                cmd += ["--db", db, "--baselines", "none", *flags]
                print("$", " ".join(cmd), flush=True)
                subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
                store = open_store(db)
                s = summarize(store)
                store.close()
                item = (s.macro("federated") or float("nan"), s.pooled_federated or float("nan"))
                found.setdefault(name, []).append(item)
    print(f"\nheart, {len(args.seeds)} seeds, delivered round, --baselines none\n")
    print("| every site's base | seed | federated macro AUC | federated pooled AUC |")
    print("|---|---|---|---|")
    for name, items in found.items():
        for seed, (m, p) in zip(args.seeds, items, strict=True):
            print(f"| {name} | {seed} | {m:.3f} | {p:.3f} |")
    for name, items in found.items():
        ms, ps = [i[0] for i in items], [i[1] for i in items]
        print(
            f"| {name} | mean ± sd | {statistics.mean(ms):.3f} ± {_sd(ms):.3f} | "
            f"{statistics.mean(ps):.3f} ± {_sd(ps):.3f} |"
        )


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-runs", action="store_true", help="part 1 only")
    p.add_argument(
        "--bases", nargs="+", choices=("fp32", "int8", "nf4"), default=["fp32", "int8", "nf4"]
    )
    args = p.parse_args()
    steps(args)
    if not args.no_runs:
        runs(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
