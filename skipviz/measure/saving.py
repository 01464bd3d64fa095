"""A latency saving with its spread, and the words that may be said about it.

Full and skipped runs are timed in interleaved, paired rounds (one full and one skipped call per round, the
order alternating: :func:`~skipviz.measure.runs.time_policy` over
:func:`~skipviz.measure.clock.measure_interleaved`); the saving is the median of the per-round differences
``full - skipped``, with a bootstrap 95 % interval of that median (``scipy.stats.bootstrap``, seeded). A saving
whose interval contains zero is reported as "no measurable saving (±x ms)", never as a positive or negative fact.

* :func:`paired_saving` - the statistics of paired round times (:class:`PairedSaving`, with its wording);
* :func:`measure_saving` - time a policy against the full network on a batch and return its saving;
* :func:`machine_busy` / :func:`trust_note` - when the figures cannot be trusted (load above the core count, a
  spread wider than the effect), in words a page shows.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..engine.network import SkipNetwork
    from ..policies.base import Policy

__all__ = ["PairedSaving", "machine_busy", "measure_saving", "paired_saving", "trust_note"]

# Measurements of wall-clock time must not overlap each other inside one process (several dashboard sessions
# share one model and the CPU): one lock serialises them.
_MEASURE_LOCK = threading.Lock()


@dataclass(frozen=True)
class PairedSaving:
    """Paired timings of a full and a skipped run, in seconds per call (one pair per round).

    ``device``: where it was measured (``"CPU (1 thread)"``, ``"GPU (name)"``); ``batch_size``: the inputs one
    call runs (the times are per call, i.e. per batch); ``busy``: why the machine was busy while measuring
    (:func:`machine_busy`), else ``None``.
    """

    full_s: tuple[float, ...]
    skipped_s: tuple[float, ...]
    saving_s: float  # median of the per-round differences full - skipped
    low_s: float  # bootstrap 95 % interval of that median
    high_s: float
    full_median_s: float
    skipped_median_s: float
    device: str = ""
    batch_size: int = 1
    busy: str | None = None

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

    @property
    def saving_percent(self) -> float:
        """The saving in percent of the full run's median time."""
        return 100.0 * self.saving_fraction

    def noisy(self) -> bool:
        """Whether the interval is wider than the effect it brackets (the spread swamps the saving)."""
        return (self.high_s - self.low_s) > abs(self.saving_s)

    def per_input(self) -> "PairedSaving":
        """The same saving per input: every time divided by :attr:`batch_size` (``batch_size`` becomes 1 only in
        the arithmetic; the record keeps the batch it was measured at)."""
        k = 1.0 / max(1, self.batch_size)
        return replace(self, full_s=tuple(v * k for v in self.full_s), skipped_s=tuple(v * k for v in self.skipped_s),
                       saving_s=self.saving_s * k, low_s=self.low_s * k, high_s=self.high_s * k,
                       full_median_s=self.full_median_s * k, skipped_median_s=self.skipped_median_s * k)

    def headline(self, unit: str = "ms") -> str:
        """The short form a metric shows: ``"1.23 ms saved"``, ``"0.40 ms slower"`` or ``"no measurable saving"``
        (never a negative number)."""
        if not self.measurable:
            return "no measurable saving"
        verb = "saved" if self.saving_s > 0 else "slower"
        return f"{_fmt(abs(self.saving_s), unit)} {unit} {verb}"

    def detail(self, unit: str = "ms") -> str:
        """What goes with the headline: ``"95 % CI 1.10-1.40 ms, 21 % of 5.80 ms"`` or ``"±0.31 ms"``."""
        if not self.measurable:
            return f"±{_fmt(self.half_width_s, unit)} {unit}"
        lo, hi = sorted((abs(self.low_s), abs(self.high_s)))
        return (f"95 % CI {_fmt(lo, unit)}-{_fmt(hi, unit)} {unit}, {abs(self.saving_percent):.0f} % of "
                f"{_fmt(self.full_median_s, unit)} {unit}")

    def label(self, unit: str = "ms") -> str:
        """What a page may say: ``"1.23 ms saved (95 % CI 1.10-1.40 ms, 21 % of 5.80 ms)"``, ``"0.40 ms slower
        (...)"``, or ``"no measurable saving (±0.31 ms)"`` when the interval contains zero."""
        return f"{self.headline(unit)} ({self.detail(unit)})"

    def describe(self) -> str:
        """How it was measured, with the device: ``"batch 16 on CPU (1 thread), 15 paired rounds"``."""
        return (f"batch {self.batch_size} on {self.device or 'an unnamed device'}, {self.rounds} interleaved "
                f"paired round{'s' if self.rounds != 1 else ''}")


