"""A latency saving with its spread, and the words that may be said about it.

Full and skipped runs are timed in interleaved, paired rounds (one full and one skipped call per round, the
order alternating); the saving is the median of the per-round differences ``full - skipped``, with a
bootstrap 95 % interval of that median (``scipy.stats.bootstrap``, seeded). A saving whose interval contains
zero is reported as "no measurable saving (±x ms)", never as a positive or negative fact.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["PairedSaving", "machine_busy", "paired_saving"]


@dataclass(frozen=True)
class PairedSaving:
    """Paired timings of a full and a skipped run, in seconds per call (one pair per round)."""

    full_s: tuple[float, ...]
    skipped_s: tuple[float, ...]
    saving_s: float  # median of the per-round differences full - skipped
    low_s: float  # bootstrap 95 % interval of that median
    high_s: float
    full_median_s: float
    skipped_median_s: float

    @property
    def rounds(self) -> int:
        return len(self.full_s)

    @property
    def measurable(self) -> bool:
        """Whether the interval excludes zero: the run is measurably faster (or slower) than the full one."""
        return self.low_s > 0.0 or self.high_s < 0.0

    @property
    def half_width_s(self) -> float:
        return (self.high_s - self.low_s) / 2.0

    @property
    def saving_fraction(self) -> float:
        """The saving as a fraction of the full run's median time."""
        return self.saving_s / self.full_median_s if self.full_median_s > 0 else float("nan")

    def noisy(self) -> bool:
        """Whether the interval is wider than the effect it brackets (the spread swamps the saving)."""
        return (self.high_s - self.low_s) > abs(self.saving_s)

    def label(self, unit: str = "ms") -> str:
        """What a page may say: ``"1.23 ms saved (95 % CI 1.10-1.40 ms, 21 % of 5.80 ms)"``, ``"0.40 ms slower
        (...)"``, or ``"no measurable saving (±0.31 ms)"`` when the interval contains zero."""
        k = 1e3 if unit == "ms" else 1e6
        if not self.measurable:
            return f"no measurable saving (±{self.half_width_s * k:.2f} {unit})"
        lo, hi = sorted((abs(self.low_s) * k, abs(self.high_s) * k))
        verb = "saved" if self.saving_s > 0 else "slower"
        return (f"{abs(self.saving_s) * k:.2f} {unit} {verb} (95 % CI {lo:.2f}-{hi:.2f} {unit}, "
                f"{abs(self.saving_fraction):.0%} of {self.full_median_s * k:.2f} {unit})")


def paired_saving(full_s: Sequence[float], skipped_s: Sequence[float], seed: int = 0,
                  resamples: int = 2000) -> PairedSaving:
    """The median paired saving of ``full_s`` and ``skipped_s`` (R,) round times, with a bootstrap 95 %
    interval (percentile method; with fewer than 3 rounds the interval is the range of the differences)."""
    full = np.asarray(full_s, dtype=np.float64)
    skipped = np.asarray(skipped_s, dtype=np.float64)
    if full.shape != skipped.shape or full.ndim != 1 or full.size == 0:
        raise ValueError("one skipped time per full time, at least one round")
    diff = full - skipped
    if diff.size < 3 or np.ptp(diff) == 0.0:
        low, high = float(diff.min()), float(diff.max())
    else:
        from scipy.stats import bootstrap  # on use: the dashboard's first prediction does not import scipy

        res = bootstrap((diff,), np.median, confidence_level=0.95, n_resamples=resamples, method="percentile",
                        random_state=np.random.default_rng(seed))
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return PairedSaving(tuple(full.tolist()), tuple(skipped.tolist()), float(np.median(diff)), low, high,
                        float(np.median(full)), float(np.median(skipped)))


def machine_busy() -> str | None:
    """Why timings on this machine cannot be trusted now (the 1-minute load average above the core count),
    or ``None``."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cores = os.cpu_count() or 1
    if load > cores:
        return f"the machine is busy (load {load:.1f} on {cores} cores): timings are noisy"
    return None
