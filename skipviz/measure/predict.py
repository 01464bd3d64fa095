"""Latency prediction from a per-block profile: the instant prediction of any decision set's latency
(:func:`predict_latency`) and its error against a measured run (:func:`check_prediction`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..engine.rows import misplaced_rows
from ..policies.base import Policy
from .clock import asdict_with, measure_latency
from .profile import BlockProfile
from .runs import _as_net_input, _check_input, _net_device

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.network import SkipNetwork

__all__ = ["PredictionCheck", "SWAP_FRACTION_ESTIMATE", "check_prediction", "predict_block_ms", "predict_latency"]


def _fractions(profile: BlockProfile, values, what: str) -> np.ndarray:
    """(L,) fractions in [0, 1] from a scalar (gated blocks only), an (L,) mask/fraction or an (N, L) mask."""
    L = profile.num_blocks
    if isinstance(values, (int, float, np.floating, np.integer)) and not isinstance(values, bool):
        f = float(values)
        if not 0.0 <= f <= 1.0 or math.isnan(f):
            raise ValueError(f"{what} fraction must be in [0, 1], got {values}")
        return np.where(np.asarray(profile.gated), f, 1.0)
    arr = values.detach().cpu().double().numpy() if torch.is_tensor(values) else np.asarray(values, dtype=np.float64)
    if arr.ndim == 2:
        if arr.shape[1] != L or arr.shape[0] < 1:
            raise ValueError(f"{what} mask must be (N, {L}), got {arr.shape}")
        arr = arr.mean(0)
    if arr.shape != (L,):
        raise ValueError(f"{what} must be a fraction, ({L},) per block or (N, {L}) per sample, got shape {arr.shape}")
    if np.isnan(arr).any() or (arr < 0).any() or (arr > 1).any():
        raise ValueError(f"{what} values must be in [0, 1]")
    return arr


#: Misplaced rows of an identity block's swap, as a fraction of min(k, N - k) for k of N rows executing, when
#: only per-block fractions are known (with an (N, L) mask the engine's arrangement is replayed instead). The
#: default model on CIFAR-10 test batches of 256 showed 0.26-0.6 (skipviz.engine.rows.misplaced_rows).
SWAP_FRACTION_ESTIMATE = 0.3


def predict_latency(profile: BlockProfile, executed, gates_evaluated=None, planned: bool = False) -> float:
    """Predicted latency (ms per batch of ``profile.batch_size``) of :meth:`SkipNetwork.run` for a decision set.

    Args:
        executed: a fraction of the gated blocks executed (ungated blocks always run), or (L,) per-block
            fractions / bools of the batch executing each block, or an (N, L) bool mask (N samples).
        gates_evaluated: like ``executed`` for gate evaluation (default: every gated block's gate runs).
        planned: the decisions come from the plan head (:class:`~skipviz.policies.PlanPolicy`): its time
            (``plan_ms``) is counted once and no gate is evaluated.
    Model: stem + head + engine overhead + the plan head when planned + every block's share
    (:func:`predict_block_ms`).
    """
    total = profile.stem_ms + profile.head_ms + profile.engine_ms + (profile.plan_ms if planned else 0.0)
    return float(total + sum(predict_block_ms(profile, executed, gates_evaluated, planned)))


def predict_block_ms(profile: BlockProfile, executed, gates_evaluated=None, planned: bool = False) -> list[float]:
    """(L,) predicted time of each block (ms per batch of ``profile.batch_size``) for a decision set, arguments as
    :func:`predict_latency`'s.

    Per block: all run -> block time; none -> bypass time; a fraction p -> the block on that share of the rows
    (:meth:`BlockProfile.block_rows_ms`) plus the data movement: for an identity block the swap of its m
    misplaced rows (``m * swap_ms``; m replayed from an (N, L) mask with :func:`~skipviz.engine.rows.misplaced_rows`,
    else estimated as ``SWAP_FRACTION_ESTIMATE * min(k, N - k)``), for a downsampling block the gather/scatter and
    the bypass of the other rows; plus its gate decision when evaluated.
    """
    p = _fractions(profile, executed, "executed")
    if planned:
        ge = np.zeros(profile.num_blocks)
    else:
        ge = np.asarray(profile.gated, dtype=np.float64) if gates_evaluated is None else \
            _fractions(profile, gates_evaluated, "gates_evaluated")
    bs = profile.batch_size
    swaps = profile.swap_ms if len(profile.swap_ms) == profile.num_blocks else None
    moved = None
    if swaps is not None and _is_mask(executed):
        mask = executed.detach().cpu().bool().tolist() if torch.is_tensor(executed) else \
            np.asarray(executed, dtype=bool).tolist()
        moved = [m * bs / len(mask) for m in misplaced_rows(mask, [not d for d in profile.downsample])]
    out = []
    for i in range(profile.num_blocks):
        if p[i] >= 1.0:
            t = profile.block_rows_ms(i, 1.0)
        elif p[i] <= 0.0:
            t = profile.bypass_ms[i]
        elif profile.downsample[i] or swaps is None:
            t = profile.block_rows_ms(i, p[i]) + profile.mix_ms[i] + \
                ((1 - p[i]) * profile.bypass_ms[i] if profile.downsample[i] else 0.0)
        else:
            m = moved[i] if moved is not None else SWAP_FRACTION_ESTIMATE * min(p[i], 1 - p[i]) * bs
            t = profile.block_rows_ms(i, p[i]) + m * swaps[i]
        out.append(float(t + (1.0 if ge[i] > 0 else 0.0) * profile.gate_ms[i]))
    return out


def _is_mask(values) -> bool:
    """Whether ``values`` is an (N, L) per-sample mask (not a scalar or an (L,) vector)."""
    if isinstance(values, (int, float, np.floating, np.integer)):
        return False
    return (values.dim() if torch.is_tensor(values) else np.asarray(values).ndim) == 2


@dataclass(frozen=True)
class PredictionCheck:
    """Predicted vs. measured latency (ms per batch) of one policy run at the profile's batch size.

    ``decision_free_ms``: the same decisions predicted as if they cost nothing (no gate or plan head);
    ``full_predicted_ms``: every block run, no decision, by the same model. Their ratio bounds what any
    decision source could save on this device: :attr:`decision_free_time_saved_fraction`.
    """

    policy: dict
    batch_size: int
    blocks_executed_mean: float
    predicted_ms: float
    measured_ms: float
    measured_iqr_ms: float
    decision_free_ms: float = math.nan
    full_predicted_ms: float = math.nan

    @property
    def decision_free_time_saved_fraction(self) -> float:
        """Time the bypassed blocks (and their data movement) account for, as a fraction of the full run."""
        return 1.0 - self.decision_free_ms / self.full_predicted_ms

    @property
    def error_ms(self) -> float:
        return self.predicted_ms - self.measured_ms

    @property
    def relative_error(self) -> float:
        return self.error_ms / self.measured_ms

    def to_dict(self) -> dict:
        return asdict_with(self, "error_ms", "relative_error")


def check_prediction(profile: BlockProfile, net: "SkipNetwork", x: torch.Tensor, policy: Policy, warmup: int = 3,
                     repeats: int = 15, threads: int | None = None, min_repeat_s: float = 0.02) -> PredictionCheck:
    """Predict ``net.run(x, policy)``'s latency from ``profile`` and measure it; x: (B, 3, H, W), B = batch size.

    With B a multiple of the profile's batch size, each batch is predicted and measured separately and the
    figures are averaged per batch.
    """
    _check_input(net, x)
    bs = profile.batch_size
    if x.shape[0] % bs:
        raise ValueError(f"x has {x.shape[0]} samples, not a multiple of the profile's batch size {bs}")
    dev = _net_device(net)
    chunks = [c.contiguous() for c in _as_net_input(net, x, dev).split(bs)]
    preds, free, blocks = [], [], []
    no_decisions = np.zeros(net.num_blocks)
    with torch.inference_mode():
        for c in chunks:
            r = net.run(c, policy)
            ev = np.zeros(net.num_blocks)
            checks = 0.0  # early exits: no gate runs, each block's exit check does, for the rows checked there
            if policy.exits_early:
                checks = float((~torch.isnan(r.scores)).double().mean(0).sum()) * profile.probe_ms
            else:
                for i, rec in enumerate(r.records):
                    ev[i] = 1.0 if rec.gate_evaluated and profile.gated[i] else 0.0
            # the plan head's time counts only when it ran (overrides may force every gated block)
            planned = policy.decides_up_front and any(rec.gate_evaluated for rec in r.records)
            preds.append(predict_latency(profile, r.executed, ev, planned=planned) + checks)
            free.append(predict_latency(profile, r.executed, no_decisions))
            blocks.append(float(r.executed.sum(1).double().mean()))

    def call() -> None:
        with torch.inference_mode():
            for c in chunks:
                net.run(c, policy)

    st = measure_latency(call, warmup=warmup, repeats=repeats, device=dev, threads=threads, label="skipped",
                         batch_size=bs, batches_per_call=len(chunks), min_repeat_s=min_repeat_s)
    return PredictionCheck(policy=policy.config(), batch_size=bs, blocks_executed_mean=float(np.mean(blocks)),
                           predicted_ms=float(np.mean(preds)), measured_ms=st.per_batch_ms,
                           measured_iqr_ms=st.iqr_ms / len(chunks), decision_free_ms=float(np.mean(free)),
                           full_predicted_ms=predict_latency(profile, np.ones(net.num_blocks), no_decisions))
