#!/usr/bin/env python
"""Every fine-tuning method on heart (4 real hospitals), same rounds and budget, over seeds.

    .venv/bin/python bench/methods.py [--methods lora prefix ...] [--seeds 0 1 2]
                                      [--db sqlite:///bench-methods.db] [-- extra simulate flags]

Each (method, seed) is one `fedpeft simulate --method M --seed S --baselines alone` in a fresh
process, recorded in the --db store. Pairs that already finished there are not run again, so an
interrupted benchmark resumes where it stopped; the table is always built from the store.
Columns: trainable parameters and their share of the model, bytes uploaded per site per round
(the serialized Flower reply), federated and alone macro AUC (mean ± sample sd over seeds), and
the coordinator's seconds per round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

from fedpeft.common.methods import method_names
from fedpeft.report import summarize
from fedpeft.server.store import RunStore, open_store


def _finished(store: RunStore) -> dict[tuple[str, int], int]:
    """(method, seed) -> id of the latest finished run with alone baselines."""
    done: dict[tuple[str, int], int] = {}
    for run in store.list_runs():
        if run.status == "finished" and store.baselines(run.id):
            done[(run.method, run.seed)] = max(run.id, done.get((run.method, run.seed), 0))
    return done


def _spread(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--methods", nargs="+", default=method_names())
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--db", default="sqlite:///bench-methods.db")
    p.add_argument("--report-only", action="store_true", help="print the table, run nothing")
    p.add_argument("extra", nargs="*", help="more flags for fedpeft simulate")
    args = p.parse_args()
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    # Seed-major: a benchmark cut short still compares every method on the seeds it finished.
    for seed in [] if args.report_only else args.seeds:
        for method in args.methods:
            store = open_store(args.db)
            done = _finished(store)
            store.close()
            if (method, seed) in done:
                continue
            cmd = [
                *(sys.executable, "-m", "fedpeft", "simulate", "--method", method),
                *("--seed", str(seed), "--db", args.db, "--baselines", "alone"),
                *("--plot", f"bench-methods-{method}-seed{seed}.png", *args.extra),
            ]
            print("$", " ".join(cmd), flush=True)
            if subprocess.run(cmd, env=env).returncode != 0:
                print(f"!! {method} seed {seed} failed; going on", flush=True)

    store = open_store(args.db)
    done = _finished(store)
    print()
    print(
        "| method | trainable params | % of model | bytes up / site / round | % of full fp32 "
        "model | federated macro AUC | alone macro AUC | federated − alone | s / round | seeds |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for method in args.methods:
        runs = [done[(method, s)] for s in args.seeds if (method, s) in done]
        if not runs:
            print(f"| {method} | – | – | – | – | – | – | – | – | 0 |")
            continue
        sums = [summarize(store, r) for r in runs]
        fed = [m for s in sums if (m := s.macro("federated")) is not None]
        alone = [m for s in sums if (m := s.macro("alone")) is not None]
        gain = [f - a for f, a in zip(fed, alone, strict=False)]
        up = statistics.mean(statistics.mean(s.bytes_up_per_round.values()) for s in sums)
        per_round = statistics.mean(r.seconds for run in runs for r in store.rounds(run))
        first = sums[0]
        print(
            f"| {method} | {first.trainable:,} | {100 * first.trainable / first.total:.3f} % | "
            f"{up:,.0f} | {100 * up / first.full_model_bytes:.2f} % | {_spread(fed)} | "
            f"{_spread(alone)} | {_spread(gain)} | {per_round:.0f} | {len(runs)} |"
        )
    _per_seed(store, done, args.methods, args.seeds)
    store.close()
    return 0


def _per_seed(
    store: RunStore, done: dict[tuple[str, int], int], methods: list[str], seeds: list[int]
) -> None:
    """Federated (alone) macro AUC of every method on every seed, and per seed the best that any
    method reached alone: what a hospital could get without the federation, whatever method."""
    macro = {
        key: (s.macro("federated"), s.macro("alone"))
        for key, run in done.items()
        if (s := summarize(store, run))
    }
    print()
    print("| method | " + " | ".join(f"seed {s} federated (alone)" for s in seeds) + " |")
    print("|---|" + "---|" * len(seeds))

    def cell(pair: tuple[float | None, float | None] | None) -> str:
        if pair is None or pair[0] is None or pair[1] is None:
            return "–"
        return f"{pair[0]:.3f} ({pair[1]:.3f})"

    for method in methods:
        print(f"| {method} | " + " | ".join(cell(macro.get((method, s))) for s in seeds) + " |")
    best = []
    for seed in seeds:
        alone = [a for (m, s), (_, a) in macro.items() if s == seed and a is not None]
        best.append(f"{max(alone):.3f}" if alone else "–")
    print("| best alone, any method | " + " | ".join(best) + " |")


if __name__ == "__main__":
    raise SystemExit(main())
