#!/usr/bin/env python
"""Seal and open throughput of a delta next to raw AES-256-GCM of the same library, and the
envelope's byte overhead per upload.

    .venv/bin/python bench/seal.py [--repeat 20]

Sizes: the default LoRA delta (74,498 values), a 1 M-value delta and the full model
(22.7 M values). Throughput is fp32 payload MB per second (MB = 10^6 bytes), the median of
--repeat runs; "raw" is AESGCM.encrypt / decrypt of the same number of bytes. Ratios are
measured side by side in one process, so they hold on a noisy machine better than the MB/s do.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedpeft.common import crypto
from fedpeft.common.envelope import Expected, open_delta, seal_delta

SIZES = {"lora r8 (default)": 74_498, "1 M values": 1_000_000, "full model": 22_713_986}


def _state(values: int) -> dict[str, np.ndarray]:
    """A delta shaped like a model's: 2-D blocks of 384 columns plus a remainder."""
    rng = np.random.default_rng(0)
    rows, rest = divmod(values, 384)
    state = {f"layer.{i}.weight": rng.normal(0, 0.01, (64, 384)) for i in range(rows // 64)}
    if rows % 64:
        state["tail.weight"] = rng.normal(0, 0.01, (rows % 64, 384))
    if rest:
        state["tail.bias"] = rng.normal(0, 0.01, (rest,))
    return {k: v.astype(np.float32) for k, v in state.items()}


def _median_seconds(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _row(label: str, values: int, repeat: int) -> str:
    run_key, site = crypto.new_run_key(), crypto.new_identity()
    state = _state(values)
    nbytes = sum(v.nbytes for v in state.values())

    def seal() -> bytes:
        return seal_delta(
            state,
            run_token="0" * 32,
            round=1,
            site_id="Cleveland",
            method="lora",
            fingerprint="sha256:" + "0" * 64,
            num_examples=180,
            codec="fp32",
            run_public=crypto.raw_public(run_key),
            identity=site,
        )

    sealed = seal()
    expected = Expected(
        run_token="0" * 32,
        round=1,
        method="lora",
        fingerprint="sha256:" + "0" * 64,
        shapes={k: v.shape for k, v in state.items()},
        max_bytes=2 * nbytes + 65_536,
    )
    sites = {"Cleveland": site.public_key()}
    payload = b"".join(v.tobytes() for v in state.values())
    aead, nonce = AESGCM(os.urandom(32)), os.urandom(12)
    ciphertext = aead.encrypt(nonce, payload, b"")
    t_seal = _median_seconds(seal, repeat)
    t_open = _median_seconds(lambda: open_delta(sealed, expected, run_key, sites), repeat)
    t_enc = _median_seconds(lambda: aead.encrypt(nonce, payload, b""), repeat)
    t_dec = _median_seconds(lambda: aead.decrypt(nonce, ciphertext, b""), repeat)
    mb = nbytes / 1e6
    overhead = len(sealed) - nbytes
    return (
        f"| {label} | {nbytes:,} | {mb / t_seal:,.0f} | {mb / t_enc:,.0f} | "
        f"{t_enc / t_seal:.2f} | {mb / t_open:,.0f} | {mb / t_dec:,.0f} | "
        f"{t_dec / t_open:.2f} | {len(sealed):,} | {overhead:,} B "
        f"({100 * overhead / nbytes:.2f} %) |"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args()
    print(
        "| delta | fp32 bytes | seal MB/s | raw encrypt MB/s | seal / raw | open MB/s | "
        "raw decrypt MB/s | open / raw | envelope bytes | overhead |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, values in SIZES.items():
        repeat = max(3, args.repeat if values < 5_000_000 else args.repeat // 5)
        print(_row(label, values, repeat), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
