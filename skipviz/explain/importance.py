"""Block importance (Captum): one number per block for one input on the **full** network, next to the policy's
skip decisions for that input (``"taylor"``, ``"grad_x_act"``, ``"conductance"``; see :mod:`skipviz.explain`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from captum.attr import LayerConductance, LayerGradientXActivation

from ..policies.base import Policy
from ..policies.simple import FrozenPolicy
from .runs import _check_one, _check_target, replica, run_decisions

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.network import SkipNetwork

__all__ = ["BlockImportance", "IMPORTANCE_METHODS", "block_importance", "executed_block_gradients"]

IMPORTANCE_METHODS: tuple[str, ...] = ("taylor", "grad_x_act", "conductance")


@dataclass
class BlockImportance:
    """Per-block importance for one input on the full network, next to a policy's decisions.

    ``importance`` (L,): signed values in logit units (method-dependent); ``share`` (L,): ``|importance|``
    normalised to sum 1; ``executed`` (L,) and ``reasons`` (L,): the policy's decisions for this input.
    """

    method: str
    target: int
    target_label: str
    block_names: list[str]
    importance: np.ndarray
    share: np.ndarray
    executed: list[bool]
    reasons: list[str]
    downsample: list[bool]
    policy: dict = field(default_factory=dict)

    @property
    def skipped(self) -> list[int]:
        return [i for i, e in enumerate(self.executed) if not e]

    @property
    def skipped_share(self) -> float:
        """Fraction of the total |importance| carried by the bypassed blocks (0 when nothing was skipped)."""
        return float(self.share[self.skipped].sum()) if self.skipped else 0.0

    @property
    def skipped_were_low_impact(self) -> bool | None:
        """Whether every bypassed block is less important than every executed one (``None``: nothing skipped
        or nothing executed)."""
        run = [i for i, e in enumerate(self.executed) if e]
        if not self.skipped or not run:
            return None
        return bool(self.share[self.skipped].max() <= self.share[run].min())

    def to_dataframe(self) -> pd.DataFrame:
        """One row per block: name, importance, share, rank (1 = most important), executed, reason."""
        order = (-self.share).argsort(kind="stable")
        rank = np.empty(len(order), dtype=int)
        rank[order] = np.arange(1, len(order) + 1)
        return pd.DataFrame({"block": range(len(self.block_names)), "name": self.block_names,
                             "importance": self.importance, "share": self.share, "rank": rank,
                             "downsample": self.downsample, "executed": self.executed, "reason": self.reasons})


def _layer_gradients(model: "SkipNetwork", x: torch.Tensor, target: int) -> list[torch.Tensor]:
    """d logit_target / d out_i for every block output, full network: list of (1, C_i, H_i, W_i)."""
    lga = LayerGradientXActivation(model, list(model.blocks), multiply_by_inputs=False)
    grads = lga.attribute(x, target=target)
    return [g.detach() for g in grads]


def _importance_values(model: "SkipNetwork", x: torch.Tensor, target: int, method: str,
                       n_steps: int) -> np.ndarray:
    """(L,) per-block importance on the full network of ``model`` (the caller holds the replica lock)."""
    if method == "conductance":
        vals = []
        for block in model.blocks:
            attr = LayerConductance(model, block).attribute(x, baselines=torch.zeros_like(x), target=target,
                                                            n_steps=n_steps, internal_batch_size=n_steps)
            vals.append(float(attr.detach().sum()))
        return np.array(vals, dtype=np.float64)
    if method == "grad_x_act":
        attrs = LayerGradientXActivation(model, list(model.blocks)).attribute(x, target=target)
        return np.array([float(a.detach().sum()) for a in attrs], dtype=np.float64)
    grads = _layer_gradients(model, x, target)
    with torch.no_grad():
        feats = model.forward_intermediates(x, intermediates_only=True, include_stem=True)
        # a block with no bypass (it changes the shape without a parameter-free shortcut) cannot be skipped: no
        # estimate (NaN; its share is 0)
        vals = [float((g * (feats[i + 1] - b.bypass(feats[i]))).sum()) if b.bypassable else float("nan")
                for i, (g, b) in enumerate(zip(grads, model.blocks))]
    return np.array(vals, dtype=np.float64)


def _share(values: np.ndarray) -> np.ndarray:
    a = np.abs(np.nan_to_num(values, nan=0.0))
    s = a.sum()
    return a / s if s > 0 else np.full_like(a, 1.0 / len(a))


def block_importance(net: "SkipNetwork", x: torch.Tensor, policy: Policy | None = None, target: int | None = None,
                     method: str = "taylor", n_steps: int = 8) -> BlockImportance:
    """Per-block importance of one image on the full network, with ``policy``'s decisions for it.

    Args:
        x: (1, 3, H, W) normalised image (or (3, H, W)).
        policy: the policy whose decisions are shown (default: full, nothing bypassed).
        target: class to explain (default: the full network's prediction).
        method: ``"taylor"`` (default), ``"grad_x_act"`` or ``"conductance"`` (see the module docstring).
        n_steps: integration steps for ``"conductance"``.
    """
    if method not in IMPORTANCE_METHODS:
        raise ValueError(f"unknown importance method {method!r}; choose one of {', '.join(IMPORTANCE_METHODS)}")
    x = _check_one(net, x)
    model, lock = replica(net)
    with lock:
        full = run_decisions(model, x, None)
        dec = run_decisions(model, x, policy) if policy is not None else full
        t = _check_target(net, full.predicted_index if target is None else target)
        values = _importance_values(model, x, t, method, n_steps)
    return BlockImportance(method=method, target=t, target_label=net.meta.classes[t], block_names=list(net.block_names),
                           importance=values, share=_share(values), executed=dec.executed, reasons=dec.reasons,
                           downsample=[b.downsample for b in net.blocks], policy=dec.policy)


def executed_block_gradients(net: "SkipNetwork", x: torch.Tensor, policy: Policy,
                             target: int | None = None) -> pd.DataFrame:
    """Gradient x activation per block in the *skipped* run of one image (Captum, hooks on executed blocks only).

    A bypassed block produces no activation for this input: it is not hooked and its row says
    ``"bypassed"`` with NaN values. Returns one row per block: name, executed, grad_x_act, status.
    """
    x = _check_one(net, x)
    model, lock = replica(net)
    with lock:
        dec = run_decisions(model, x, policy)
        t = _check_target(net, dec.predicted_index if target is None else target)
        frozen = FrozenPolicy(dec.executed, dec.exit_block)
        last = dec.exit_block if dec.exit_block is not None else model.num_blocks - 1
        hooked = [i for i, e in enumerate(dec.executed) if e and i <= last]
        values = np.full(model.num_blocks, np.nan)
        if hooked:
            attrs = LayerGradientXActivation(lambda inp: model.run(inp, frozen).logits,
                                             [model.blocks[i] for i in hooked]).attribute(x, target=t)
            attrs = attrs if isinstance(attrs, (list, tuple)) else [attrs]
            for i, a in zip(hooked, attrs):
                values[i] = float(a.detach().sum())
    after_exit = [dec.exit_block is not None and i > dec.exit_block for i in range(net.num_blocks)]
    status = ["executed" if i in hooked else ("bypassed (early exit)" if after_exit[i] else "bypassed")
              for i in range(net.num_blocks)]
    return pd.DataFrame({"block": range(net.num_blocks), "name": net.block_names, "executed": dec.executed,
                         "grad_x_act": values, "status": status})
