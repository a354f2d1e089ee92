#!/usr/bin/env python
"""Named variants of `fedpeft simulate --baselines none` side by side over seeds: each
variant's federated macro and pooled AUC (delivered round) per seed and as mean ± sd, its
mean upload per site and round, and its wall time.

    .venv/bin/python bench/variants.py --variant NAME "FLAGS" [--variant NAME "FLAGS" ...]
        [--seeds 0 1 2]

e.g. --variant lora "" --variant "lora + top layer" "--full-layers 1"
Each (variant, seed) is one fresh process, in the order given, one at a time.
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

from fedpeft.report import summarize
from fedpeft.server.store import open_store


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "FLAGS"), required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    # name -> [(seed, macro, pooled, bytes up / site / round, wall s)]
    found: dict[str, list[tuple[int, float, float, float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, flags) in enumerate(args.variant):
            for seed in args.seeds:
                db = f"sqlite:///{Path(tmp) / f'{index}-{seed}.db'}"
                cmd = [sys.executable, "-m", "fedpeft", "simulate", "--seed", str(seed)]
                cmd += ["--db", db, "--baselines", "none", *shlex.split(flags)]
                print("$", shlex.join(cmd), flush=True)
                started = time.perf_counter()
                subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
                wall = time.perf_counter() - started
                store = open_store(db)
                s = summarize(store)
                store.close()
                up = statistics.mean(s.bytes_up_per_round.values())
                item = (
                    seed,
                    s.macro("federated") or float("nan"),
                    s.pooled_federated or float("nan"),
                )
                found.setdefault(name, []).append((*item, up, wall))
    print(f"\n{len(args.seeds)} seeds, delivered round, --baselines none\n")
    print("| variant | seed | federated macro AUC | federated pooled AUC |")
    print("|---|---|---|---|")
    for name, rows in found.items():
        for seed, macro, pooled, _, _ in rows:
            print(f"| {name} | {seed} | {macro:.3f} | {pooled:.3f} |")
    print("\n| variant | flags | macro AUC | pooled AUC | bytes up / site / round | wall s |")
    print("|---|---|---|---|---|---|")
    for (name, flags), rows in zip(args.variant, found.values(), strict=True):
        print(
            f"| {name} | `{flags}` | {_mean_sd([r[1] for r in rows])} | "
            f"{_mean_sd([r[2] for r in rows])} | {statistics.mean(r[3] for r in rows):,.0f} | "
            f"{statistics.mean(r[4] for r in rows):.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
