"""Per-part latency profile of a model at one batch size (:func:`profile_blocks`, :class:`BlockProfile`) and what
the decision heads cost (:func:`gate_cost`, from the profile; one decision inside runs: :func:`decision_cost`). The
prediction of a decision set's latency from a profile is :mod:`skipviz.measure.predict`'s."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from ..engine.rows import gather_rows, scatter_rows_
from ..policies.base import Decision, Plan, Policy
from ..policies.simple import EarlyExitPolicy, FullPolicy
from ..policies.threshold import GatePolicy, PlanPolicy
from .clock import DeviceInfo, asdict_with, device_info, measure_interleaved, measure_latency, resolve_device
from .runs import _as_net_input, _check_input, _net_device

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.network import SkipNetwork

__all__ = ["BlockProfile", "DecisionCost", "GateCost", "decision_cost", "gate_cost", "profile_blocks"]


@dataclass(frozen=True)
class BlockProfile:
    """Per-part latency (ms, medians) of one model at one batch size on one device.

    ``block_ms[i]``: block i run on the whole batch; ``bypass_ms[i]``: its bypass; ``gate_ms[i]``: the gate
    decision (gate head + sigmoid + threshold, as ``GatePolicy.decide``), 0 for blocks without a gate;
    ``mix_ms[i]``: the gather/scatter of a half-and-half split, what a downsampling block's mixed batch costs (0 at
    batch 1 and for identity blocks, which swap rows instead; older profiles timed it for every block);
    ``swap_ms[i]``: per misplaced row, the row swap that makes an identity block's executing rows contiguous
    (:meth:`SkipNetwork._run_contiguous`; 0 for downsampling blocks and at batch 1, empty in profiles recorded
    before it existed); ``block_half_ms[i]``: block i on the first half of the batch (the cost of a sub-batch is
    not linear in its rows: on CPU a whole batch of 256 spills the caches that half of it fits; 0 at batch 1, empty
    in older profiles); ``engine_ms``: the fixed per-run cost of :meth:`SkipNetwork.run` over the plain forward,
    ``max(0, full_run_ms - full_ms)`` (older profiles: over the sum of the parts); ``full_ms``: the plain full
    forward, measured; ``block_scale``: how much slower the blocks run inside a forward than one by one on warm
    caches, ``max(1, (full_ms - stem_ms - head_ms) / sum(block_ms))`` (clamped at 1: a forward faster than its
    parts is predicted from the parts; 1.0 in older profiles).
    """

    model: str
    batch_size: int
    input_hw: tuple[int, int]
    names: list[str]
    downsample: list[bool]
    gated: list[bool]
    stem_ms: float
    block_ms: list[float]
    bypass_ms: list[float]
    gate_ms: list[float]
    mix_ms: list[float]
    head_ms: float
    engine_ms: float
    full_ms: float
    full_run_ms: float
    info: DeviceInfo
    swap_ms: list[float] = field(default_factory=list)
    block_half_ms: list[float] = field(default_factory=list)
    plan_ms: float = 0.0  # the plan head's decisions for the batch (PlanPolicy), 0 without a plan head
    block_scale: float = 1.0
    # one early-exit check (probe head, softmax, threshold) inside a run, measured there (decision_cost): a
    # batch-1 EfficientNet run paid 130-210 us per check against 25-50 us for the probe timed alone
    probe_ms: float = 0.0

    def block_rows_ms(self, i: int, fraction: float) -> float:
        """Block i on ``fraction`` of the batch's rows: piecewise linear through (0, 0), half the batch
        (``block_half_ms``) and the whole batch (``block_ms``); linear in the rows without a half-batch time."""
        full = self.block_ms[i] * self.block_scale
        half = self.block_half_ms[i] * self.block_scale if len(self.block_half_ms) == self.num_blocks else 0.0
        if half <= 0.0:
            return fraction * full
        if fraction <= 0.5:
            return 2.0 * fraction * half
        return half + (2.0 * fraction - 1.0) * (full - half)

    @property
    def num_blocks(self) -> int:
        return len(self.block_ms)

    @property
    def gates_ms(self) -> float:
        return float(sum(self.gate_ms))

    @property
    def gate_latency_fraction(self) -> float:
        """Time of every gate decision over the plain full forward's time."""
        return self.gates_ms / self.full_ms

    def to_dict(self) -> dict:
        out = asdict(self)
        out["info"] = self.info.to_dict()
        out["gate_latency_fraction"] = self.gate_latency_fraction
        return out

    def to_dataframe(self):
        """One row per part: part, name, run_ms, bypass_ms, gate_ms, mix_ms."""
        import pandas as pd

        rows = [{"part": "stem", "name": "stem", "run_ms": self.stem_ms, "bypass_ms": 0.0, "gate_ms": 0.0,
                 "mix_ms": 0.0}]
        rows += [{"part": f"block{i}", "name": n, "run_ms": self.block_ms[i], "bypass_ms": self.bypass_ms[i],
                  "gate_ms": self.gate_ms[i], "mix_ms": self.mix_ms[i]} for i, n in enumerate(self.names)]
        rows.append({"part": "head", "name": "head", "run_ms": self.head_ms, "bypass_ms": 0.0, "gate_ms": 0.0,
                     "mix_ms": 0.0})
        return pd.DataFrame(rows)


