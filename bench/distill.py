#!/usr/bin/env python
"""Distillation on heart, side by side over seeds: per seed, a teacher (`fedpeft simulate`,
LoRA on all six layers, no baselines), then students of it (`fedpeft distill`) named by their
flags; each model's delivered macro and pooled AUC per seed and as mean ± sd, the share of the
teacher's macro AUC retained, parameters, and inference time per batch of the teacher and
each student's architecture timed side by side at the end.

    .venv/bin/python bench/distill.py [--seeds 0 1 2] \
        [--student NAME "FLAGS" ...]   (default: 3 layers distilled, 3 layers alone, 2 distilled)

Each run is one fresh process, one at a time.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedpeft.distilling import delivered_model, inference_ms
from fedpeft.report import summarize
from fedpeft.server.store import open_store
from fedpeft.simulate import delivered_state

DEFAULT_STUDENTS = [
    ("3 layers, distilled (T 2, alpha 0.5)", "--layers 3"),
    ("3 layers, hard labels only (alpha 0)", "--layers 3 --alpha 0"),
    ("2 layers, distilled (T 2, alpha 0.5)", "--layers 2"),
]


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def _run(cmd: list[str], env: dict[str, str]) -> float:
    print("$", shlex.join(cmd), flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--student", nargs=2, action="append", metavar=("NAME", "FLAGS"))
    args = p.parse_args()
    students = args.student or DEFAULT_STUDENTS
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    fedpeft = [sys.executable, "-m", "fedpeft"]
    # name -> [(seed, macro, pooled, wall s, parameters)]
    found: dict[str, list[tuple[int, float, float, float, int]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            db = f"sqlite:///{Path(tmp) / f'{seed}.db'}"
            wall = _run(
                [*fedpeft, "simulate", "--seed", str(seed), "--db", db, "--no-baselines"], env
            )
            names = [("teacher (6 layers, LoRA)", wall)]
            for name, flags in students:
                cmd = [*fedpeft, "distill", "--run", "1", "--db", db, "--time-batch", "0"]
                names.append((name, _run([*cmd, *shlex.split(flags)], env)))
            store = open_store(db)
            try:
                for run_id, (name, wall) in enumerate(names, 1):
                    s = summarize(store, run_id)
                    found.setdefault(name, []).append(
                        (
                            seed,
                            s.macro("federated") or float("nan"),
                            s.pooled_federated or float("nan"),
                            wall,
                            s.total,
                        )
                    )
            finally:
                store.close()
            if seed == args.seeds[0]:
                from fedpeft.cli import stored_config

                configs = [stored_config(db, i) for i in range(1, len(names) + 1)]
                models = [
                    delivered_model(c, delivered_state(db, i))  # type: ignore[arg-type]
                    for i, c in enumerate(configs, 1)
                ]
                times = inference_ms(models, batch=32, tokens=configs[0].model.max_length)
    teacher_macro = {seed: macro for seed, macro, *_ in next(iter(found.values()))}
    print(f"\nheart, seeds {args.seeds}, {time.strftime('%Y-%m-%d')}")
    print(
        "| model | macro AUC | pooled AUC | retained (macro) | parameters | ms / batch of 32 x "
        "128 | speed-up | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for (name, rows), ms in zip(found.items(), times, strict=True):
        retained = [macro / teacher_macro[seed] for seed, macro, *_ in rows]
        print(
            f"| {name} | {_mean_sd([r[1] for r in rows])} | {_mean_sd([r[2] for r in rows])} | "
            f"{100 * statistics.mean(retained):.1f} % | {rows[0][4]:,} | {ms:.0f} | "
            f"{times[0] / ms:.2f}x | {statistics.mean(r[3] for r in rows):.0f} |"
        )
    for name, rows in found.items():
        per_seed = ", ".join(f"seed {seed} {macro:.3f}" for seed, macro, *_ in rows)
        print(f"{name}: {per_seed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
