#!/usr/bin/env python
"""What a simulated round spends outside training, and what sealing and opening cost as a share
of it, measured in one script run.

Runs ``fedpeft simulate``'s engine (default: heart, LoRA, 5 rounds, no baselines) and reads the
store: each round's wall time, each site's local training (its reply's ``train-seconds``) and
the whole time it spent on the message (``task-seconds``: evaluating the previous state,
training, sealing). The virtual sites share ``--cpus`` Ray workers, so a round's site work is
at least the busiest worker's: the sites' task seconds summed, over the workers (the sites
packed perfectly; the real packing is worse, so "coordinator and messaging" is an upper bound).
Then it seals and opens a delta of this run's exact shapes with the same envelope (median of
``--repeat``): in a round each site seals once (in parallel) and the coordinator opens every
delta in turn.

    .venv/bin/python bench/overhead.py [--rounds 5] [--seed 0] [--repeat 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from compare import stored_run  # bench/compare.py and bench/seal.py: this folder is on the path
from seal import _median_seconds

from fedpeft.common.config import RunConfig


def seal_open_seconds(cfg: RunConfig, repeat: int) -> tuple[float, float, int]:
    """Median seconds to seal and to open one delta of ``cfg``'s shared state, and its bytes."""
    from fedpeft.common import crypto
    from fedpeft.common.envelope import Expected, open_delta, seal_delta
    from fedpeft.common.methods import build_model, shared_state
    from fedpeft.common.tensors import to_numpy

    model = build_model(cfg.model, cfg.method, 0.0, cfg.seed)
    rng = np.random.default_rng(0)
    delta = {
        k: rng.normal(0, 0.01, v.shape).astype(np.float32)
        for k, v in to_numpy(shared_state(model)).items()
    }
    run_key, site = crypto.new_run_key(), crypto.new_identity()
    token, method, fingerprint = "0" * 32, cfg.method.name, "sha256:" + "0" * 64

    def seal() -> bytes:
        return seal_delta(
            delta,
            run_token=token,
            round=1,
            site_id="Cleveland",
            method=method,
            fingerprint=fingerprint,
            num_examples=180,
            codec=cfg.federation.codec,
            run_public=crypto.raw_public(run_key),
            identity=site,
        )

    sealed = seal()
    expected = Expected(
        run_token=token,
        round=1,
        method=method,
        fingerprint=fingerprint,
        shapes={k: v.shape for k, v in delta.items()},
        max_bytes=2 * len(sealed) + 65_536,
    )
    sites = {"Cleveland": site.public_key()}
    opened = _median_seconds(lambda: open_delta(sealed, expected, run_key, sites), repeat)
    return _median_seconds(seal, repeat), opened, len(sealed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="heart")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

    from fedpeft.common.config import load_config
    from fedpeft.common.keys import TASK_SECONDS
    from fedpeft.simulate import run_simulation

    workers = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="fedpeft-overhead-") as tmp:
        db = f"sqlite:///{Path(tmp) / 'runs.db'}"
        overrides = {"data.dataset": args.dataset, "federation.rounds": args.rounds}
        cfg = load_config(overrides={**overrides, "seed": args.seed, "db": db})
        result = run_simulation(cfg, progress=lambda _: None)
        rounds, results = stored_run(db, result.run_id)
    seal_s, open_s, sealed_bytes = seal_open_seconds(cfg, args.repeat)

    print(
        f"\n{args.dataset}, {cfg.method.name}, {args.rounds} rounds, seed {args.seed}, "
        f"{workers} Ray workers, {time.strftime('%Y-%m-%d')}\n"
    )
    print(
        "| round | wall (s) | sites' training, summed (s) | sites' task, summed (s) | "
        "busiest worker at least (s) | coordinator and messaging at most (s) | share |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    walls, outside = [], []
    for r in rounds:
        trains = [s for s in results if s.round == r.round and s.phase == "train"]
        training = sum(s.seconds or 0.0 for s in trains)
        task = sum(s.extra.get(TASK_SECONDS, 0.0) for s in trains)
        busiest = task / min(workers, max(len(trains), 1))
        rest = r.seconds - busiest
        walls.append(r.seconds)
        outside.append(rest)
        print(
            f"| {r.round} | {r.seconds:.1f} | {training:.1f} | {task:.1f} | {busiest:.1f} | "
            f"{rest:.1f} | {100 * rest / r.seconds:.0f} % |"
        )
    sites = len({s.site for s in results})
    per_round = seal_s + sites * open_s
    mean_wall = sum(walls) / len(walls)
    print(
        f"\nseal one delta ({sealed_bytes:,} bytes sealed): {1000 * seal_s:.2f} ms; open one: "
        f"{1000 * open_s:.2f} ms; a round (one seal on the critical path, {sites} opens): "
        f"{1000 * per_round:.1f} ms = {100 * per_round / mean_wall:.3f} % of the mean round "
        f"({mean_wall:.1f} s)"
    )
    print(
        f"mean outside the sites' work, rounds 2-{len(rounds)}: "
        f"{statistics.mean(outside[1:]) if len(outside) > 1 else float('nan'):.1f} s"
    )


if __name__ == "__main__":
    main()
