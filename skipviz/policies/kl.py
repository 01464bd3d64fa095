"""The KL-redundancy policy: a static mask of the blocks that change the (spatial or prediction) distribution
the least, calibrated on data with the "Beta quantile mapping" of Efficient Layer Attention (arXiv 2503.06473):
scores are normalised into (0, 1), a Beta distribution is fitted to them (``scipy.stats.beta.fit``), and a
block is skipped when its normalised score falls below the Beta distribution's ``q`` quantile.

The divergences themselves are :mod:`skipviz.redundancy`'s.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd
import torch

from ..data import TensorDataset
from ..engine.trace import Reason
from ..redundancy import Method, _batches, _check_method, _images, block_io_divergence, default_grid
from .base import Decision
from .simple import StaticMaskPolicy

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.network import SkipNetwork

__all__ = ["BetaThreshold", "KLRedundancyPolicy", "beta_quantile_threshold", "normalise_scores"]


SQUEEZE = 0.01  # normalised scores live in [SQUEEZE, 1 - SQUEEZE], strictly inside (0, 1) for the Beta fit


@dataclass(frozen=True)
class BetaThreshold:
    """How the skip threshold was found. ``fit``: ``"beta"`` (scipy fit), ``"empirical"`` (too few or
    unfittable scores: the plain ``q`` quantile of the normalised scores), ``"degenerate"`` (all candidate
    scores equal: nothing is more redundant than anything else, nothing is skipped) or ``"none"`` (no
    candidate block). ``threshold`` is on the normalised scale, ``threshold_kl`` in KL units."""

    fit: str
    a: float | None
    b: float | None
    threshold: float
    threshold_kl: float | None


def normalise_scores(scores: np.ndarray, squeeze: float = SQUEEZE) -> np.ndarray:
    """Min-max scale (M,) scores into ``[squeeze, 1 - squeeze]`` (inside (0, 1), as a Beta fit needs)."""
    lo, hi = float(scores.min()), float(scores.max())
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return np.full_like(scores, 0.5, dtype=np.float64)
    return squeeze + (1 - 2 * squeeze) * (scores - lo) / (hi - lo)


def beta_quantile_threshold(scores: Sequence[float], q: float, squeeze: float = SQUEEZE) -> BetaThreshold:
    """Beta quantile mapping: normalise ``scores`` (M,) into (0, 1), fit Beta(a, b) on [0, 1] with
    ``scipy.stats.beta.fit`` (location and scale fixed), and return its ``q`` quantile.

    Degenerate cases: no scores -> ``"none"``; all equal -> ``"degenerate"`` (threshold below every score);
    fewer than 3 scores or a failed/non-finite fit -> ``"empirical"`` (``numpy.quantile`` of the scores).
    """
    from scipy import stats

    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        return BetaThreshold("none", None, None, 0.0, None)
    lo, hi = float(s.min()), float(s.max())
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return BetaThreshold("degenerate", None, None, 0.0, lo)
    z = normalise_scores(s, squeeze)

    def to_kl(t: float) -> float:
        return lo + (min(max(t, squeeze), 1 - squeeze) - squeeze) / (1 - 2 * squeeze) * (hi - lo)

    if s.size >= 3:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                a, b, _, _ = stats.beta.fit(z, floc=0.0, fscale=1.0)
            t = float(stats.beta.ppf(q, a, b))
            if all(math.isfinite(v) for v in (a, b, t)) and a > 0 and b > 0:
                return BetaThreshold("beta", float(a), float(b), t, to_kl(t))
        except (ValueError, RuntimeError, FloatingPointError):
            pass
    t = float(np.quantile(z, q))
    return BetaThreshold("empirical", None, None, t, to_kl(t))


def _fmt_kl(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.3f}" if v == 0 or abs(v) >= 1e-3 else f"{v:.2e}"


class KLRedundancyPolicy(StaticMaskPolicy):
    """Skip the blocks that change the (spatial or prediction) distribution the least - a static mask
    calibrated on data with Beta quantile mapping (Efficient Layer Attention, arXiv 2503.06473).

    Build it with :meth:`calibrate` (scores from data) or directly from per-block scores.

    Args:
        scores: (L,) mean KL(block input || block output) per block over the calibration set (see
            :func:`block_io_divergence`); a low score means the block barely changes its input: redundant.
        downsample: (L,) whether each block is a downsampling block.
        q: the quantile in [0, 1] (the user's knob). The candidate blocks' scores are normalised into (0, 1),
            a Beta distribution is fitted, and a block is skipped when its normalised score is below the
            fitted Beta's ``q`` quantile. ``q=0`` skips nothing; larger ``q`` skips more.
        method: ``"spatial"`` (default, any backbone) or ``"prediction"`` (probe heads).
        skip_downsample: downsampling blocks change the resolution and channel count, and their bypass (the
            strided / projected shortcut alone) was never trained to stand in for them, so skipping them costs
            the most accuracy; by default (``False``) they always run and are left out of the Beta fit. With
            ``True`` they are candidates like any other block.
        block_names: for readable configs; n_calibration: how many inputs the scores were averaged over.
    """

    name = "kl_redundancy"

    def __init__(self, scores: Sequence[float], downsample: Sequence[bool], q: float = 0.3,
                 method: Method = "spatial", skip_downsample: bool = False, block_names: Sequence[str] | None = None,
                 n_calibration: int | None = None, grid: tuple[int, int] | None = None) -> None:
        self.scores = [float(s) for s in scores]
        self.downsample = [bool(d) for d in downsample]
        if len(self.scores) != len(self.downsample):
            raise ValueError(f"one score per block: {len(self.scores)} scores, {len(self.downsample)} downsample "
                             "flags")
        if not self.scores:
            raise ValueError("no block scores: calibrate on a network with at least one block")
        if any(not math.isfinite(s) or s < 0 for s in self.scores):
            raise ValueError(f"scores must be finite KL values >= 0, got {self.scores}")
        q = float(q)
        if not 0.0 <= q <= 1.0 or math.isnan(q):
            raise ValueError(f"quantile q must be in [0, 1], got {q}")
        self.q = q
        self.method = _check_method(method)
        self.skip_downsample = bool(skip_downsample)
        self.block_names = list(block_names) if block_names is not None else None
        if self.block_names is not None and len(self.block_names) != len(self.scores):
            raise ValueError("one block name per score")
        self.n_calibration = n_calibration
        self.grid = tuple(grid) if grid is not None else None
        self.candidates = [i for i, d in enumerate(self.downsample) if self.skip_downsample or not d]
        self.beta = beta_quantile_threshold([self.scores[i] for i in self.candidates], self.q)
        skip = []
        if self.beta.fit in ("beta", "empirical"):
            cand = np.array([self.scores[i] for i in self.candidates])
            z = normalise_scores(cand)
            skip = [i for i, zi in zip(self.candidates, z) if zi < self.beta.threshold]
        super().__init__(skip)

    # ------------------------------------------------------------------------------------------ building
    @classmethod
    def calibrate(cls, net: "SkipNetwork", data: TensorDataset | torch.Tensor, q: float = 0.3,
                  method: Method = "spatial", skip_downsample: bool = False, batch_size: int = 256,
                  max_samples: int | None = 1000, grid: tuple[int, int] | None = None) -> "KLRedundancyPolicy":
        """Score every block over ``data`` (at most ``max_samples`` inputs) and build the policy."""
        images = _images(net, data, max_samples)
        if images.shape[0] == 0:
            raise ValueError("the calibration set is empty")
        if method == "spatial" and grid is None:
            grid = default_grid(net, tuple(images.shape[-2:]))
        total = torch.zeros(net.num_blocks, dtype=torch.float64)
        n = 0
        for xb in _batches(net, images, batch_size):
            io = block_io_divergence(net, xb, method, grid).double()
            total += io.sum(0)
            n += io.shape[0]
        return cls((total / n).tolist(), [b.downsample for b in net.blocks], q=q, method=method,
                   skip_downsample=skip_downsample, block_names=net.block_names, n_calibration=n,
                   grid=grid if method == "spatial" else None)

    def with_q(self, q: float) -> "KLRedundancyPolicy":
        """The same calibration with another quantile (no recomputation of the scores)."""
        return type(self)(self.scores, self.downsample, q, self.method, self.skip_downsample, self.block_names,
                          self.n_calibration, self.grid)

    # ------------------------------------------------------------------------------------------ engine API
    def _check_net(self, net: "SkipNetwork") -> None:
        if net.num_blocks != len(self.scores):
            raise ValueError(f"this KL policy was calibrated for {len(self.scores)} blocks, the network has "
                             f"{net.num_blocks}; calibrate it on this network")

    def decide(self, net: "SkipNetwork", index: int, h: torch.Tensor) -> Decision:
        self._check_net(net)
        thr = self.beta.threshold_kl
        if index in self.skip:
            return Decision(execute=False, reason=int(Reason.KL_SKIP), score=self.scores[index], threshold=thr)
        return Decision(execute=True, reason=int(Reason.KL_RUN), score=self.scores[index], threshold=thr)

    def reason_text(self, code: Reason, score: float | None, threshold: float | None, index: int,
                    exit_block: int | None = None) -> str:
        if code == Reason.KL_SKIP:
            return f"KL {_fmt_kl(score)} below q={self.q:.2f} quantile"
        if code == Reason.KL_RUN:
            if 0 <= index < len(self.downsample) and self.downsample[index] and not self.skip_downsample:
                return f"KL {_fmt_kl(score)}: downsampling block always runs"
            if self.beta.fit == "degenerate":
                return f"KL {_fmt_kl(score)}: all blocks score alike, nothing to skip"
            return f"KL {_fmt_kl(score)} not below q={self.q:.2f} quantile"
        return super().reason_text(code, score, threshold, index, exit_block)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per block: score, normalised score (candidates), candidate, skipped."""
        z = np.full(len(self.scores), np.nan)
        if self.candidates:
            z[self.candidates] = normalise_scores(np.array([self.scores[i] for i in self.candidates]))
        return pd.DataFrame({"block": range(len(self.scores)),
                             "name": self.block_names or [str(i) for i in range(len(self.scores))],
                             "kl": self.scores, "normalised": z,
                             "downsample": self.downsample,
                             "candidate": [i in self.candidates for i in range(len(self.scores))],
                             "skipped": [i in self.skip for i in range(len(self.scores))]})

    def config(self) -> dict:
        return {"name": self.name, "q": self.q, "method": self.method, "skip_downsample": self.skip_downsample,
                "scores": list(self.scores), "downsample": list(self.downsample), "block_names": self.block_names,
                "n_calibration": self.n_calibration, "grid": list(self.grid) if self.grid else None,
                "skip": sorted(self.skip),
                "beta": {"fit": self.beta.fit, "a": self.beta.a, "b": self.beta.b,
                         "threshold_normalised": self.beta.threshold, "threshold_kl": self.beta.threshold_kl}}

    @classmethod
    def from_config(cls, config: dict) -> "KLRedundancyPolicy":
        """Rebuild from :meth:`config` output. The skip set is recomputed from the stored scores; if a stored
        ``skip`` differs (e.g. another SciPy version fits differently) the stored one wins, with a warning,
        so that audited runs reproduce exactly."""
        if config.get("name", cls.name) != cls.name:
            raise ValueError(f"not a {cls.name} config: {config.get('name')!r}")
        missing = [k for k in ("scores", "downsample") if k not in config]
        if missing:
            raise ValueError(f"kl_redundancy config lacks {', '.join(missing)}")
        grid = config.get("grid")
        policy = cls(config["scores"], config["downsample"], q=config.get("q", 0.3),
                     method=config.get("method", "spatial"), skip_downsample=config.get("skip_downsample", False),
                     block_names=config.get("block_names"), n_calibration=config.get("n_calibration"),
                     grid=tuple(grid) if grid else None)
        stored = config.get("skip")
        if stored is not None and set(int(i) for i in stored) != set(policy.skip):
            warnings.warn(f"recomputed KL skip set {sorted(policy.skip)} differs from the stored {sorted(stored)}; "
                          "using the stored one", RuntimeWarning, stacklevel=2)
            policy.skip = frozenset(int(i) for i in stored)
        return policy
