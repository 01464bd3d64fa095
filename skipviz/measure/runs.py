"""Timed runs of a network: the masked baseline, full vs skipped vs masked of one policy, audit throughput (the
paired saving with its interval that the dashboard shows builds on :func:`time_policy`: :mod:`skipviz.measure.saving`).

* :func:`run_masked` - the published SkipNet / ConvNet-AIG way: every block computed, output mixed by the gate.
* :func:`time_policy` - full forward vs. :meth:`SkipNetwork.run` under a policy vs. :func:`run_masked`, measured
  interleaved, with FLOPs saved, time saved and the efficiency ratio (time saved / FLOPs saved).
* :func:`measure_throughput` - images/s of the skipped run with and without the audit's shadow run.
"""
from __future__ import annotations

import functools

import statistics
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from ..policies.base import Policy
from ..policies.simple import FullPolicy
from .clock import (DeviceInfo, LatencyStats, device_info, latency_of_rounds, measure_interleaved, measure_per_input,
                    resolve_device, synchronize)

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.network import SkipNetwork

__all__ = ["PolicyTiming", "default_audit_batch_size", "measure_throughput", "run_masked", "time_policy"]

def run_masked(net: "SkipNetwork", x: torch.Tensor, policy: Policy | None = None) -> torch.Tensor:
    """The published way (SkipNet, ConvNet-AIG inference code): compute EVERY block, mix by the decision.

    For each block the policy decides exactly as in :meth:`SkipNetwork.run`; the block is computed for the
    whole batch anyway and ``h = g * block(h) + (1 - g) * bypass(h)`` with ``g`` the 0/1 decision. Blocks the
    policy cannot skip (no gate, not evaluated, always run) are just computed. Early-exit policies: every
    block still runs for every sample; a sample's logits are those of the probe it exits at.

    Args:
        x: (N, 3, H, W). Returns: logits (N, K), equal (up to float rounding) to ``net.run(x, policy).logits``.
    """
    policy = policy or FullPolicy()
    n = x.shape[0]
    h = net._stem(x)  # laid out as the engine lays it out (channels-last), as run() does
    active = torch.ones(n, dtype=torch.bool, device=x.device)
    exit_logits: torch.Tensor | None = None
    plan = policy.plan(net, h)
    for i, block in enumerate(net.blocks):
        d = policy.decide(net, i, h) if plan is None else plan.decide(i)
        out = block(h)
        if d.execute is True and not d.evaluated:
            h = out
        else:
            g = d.execute.to(out.dtype).view(-1, 1, 1, 1) if torch.is_tensor(d.execute) else float(bool(d.execute))
            h = g * out + (1 - g) * block.bypass(h)
        ex = policy.exit_after(net, i, h)
        if ex is not None:
            leave, logits, _ = ex
            if leave.__class__ is bool:  # a batch of one decided on the host
                leave = torch.full_like(active, leave)
            leave = leave & active
            if exit_logits is None:
                exit_logits = logits.new_zeros(logits.shape)
            exit_logits = torch.where(leave.view(-1, 1), logits.to(exit_logits.dtype), exit_logits)
            active = active & ~leave
    final = net.head(h)
    if exit_logits is None:
        return final
    return torch.where(active.view(-1, 1), final, exit_logits.to(final.dtype))


def _net_device(net: "SkipNetwork") -> torch.device:
    return next(net.parameters()).device


