"""Explanations with Captum: did the blocks a policy bypassed matter, and does skipping change where the
network looks?

* :func:`block_importance` - one number per block for one input on the **full** network, returned next to
  the policy's skip decisions for that input. Methods:

  - ``"taylor"`` (default): ``sum(dlogit_t / d out_i * (out_i - bypass_i(in_i)))``, the first-order estimate
    of how much the target logit changes when block i is replaced by its bypass. The gradients at every
    block output come from one Captum :class:`~captum.attr.LayerGradientXActivation` pass with
    ``multiply_by_inputs=False`` (layer gradients).
  - ``"grad_x_act"``: Captum :class:`~captum.attr.LayerGradientXActivation` summed over the block output.
  - ``"conductance"``: Captum :class:`~captum.attr.LayerConductance` per block (``n_steps`` integration
    steps from a zero baseline image), summed over the block output.

  ``share`` is ``|importance| / sum |importance|`` (sums to 1).

* :func:`attribution_maps` / :func:`explain` - attribution maps for the full run and the skipped run of the
  same input, plus how much they differ (Spearman rank correlation and top-k overlap):

  - ``"gradcam"``: Captum :class:`~captum.attr.LayerGradCam` on the feature map the prediction is read from
    (the classifier head's input, or the exit probe's input after an early exit) - it exists in both runs
    whatever was bypassed, upsampled to the input size;
  - ``"integrated_gradients"``: Captum :class:`~captum.attr.IntegratedGradients` on the input (zero baseline),
    ``|attribution|`` summed over colour channels.

  The skipped run is ``net.run`` under the *frozen* decisions the policy took for this input (a static mask,
  plus the exit if it exited), so that the attribution function is the sub-network the input really went
  through (gates re-evaluated along an integration path would switch blocks on and off midway). A bypassed
  block produces no activation in that run: it is never hooked, and its per-block values are NaN with
  ``"bypassed"`` in the table - nothing waits for a hook output that cannot come.

Thread safety: Captum registers hooks on the model's modules. All attribution runs on a private replica of
the model (a deep copy made once per model, refreshed when its weights change), serialised by one lock per
replica, so concurrent users of one cached model neither see each other's hooks nor disturb plain
``net.run`` calls on the original.
"""
from __future__ import annotations

import copy
import math
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from captum.attr import (IntegratedGradients, LayerAttribution, LayerConductance, LayerGradCam,
                         LayerGradientXActivation)

from .policies import Decision, FullPolicy, Policy
from .trace import Reason

if TYPE_CHECKING:  # pragma: no cover
    from .network import SkipNetwork

IMPORTANCE_METHODS: tuple[str, ...] = ("taylor", "grad_x_act", "conductance")
MAP_METHODS: tuple[str, ...] = ("gradcam", "integrated_gradients")
MAP_DESCRIPTIONS: dict[str, str] = {
    "gradcam": "Grad-CAM (Captum LayerGradCam) on the last feature map before the classifier, upsampled.",
    "integrated_gradients": "Integrated Gradients (Captum) on the input pixels from a black image, "
                            "|attribution| summed over colour channels.",
}


# ------------------------------------------------------------------------------------- model replicas
class _Replica:
    def __init__(self, net: "SkipNetwork") -> None:
        self.lock = threading.Lock()
        self.fingerprint = _fingerprint(net)
        self.model = _clone(net)


_REPLICAS: "weakref.WeakKeyDictionary[SkipNetwork, _Replica]" = weakref.WeakKeyDictionary()
_REPLICAS_LOCK = threading.Lock()
_LOCK_FACTORIES = {type(threading.Lock()): threading.Lock, type(threading.RLock()): threading.RLock}


def _fingerprint(net: "SkipNetwork") -> tuple:
    """Changes when a parameter or buffer is replaced or modified in place (``_version`` counters)."""
    return tuple((id(t), t._version) for t in list(net.parameters()) + list(net.buffers()))


