"""Client-level differential privacy: clipping, Gaussian noise, DP-FedAvg and the accountant.

The mechanism is DP-FedAvg (McMahan et al., "Learning Differentially Private Recurrent Language
Models", ICLR 2018) with uniform weights: each site clips its whole update to L2 norm ``C``
(:func:`clip_update`), so that adding or removing one site moves the round's *sum* of updates by
at most ``C``; the sum carries Gaussian noise of standard deviation ``σ·C``; the aggregate is the
noisy sum divided by the round's ``n`` participants (:func:`dp_average`). Either the coordinator
adds the noise to the sum (central: :func:`noise_std_central`), or each of the round's sites adds
its share before masking, so that the securely aggregated sum carries it (distributed:
:func:`noise_std_per_site`). In central mode the coordinator clips every update again: a site
that did not clip cannot raise the sensitivity. Under secure aggregation the coordinator cannot:
the fixed-point range bounds each coordinate, not the norm, so there the bound rests on the
sites clipping as told.

Accounting is Opacus' RDP analysis of the Poisson-subsampled Gaussian mechanism (Mironov, Talwar
and Zhang 2019; the RDP-to-(ε, δ) conversion of Balle et al. 2020), not written here:
:class:`Accountant` composes one mechanism per round, at the round's sampling rate ``q``. Every
function but the accountant's is numpy only; Opacus (which loads torch) is imported on the
accountant's first use, not with this module.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections import Counter
from collections.abc import Collection, Sequence
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from fedpeft.common.errors import ConfigError
from fedpeft.common.state import State

if TYPE_CHECKING:
    from fedpeft.common.config import DPConfig

#: The Rényi orders the accountant evaluates: Opacus' default orders (RDPAccountant), then
#: larger ones. ε is the minimum over orders, every one of which gives a valid bound; the
#: larger orders matter for a strong guarantee over few rounds (σ of 10 or more: the best
#: order is near 1 + σ·sqrt(2·ln(1/δ)/rounds)), where Opacus' largest, 63, would be loose.
ORDERS: tuple[float, ...] = (
    *(1 + x / 10.0 for x in range(1, 100)),
    *(float(a) for a in range(12, 64)),
    *(80.0, 96.0, 128.0, 192.0, 256.0, 384.0, 512.0, 1024.0),
)

#: What :func:`clip_update` leaves below ``clip`` for float32 rounding: every element rounds
#: by at most 2**-24 of itself, so the norm of the rounded copy moves by at most 2**-24 of it.
_CLIP_MARGIN = 1 - 2.0**-22


def l2_norm(state: State) -> float:
    """The L2 norm of an update over all its tensors, in float64."""
    return math.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in state.values()))


def clip_update(delta: State, clip: float) -> tuple[State, float]:
    """A copy of ``delta`` scaled to L2 norm at most ``clip`` (over all its tensors together),
    and ``delta``'s own norm. An update within the bound comes back unchanged (a copy); a larger
    one is scaled by one factor, so its direction is kept, to a norm in ``[clip·(1 − 2⁻²¹),
    clip]``: float32 rounding never takes it above ``clip``."""
    if not (clip > 0 and math.isfinite(clip)):
        raise ValueError(f"clip must be positive, got {clip!r}")
    norm = l2_norm(delta)
    if not math.isfinite(norm):
        raise ValueError("cannot clip an update holding NaN or Inf")
    if norm <= clip:
        return {name: np.array(value, dtype=np.float32) for name, value in delta.items()}, norm
    factor = clip / norm * _CLIP_MARGIN
    clipped = {
        name: (value.astype(np.float64) * factor).astype(np.float32)
        for name, value in delta.items()
    }
    return clipped, norm


def gaussian_noise_like(state: State, std: float, rng: np.random.Generator) -> State:
    """Independent N(0, std²) noise in float32 for every element of ``state``, by name (drawn
    in float64, in ``state``'s order of names)."""
    if not (std >= 0 and math.isfinite(std)):
        raise ValueError(f"noise std must be a finite non-negative number, got {std!r}")
    return {
        name: rng.normal(0.0, std, size=np.shape(value)).astype(np.float32)
        for name, value in state.items()
    }


def noise_std_central(sigma: float, clip: float) -> float:
    """The standard deviation of the noise the coordinator adds to a round's sum: ``σ·C``."""
    return sigma * clip


def noise_std_per_site(sigma: float, clip: float, n: int) -> float:
    """The standard deviation of the noise each site adds under distributed DP: ``σ·C/√n``, so
    that the sum of ``n`` sites' independent shares has standard deviation ``σ·C``.

    ``n`` is the least number of inputs the round's sum can hold: under secure aggregation the
    threshold ``t`` of shares needed to unmask (``SecureAggregationConfig.shares_needed``), so
    that the sum carries at least ``σ·C`` however many sites drop after masking (with ``m ≥ t``
    inputs it carries ``σ·C·√(m/t)``). Taking the number of sites sampled instead would leave
    the sum short of ``σ·C`` whenever one drops."""
    if n < 1:
        raise ValueError(f"a round's sum holds at least one input, got n={n}")
    return sigma * clip / math.sqrt(n)


def sum_updates(updates: Sequence[State]) -> State:
    """The sum of updates by name, in float64 and in the given order (sort by site for
    reproducibility); float32 out."""
    if not updates:
        raise ValueError("sum_updates needs at least one update")
    return {
        name: sum(
            (u[name].astype(np.float64) for u in updates),
            start=np.zeros(np.shape(updates[0][name]), dtype=np.float64),
        ).astype(np.float32)
        for name in updates[0]
    }


def dp_average(total: State, n: int, noise_std: float, rng: np.random.Generator) -> State:
    """DP-FedAvg's aggregate: ``(total + N(0, noise_std²)) / n``, uniform weights over the
    round's ``n`` participants. ``total`` is the sum of their clipped updates (with distributed
    DP already noisy: then ``noise_std`` is 0). The noise is drawn as :func:`gaussian_noise_like`
    does, the division in float64."""
    if n < 1:
        raise ValueError(f"an average needs at least one participant, got n={n}")
    noise = gaussian_noise_like(total, noise_std, rng)
    return {
        name: ((value.astype(np.float64) + noise[name]) / n).astype(np.float32)
        for name, value in total.items()
    }


# -- accounting --------------------------------------------------------------------------------


@functools.cache
def _opacus() -> tuple[ModuleType, ModuleType]:
    """Opacus' RDP analysis and its calibration helper, imported on first use.

    Importing any Opacus module runs its package's ``__init__``, which loads torch and, in
    ``opacus.utils.module_utils``, calls ``logging.basicConfig``: a stderr handler on the root
    logger of whatever process imports it (opacus 1.6). The handlers it adds are removed again
    so that the process's own logging setup stays as it was."""
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        from opacus.accountants import utils as calibration
        from opacus.accountants.analysis import rdp
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
    return rdp, calibration


def _epsilon(rdp: np.ndarray, delta: float, orders: Sequence[float]) -> float:
    analysis, _ = _opacus()
    with warnings.catch_warnings():
        # Opacus warns when the best order is the first or last one tried: ε is still a valid
        # bound (every order gives one), only perhaps not the tightest.
        warnings.simplefilter("ignore", UserWarning)
        eps, _order = analysis.get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return float(eps)


class Accountant:
    """The privacy spent by a DP run, at ``delta``, round after round.

    Each recorded round is one Poisson-subsampled Gaussian mechanism with noise multiplier
    ``σ`` and sampling rate ``q`` (the share of sites sampled); RDP composes over rounds and is
    converted to (ε, δ) at the end (Opacus).

    - :meth:`epsilon` is the run's ε: what anyone who sees only the released global states
      (the exported model, the sites) can learn about whether one site took part, with who was
      sampled kept secret. fedpeft samples a fixed number of sites per round; accounting it as
      Poisson sampling at rate ``q`` is the usual approximation (McMahan et al. 2018). With every
      site in every round, ``q`` = 1 and it is exact.
    - :meth:`site_epsilon` is one site's ε counting only the rounds it took part in, each at
      ``q`` = 1: the coordinator chose the round's sites and saw who answered, so the
      amplification that subsampling gives the run's ε does not hold against it. What holds:
      a site's ε never exceeds the ε of ``q`` = 1 over every round; with ``q`` = 1 in every
      round a site's ε is at most the run's, equal for a site in every round; with ``q`` < 1 a
      site's ε can exceed the run's (that is the amplification it does not get).
    """

    def __init__(
        self, noise_multiplier: float, delta: float, orders: Sequence[float] = ORDERS
    ) -> None:
        if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
            raise ValueError(f"noise_multiplier must be positive, got {noise_multiplier!r}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        self.noise_multiplier = float(noise_multiplier)
        self.delta = float(delta)
        self.orders = tuple(float(a) for a in orders)
        self._rounds_at: Counter[float] = Counter()  # sampling rate -> rounds recorded at it
        self._site_rounds: Counter[str] = Counter()  # site -> rounds it took part in

    @property
    def rounds(self) -> int:
        """Rounds recorded."""
        return sum(self._rounds_at.values())

    def record_round(self, sample_rate: float, sites: Collection[str]) -> None:
        """Record one round whose noisy aggregate was released: ``sample_rate`` the share of
        the available sites sampled for it, ``sites`` those whose updates are in its sum."""
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        if len(set(sites)) != len(sites):
            raise ValueError("a site takes part in a round once")
        self._rounds_at[float(sample_rate)] += 1
        self._site_rounds.update(sites)

    def _rdp(self, rounds_at: Counter[float]) -> np.ndarray:
        analysis, _ = _opacus()
        total = np.zeros(len(self.orders))
        for q, steps in sorted(rounds_at.items()):
            total += np.asarray(
                analysis.compute_rdp(
                    q=q, noise_multiplier=self.noise_multiplier, steps=steps, orders=self.orders
                ),
                dtype=np.float64,
            )
        return total

    def rdp(self) -> np.ndarray:
        """The run's Rényi DP so far at each of :attr:`orders` (composed over the rounds)."""
        return self._rdp(self._rounds_at)

    def epsilon(self) -> float:
        """The run's ε at ``delta`` after the rounds recorded (0 before any)."""
        if not self._rounds_at:
            return 0.0
        return _epsilon(self._rdp(self._rounds_at), self.delta, self.orders)

    def peek(self, sample_rate: float) -> float:
        """The run's ε if one more round at ``sample_rate`` were recorded (for a budget that
        must not be passed); records nothing."""
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        after = self._rounds_at.copy()
        after[float(sample_rate)] += 1
        return _epsilon(self._rdp(after), self.delta, self.orders)

    def site_epsilon(self, site: str) -> float:
        """``site``'s ε at ``delta``: the rounds it took part in, each at ``q`` = 1 (see the
        class); 0 for a site in none."""
        taken = self._site_rounds.get(site, 0)
        if not taken:
            return 0.0
        return _epsilon(self._rdp(Counter({1.0: taken})), self.delta, self.orders)

    def site_epsilons(self) -> dict[str, float]:
        """:meth:`site_epsilon` of every site that took part in a recorded round, by name."""
        return {site: self.site_epsilon(site) for site in sorted(self._site_rounds)}

    @staticmethod
    def calibrate(
        target_epsilon: float,
        delta: float,
        sample_rate: float,
        rounds: int,
        orders: Sequence[float] = ORDERS,
    ) -> float:
        """The noise multiplier σ whose run of ``rounds`` rounds at ``sample_rate`` spends at
        most ``target_epsilon`` at ``delta``, within 0.01 of it (Opacus' search,
        ``get_noise_multiplier``, over the same orders as :meth:`epsilon`). ``ValueError``
        when no σ up to 10⁶ reaches it."""
        if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
            raise ValueError(f"target_epsilon must be positive, got {target_epsilon!r}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        if rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {rounds}")
        _, calibration = _opacus()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # as in _epsilon
            sigma = calibration.get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=rounds,
                accountant="rdp",
                alphas=list(orders),
            )
        return float(sigma)


def resolve_noise_multiplier(dp: DPConfig, rounds: int, sample_rate: float) -> float:
    """The σ a run uses: ``dp.noise_multiplier`` when set, else the σ calibrated to reach
    ``dp.target_epsilon`` after ``rounds`` rounds at ``sample_rate`` (see
    :meth:`Accountant.calibrate`); 0 with DP off. ``ConfigError`` naming
    ``federation.dp.target_epsilon`` when no σ reaches it."""
    if not dp.enabled:
        return 0.0
    if dp.noise_multiplier > 0:
        return dp.noise_multiplier
    try:
        return Accountant.calibrate(dp.target_epsilon, dp.delta, sample_rate, rounds)
    except ValueError as exc:
        raise ConfigError(
            f"federation.dp.target_epsilon: {dp.target_epsilon!r} cannot be reached in {rounds} "
            f"round(s) at sampling rate {sample_rate:.3g} and delta {dp.delta!r} ({exc})"
        ) from None
