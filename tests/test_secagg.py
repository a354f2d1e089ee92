"""Secure aggregation's pure core: exact sums in the ring, dropouts up to the threshold and
refusal beyond it, masked uploads that look uniform, fixed point, tampering and the guard that a
site never reveals both secrets of one site. No network: whole rounds run in memory."""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import Collection

import numpy as np
import pytest
from scipy.stats import chisquare

from fedpeft.common.secagg import (
    PRIME,
    BelowThreshold,
    FixedPoint,
    Revealed,
    SecAggError,
    SiteSecAgg,
    flatten,
    prg,
    round_context,
    shamir_combine,
    shamir_split,
    unflatten,
    unmask_sum,
)

CONTEXT = round_context("run-token-1", 3)
BOUND = 0.5


def names(n: int) -> list[str]:
    return [f"site-{i:02d}" for i in range(n)]


def quantized(n: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Each site's delta, clipped to BOUND and encoded for n sites."""
    rng = np.random.default_rng(seed)
    fp = FixedPoint(BOUND, n)
    return {s: fp.encode(rng.normal(0, 0.2, length).astype(np.float32)) for s in names(n)}


def new_sites(n: int, seed: int = 0, context: bytes = CONTEXT) -> dict[str, SiteSecAgg]:
    return {
        s: SiteSecAgg(s, context, random_bytes=np.random.default_rng([seed, i]).bytes)
        for i, s in enumerate(names(n))
    }


class Round:
    """One round in memory, step by step, so that a test can stop or alter any step."""

    def __init__(self, n: int, threshold: int, seed: int = 0):
        self.sites = new_sites(n, seed)
        self.threshold = threshold
        self.roster = {s: site.advertise() for s, site in self.sites.items()}
        self.shared: dict[str, dict[str, bytes]] = {}
        self.masked: dict[str, np.ndarray] = {}

    def share(self, silent: Collection[str] = ()) -> None:
        self.shared = {
            s: site.share_keys(self.roster, self.threshold)
            for s, site in self.sites.items()
            if s not in silent
        }

    def inbox(self, recipient: str) -> dict[str, bytes]:
        return {v: out[recipient] for v, out in self.shared.items() if v != recipient}

    def mask(self, inputs: dict[str, np.ndarray], silent: Collection[str] = ()) -> None:
        self.masked = {
            s: self.sites[s].masked_input(inputs[s], self.inbox(s))
            for s in self.shared
            if s not in silent
        }

    def reveal(self, silent: Collection[str] = ()) -> dict[str, Revealed]:
        dropped = set(self.shared) - set(self.masked)
        return {
            s: self.sites[s].unmask(set(self.masked), dropped)
            for s in self.masked
            if s not in silent
        }

    def total(self, revealed: dict[str, Revealed]) -> np.ndarray:
        return unmask_sum(
            self.masked, revealed, self.roster, set(self.shared), self.threshold, CONTEXT
        )


def run_round(
    n: int,
    threshold: int,
    inputs: dict[str, np.ndarray],
    *,
    after_advertise: Collection[str] = (),
    before_masking: Collection[str] = (),
    after_masking: Collection[str] = (),
) -> tuple[np.ndarray, set[str]]:
    """The unmasked sum with sites going silent at each stage, and the sites it sums."""
    r = Round(n, threshold)
    r.share(silent=after_advertise)
    r.mask(inputs, silent=before_masking)
    return r.total(r.reveal(silent=after_masking)), set(r.masked)


def ring_sum(inputs: dict[str, np.ndarray], sites: Collection[str]) -> np.ndarray:
    return sum((inputs[s] for s in sorted(sites)), start=np.zeros_like(inputs[names(1)[0]]))


# -- primitives ------------------------------------------------------------------------------------


def test_prg_is_the_chacha20_keystream_of_rfc8439_appendix_a1() -> None:
    # Test vector #1 of RFC 8439 A.1: all-zero key and nonce, block counter 0.
    expected = bytes.fromhex(
        "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
        "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586"
    )
    assert prg(bytes(32), 16).astype("<u4").tobytes() == expected
    assert not np.array_equal(prg(bytes(31) + b"\x01", 16), prg(bytes(32), 16))


def test_shamir_any_threshold_shares_rebuild_the_secret_and_fewer_do_not() -> None:
    rng = np.random.default_rng(7)
    secret = int.from_bytes(rng.bytes(32), "big")
    shares = shamir_split(secret, 3, range(1, 6), rng.bytes)
    for subset in itertools.combinations(sorted(shares), 3):
        assert shamir_combine({x: shares[x] for x in subset}) == secret
    for pair in itertools.combinations(sorted(shares), 2):
        assert shamir_combine({x: shares[x] for x in pair}) != secret
    assert all(0 <= y < PRIME for y in shares.values())


# -- fixed point -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("bound", "max_sites"), [(0.5, 3), (1.0, 20), (4.0, 1000)])
def test_decoded_sum_is_the_float_sum_within_the_documented_resolution(
    bound: float, max_sites: int
) -> None:
    fp = FixedPoint(bound, max_sites)
    rng = np.random.default_rng(1)
    xs = [rng.uniform(-bound, bound, 5000).astype(np.float32) for _ in range(max_sites)]
    total = sum((fp.encode(x) for x in xs), start=np.zeros(5000, dtype=np.uint32))
    exact = np.sum([x.astype(np.float64) for x in xs], axis=0)
    error = np.abs(fp.decode_sum(total, max_sites) - exact)
    assert error.max() <= max_sites * fp.step / 2 * (1 + 1e-9)
    assert fp.step == pytest.approx(2 * bound * max_sites / 2**32, rel=1e-6)
    # The resolution is real: the error is not zero.
    assert error.max() > 0


@pytest.mark.parametrize("max_sites", [1, 2, 7, 100, 2**20])
def test_no_wrap_with_max_sites_all_at_the_bound(max_sites: int) -> None:
    fp = FixedPoint(2.0, max_sites)
    top = fp.encode(np.array([2.0, 1e30, np.inf], dtype=np.float32))  # clipped to the bound
    bottom = fp.encode(np.array([-2.0, -1e30, -np.inf], dtype=np.float32))
    assert (top == fp.levels).all() and (bottom == 0).all()
    high = (top.astype(np.uint64) * max_sites).astype(np.uint32)  # max_sites encodings, summed
    assert int(high[0]) == max_sites * fp.levels < 2**32  # never wrapped
    assert fp.decode_sum(high, max_sites) == pytest.approx([2.0 * max_sites] * 3)
    assert fp.decode_sum(bottom * np.uint32(max_sites), max_sites) == pytest.approx(
        [-2.0 * max_sites] * 3
    )
    zero = fp.encode(np.zeros(1, dtype=np.float32))
    assert fp.decode_sum(zero * np.uint32(max_sites), max_sites)[0] == 0.0


def test_fixed_point_refuses_nan_and_totals_no_encodings_reach() -> None:
    fp = FixedPoint(1.0, 4)
    with pytest.raises(ValueError, match="NaN"):
        fp.encode(np.array([0.0, np.nan], dtype=np.float32))
    with pytest.raises(SecAggError, match="out of range"):
        fp.decode_sum(np.array([2 * fp.levels + 1], dtype=np.uint32), 2)
    with pytest.raises(ValueError, match="1..4"):
        fp.decode_sum(np.zeros(1, dtype=np.uint32), 5)
    with pytest.raises(ValueError, match="bound"):
        FixedPoint(float("nan"), 4)


def test_flatten_and_unflatten_keep_names_and_shapes() -> None:
    state = {
        "b.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
        "a.bias": np.array([7.0, 8.0], dtype=np.float32),
        "c.scalar": np.array(9.0, dtype=np.float32),
    }
    vector, layout = flatten(state)
    assert vector.tolist() == [7.0, 8.0, 0, 1, 2, 3, 4, 5, 9.0]  # sorted names
    assert layout == (("a.bias", (2,)), ("b.weight", (2, 3)), ("c.scalar", ()))
    back = unflatten(vector.astype(np.float64), layout)
    assert list(back) == ["a.bias", "b.weight", "c.scalar"]
    for name, value in state.items():
        assert back[name].shape == value.shape and np.array_equal(back[name], value)
    with pytest.raises(ValueError, match="8 values for a layout of 9"):
        unflatten(vector[:8], layout)


# -- whole rounds ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "threshold"), [(3, 2), (5, 3), (10, 6), (20, 11)])
def test_unmasked_sum_is_the_exact_ring_sum_of_the_quantized_inputs(n: int, threshold: int) -> None:
    inputs = quantized(n, 3000, seed=n)
    total, summed = run_round(n, threshold, inputs)
    assert summed == set(names(n))
    assert total.dtype == np.uint32
    assert np.array_equal(total, ring_sum(inputs, summed))
    # Full-range inputs, whose sum wraps around the ring, are exact too.
    rng = np.random.default_rng(n)
    wide = {s: rng.integers(0, 2**32, 3000, dtype=np.uint32) for s in names(n)}
    total, _ = run_round(n, threshold, wide)
    assert np.array_equal(total, ring_sum(wide, names(n)))


N, T = 10, 6  # n - t = 4 sites may fail


@pytest.mark.parametrize(
    ("after_advertise", "before_masking", "after_masking"),
    [
        ((), (), ("site-03",)),  # one site drops after masking: its input still counts
        ((), (), ("site-00", "site-04", "site-05", "site-09")),  # n - t after masking
        ((), ("site-07",), ()),  # one drops after sharing keys, before masking
        ((), ("site-00", "site-02", "site-08", "site-09"), ()),  # n - t before masking
        (("site-01",), ("site-05",), ("site-02", "site-09")),  # some at every stage
        (("site-01", "site-03", "site-06", "site-08"), (), ()),  # n - t never share keys
    ],
)
def test_the_round_completes_with_the_survivors_sum_up_to_n_minus_t_dropped(
    after_advertise: tuple[str, ...],
    before_masking: tuple[str, ...],
    after_masking: tuple[str, ...],
) -> None:
    inputs = quantized(N, 2000)
    total, summed = run_round(
        N,
        T,
        inputs,
        after_advertise=after_advertise,
        before_masking=before_masking,
        after_masking=after_masking,
    )
    assert summed == set(names(N)) - set(after_advertise) - set(before_masking)
    assert np.array_equal(total, ring_sum(inputs, summed))
    fp = FixedPoint(BOUND, N)
    assert np.abs(fp.decode_sum(total, len(summed))).max() > 0  # a real sum, decodable


def test_more_than_n_minus_t_dropping_after_masking_is_refused() -> None:
    r = Round(N, T)
    r.share()
    r.mask(quantized(N, 100))
    revealed = r.reveal(silent=names(N)[: N - T + 1])  # t - 1 sites reveal
    with pytest.raises(BelowThreshold, match="5 share\\(s\\) of site 'site-00'") as caught:
        r.total(revealed)
    assert caught.value.site == "site-00"


def test_more_than_n_minus_t_dropping_before_masking_is_refused_by_sites_and_coordinator() -> None:
    r = Round(N, T)
    r.share()
    r.mask(quantized(N, 100), silent=names(N)[: N - T + 1])
    dropped = set(r.shared) - set(r.masked)
    for s in r.masked:
        with pytest.raises(BelowThreshold, match="5 survivors"):
            r.sites[s].unmask(set(r.masked), dropped)
    with pytest.raises(BelowThreshold, match="5 masked input"):
        r.total({})


def test_too_few_sites_sharing_keys_refuses_to_mask() -> None:
    r = Round(N, T)
    r.share(silent=names(N)[: N - T + 1])
    with pytest.raises(BelowThreshold, match="5 sites shared keys"):
        r.sites["site-09"].masked_input(np.zeros(4, dtype=np.uint32), r.inbox("site-09"))


# -- what a single upload shows ----------------------------------------------------------------


def test_a_masked_upload_looks_uniform_and_is_uncorrelated_with_its_input() -> None:
    n, length = 5, 4096
    rng = np.random.default_rng(11)
    fp = FixedPoint(BOUND, n)
    inputs = {s: fp.encode(rng.uniform(-BOUND, BOUND, length)) for s in names(n)}
    r = Round(n, 3, seed=11)
    r.share()
    r.mask(inputs)
    x, y = inputs["site-02"], r.masked["site-02"]

    def byte_p(v: np.ndarray) -> float:
        counts = np.bincount(v.astype("<u4").view(np.uint8), minlength=256)
        return float(chisquare(counts).pvalue)

    assert byte_p(y) > 1e-3
    assert byte_p(x) < 1e-3  # the test has power: the input itself is far from uniform
    r_xy = np.corrcoef(x.astype(np.float64), y.astype(np.float64))[0, 1]
    assert abs(r_xy) < 0.05  # ~3 standard errors (1 / sqrt(4096)) from 0
    # And it was masked, not replaced: the round still opens to the exact sum.
    assert np.array_equal(r.total(r.reveal()), ring_sum(inputs, names(n)))


# -- tampering and refusals --------------------------------------------------------------------


def flip(blob: bytes, at: int) -> bytes:
    return blob[:at] + bytes([blob[at] ^ 1]) + blob[at + 1 :]


@pytest.mark.parametrize("at", [0, 20, -1])  # nonce, ciphertext, tag
def test_an_altered_share_ciphertext_is_refused_naming_its_sender(at: int) -> None:
    r = Round(5, 3)
    r.share()
    inbox = r.inbox("site-01")
    inbox["site-03"] = flip(inbox["site-03"], at % len(inbox["site-03"]))
    with pytest.raises(SecAggError, match="from site 'site-03' do not decrypt") as caught:
        r.sites["site-01"].masked_input(np.zeros(8, dtype=np.uint32), inbox)
    assert caught.value.site == "site-03"


def test_shares_for_another_site_or_under_another_name_are_refused() -> None:
    r = Round(5, 3)
    r.share()
    inbox = r.inbox("site-01")
    inbox["site-03"] = r.shared["site-03"]["site-02"]  # meant for another recipient
    with pytest.raises(SecAggError, match="site-03"):
        r.sites["site-01"].masked_input(np.zeros(8, dtype=np.uint32), inbox)
    r = Round(5, 3)
    r.share()
    inbox = r.inbox("site-01")
    inbox["site-03"], inbox["site-04"] = inbox["site-04"], inbox["site-03"]  # senders swapped
    with pytest.raises(SecAggError, match="site-03"):
        r.sites["site-01"].masked_input(np.zeros(8, dtype=np.uint32), inbox)
    with pytest.raises(SecAggError, match="'site-99', not another site of the roster"):
        new_round = Round(5, 3)
        new_round.share()
        new_round.sites["site-01"].masked_input(
            np.zeros(8, dtype=np.uint32), {"site-99": b"x" * 60}
        )


def test_shares_from_another_round_are_refused() -> None:
    # The same seeds give the same keys: only the context differs between the two rounds.
    later = new_sites(3, context=round_context("run-token-1", 4))
    now = new_sites(3)
    roster = {s: site.advertise() for s, site in later.items()}
    assert {s: site.advertise() for s, site in now.items()} == roster
    shared = {s: site.share_keys(roster, 2) for s, site in later.items()}
    now["site-00"].share_keys(roster, 2)
    inbox = {v: shared[v]["site-00"] for v in ("site-01", "site-02")}
    with pytest.raises(SecAggError, match="another site or round"):
        now["site-00"].masked_input(np.zeros(8, dtype=np.uint32), inbox)


def test_a_site_never_reveals_both_shares_of_one_site() -> None:
    r = Round(5, 3)
    r.share()
    r.mask(quantized(5, 16), silent=["site-04"])
    alive = {"site-00", "site-01", "site-02", "site-03"}
    site = r.sites["site-00"]
    with pytest.raises(SecAggError, match="both shares of \\['site-02'\\]") as caught:
        site.unmask(alive, {"site-02", "site-04"})
    assert caught.value.site == "site-02"
    # A refused call reveals nothing and ends the site's round: no second try with other lists.
    with pytest.raises(SecAggError, match="out of order"):
        site.unmask(alive, {"site-04"})
    other = r.sites["site-01"]
    with pytest.raises(SecAggError, match="not the sites"):
        other.unmask(alive, set())  # site-04 left out: U2 is not what it masked against
    with pytest.raises(SecAggError, match="listed as dropped"):
        r.sites["site-02"].unmask(alive - {"site-02"}, {"site-02", "site-04"})
    revealed = r.sites["site-03"].unmask(alive, {"site-04"})
    assert set(revealed.seeds) == alive and set(revealed.keys) == {"site-04"}
    with pytest.raises(SecAggError, match="out of order"):
        r.sites["site-03"].unmask(alive - {"site-01"}, {"site-01", "site-04"})


def test_steps_run_once_and_in_order() -> None:
    site = SiteSecAgg("site-00", CONTEXT)
    with pytest.raises(SecAggError, match="share_keys out of order"):
        site.share_keys({}, 2)
    site.advertise()
    with pytest.raises(SecAggError, match="advertise out of order"):
        site.advertise()


def test_a_roster_without_the_sites_own_keys_or_with_a_bad_threshold_is_refused() -> None:
    r = Round(5, 3)
    forged = dict(r.roster, **{"site-00": r.roster["site-01"]})
    with pytest.raises(SecAggError, match="own keys"):
        r.sites["site-00"].share_keys(forged, 3)
    r = Round(5, 3)  # a refused step ends the site's round: a fresh one
    copied = dict(r.roster, **{"site-02": r.roster["site-01"]})
    with pytest.raises(SecAggError, match="site 'site-02' advertised another site's key"):
        r.sites["site-00"].share_keys(copied, 3)
    for threshold in (1, 2, 6):  # at least 2, more than half of 5, at most 5
        with pytest.raises(SecAggError, match=f"threshold {threshold} of 5"):
            Round(5, 3).sites["site-00"].share_keys(r.roster, threshold)


def test_the_coordinator_refuses_shares_that_do_not_rebuild_a_dropped_sites_key() -> None:
    r = Round(5, 3)
    r.share()
    r.mask(quantized(5, 16), silent=["site-04"])
    revealed = r.reveal()
    bad = revealed["site-00"]
    revealed["site-00"] = Revealed(bad.seeds, {"site-04": (bad.keys["site-04"] + 1) % PRIME})
    with pytest.raises(SecAggError, match="dropped site 'site-04'") as caught:
        r.total(revealed)
    assert caught.value.site == "site-04"


def test_the_coordinator_refuses_malformed_masked_inputs_naming_the_site() -> None:
    r = Round(5, 3)
    r.share()
    r.mask(quantized(5, 16))
    revealed = r.reveal()
    r.masked["site-02"] = r.masked["site-02"][:15]
    with pytest.raises(SecAggError, match="site 'site-02'.*not a uint32 vector of 16"):
        r.total(revealed)
    r.masked["site-02"] = np.zeros(16, dtype=np.int64)
    with pytest.raises(SecAggError, match="site 'site-02'"):
        r.total(revealed)
    r.masked["site-02"] = np.zeros(16, dtype=np.uint32)
    r.masked["site-77"] = np.zeros(16, dtype=np.uint32)
    with pytest.raises(SecAggError, match="site 'site-77' sent a masked input without sharing"):
        r.total(revealed)


def test_the_core_imports_neither_flower_nor_torch() -> None:
    # A pure core: the round loop wraps it, it knows nothing of the round loop (fresh interpreter).
    code = (
        "import sys, fedpeft.common.secagg\n"
        "sys.exit(' '.join(m for m in ('flwr', 'torch') if m in sys.modules) or None)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
