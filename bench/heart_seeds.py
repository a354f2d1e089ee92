#!/usr/bin/env python
"""Default `fedpeft simulate` on heart over several seeds: macro AUC alone / federated /
centralized, bytes up per site per round and wall time, one table.

    .venv/bin/python bench/heart_seeds.py [--seeds 0 1 2] [--db sqlite:///bench.db] [-- extra flags]

Each seed is one full `fedpeft simulate` (a fresh process, as a user runs it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from fedpeft.report import summarize
from fedpeft.server.store import open_store


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--db", default="sqlite:///bench-heart.db")
    p.add_argument("extra", nargs="*", help="more flags for fedpeft simulate")
    args = p.parse_args()
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    rows = []
    for seed in args.seeds:
        started = time.perf_counter()
        cmd = [
            sys.executable,
            "-m",
            "fedpeft",
            "simulate",
            "--seed",
            str(seed),
            "--db",
            args.db,
            "--plot",
            f"bench-heart-seed{seed}.png",
            *args.extra,
        ]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, env=env, check=True)
        wall = time.perf_counter() - started
        store = open_store(args.db)
        s = summarize(store)
        store.close()
        up = statistics.mean(s.bytes_up_per_round.values())
        rows.append(
            (
                seed,
                s.macro("alone"),
                s.macro("federated"),
                s.macro("centralized"),
                s.pooled_federated,
                up,
                100 * up / s.full_model_bytes,
                wall,
            )
        )
    print()
    print(
        "| seed | alone macro AUC | federated macro AUC | centralized macro AUC | federated pooled "
        "AUC | bytes up / site / round | % of full fp32 model | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|")

    def auc(x: float | None) -> str:  # a baseline not run (--no-baselines) has none
        return "n/a" if x is None else f"{x:.3f}"

    for r in rows:
        print(
            f"| {r[0]} | {auc(r[1])} | {auc(r[2])} | {auc(r[3])} | {auc(r[4])} | {r[5]:,.0f} | "
            f"{r[6]:.2f} % | {r[7]:.0f} |"
        )

    def mean(i: int) -> float | None:
        values = [r[i] for r in rows]
        return None if None in values else statistics.mean(values)

    print(
        f"| mean | {auc(mean(1))} | {auc(mean(2))} | {auc(mean(3))} | {auc(mean(4))} | "
        f"{mean(5):,.0f} | {mean(6):.2f} % | {mean(7):.0f} |"
    )
    m1, m2, m3 = mean(1), mean(2), mean(3)
    if None not in (m1, m2, m3):
        print(f"\nfederated - alone: {m2 - m1:+.3f}; federated - centralized: {m2 - m3:+.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
