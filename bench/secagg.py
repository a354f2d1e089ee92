#!/usr/bin/env python
"""The cost of one round with and without secure aggregation, at 4, 20 and 100 simulated sites.

The real round loop (server/strategy.py ``FederatedRun``) over the in-memory grid of the tests
(tests/memory_grid.py: this script puts tests/ on ``sys.path`` to import ``MemoryGrid`` and
``ScriptedSite``), in one process: no Flower network, no model, no training. Each scripted site
answers with the real site functions (the envelope, and with secure aggregation
client/secagg.py's stage answers and masked update) and sends a fixed random update of the
default LoRA shape (74,498 float32 entries: 6 layers x query/value x LoRA A (8 x 384) and
B (384 x 8), and the 2-class head), of L2 norm 0.5 (within the default clip of 10, so clipping
changes nothing). The store is an in-memory SQLite one. Each run is one round, then the final
evaluate exchange, as ``fedpeft simulate --rounds 1`` would do.

Measured per run:

- round wall s: the whole ``FederatedRun.start`` of the 1-round run, at the coordinator. The
  sites answer inside it, one after the other (the grid calls them), so it includes their time;
- sites' s: the sum over the sites of the time spent in their handler (each scripted site
  wrapped), over all messages of the run; "coordinator s" is the wall minus that;
- bytes per site (the mean over the sites): the train exchange's up and down bytes as the store's
  train rows record them, and the secure aggregation stages' (``query.secagg_*``) from the
  messages the grid carried, both with ``common/records.py:message_nbytes``. The final evaluate
  exchange is left out (the same in both modes);
- the largest |secure mean - plain mean| over all entries of the new global state, next to the
  fixed-point step 2 * clip / L of a round of that many sites (the secure mean is within half a
  step of the exact mean of the clipped updates, so this must stay below one step).

A second table splits the secure runs' time: each stage's site seconds (sum over sites), the
ChaCha20 mask expansions (``common.secagg.prg``, at sites and coordinator: how many and their
seconds, the time includes nothing else) and the coordinator's ``unmask_sum``.

    .venv/bin/python bench/secagg.py [--sites 4,20,100] [--repeat 1]

Times are the median of --repeat runs (plain and secure alternate). One plain and one secure run
of 100 sites take about 15 s on 2 cores (the sites' work grows as n^2).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from memory_grid import MemoryGrid, ScriptedSite  # noqa: E402

import fedpeft.common.secagg as secagg  # noqa: E402
import fedpeft.server.strategy as strategy  # noqa: E402
from fedpeft.common import crypto  # noqa: E402
from fedpeft.common.config import SecureAggregationConfig, load_config  # noqa: E402
from fedpeft.common.keys import Phase  # noqa: E402
from fedpeft.common.records import message_nbytes  # noqa: E402
from fedpeft.common.secagg import FixedPoint  # noqa: E402
from fedpeft.common.secagg_messages import STAGES  # noqa: E402
from fedpeft.common.state import State  # noqa: E402
from fedpeft.common.trust import CoordinatorTrust  # noqa: E402
from fedpeft.server.store import open_store  # noqa: E402

FINGERPRINT = "sha256:bench-base-model"
HIDDEN, RANK, LAYERS, LABELS = 384, 8, 6, 2
UPDATE_NORM = 0.5
CLIP = 10.0  # federation.secure_aggregation.clip (its default)


def lora_state(rng: np.random.Generator, std: float) -> State:
    """A state of the default LoRA shape (74,498 float32 entries), entries N(0, std^2)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(LAYERS):
        for proj in ("query", "value"):
            prefix = f"encoder.layer.{layer}.attention.self.{proj}"
            shapes[f"{prefix}.lora_A.weight"] = (RANK, HIDDEN)
            shapes[f"{prefix}.lora_B.weight"] = (HIDDEN, RANK)
    shapes["classifier.weight"], shapes["classifier.bias"] = (LABELS, HIDDEN), (LABELS,)
    return {k: rng.normal(0, std, s).astype(np.float32) for k, s in shapes.items()}


