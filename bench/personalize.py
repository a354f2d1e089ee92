#!/usr/bin/env python
"""Personalization (``federation.personalize``): each site's AUC under the delivered global
state against its personalized model's, per part and seed, then the mean of seeds per site.

    .venv/bin/python bench/personalize.py [--seeds 0 1 2] [--parts head lora-b] [-- extra flags]

Each (seed, part) is one `fedpeft simulate --baselines none --personalize PART` (a fresh
process); the global column is the same run's delivered round.
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

from fedpeft.report import summarize
from fedpeft.server.store import open_store


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--parts", nargs="+", default=["head", "lora-b"])
    p.add_argument("extra", nargs="*", help="more flags for fedpeft simulate")
    args = p.parse_args()
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    # (part, site) -> [(global, personalized, epochs)] over seeds
    found: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.parts:
            for seed in args.seeds:
                db = f"sqlite:///{Path(tmp) / f'{part}-{seed}.db'}"
                cmd = [sys.executable, "-m", "fedpeft", "simulate", "--seed", str(seed)]
                cmd += ["--db", db, "--baselines", "none", "--personalize", part, *args.extra]
                print("$", " ".join(cmd), flush=True)
                started = time.perf_counter()
                subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
                store = open_store(db)
                s = summarize(store)
                store.close()
                for r in s.rows:
                    if r.federated is not None and r.personalized is not None:
                        item = (r.federated, r.personalized, r.personal_epochs or 0)
                        found.setdefault((part, r.site), []).append(item)
                runs.append(
                    (
                        part,
                        seed,
                        s.macro("federated"),
                        s.macro("personalized"),
                        time.perf_counter() - started,
                    )
                )
    print("\n| part | seed | global macro AUC | personalized macro AUC | difference | wall s |")
    print("|---|---|---|---|---|---|")

    def f(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    for part, seed, g, m, wall in runs:
        diff = "n/a" if g is None or m is None else f"{m - g:+.3f}"
        print(f"| {part} | {seed} | {f(g)} | {f(m)} | {diff} | {wall:.0f} |")
    print(
        "\n| part | site | global AUC (mean of seeds) | personalized | difference "
        "| seeds kept global |"
    )
    print("|---|---|---|---|---|---|")
    for (part, site), items in sorted(found.items()):
        g = statistics.mean(i[0] for i in items)
        m = statistics.mean(i[1] for i in items)
        kept = sum(1 for i in items if i[2] == 0)
        print(f"| {part} | {site} | {g:.3f} | {m:.3f} | {m - g:+.3f} | {kept} of {len(items)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