def _fmt(seconds: float, unit: str) -> str:
    """``seconds`` in ``unit`` (``"ms"`` or ``"µs"``), with three significant decimals below 0.1 ms."""
    v = seconds * (1e3 if unit == "ms" else 1e6)
    return f"{v:.3f}" if unit == "ms" and v < 0.1 else f"{v:.2f}"


def paired_saving(full_s: Sequence[float], skipped_s: Sequence[float], seed: int = 0,
                  resamples: int = 2000, device: str = "", batch_size: int = 1,
                  busy: str | None = None) -> PairedSaving:
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
                        float(np.median(full)), float(np.median(skipped)), device, int(batch_size), busy)


def measure_saving(net: "SkipNetwork", x: "torch.Tensor", policy: "Policy", batch_size: int | None = None,
                   rounds: int = 15, warmup: int = 2, min_repeat_s: float = 0.005,
                   threads: int | None = None) -> PairedSaving:
    """Time the full network against ``net.run(., policy)`` on ``x`` (N, 3, H, W) in ``rounds`` interleaved
    paired rounds (:func:`~skipviz.measure.runs.time_policy`, split into batches of ``batch_size``, default N)
    and return the saving per batch with its interval, the device and whether the machine was busy. ``threads``:
    intra-op threads while timing on CPU (default: torch's current setting).

    One home for the measurement: the rounds are :func:`~skipviz.measure.clock.measure_interleaved`'s, the
    statistics :func:`paired_saving`'s. Measurements in one process are serialised by a lock.
    """
    from .clock import device_label
    from .runs import time_policy

    with _MEASURE_LOCK:
        busy_before = machine_busy()
        t = time_policy(net, x, policy, batch_size=batch_size, warmup=warmup, repeats=rounds, include_masked=False,
                        min_repeat_s=min_repeat_s, threads=threads)
    per = t.full_stats.batches_per_call
    full = [v / 1e3 / per for v in t.full_stats.times_ms]
    skipped = [v / 1e3 / per for v in t.skipped_stats.times_ms]
    return paired_saving(full, skipped, device=device_label(t.info.device), batch_size=t.batch_size,
                         busy=busy_before or machine_busy())


def machine_busy() -> str | None:
    """Why timings on this machine cannot be trusted now (the 1-minute load average above the core count),
    or ``None``."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cores = os.cpu_count() or 1
    if load > cores:
        return f"the machine is busy (load {load:.1f} on {cores} cores)"
    return None


def trust_note(savings: PairedSaving | Sequence[PairedSaving], unit: str = "ms") -> str | None:
    """What a page must say when its latencies cannot be trusted, or ``None``: the machine was busy while they
    were measured (load above the core count), or a saving's spread is wider than its effect. For several
    savings (a sweep), how many of them are affected."""
    many = [savings] if isinstance(savings, PairedSaving) else list(savings)
    if not many:
        return None
    busy = [s.busy for s in many if s.busy]
    reasons = []
    if busy:  # one note for the sweep, not one per load reading: the latest, and how many timings it touched
        reasons.append(busy[-1] if len(busy) == len(many) else f"{busy[-1]} during {len(busy)} of {len(many)} timings")
    noisy = [s for s in many if s.noisy()]
    if noisy:
        if len(many) == 1:
            s = noisy[0]
            reasons.append(f"the spread (95 % interval ±{_fmt(s.half_width_s, unit)} {unit}) is wider than the "
                           f"effect ({_fmt(abs(s.saving_s), unit)} {unit})")
        else:
            reasons.append(f"at {len(noisy)} of {len(many)} settings the spread of the saving is wider than the "
                           "saving")
    if not reasons:
        return None
    return ("Timings are noisy: " + "; ".join(reasons) + ". Savings are only stated where their 95 % interval "
            "excludes zero; measure again when the machine is quieter.")