def _clone(net: "SkipNetwork") -> "SkipNetwork":
    """Deep copy of the model in eval mode; locks it holds are replaced by fresh ones (locks cannot be copied)."""
    memo: dict[int, object] = {}
    for m in net.modules():
        for v in vars(m).values():
            make = _LOCK_FACTORIES.get(type(v))
            if make is not None:
                memo[id(v)] = make()
    return copy.deepcopy(net, memo).eval()


def replica(net: "SkipNetwork") -> tuple["SkipNetwork", threading.Lock]:
    """The private copy of ``net`` that explanations hook into, and the lock that serialises its use."""
    with _REPLICAS_LOCK:
        rep = _REPLICAS.get(net)
        if rep is None or rep.fingerprint != _fingerprint(net):
            rep = _Replica(net)
            _REPLICAS[net] = rep
        return rep.model, rep.lock


# ------------------------------------------------------------------------------------ frozen decisions
class FrozenPolicy(Policy):
    """Replays one input's decisions: block i runs iff ``executed[i]``; exit after ``exit_block`` if set.

    Used as the differentiable "skipped run" of one input (all samples of a batch - e.g. the points of an
    integration path - take the same sub-network).
    """

    name = "frozen"

    def __init__(self, executed: Sequence[bool], exit_block: int | None = None) -> None:
        self.executed = [bool(e) for e in executed]
        self.exit_block = exit_block

    def decide(self, net: "SkipNetwork", index: int, h: torch.Tensor) -> Decision:
        run = self.executed[index]
        return Decision(execute=run, reason=int(Reason.STATIC_RUN if run else Reason.STATIC_SKIP))

    def exit_after(self, net: "SkipNetwork", index: int,
                   h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        if self.exit_block is None or index != self.exit_block:
            return None
        logits = net.probe(index)(h)
        return (torch.ones(h.shape[0], dtype=torch.bool, device=h.device), logits,
                torch.softmax(logits, 1).amax(1))

    def config(self) -> dict:
        return {"name": self.name, "executed": self.executed, "exit_block": self.exit_block}


@dataclass(frozen=True)
class RunDecisions:
    """What a policy did for one input: ``executed`` (L,), reason texts, the prediction, the exit block."""

    policy: dict
    executed: list[bool]
    reasons: list[str]
    exit_block: int | None
    predicted_index: int
    predicted_label: str
    confidence: float


def _check_one(net: "SkipNetwork", x: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(x):
        raise TypeError(f"expected an image tensor (1, 3, H, W), got {type(x).__name__}")
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[0] != 1 or x.shape[1] != 3:
        raise ValueError(f"explanations work on one image at a time: expected (1, 3, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point() or not bool(torch.isfinite(x).all()):
        raise ValueError("expected a normalised, finite float image (see net.meta.preprocess)")
    return x.detach().to(next(net.parameters()).device)


def _check_target(net: "SkipNetwork", target: int) -> int:
    k = net.meta.num_classes
    if not 0 <= int(target) < k:
        raise ValueError(f"target class {target} out of range: the model has {k} classes")
    return int(target)


def run_decisions(net: "SkipNetwork", x: torch.Tensor, policy: Policy | None) -> RunDecisions:
    """The policy's decisions for one image (1, 3, H, W) on ``net`` (no gradients)."""
    policy = policy or FullPolicy()
    with torch.no_grad():
        tr = net.run(x, policy).traces()[0]
    return RunDecisions(policy=policy.config(), executed=tr.executed_mask, reasons=[b.reason for b in tr.blocks],
                        exit_block=tr.exit_block, predicted_index=tr.predicted_index,
                        predicted_label=tr.predicted_label, confidence=tr.confidence)


# ------------------------------------------------------------------------------------ block importance
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
        vals = [float((g * (feats[i + 1] - b.bypass(feats[i]))).sum()) for i, (g, b) in
                enumerate(zip(grads, model.blocks))]
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


# ------------------------------------------------------------------------------------ attribution maps
@dataclass(frozen=True)
class MapComparison:
    """How much two attribution maps differ: Spearman rank correlation over pixels (1 = same ranking) and
    the overlap of their top ``top_k`` fraction of pixels (1 = same most-attributed pixels)."""

    method: str
    spearman: float
    topk_overlap: float
    top_k: float


def compare_maps(a: np.ndarray, b: np.ndarray, top_k: float = 0.1, method: str = "") -> MapComparison:
    """Compare two (H, W) maps. Constant maps carry no ranking: both constant -> Spearman 1, one -> 0."""
    from scipy.stats import spearmanr

    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"maps differ in size: {a.size} vs {b.size} pixels")
    if not 0 < top_k <= 1:
        raise ValueError(f"top_k is a fraction in (0, 1], got {top_k}")
    const_a, const_b = np.ptp(a) == 0, np.ptp(b) == 0
    if const_a or const_b:
        rho = 1.0 if (const_a and const_b) else 0.0
    else:
        rho = float(spearmanr(a, b).statistic)
        rho = 0.0 if math.isnan(rho) else rho
    k = max(1, int(round(top_k * a.size)))
    top_a = set(np.argsort(-a, kind="stable")[:k].tolist())
    top_b = set(np.argsort(-b, kind="stable")[:k].tolist())
    return MapComparison(method=method, spearman=rho, topk_overlap=len(top_a & top_b) / k, top_k=top_k)


def _readout_layer(model: "SkipNetwork", exit_block: int | None) -> tuple[torch.nn.Module, str]:
    """The module whose *input* is the feature map the prediction is read from."""
    if exit_block is not None:
        return model.probe(exit_block), f"probe {exit_block} input ({model.block_names[exit_block]} output)"
    return model.head, "classifier head input (last feature map)"


def _map(model: "SkipNetwork", forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, target: int,
         method: str, exit_block: int | None, ig_steps: int) -> tuple[np.ndarray, str]:
    """(H, W) attribution map for one run (the caller holds the replica lock)."""
    if method == "gradcam":
        layer, where = _readout_layer(model, exit_block)
        cam = LayerGradCam(forward, layer).attribute(x, target=target, attribute_to_layer_input=True,
                                                     relu_attributions=True)
        cam = LayerAttribution.interpolate(cam.detach(), tuple(x.shape[-2:]), interpolate_mode="bilinear")
        return cam[0, 0].cpu().numpy().astype(np.float64), where
    attr = IntegratedGradients(forward).attribute(x, baselines=torch.zeros_like(x), target=target, n_steps=ig_steps,
                                                  internal_batch_size=ig_steps)
    return attr.detach().abs().sum(1)[0].cpu().numpy().astype(np.float64), "input pixels"


@dataclass
class Explanation:
    """Full run vs skipped run of one image.

    ``maps[method]["full" | "skipped"]``: (H, W) float arrays; ``comparisons[method]``: :class:`MapComparison`;
    ``image``: (H, W, 3) float in [0, 1] for display; ``importance``: per-block importance on the full network
    with the policy's decisions; ``seconds``: wall time of each part.
    """

    target: int
    target_label: str
    full: RunDecisions
    skipped: RunDecisions
    image: np.ndarray
    maps: dict[str, dict[str, np.ndarray]]
    layers: dict[str, str]
    comparisons: dict[str, MapComparison]
    importance: BlockImportance | None
    seconds: dict[str, float]

    def summary(self) -> pd.DataFrame:
        """One row per map method: Spearman, top-k overlap, where the map was taken."""
        return pd.DataFrame([{"method": m, "spearman": c.spearman, "topk_overlap": c.topk_overlap,
                              "top_k": c.top_k, "layer": self.layers.get(m, "")}
                             for m, c in self.comparisons.items()])


def explain(net: "SkipNetwork", x: torch.Tensor, policy: Policy, target: int | None = None,
            methods: Sequence[str] = MAP_METHODS, importance: str | None = "taylor", ig_steps: int = 16,
            top_k: float = 0.1, n_steps: int = 8) -> Explanation:
    """Attribution maps of one image for the full run and the run under ``policy``, and their difference.

    Args:
        x: (1, 3, H, W) normalised image (or (3, H, W)).
        policy: the skipping policy (its decisions for this image are frozen for the attribution).
        target: the class explained in both runs (default: the full network's prediction), so the two maps
            answer the same question.
        methods: any of ``"gradcam"``, ``"integrated_gradients"``.
        importance: per-block importance method (see :func:`block_importance`) or ``None`` to leave it out.
        ig_steps: Integrated Gradients steps; top_k: fraction of pixels for the overlap.
    """
    unknown = [m for m in methods if m not in MAP_METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown or no map methods {unknown or list(methods)}; choose from {', '.join(MAP_METHODS)}")
    if importance is not None and importance not in IMPORTANCE_METHODS:
        raise ValueError(f"unknown importance method {importance!r}; choose one of {', '.join(IMPORTANCE_METHODS)}")
    if ig_steps < 2:
        raise ValueError("ig_steps must be >= 2")
    x = _check_one(net, x)
    model, lock = replica(net)
    seconds: dict[str, float] = {}
    maps: dict[str, dict[str, np.ndarray]] = {}
    layers: dict[str, str] = {}
    comparisons: dict[str, MapComparison] = {}
    with lock:
        t0 = time.perf_counter()
        full = run_decisions(model, x, None)
        skipped = run_decisions(model, x, policy)
        t = _check_target(net, full.predicted_index if target is None else target)
        frozen = FrozenPolicy(skipped.executed, skipped.exit_block)
        runs = {"full": (model, None), "skipped": (lambda inp: model.run(inp, frozen).logits, skipped.exit_block)}
        seconds["decisions"] = time.perf_counter() - t0
        for m in methods:
            t0 = time.perf_counter()
            maps[m] = {}
            for run_name, (fwd, exit_block) in runs.items():
                maps[m][run_name], where = _map(model, fwd, x, t, m, exit_block, ig_steps)
                layers[m] = where if run_name == "full" else (layers[m] if where == layers[m] else
                                                               f"{layers[m]} / skipped: {where}")
            comparisons[m] = compare_maps(maps[m]["full"], maps[m]["skipped"], top_k, m)
            seconds[m] = time.perf_counter() - t0
        imp = None
        if importance is not None:
            t0 = time.perf_counter()
            values = _importance_values(model, x, t, importance, n_steps)
            imp = BlockImportance(method=importance, target=t, target_label=net.meta.classes[t],
                                  block_names=list(net.block_names), importance=values, share=_share(values),
                                  executed=skipped.executed, reasons=skipped.reasons,
                                  downsample=[b.downsample for b in net.blocks], policy=skipped.policy)
            seconds["importance"] = time.perf_counter() - t0
    image = net.meta.denormalize(x)[0].permute(1, 2, 0).cpu().numpy().astype(np.float64)
    seconds["total"] = sum(seconds.values())
    return Explanation(target=t, target_label=net.meta.classes[t], full=full, skipped=skipped, image=image,
                       maps=maps, layers=layers, comparisons=comparisons, importance=imp, seconds=seconds)


def attribution_maps(net: "SkipNetwork", x: torch.Tensor, policy: Policy, method: str = "gradcam",
                     target: int | None = None, ig_steps: int = 16,
                     top_k: float = 0.1) -> tuple[np.ndarray, np.ndarray, MapComparison]:
    """``(full map (H, W), skipped map (H, W), comparison)`` for one method; see :func:`explain`."""
    ex = explain(net, x, policy, target=target, methods=(method,), importance=None, ig_steps=ig_steps, top_k=top_k)
    return ex.maps[method]["full"], ex.maps[method]["skipped"], ex.comparisons[method]


__all__ = [
    "BlockImportance", "Explanation", "FrozenPolicy", "IMPORTANCE_METHODS", "MAP_DESCRIPTIONS", "MAP_METHODS",
    "MapComparison", "RunDecisions", "attribution_maps", "block_importance", "compare_maps",
    "executed_block_gradients", "explain", "replica", "run_decisions",
]