def _gather_scatter(h: torch.Tensor, out_like: torch.Tensor, run_idx: torch.Tensor,
                    skip_idx: torch.Tensor) -> torch.Tensor:
    """The data movement of a mixed downsampling block in :meth:`SkipNetwork._apply_block`, without the
    block's maths (identity blocks swap rows instead: ``swap_ms``)."""
    gather_rows(h, run_idx)
    gather_rows(h, skip_idx)
    out = torch.empty_like(out_like)
    return scatter_rows_(scatter_rows_(out, run_idx, out_like[: run_idx.numel()]), skip_idx,
                         out_like[: skip_idx.numel()])


def profile_blocks(net: "SkipNetwork", batch_size: int = 1, device: str | torch.device | None = None,
                   x: torch.Tensor | None = None, warmup: int = 3, repeats: int = 15, threads: int | None = None,
                   min_repeat_s: float = 0.01) -> BlockProfile:
    """Measure the latency of every part of ``net`` at ``batch_size`` on its device.

    Args:
        x: optional (batch_size, 3, H, W) input the parts are timed on (default: seeded random normal at the
            model's input size); each part gets the features that actually reach it in a full forward.
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    bs = int(batch_size)
    dev = resolve_device(device) if device is not None else _net_device(net)
    if _net_device(net).type != dev.type:
        raise ValueError(f"the model is on {_net_device(net)} but profiling was asked on {dev}")
    if x is None:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(bs, *net.meta.input_size, generator=g)
    _check_input(net, x)
    if x.shape[0] != bs:
        raise ValueError(f"x has {x.shape[0]} samples, batch_size is {bs}")
    x = _as_net_input(net, x, dev)
    kw = dict(warmup=warmup, repeats=repeats, device=dev, threads=threads, batch_size=bs, min_repeat_s=min_repeat_s)
    timed = _timer(kw)
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode():
            stem_ms = timed(lambda: net._stem(x), "stem")
            parts, hl = _time_blocks(net, net._stem(x), timed, bs, dev)
            head_ms = timed(lambda: net.head(hl), "head")
            h0 = net._stem(x)
            plan_ms = timed(lambda: PlanPolicy(0.5).plan(net, h0), "plan") if net.plan_head is not None else 0.0
            both = measure_interleaved({"full": lambda: _inference(net, x),
                                        "full_run": lambda: _inference(net.run, x, FullPolicy())}, **kw)
        # one home for what an exit check costs: per batch of bs, the engine's per-run cost spread over the checks
        probe_ms = (decision_cost(net, x, "early_exit", rounds=repeats, batch_size=bs, threads=threads).check_ms * bs
                    if net.probes is not None and net.num_blocks > 1 else 0.0)
    finally:
        net.train(was_training)
    full_ms, full_run_ms = both["full"].median_ms, both["full_run"].median_ms
    block_ms = parts["block_ms"]
    # inside a forward the blocks stream their data through the caches: scale their one-by-one times to the
    # measured forward; what run() adds over the plain forward is the engine's fixed cost
    scale = max(1.0, (full_ms - stem_ms - head_ms) / sum(block_ms)) if sum(block_ms) > 0 else 1.0
    engine = max(0.0, full_run_ms - full_ms)
    return BlockProfile(model=net.meta.display_name, batch_size=bs, input_hw=(int(x.shape[-2]), int(x.shape[-1])),
                        names=list(net.block_names), downsample=[b.downsample for b in net.blocks],
                        stem_ms=stem_ms, plan_ms=plan_ms, block_scale=scale, head_ms=head_ms, engine_ms=engine,
                        full_ms=full_ms, full_run_ms=full_run_ms, probe_ms=probe_ms,
                        info=device_info(dev, next(net.parameters()).dtype, both["full"].threads), **parts)


class _ExitChecksOnly(EarlyExitPolicy):
    """Checks an exit after every block with a probe (probe head, softmax, threshold, as a real exit) and lets no
    input leave: every block runs, so the run's extra time over the full run is the checks'."""

    def __init__(self) -> None:
        super().__init__(1.0)

    def exit_after(self, net: "SkipNetwork", index: int,
                   h: torch.Tensor) -> tuple[torch.Tensor | bool, torch.Tensor, torch.Tensor | float] | None:
        ex = super().exit_after(net, index, h)
        if ex is None:
            return None
        return (False if ex[0].__class__ is bool else torch.zeros_like(ex[0])), ex[1], ex[2]


class _GatesOnly(GatePolicy):
    """Evaluates every gate as a real decision does (its threshold above 0) and runs every block."""

    def __init__(self) -> None:
        super().__init__(1.0)

    def decide(self, net: "SkipNetwork", index: int, h: torch.Tensor) -> Decision:
        d = super().decide(net, index, h)
        run = torch.ones_like(d.execute) if isinstance(d.execute, torch.Tensor) else True  # a batch's per-row work
        return Decision(run, d.reason, d.score, d.threshold, d.evaluated)


class _PlanOnly(PlanPolicy):
    """Evaluates the plan head as a real plan does and runs every block."""

    def __init__(self) -> None:
        super().__init__(1.0)

    def plan(self, net: "SkipNetwork", h: torch.Tensor) -> Plan:
        p = super().plan(net, h)
        run = [torch.ones_like(e) if isinstance(e, torch.Tensor) else True for e in p.execute]  # rows as decided
        return Plan(run, p.score, p.reason, p.threshold, p.evaluated)


def _decisions_only(net: "SkipNetwork", source: str) -> tuple[Policy, int]:
    """The policy that makes every decision of ``source`` and skips nothing, and the decisions per input."""
    if source == "early_exit":
        policy: Policy = _ExitChecksOnly()
        n = sum(policy.exits_possible_after(net, i) for i in range(net.num_blocks))
        if not n:
            raise ValueError(f"{net.meta.display_name} has no probe heads: there is no exit check to time")
        return policy, n
    if source == "gates":
        if not net.gated_blocks:
            raise ValueError(f"{net.meta.display_name} has no gate heads: there is no gate decision to time")
        return _GatesOnly(), len(net.gated_blocks)
    if source == "plan":
        if net.plan_head is None:
            raise ValueError(f"{net.meta.display_name} has no plan head: there is no plan to time")
        return _PlanOnly(), 1
    raise ValueError(f"unknown decision source {source!r}: 'gates', 'plan' or 'early_exit'")


@dataclass(frozen=True)
class DecisionCost:
    """What one decision of a source costs inside a run (an early-exit check: probe head, softmax, threshold; a
    gate: gate head, sigmoid, threshold; the plan head, once per input), from paired rounds of the full network
    against a run making every decision of ``source`` and skipping nothing: ``checks`` decisions per input,
    ``check_ms`` one decision (the median per-round difference over ``checks``), ``full_ms`` the full run (median),
    both per input at ``batch_size``; ``device`` as the saving's label (``"CPU (2 threads)"``), ``device_name``
    the processor or GPU model."""

    checks: int
    check_ms: float
    full_ms: float
    rounds: int
    batch_size: int
    device: str
    device_name: str = ""
    source: str = "early_exit"

    @property
    def fraction(self) -> float:
        """One decision's time over the full run's."""
        return self.check_ms / self.full_ms

    def to_dict(self) -> dict:
        return asdict_with(self, "fraction")


def decision_cost(net: "SkipNetwork", x: torch.Tensor, source: str = "early_exit", rounds: int = 30,
                  batch_size: int = 1, threads: int | None = None) -> DecisionCost:
    """Time the decisions of ``source`` (``"early_exit"``: every exit check ``net``'s probes allow; ``"gates"``:
    every gate; ``"plan"``: the plan head) on ``x`` (N, 3, H, W, normalised; N a multiple of ``batch_size``) in
    batches of ``batch_size``: the plain full forward against a run making every decision and skipping nothing
    (so the engine's own per-run cost counts with them), in ``rounds`` interleaved paired rounds
    (:func:`~skipviz.measure.saving.measure_saving`). A ratio of paired times: the machine's drift, which moved a
    batch-1 EfficientNet-Lite0 forward between 12 and 20 ms within minutes on the 2-core AMD EPYC, cancels.
    Decisions timed inside runs, not one by one: a decision timed alone on warm caches took a fraction of its time
    inside a run (the shipped EfficientNet-Lite0's nine gates: 1.9 % of the run one by one in a block profile of
    2026-12-06, 7.0-8.2 % of it this way on 2026-12-07; an exit check 25-50 us alone, 110-150 us inside a run; the
    2-core AMD EPYC)."""
    from .saving import measure_saving

    policy, n = _decisions_only(net, source)
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode():
            s = measure_saving(net, x, policy, batch_size=batch_size, rounds=rounds, threads=threads)
    finally:
        net.train(was_training)
    per_input = 1e3 / batch_size  # measure_saving's seconds per batch -> ms per input
    return DecisionCost(checks=n, check_ms=max(0.0, -s.saving_s) * per_input / n, full_ms=s.full_median_s * per_input,
                        rounds=s.rounds, batch_size=batch_size, device=s.device,
                        device_name=device_info(_net_device(net)).device_name, source=source)


def _timer(kw: dict) -> Callable[[Callable[[], object], str], float]:
    """``timed(fn, label)``: the median ms of ``fn()`` under inference mode (:func:`measure_latency` with ``kw``)."""
    def timed(fn: Callable[[], object], label: str) -> float:
        def call() -> None:
            with torch.inference_mode():
                fn()

        return measure_latency(call, label=label, **kw).median_ms

    return timed


def _time_blocks(net: "SkipNetwork", h: torch.Tensor, timed: Callable[[Callable[[], object], str], float], bs: int,
                 dev: torch.device) -> tuple[dict[str, list], torch.Tensor]:
    """Every block's parts timed on the features that reach it (``h``: the stem's output): the gate decision, the
    block on the whole batch and on half of it, its bypass, a downsampling block's gather/scatter, an identity
    block's row swap per misplaced row. Returns the :class:`BlockProfile` lists by field name and the last
    block's output."""
    policy = GatePolicy(0.5)
    half = torch.arange(bs, device=dev) % 2 == 0
    run_idx, skip_idx = half.nonzero().squeeze(1), (~half).nonzero().squeeze(1)
    n_swap = max(1, bs // 8)  # misplaced rows of the timed swap: the first n_swap rows with the last
    swap_dst = torch.cat([torch.arange(n_swap), torch.arange(bs - n_swap, bs)]).to(dev)
    swap_src = torch.cat([torch.arange(bs - n_swap, bs), torch.arange(n_swap)]).to(dev)
    block_ms, bypass_ms, gate_ms, mix_ms, swap_ms, half_ms, gated = [], [], [], [], [], [], []
    for i, block in enumerate(net.blocks):
        hi = h
        gated.append(net.gate(i) is not None)
        gate_ms.append(timed(lambda: policy.decide(net, i, hi), f"gate{i}") if gated[-1] else 0.0)
        block_ms.append(_block_ms(timed, block, hi, f"block{i}"))
        half_ms.append(_block_ms(timed, block, hi[: bs // 2], f"block{i}_half") if bs >= 2 else 0.0)
        # a block without a bypass (an MBConv block that changes the shape) always runs: nothing to time
        bypass_ms.append(timed(lambda: block.bypass(hi), f"bypass{i}") if block.bypassable else 0.0)
        out = block(hi)
        if bs > 1 and block.downsample and block.bypassable:  # identity blocks swap rows instead (swap_ms)
            mix_ms.append(timed(lambda: _gather_scatter(hi, out, run_idx, skip_idx), f"mix{i}"))
        else:
            mix_ms.append(0.0)
        if bs >= 2 * n_swap and not block.downsample:
            hs = hi.clone()  # swapped in place, again and again: rows trade places, values stay finite
            swap_ms.append(timed(lambda: scatter_rows_(hs, swap_dst, gather_rows(hs, swap_src)),
                                 f"swap{i}") / n_swap)
        else:
            swap_ms.append(0.0)
        h = out
    return dict(gated=gated, block_ms=block_ms, bypass_ms=bypass_ms, gate_ms=gate_ms, mix_ms=mix_ms,
                swap_ms=swap_ms, block_half_ms=half_ms), h


def _block_ms(timed: Callable[[Callable[[], object], str], float], block, h: torch.Tensor, label: str) -> float:
    """Block latency on ``h`` as the engine runs it: an identity block in place (``forward_``, no output
    allocated: timed on a scratch copy, the copy's own time subtracted), a downsampling block out of place."""
    if block.downsample:
        return timed(lambda: block(h), label)
    scratch = h.clone()
    with_copy = timed(lambda: block.forward_(scratch.copy_(h)), label)
    return max(with_copy - timed(lambda: scratch.copy_(h), label + "_copy"), 0.0)


def _inference(fn: Callable, *args) -> None:
    with torch.inference_mode():
        fn(*args)


@dataclass(frozen=True)
class GateCost:
    """What the gate heads cost: FLOPs over the full network's FLOPs, decision time over the full forward's."""

    gates: int | str  # the number of gate heads, or "plan head"
    gate_flops: int
    flops_full: int
    gate_ms: float
    full_ms: float
    batch_size: int

    @property
    def flops_fraction(self) -> float:
        return self.gate_flops / self.flops_full

    @property
    def latency_fraction(self) -> float:
        return self.gate_ms / self.full_ms

    def to_dict(self) -> dict:
        return asdict_with(self, "flops_fraction", "latency_fraction")


def gate_cost(net: "SkipNetwork", profile: BlockProfile, planned: bool = False) -> GateCost:
    """Gate heads' share of FLOPs (``net.flop_table``) and of latency (``profile``) of the full network; with
    ``planned``, the plan head's instead (one per input, for :class:`~skipviz.policies.PlanPolicy`)."""
    table = net.flop_table(profile.input_hw)
    if planned:
        return GateCost(gates="plan head", gate_flops=table.plan, flops_full=table.full, gate_ms=profile.plan_ms,
                        full_ms=profile.full_ms, batch_size=profile.batch_size)
    return GateCost(gates=len(table.gates), gate_flops=int(sum(table.gates.values())), flops_full=table.full,
                    gate_ms=profile.gates_ms, full_ms=profile.full_ms, batch_size=profile.batch_size)
