"""Round overhead on loopback: stock Flower (a ``flwr-clientapp`` process per message) vs fedpeft's
warm site worker, side by side on the same machine.

For each mode: a TLS coordinator and 3 sites (60 heart-disease rows each) on 127.0.0.1, started
with ``fedpeft coordinator start`` / ``fedpeft site start`` (the stock mode with the hidden
``--per-message-process``), then one 3-round LoRA run with ``fedpeft run start``. From the run
store: each round's wall time (its exchange, one message per site that also evaluates the
previous round's state, and its aggregation; the last round's also the final evaluate
exchange: the rounds add up to the run), the slowest site's training seconds and the
difference, which is what the deployment adds on top of training. The difference splits into
what the sites spend beyond training (evaluating, sealing; each reply says how long the site
spent on its message) and the rest: messaging (Flower's polls, transfers) and the coordinator.

    .venv/bin/python bench/worker.py [--rounds 3] [--rows 60] [--keep DIR]

Takes a few minutes per mode on a laptop; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fedpeft.common.data import heart_sites
from fedpeft.common.environment import FLWR_HOME_ENV
from fedpeft.common.keys import TASK_SECONDS
from fedpeft.processes import BIN, child_env
from fedpeft.server.checkpoints import write_store_key
from fedpeft.server.store import open_store

SITES = ("Cleveland", "Hungary", "Switzerland")
MODES = {"per-message process": ("--per-message-process",), "warm worker": ()}


def say(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def fedpeft(*args: str, cwd: Path) -> None:
    done = subprocess.run(
        [str(BIN / "fedpeft"), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    if done.returncode:
        raise RuntimeError(f"fedpeft {' '.join(args)}: {done.stderr[-2000:]}")


def start(
    started: list[subprocess.Popen[bytes]], cwd: Path, *args: str, threads: int = 0
) -> subprocess.Popen[bytes]:
    """``fedpeft *args`` in ``cwd``; ``threads``: its torch threads (0: torch's default)."""
    extra = {FLWR_HOME_ENV: str(cwd / "flwr-home")}
    if threads:
        extra |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with (cwd / "process.log").open("ab") as out:
        proc = subprocess.Popen(
            [str(BIN / "fedpeft"), *args],
            cwd=cwd,
            env=child_env(extra),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    started.append(proc)
    return proc


def stop(started: list[subprocess.Popen[bytes]]) -> None:
    for proc in reversed(started):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in started:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def deploy(
    root: Path,
    flags: tuple[str, ...],
    rows: int,
    started: list[subprocess.Popen[bytes]],
    threads: int = 0,
) -> Path:
    """A TLS coordinator and the sites, running; returns the coordinator's folder."""
    coord = root / "coordinator"
    coord.mkdir(parents=True)
    fedpeft("certs", "--name", "localhost", "--name", "127.0.0.1", cwd=coord)
    fedpeft("coordinator", "init", cwd=coord)
    write_store_key(coord / "store.key")
    (coord / "sites.txt").write_text("# registered sites\n")
    fleet, api = free_port(), free_port()
    (coord / "coordinator.toml").write_text(
        f'[coordinator]\nfleet_address = "127.0.0.1:{fleet}"\napi_address = "127.0.0.1:{api}"\n'
        'state = "superlink.db"\n\n[tls]\nca = "certs/ca.crt"\n'
        'certificate = "certs/server.pem"\nkey = "certs/server.key"\n'
    )
    link = start(started, coord, "coordinator", "start", "--config", "coordinator.toml")
    wait_port(api, link)
    wait_port(fleet, link)
    for name, data in zip(SITES, heart_sites()[: len(SITES)], strict=True):
        home = root / name
        home.mkdir()
        fedpeft("site", "enroll", "--name", name, cwd=home)
        fedpeft(
            *("coordinator", "add-site", name, str(home / "keys" / f"{name}.pub")),
            *("--config", "coordinator.toml"),
            cwd=coord,
        )
        idx = np.random.default_rng(0).choice(len(data), rows, replace=False)
        pd.DataFrame({"text": [data.texts[i] for i in idx], "label": data.labels[idx]}).to_csv(
            home / "records.csv", index=False
        )
        (home / "site.toml").write_text(
            f'[site]\nname = "{name}"\ncoordinator = "127.0.0.1:{fleet}"\n'
            f'ca = "{coord / "certs" / "ca.crt"}"\nidentity_key = "keys/{name}.key"\n'
            f'coordinator_key = "{coord / "keys" / "coordinator.pub"}"\n'
            f'data = "records.csv"\napi_port = {free_port()}\n'
        )
        start(started, home, "site", "start", "--config", "site.toml", *flags, threads=threads)
    return coord


#: Per round: round, wall seconds, slowest site's training seconds, the sites' time beyond it.
Row = tuple[int, float, float, float]


def run(coord: Path, rounds: int) -> list[Row]:
    """One LoRA run; per round: its :data:`Row`. The sites' time beyond training: the longest
    train message minus the longest training, plus the longest final evaluate message."""
    (coord / "run.toml").write_text(
        'device = "cpu"\ndb = "sqlite:///runs.db"\n[method]\nname = "lora"\n'
        f"[federation]\nrounds = {rounds}\nmin_sites = {len(SITES)}\nround_timeout_s = 600.0\n"
        "[model]\nmax_length = 64\n"
    )
    with (coord / "run.log").open("wb") as log:
        done = subprocess.run(
            [str(BIN / "fedpeft"), "run", "start", "run.toml", "--coordinator", "coordinator.toml"],
            cwd=coord,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=3600,
        )
    if done.returncode:
        raise RuntimeError(f"the run failed: see {coord / 'run.log'}")
    store = open_store(f"sqlite:///{coord / 'runs.db'}")
    (info,) = store.list_runs()
    sites = store.site_results(info.id)
    out = []
    for r in store.rounds(info.id):
        train = [s for s in sites if s.round == r.round and s.phase == "train"]
        evaluate = [s for s in sites if s.round == r.round and s.phase == "evaluate"]
        training = max(s.seconds or 0.0 for s in train)
        task = max(float(s.extra.get(TASK_SECONDS, 0.0)) for s in train)
        final = max((float(s.extra.get(TASK_SECONDS, 0.0)) for s in evaluate), default=0.0)
        out.append((r.round, r.seconds, training, task - training + final))
    store.close()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rows", type=int, default=60, help="records per site")
    p.add_argument("--keep", type=Path, default=None, help="keep folders and logs here")
    p.add_argument(
        "--mode", choices=sorted(MODES), action="append", help="only this mode (repeatable)"
    )
    p.add_argument(
        "--site-threads",
        type=int,
        default=0,
        help="torch threads of each site (OMP_NUM_THREADS; default: torch's, one per core): "
        "the sites share this machine's cores, where each hospital would have its own",
    )
    args = p.parse_args()
    root = (
        Path(tempfile.mkdtemp(prefix="fedpeft-bench-worker-")) if args.keep is None else args.keep
    )
    results: dict[str, list[Row]] = {}
    try:
        for mode, flags in MODES.items():
            if args.mode and mode not in args.mode:
                continue
            started: list[subprocess.Popen[bytes]] = []
            try:
                folder = root / mode.replace(" ", "-")
                say(f"{mode}: starting a coordinator and {len(SITES)} sites in {folder}")
                coord = deploy(folder, flags, args.rows, started, args.site_threads)
                say(f"{mode}: {args.rounds}-round LoRA run")
                t0 = time.monotonic()
                results[mode] = run(coord, args.rounds)
                say(f"{mode}: done in {time.monotonic() - t0:.0f} s")
            finally:
                stop(started)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print()
    print(
        "| mode | round | round wall (s) | slowest site's training (s) | difference (s) "
        "| of which at the sites (s) | of which messaging (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode, rows in results.items():
        for rnd, wall, slowest, at_sites in rows:
            print(
                f"| {mode} | {rnd} | {wall:.1f} | {slowest:.1f} | {wall - slowest:.1f} "
                f"| {at_sites:.1f} | {wall - slowest - at_sites:.1f} |"
            )
        n = len(rows)
        diff = sum(w - s for _, w, s, _ in rows) / n
        at = sum(a for *_, a in rows) / n
        print(f"| {mode} | mean | | | {diff:.1f} | {at:.1f} | {diff - at:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
