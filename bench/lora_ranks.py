#!/usr/bin/env python
"""Sites of different capacity (``site_lora_ranks``): the run's LoRA (rank 8) with every site at
rank 8, with sites at ranks 8, 8, 4 and 2 (each component averaged over the sites that trained
it), and with every site at rank 2 (what a consortium gets by running at its weakest site's
rank). Macro and pooled AUC of the delivered round, each site's AUC, and the seconds per local
step each rank took, over seeds.

    .venv/bin/python bench/lora_ranks.py [--seeds 0 1 2] [-- extra flags]

Each (setting, seed) is one `fedpeft simulate --baselines none` (a fresh process).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedpeft.common import keys
from fedpeft.report import summarize
from fedpeft.server.store import open_store

SETTINGS: dict[str, list[str]] = {
    "all at 8": [],
    "8, 8, 4, 2": ["--site-lora-ranks", "8", "8", "4", "2"],
    "all at 2": ["--site-lora-ranks", "2", "2", "2", "2"],
}


def mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}" if values else "n/a"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("extra", nargs="*", help="more flags for fedpeft simulate")
    args = p.parse_args()
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    macro: dict[str, list[float]] = {}
    pooled: dict[str, list[float]] = {}
    per_site: dict[tuple[str, str], list[float]] = {}
    step: dict[int, list[float]] = {}  # rank -> seconds per local step
    walls: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, flags) in enumerate(SETTINGS.items()):
            for seed in args.seeds:
                db = f"sqlite:///{Path(tmp) / f'{index}-{seed}.db'}"
                cmd = [sys.executable, "-m", "fedpeft", "simulate", "--seed", str(seed)]
                cmd += ["--db", db, "--baselines", "none", *flags, *args.extra]
                print("$", " ".join(cmd), flush=True)
                started = time.perf_counter()
                subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
                walls.setdefault(name, []).append(time.perf_counter() - started)
                store = open_store(db)
                s = summarize(store)
                for r in store.site_results(store.get_run(None).id):
                    if r.phase == "train" and keys.LORA_RANK in r.extra:
                        rank = int(r.extra[keys.LORA_RANK])
                        step.setdefault(rank, []).append(float(r.extra["seconds-per-step"]))
                store.close()
                macro.setdefault(name, []).append(s.macro("federated") or float("nan"))
                pooled.setdefault(name, []).append(s.pooled_federated or float("nan"))
                for row in s.rows:
                    if row.federated is not None:
                        per_site.setdefault((name, row.site), []).append(row.federated)
    print(f"\nheart, {len(args.seeds)} seeds (mean ± sd), delivered round, --baselines none\n")
    print("| site ranks | federated macro AUC | federated pooled AUC | wall s (mean) |")
    print("|---|---|---|---|")
    for name in SETTINGS:
        print(
            f"| {name} | {mean_sd(macro[name])} | {mean_sd(pooled[name])} | "
            f"{statistics.mean(walls[name]):.0f} |"
        )
    sites = sorted({site for _, site in per_site})
    print("\n| site | " + " | ".join(SETTINGS) + " |")
    print("|---|" + "---|" * len(SETTINGS))
    for site in sites:
        cells = [mean_sd(per_site.get((name, site), [])) for name in SETTINGS]
        print(f"| {site} | " + " | ".join(cells) + " |")
    print("\n| rank trained | local steps timed | seconds per step (median) |")
    print("|---|---|---|")
    for rank in sorted(step):
        print(f"| {rank} | {len(step[rank])} | {statistics.median(step[rank]):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
