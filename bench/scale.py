#!/usr/bin/env python
"""Many simulated sites on one machine: what grows with the number of sites, in one script.

Each configuration is a ``fedpeft simulate`` run of LoRA on ``synthetic:N`` (N sites of
generated notes, common/data.py ``synthetic_sites``) with K sites training per round (0 = all),
every other site evaluating the round's state, in a process of its own. Reported per
configuration:

* seconds per round (the store's, rounds 2 on: round 1 also builds every site's session);
* bytes per round, down (global state to every site) and up (replies), summed over the sites;
* the store's writes per round: SQL statements and rows written, and transactions (commits);
* the coordinator process's resident memory: after round 1 and after the last round (does it
  grow round after round?) and its peak (does it grow with N?);
* the largest site process's peak (each Ray worker records its own; a worker serves any site).

    .venv/bin/python bench/scale.py [--sites 10 25 50 100] [--per-round 10] [--all-at 10 100]

``--per-round K`` runs each of ``--sites`` with K sites per round; ``--all-at`` adds runs with
every site training each round. Run it on an otherwise idle machine: all 100 sites training take
about a minute a round on 2 CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from compare import RSS_DIR_ENV, _measured_fedpeft_app, _peak_mb, _site_peak, stored_run


def _rss_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def one(n_sites: int, per_round: int, rounds: int, seed: int) -> dict[str, Any]:
    """One configuration in this process; its numbers."""
    import logging

    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from fedpeft.common.config import load_config
    from fedpeft.server.store.sql import SqlRunStore
    from fedpeft.simulate import run_simulation

    logging.getLogger("flwr").setLevel(logging.ERROR)
    counts = {"statements": 0, "rows": 0, "commits": 0}

    @event.listens_for(Engine, "before_cursor_execute")
    def _statement(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if statement.lstrip().split(None, 1)[0].upper() in ("INSERT", "UPDATE", "DELETE"):
            counts["statements"] += 1
            counts["rows"] += len(parameters) if executemany else 1

    @event.listens_for(Engine, "commit")
    def _commit(conn):  # type: ignore[no-untyped-def]
        counts["commits"] += 1

    per_round_writes: list[dict[str, int]] = []
    rss_after: list[float] = []
    add_round = SqlRunStore.add_round

    def measured_add_round(self: Any, *args: Any, **kwargs: Any) -> None:
        before = dict(counts)
        add_round(self, *args, **kwargs)
        per_round_writes.append({k: counts[k] - before[k] for k in counts})
        rss_after.append(_rss_mb())

    SqlRunStore.add_round = measured_add_round  # type: ignore[method-assign]

    with tempfile.TemporaryDirectory(prefix="fedpeft-scale-") as tmp:
        work = Path(tmp)
        (work / "rss").mkdir()
        os.environ[RSS_DIR_ENV] = str(work / "rss")
        db = f"sqlite:///{work / 'runs.db'}"
        cfg = load_config(
            overrides={
                "data.dataset": f"synthetic:{n_sites}",
                "federation.rounds": rounds,
                "federation.sites_per_round": per_round,
                "seed": seed,
                "db": db,
            }
        )
        started = time.perf_counter()
        result = run_simulation(cfg, client_app=_measured_fedpeft_app(), progress=lambda _: None)
        wall = time.perf_counter() - started
        stored, sites = stored_run(db, result.run_id)
        site_peak = _site_peak(work / "rss")
    later = [r for r in stored if r.round >= 2] or stored
    last = max(r.round for r in stored)
    trained = [s for s in sites if s.phase == "train" and s.status == "ok"]
    aucs = [s.auc for s in sites if s.phase == "evaluate" and s.round == last and s.auc]
    return {
        "sites": n_sites,
        "per_round": per_round or n_sites,
        "rounds": len(stored),
        "wall_s": wall,
        "s_per_round": sum(r.seconds for r in later) / len(later),
        "down_mb": sum(s.bytes_down or 0 for s in sites) / len(stored) / 1e6,
        "up_mb": sum(s.bytes_up or 0 for s in sites) / len(stored) / 1e6,
        "trained_per_round": len(trained) / len(stored),
        "writes": per_round_writes,
        "rss_after_round_mb": rss_after,
        "coordinator_peak_mb": _peak_mb(),
        "site_peak_mb": site_peak,
        "macro_auc": sum(aucs) / len(aucs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 25, 50, 100])
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--all-at", type=int, nargs="*", default=[100])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--one", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        numbers = one(args.one[0], args.one[1], args.rounds, args.seed)
        print("RESULT " + json.dumps(numbers), flush=True)
        return
    configs = [(n, args.per_round if args.per_round < n else 0) for n in args.sites]
    configs += [(n, 0) for n in args.all_at if (n, 0) not in configs]
    rows = []
    for n, k in configs:
        out = subprocess.run(
            [sys.executable, __file__, "--one", str(n), str(k), "--rounds", str(args.rounds)]
            + ["--seed", str(args.seed)],
            capture_output=True,
            text=True,
            env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
        )
        lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            sys.exit(f"{n} sites failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        rows.append(json.loads(lines[-1][7:]))
        r = rows[-1]
        print(f"{n} sites, {r['per_round']} per round: {r['wall_s']:.0f} s", flush=True)
    print(
        f"\nLoRA on synthetic:N, {args.rounds} rounds, seed {args.seed}, {os.cpu_count()} CPUs, "
        f"{time.strftime('%Y-%m-%d')}\n"
    )
    print(
        "| sites | training / round | s / round | MB down / round | MB up / round "
        "| store writes / round: statements, rows, commits "
        "| coordinator MB after round 1 → last, peak | largest site peak MB | macro AUC |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        w = r["writes"][-1]
        rss = r["rss_after_round_mb"]
        print(
            f"| {r['sites']} | {r['per_round']} | {r['s_per_round']:.1f} | {r['down_mb']:.1f} "
            f"| {r['up_mb']:.2f} | {w['statements']}, {w['rows']}, {w['commits']} "
            f"| {rss[0]:.0f} → {rss[-1]:.0f}, {r['coordinator_peak_mb']:.0f} "
            f"| {r['site_peak_mb']:.0f} | {r['macro_auc']:.3f} |"
        )


if __name__ == "__main__":
    main()