def _as_net_input(net: "SkipNetwork", x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device`` in the network's floating dtype (a float16/bfloat16 network gets half inputs)."""
    return x.to(device, dtype=next(net.parameters()).dtype) if x.is_floating_point() else x.to(device)


def _check_input(net: "SkipNetwork", x: torch.Tensor) -> None:
    if not torch.is_tensor(x) or x.dim() != 4 or x.shape[1] != 3 or x.shape[0] < 1:
        raise ValueError(f"expected images of shape (N, 3, H, W) with N >= 1, got "
                         f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")


@dataclass(frozen=True)
class PolicyTiming:
    """Full forward vs. real skipping vs. masked (compute-all) run of one policy on the same inputs.

    Latencies are per batch of ``batch_size`` (medians over repeats; ``*_stats`` hold the details).
    ``flops_saved_fraction`` counts gate/probe heads as spent; ``efficiency`` = time saved fraction / FLOPs
    saved fraction (1.0: every saved FLOP is saved time; ``None`` when no FLOPs are saved).
    """

    policy: dict
    batch_size: int
    num_batches: int
    full_ms: float
    skipped_ms: float
    masked_ms: float | None
    flops_full: int
    flops_executed_mean: float
    blocks_executed_mean: float
    blocks_total: int
    max_abs_logit_diff_masked: float | None
    full_stats: LatencyStats
    skipped_stats: LatencyStats
    masked_stats: LatencyStats | None
    info: DeviceInfo

    @property
    def flops_saved_fraction(self) -> float:
        return 1.0 - self.flops_executed_mean / self.flops_full

    @property
    def time_saved_fraction(self) -> float:
        return 1.0 - self.skipped_ms / self.full_ms

    @property
    def masked_time_saved_fraction(self) -> float | None:
        return None if self.masked_ms is None else 1.0 - self.masked_ms / self.full_ms

    @property
    def efficiency(self) -> float | None:
        f = self.flops_saved_fraction
        return None if f <= 1e-9 else self.time_saved_fraction / f

    @property
    def masked_efficiency(self) -> float | None:
        f, t = self.flops_saved_fraction, self.masked_time_saved_fraction
        return None if f <= 1e-9 or t is None else t / f

    @property
    def paired_efficiencies(self) -> list[float]:
        """The efficiency of each interleaved round: ``(1 - skipped_r / full_r) / FLOPs saved fraction`` from
        the r-th repeat of each, which ran back to back in the same round, so a drift of the machine's speed
        cancels in the ratio (:attr:`efficiency` divides medians taken over the whole run). Empty when no FLOPs
        are saved or the repeats do not pair."""
        f, full, skipped = self.flops_saved_fraction, self.full_stats.times_ms, self.skipped_stats.times_ms
        if f <= 1e-9 or not full or len(full) != len(skipped):
            return []
        return [(1.0 - s / t) / f for t, s in zip(full, skipped)]

    @property
    def paired_efficiency(self) -> float | None:
        """Median of :attr:`paired_efficiencies` (``None`` when there are none)."""
        e = self.paired_efficiencies
        return float(np.median(e)) if e else None

    @property
    def paired_efficiency_quartiles(self) -> tuple[float, float] | None:
        e = self.paired_efficiencies
        return (float(np.percentile(e, 25)), float(np.percentile(e, 75))) if e else None

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("full_stats", "skipped_stats", "masked_stats",
                                                                  "info")}
        out.update(flops_saved_fraction=self.flops_saved_fraction, time_saved_fraction=self.time_saved_fraction,
                   masked_time_saved_fraction=self.masked_time_saved_fraction, efficiency=self.efficiency,
                   paired_efficiency=self.paired_efficiency,
                   paired_efficiency_quartiles=self.paired_efficiency_quartiles,
                   masked_efficiency=self.masked_efficiency, full_stats=self.full_stats.to_dict(),
                   skipped_stats=self.skipped_stats.to_dict(),
                   masked_stats=None if self.masked_stats is None else self.masked_stats.to_dict(),
                   info=self.info.to_dict())
        return out


def _per_batch_passes(net: "SkipNetwork", chunks: list[torch.Tensor], policy: Policy,
                      include_masked: bool) -> dict[str, Callable[[int], object]]:
    """Per batch ``i`` of ``chunks``: the full forward, the skipped run and (with ``include_masked``) the masked
    run, for :func:`~skipviz.measure.clock.measure_per_input`."""
    fns: dict[str, Callable[[int], object]] = {"full": lambda i: net(chunks[i]),
                                               "skipped": lambda i: net.run(chunks[i], policy)}
    if include_masked:
        fns["masked"] = lambda i: run_masked(net, chunks[i], policy)
    return fns


def _time_batches(fns: dict[str, Callable[[int], object]], n_batches: int, bs: int, dev: torch.device, warmup: int,
                  repeats: int, threads: int | None, number: int | None,
                  min_repeat_s: float) -> dict[str, LatencyStats]:
    """:func:`time_policy`'s statistics of the per-batch callables ``fns`` (one per variant), the r-th repeats of
    the variants from the same round."""
    if n_batches > 1:
        # batch by batch: each batch through every variant back to back. Timing whole passes over the batches
        # in turn left the machine's drift in the paired ratios: batch-1 exits of the ImageNet model over 32
        # photos (0.4 s a pass), per-round efficiency quartiles -0.53 to 0.51 pass by pass, 0.47-0.67 and
        # 0.54-0.60 photo by photo (benchmarks/batch1_decision_ceiling.py, 2026-12-07, AMD EPYC Zen 4)
        th = int(threads or torch.get_num_threads())
        with torch.inference_mode():
            times = measure_per_input(fns, n_batches, rounds=repeats, warmup=warmup, device=dev, threads=th)
        return {name: latency_of_rounds(name, t, dev, th, bs) for name, t in times.items()}
    with torch.inference_mode():  # one batch: whole calls, calibrated (torch.utils.benchmark runs them in this thread)
        return measure_interleaved({name: functools.partial(fn, 0) for name, fn in fns.items()}, warmup=warmup,
                                   repeats=repeats, device=dev, number=number, threads=threads, batch_size=bs,
                                   batches_per_call=1, min_repeat_s=min_repeat_s)


def time_policy(net: "SkipNetwork", x: torch.Tensor, policy: Policy, batch_size: int | None = None, warmup: int = 3,
                repeats: int = 20, device: str | torch.device | None = None, include_masked: bool = True,
                threads: int | None = None, number: int | None = None, min_repeat_s: float = 0.02) -> PolicyTiming:
    """Time ``net(x)`` (full), ``net.run(x, policy)`` (skipped) and :func:`run_masked` interleaved.

    Args:
        x: (N, 3, H, W) normalised images; split into batches of ``batch_size`` (default N), so batch-1
            latency is averaged over N different inputs (and their different decisions). N must be a multiple of
            ``batch_size``. With several batches, each round puts every batch through the full, skipped and
            masked runs back to back (:func:`~skipviz.measure.clock.measure_per_input`; ``number`` and
            ``min_repeat_s`` then do not apply: one call per batch and variant); one batch is timed by
            :func:`~skipviz.measure.clock.measure_interleaved`. Either way the r-th repeats of the variants come
            from the same round.
        device: must be the device ``net`` is on (default: that device).
    """
    _check_input(net, x)
    dev = resolve_device(device) if device is not None else _net_device(net)
    if _net_device(net).type != dev.type:
        raise ValueError(f"the model is on {_net_device(net)} but timing was asked on {dev}; move it with net.to()")
    bs = int(batch_size or x.shape[0])
    if bs < 1 or x.shape[0] % bs:
        raise ValueError(f"batch_size {bs} must be >= 1 and divide the number of inputs {x.shape[0]}")
    chunks = [c.contiguous() for c in _as_net_input(net, x, dev).split(bs)]
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode():
            results = [net.run(c, policy) for c in chunks]
            flops = torch.cat([r.flops_executed() for r in results]).double()
            executed = torch.cat([r.executed for r in results])
            diff = None
            if include_masked:
                masked_logits = torch.cat([run_masked(net, c, policy) for c in chunks])
                skip_logits = torch.cat([r.logits for r in results])
                diff = float((masked_logits - skip_logits).abs().max())
            del results
        stats = _time_batches(_per_batch_passes(net, chunks, policy, include_masked), len(chunks), bs, dev,
                              warmup, repeats, threads, number, min_repeat_s)
    finally:
        net.train(was_training)
    dtype = next(net.parameters()).dtype
    return PolicyTiming(policy=policy.config(), batch_size=bs, num_batches=len(chunks),
                        full_ms=stats["full"].per_batch_ms, skipped_ms=stats["skipped"].per_batch_ms,
                        masked_ms=stats["masked"].per_batch_ms if include_masked else None,
                        flops_full=net.flop_table(tuple(x.shape[-2:])).full, flops_executed_mean=float(flops.mean()),
                        blocks_executed_mean=float(executed.sum(1).double().mean()), blocks_total=net.num_blocks,
                        max_abs_logit_diff_masked=diff, full_stats=stats["full"], skipped_stats=stats["skipped"],
                        masked_stats=stats.get("masked"), info=device_info(dev, dtype, stats["full"].threads))


def default_audit_batch_size(net: "SkipNetwork", budget_bytes: int = 32 << 20, largest: int = 256) -> int:
    """Images per audit batch: the largest power of two <= ``largest`` whose stem output (a ResNet's widest
    activation) for one input of ``net.meta.input_size`` fits ``budget_bytes`` times the batch.

    Skipping pays more in larger batches: every block runs on the sub-batch that executes it, and on CPU a
    small sub-batch costs more per image than a large one. For the default model on the 2-core CPU
    (``benchmarks/results/audit_throughput_cpu.md``, threshold 0.5) the skipped run's efficiency against the
    FLOP ideal is 0.77 / 0.83 / 0.87 / 0.89 at batch 32 / 64 / 128 / 256, and its images/s are level from 128
    to 256 (2,911 and 2,887), within the machine's run-to-run drift.
    The budget keeps 224-pixel ImageNet ResNets at batch 32.
    """
    param = next(net.parameters())
    was_training = net.training
    net.eval()  # a training-mode stem would update BatchNorm statistics
    try:
        with torch.inference_mode():
            stem_out = net.stem(torch.zeros((1, *net.meta.input_size), device=param.device, dtype=param.dtype))
    finally:
        net.train(was_training)
    per_image = stem_out.numel() * stem_out.element_size()
    n = largest
    while n > 1 and n * per_image > budget_bytes:
        n //= 2
    return n


def measure_throughput(net: "SkipNetwork", policy: Policy, x: torch.Tensor, batch_size: int | None = None,
                       repeats: int = 7) -> dict:
    """Images/s of the skipped run, the skipped run plus the shadow full run, and the plain full network, on
    the same batches of ``x`` (N, 3, H, W), ``batch_size`` images each (default: the audit's,
    :func:`default_audit_batch_size`).

    Each of ``repeats`` rounds times one pass of the plain network and one pass of the skipped run over all
    batches, back to back (which goes first alternates between rounds, so neither gains from going second),
    so both see the same machine load. Images/s are medians over rounds; ``speedup`` is the median of the
    per-round ratios (robust to load from other work) and ``efficiency_quartiles`` the spread of the per-round
    efficiencies. Also the fraction of FLOPs executed and the issue's target: speedup >= 0.9 x (1 / fraction
    executed).
    """
    net.eval()
    batch_size = default_audit_batch_size(net) if batch_size is None else int(batch_size)
    dev = next(net.parameters()).device
    x = x.to(dev)
    batches = [x[i: i + batch_size] for i in range(0, x.shape[0], batch_size)]
    times: dict[str, list[float]] = {"skip": [], "full": []}
    with torch.inference_mode():
        flops = [net.run(xb, policy).flops_executed() for xb in batches]  # also warms up every batch shape
        for xb in batches:
            net(xb)
        for r in range(max(1, repeats)):
            for kind in (("full", "skip") if r % 2 == 0 else ("skip", "full")):
                synchronize(dev)
                t0 = time.perf_counter()
                for xb in batches:
                    if kind == "skip":
                        net.run(xb, policy)
                    else:
                        net(xb)
                synchronize(dev)
                times[kind].append(time.perf_counter() - t0)
    n = x.shape[0]
    fraction = float(torch.cat(flops).double().mean()) / net.flop_table(tuple(x.shape[-2:])).full
    skip_s, full_s = statistics.median(times["skip"]), statistics.median(times["full"])
    ratios = [f / s for f, s in zip(times["full"], times["skip"])]
    speedup = statistics.median(ratios)
    quartiles = (statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3)
    full = n / full_s
    return {"images": n, "batch_size": batch_size, "device": str(dev), "torch_threads": torch.get_num_threads(),
            "rounds": len(times["full"]), "skip_images_per_s": n / skip_s,
            "skip_with_shadow_images_per_s": n / (skip_s + full_s), "full_images_per_s": full,
            "flops_fraction_executed": fraction, "speedup": speedup, "ideal_speedup": 1.0 / fraction,
            "efficiency": speedup * fraction,
            "efficiency_quartiles": [quartiles[0] * fraction, quartiles[2] * fraction],
            "target_images_per_s": 0.9 * full / fraction,
            "meets_target": speedup >= 0.9 / fraction}