ENTRIES = sum(v.size for v in lora_state(np.random.default_rng(0), 1).values())
assert ENTRIES == 74_498, ENTRIES


def site_update(n_sites: int, index: int) -> State:
    """Site ``index``'s update in a run of ``n_sites``: random, of L2 norm :data:`UPDATE_NORM`."""
    state = lora_state(np.random.default_rng([n_sites, index]), 1.0)
    norm = float(np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in state.values())))
    return {k: (v * (UPDATE_NORM / norm)).astype(np.float32) for k, v in state.items()}


@dataclass
class Clock:
    """Seconds spent, by what (a message type, or a function's name), and calls counted."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def wrap(self, what: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[what] += time.perf_counter() - t0
                self.calls[what] += 1

        return timed


@dataclass
class TimedSite:
    """A scripted site whose handler time is added to ``clock`` by message type; its replies
    are kept to count their bytes after the run (not inside the timed handler)."""

    site: ScriptedSite
    clock: Clock
    replies: list[Any]

    def __call__(self, msg: Any) -> Any:
        t0 = time.perf_counter()
        reply = self.site(msg)
        self.clock.seconds[msg.metadata.message_type] += time.perf_counter() - t0
        if reply is not None:
            self.replies.append(reply)
        return reply


@dataclass
class Result:
    wall: float
    sites: float
    train_up: float
    train_down: float
    stages_up: float
    stages_down: float
    mean: State  # the update the round applied: the mean of the sites'
    clock: Clock


def one_run(n_sites: int, secure: bool) -> Result:
    """One 1-round run over ``n_sites`` scripted sites; what it cost."""
    coordinator = crypto.new_identity()
    names = [f"site{i:03d}" for i in range(n_sites)]
    identity = {name: crypto.new_identity() for name in names}
    trust = CoordinatorTrust(coordinator, {n: k.public_key() for n, k in identity.items()})
    overrides: dict[str, Any] = {"seed": 0, "db": "sqlite://", "federation.rounds": 1}
    if secure:
        overrides["federation.secure_aggregation.enabled"] = True
        overrides["federation.secure_aggregation.clip"] = CLIP
    cfg = load_config(overrides=overrides)
    store = open_store("sqlite://")
    run_id = store.create_run(
        config_json=cfg.to_json(),
        dataset="bench",
        method=cfg.method.name,
        model_name="bench",
        model_fingerprint=FINGERPRINT,
        trainable_params=ENTRIES,
        total_params=ENTRIES,
        seed=0,
    )
    clock, replies = Clock(), []
    nodes = {}
    for i, name in enumerate(names):
        update = site_update(n_sites, i)
        site = ScriptedSite(
            name, identity[name], coordinator.public_key(), lambda _r, _s, u=update: u
        )
        nodes[i + 1] = TimedSite(site, clock, replies)
    initial = lora_state(np.random.default_rng(12345), 0.02)
    loop = strategy.FederatedRun(
        cfg, store, run_id, dict(initial), FINGERPRINT, trust, os.urandom(32), lambda _: None
    )
    grid = MemoryGrid(nodes)
    # Count the mask expansions and the coordinator's unmasking (module attributes, looked up
    # at each call; put back after the run), and keep the mean the round applies.
    applied: list[State] = []

    def apply_delta(state: State, delta: State) -> State:
        applied.append(delta)
        return saved_apply(state, delta)

    saved_prg, saved_unmask, saved_apply = secagg.prg, strategy.unmask_sum, strategy.apply_delta
    secagg.prg = clock.wrap("prg", secagg.prg)
    strategy.unmask_sum = clock.wrap("unmask_sum", strategy.unmask_sum)
    strategy.apply_delta = apply_delta
    try:
        t0 = time.perf_counter()
        loop.start(grid)
        wall = time.perf_counter() - t0
    finally:
        secagg.prg, strategy.unmask_sum = saved_prg, saved_unmask
        strategy.apply_delta = saved_apply
    rows = [r for r in store.site_results(run_id) if r.phase == Phase.TRAIN]
    store.close()
    [mean] = applied
    assert len(rows) == n_sites and all(r.status == "ok" for r in rows), rows
    stages_down = sum(message_nbytes(m) for m in grid.sent if m.metadata.message_type in STAGES)
    stages_up = sum(message_nbytes(m) for m in replies if m.metadata.message_type in STAGES)
    sites = sum(v for k, v in clock.seconds.items() if k in (*STAGES, "train", "evaluate"))
    return Result(
        wall=wall,
        sites=sites,
        train_up=statistics.mean(r.bytes_up for r in rows),
        train_down=statistics.mean(r.bytes_down for r in rows),
        stages_up=stages_up / n_sites,
        stages_down=stages_down / n_sites,
        mean=mean,
        clock=clock,
    )


def say(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def machine() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return (
        f"{datetime.date.today().isoformat()}, commit {commit}, {platform.machine()} "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, numpy {np.__version__}, "
        f"cryptography {version('cryptography')}, flwr {version('flwr')}"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sites", default="4,20,100", help="site counts, comma-separated")
    p.add_argument("--repeat", type=int, default=1, help="runs per setting (median time)")
    args = p.parse_args()
    counts = [int(s) for s in args.sites.split(",")]
    print(f"{machine()}; {ENTRIES:,} float32 entries per update, {args.repeat} run(s) each\n")
    main_rows, split_rows = [], []
    for n in counts:
        runs: dict[bool, list[Result]] = {False: [], True: []}
        worst = 0.0
        for rep in range(args.repeat):
            for secure in (False, True):
                r = one_run(n, secure)
                runs[secure].append(r)
                say(f"{n} sites, secure={secure}, run {rep + 1}: {r.wall:.2f} s")
            plain, masked = runs[False][-1].mean, runs[True][-1].mean
            worst = max(worst, max(float(np.max(np.abs(masked[k] - plain[k]))) for k in plain))
        step = FixedPoint(CLIP, n).step
        for secure in (False, True):
            rs = runs[secure]
            wall = statistics.median(r.wall for r in rs)
            sites = statistics.median(r.sites for r in rs)
            last = rs[-1]
            check = f"{worst:.1e} (step {step:.1e}: {'ok' if worst <= step else 'NOT'})"
            main_rows.append(
                f"| {n} | {'on' if secure else 'off'} | {wall:.2f} | {sites:.2f} | "
                f"{wall - sites:.2f} | {sites / n:.3f} | {last.train_up:,.0f} | "
                f"{last.stages_up:,.0f} | {last.train_down:,.0f} | {last.stages_down:,.0f} | "
                f"{check if secure else ''} |"
            )
        clocks = [r.clock for r in runs[True]]

        def median(what: str, clocks: list[Clock] = clocks) -> str:
            return f"{statistics.median(c.seconds[what] for c in clocks):.2f}"

        split_rows.append(
            f"| {n} | {SecureAggregationConfig().shares_needed(n)} | "
            + " | ".join(median(s) for s in (*STAGES[:2], "train", STAGES[2]))
            + f" | {clocks[-1].calls['prg']:,} | {median('prg')} | {median('unmask_sum')} |"
        )
    print(
        "| sites | secure aggregation | round wall s | sites' s (sum) | coordinator s | "
        "s per site | train up B/site | stages up B/site | train down B/site | "
        "stages down B/site | max abs(secure - plain mean) |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    print("\n".join(main_rows))
    print(
        "\nSecure runs, where the time goes (median s; sites' s by message, sum over sites; "
        "mask expansions at sites and coordinator):\n"
    )
    print(
        "| sites | t | keys s | shares s | train s | unmask s | ChaCha20 mask expansions | "
        "their s | coordinator unmask_sum s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(split_rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
