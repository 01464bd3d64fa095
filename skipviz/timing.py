"""Honest latency: measured time of full, skipped and masked runs, per-block latency profiles, predictions.

Everything here measures wall-clock latency on one device and says which:

* :func:`measure_latency` / :func:`measure_interleaved` - warm-up, repeated timed calls, median and
  inter-quartile range. On CPU through ``torch.utils.benchmark.Timer.timeit``; on CUDA with CUDA events and
  a synchronisation after each repeat. Every figure carries a :class:`DeviceInfo` (device, threads, dtype,
  versions, date).
* :func:`time_policy` - full forward vs. :meth:`SkipNetwork.run` under a policy vs. :func:`run_masked` (the
  published SkipNet / ConvNet-AIG way: every block computed, output mixed by the gate), measured interleaved,
  with FLOPs saved, time saved and the efficiency ratio (time saved / FLOPs saved).
* :func:`profile_blocks` / :func:`predict_latency` / :func:`check_prediction` - a per-part latency profile of
  a model at one batch size, the instant prediction of any decision set's latency from it, and the error of
  that prediction against a measured run.
* :func:`run_benchmark` / :func:`write_results` / :func:`add_cli` - the latency benchmark behind
  ``benchmarks/bench_latency.py`` and ``skipviz bench``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from ._allocator import allocator_setting, keep_heap_memory  # noqa: F401 (keep_heap_memory: re-exported)
from ._env import package_version
from .network import SkipNetwork, gather_rows, misplaced_rows, scatter_rows_
from .policies import THRESHOLD_POLICIES as POLICIES
from .policies import FullPolicy, GatePolicy, PlanPolicy, Policy, policy_for

# ------------------------------------------------------------------------------------------------- devices


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else CPU. Asking for CUDA without one is a clear error."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'auto'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available here; use 'cpu' or 'auto'")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device type {dev.type!r} is not supported for timing; use 'cpu' or 'cuda'")
    return dev


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (no-op on CPU), so a host clock reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class DeviceInfo:
    """Where and how a figure was measured: device, threads, dtype, library versions, date (UTC)."""

    device: str
    device_type: str
    device_name: str
    threads: int
    interop_threads: int
    dtype: str
    torch_version: str
    torchvision_version: str
    python_version: str
    platform: str
    cuda_version: str | None
    cpu_count: int
    load_average_1min: float | None
    date: str
    allocator: str = ""  # the CPU allocator's setting (skipviz._allocator), e.g. "glibc 2.36 malloc, mmap ..."

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def label(self) -> str:
        """Short human label, e.g. ``"cpu (AMD EPYC ..., 2 threads, float32)"``."""
        return f"{self.device_type} ({self.device_name}, {self.threads} threads, {self.dtype})"


def device_info(device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                threads: int | None = None) -> DeviceInfo:
    """Record the environment of a measurement on ``device``."""
    dev = resolve_device(device)
    tv = package_version("torchvision")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name()
    try:
        load = round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):  # pragma: no cover - not on every platform
        load = None
    return DeviceInfo(device=str(dev), device_type=dev.type, device_name=name,
                      threads=int(threads or torch.get_num_threads()), interop_threads=torch.get_num_interop_threads(),
                      dtype=str(dtype).replace("torch.", ""), torch_version=torch.__version__, torchvision_version=tv,
                      python_version=platform.python_version(), platform=platform.platform(),
                      cuda_version=torch.version.cuda if dev.type == "cuda" else None, cpu_count=os.cpu_count() or 1,
                      load_average_1min=load,
                      date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                      allocator=allocator_setting().label)


# ----------------------------------------------------------------------------------------------- latency


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one callable: statistics over ``n`` repeats of ``number`` back-to-back calls each.

    ``median_ms``/``q25_ms``/``q75_ms``/``iqr_ms``/``mean_ms``/``min_ms`` are milliseconds per call.
    ``batches_per_call``/``batch_size`` describe what one call does (e.g. 32 single-image runs), so
    :attr:`per_batch_ms` and :attr:`per_sample_ms` are comparable across settings.
    """

    label: str
    device: str
    device_type: str
    method: str
    median_ms: float
    q25_ms: float
    q75_ms: float
    iqr_ms: float
    mean_ms: float
    min_ms: float
    n: int
    number: int
    threads: int
    batch_size: int = 1
    batches_per_call: int = 1
    times_ms: list[float] = field(default_factory=list)

    @property
    def per_batch_ms(self) -> float:
        return self.median_ms / self.batches_per_call

    @property
    def per_sample_ms(self) -> float:
        return self.median_ms / (self.batches_per_call * self.batch_size)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["per_batch_ms"] = self.per_batch_ms
        out["per_sample_ms"] = self.per_sample_ms
        return out


def _stats(label: str, times_s: Sequence[float], device: torch.device, method: str, number: int, threads: int,
           batch_size: int, batches_per_call: int) -> LatencyStats:
    ms = np.asarray(times_s, dtype=np.float64) * 1e3
    q25, med, q75 = (float(v) for v in np.percentile(ms, [25, 50, 75]))
    return LatencyStats(label=label, device=str(device), device_type=device.type, method=method, median_ms=med,
                        q25_ms=q25, q75_ms=q75, iqr_ms=q75 - q25, mean_ms=float(ms.mean()), min_ms=float(ms.min()),
                        n=len(ms), number=number, threads=threads, batch_size=batch_size,
                        batches_per_call=batches_per_call, times_ms=[round(float(v), 6) for v in ms])


def _check_counts(warmup: int, repeats: int) -> None:
    if int(warmup) < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if int(repeats) < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")


class _Clock:
    """Times ``number`` calls of one callable: ``torch.utils.benchmark.Timer`` on CPU, CUDA events on GPU."""

    def __init__(self, fn: Callable[[], object], device: torch.device, threads: int, label: str) -> None:
        self.fn, self.device = fn, device
        if device.type == "cuda":
            self.method = "cuda_events"
            self.timer = None
        else:
            from torch.utils.benchmark import Timer

            self.method = "torch.utils.benchmark.Timer.timeit"
            self.timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads, label=label)

    def once(self, number: int) -> float:
        """Seconds per call, averaged over ``number`` back-to-back calls."""
        if self.timer is not None:
            return float(self.timer.timeit(number).median)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            self.fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / number


def _calibrate(fn: Callable[[], object], device: torch.device, min_repeat_s: float) -> int:
    """How many calls make one repeat last about ``min_repeat_s`` (at least 1)."""
    import time

    if min_repeat_s <= 0:
        return 1
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    dt = max(time.perf_counter() - t0, 1e-7)
    return max(1, min(10_000, int(math.ceil(min_repeat_s / dt))))


def measure_interleaved(fns: Mapping[str, Callable[[], object]], warmup: int = 3, repeats: int = 20,
                        device: str | torch.device | None = None, number: int | None = None,
                        threads: int | None = None, batch_size: int = 1, batches_per_call: int = 1,
                        min_repeat_s: float = 0.02) -> dict[str, LatencyStats]:
    """Time several callables round-robin (repeat r times each of them once, in a rotating order).

    Interleaving puts slow drifts of the machine (other processes, clocks) on every variant equally, so their
    ratios are fair. ``number``: calls per repeat (default: calibrated so one repeat lasts ``min_repeat_s``,
    the same for all variants, from the slowest). ``threads``: intra-op threads while timing on CPU (default:
    ``torch.get_num_threads()``; ``torch.utils.benchmark`` would otherwise use 1).
    """
    _check_counts(warmup, repeats)
    if not fns:
        raise ValueError("nothing to time: give at least one callable")
    for name, fn in fns.items():
        if not callable(fn):
            raise TypeError(f"{name!r} is not callable")
    dev = resolve_device(device)
    threads = int(threads or torch.get_num_threads())
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        clocks = {name: _Clock(fn, dev, threads, name) for name, fn in fns.items()}
        for _ in range(int(warmup)):
            for fn in fns.values():
                fn()
        synchronize(dev)
        if number is None:
            number = min(_calibrate(fn, dev, min_repeat_s) for fn in fns.values())
        number = int(number)
        if number < 1:
            raise ValueError(f"number must be >= 1, got {number}")
        times: dict[str, list[float]] = {name: [] for name in fns}
        names = list(fns)
        for r in range(int(repeats)):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                times[name].append(clocks[name].once(number))
    finally:
        torch.set_num_threads(old_threads)
    return {name: _stats(name, times[name], dev, clocks[name].method, number, threads, batch_size, batches_per_call)
            for name in fns}


def quick_median_ms(fn: Callable[[], object], repeats: int, device: str | torch.device | None = None) -> float:
    """Median wall-clock milliseconds of ``fn()`` over ``repeats`` single calls (host clock, device synchronised).

    For interactive views that must stay within a few hundred milliseconds: no ``torch.utils.benchmark`` set-up
    per call and no calibration, so use :func:`measure_interleaved` for figures you report.
    """
    import statistics
    import time

    _check_counts(0, repeats)
    dev = resolve_device(device)
    times = []
    for _ in range(int(repeats)):
        synchronize(dev)
        t0 = time.perf_counter()
        fn()
        synchronize(dev)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_latency(fn: Callable[[], object], warmup: int = 3, repeats: int = 20,
                    device: str | torch.device | None = None, number: int | None = None, label: str = "",
                    threads: int | None = None, batch_size: int = 1, batches_per_call: int = 1,
                    min_repeat_s: float = 0.02) -> LatencyStats:
    """Latency of ``fn()`` (which must do its own work on ``device``): median / quartiles over ``repeats``."""
    return measure_interleaved({label or getattr(fn, "__name__", "fn"): fn}, warmup, repeats, device, number, threads,
                               batch_size, batches_per_call, min_repeat_s)[label or getattr(fn, "__name__", "fn")]


# ------------------------------------------------------------------------------------------- masked run


def run_masked(net: SkipNetwork, x: torch.Tensor, policy: Policy | None = None) -> torch.Tensor:
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
    h = net.stem(x)
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
            leave = leave & active
            if exit_logits is None:
                exit_logits = logits.new_zeros(logits.shape)
            exit_logits = torch.where(leave.view(-1, 1), logits.to(exit_logits.dtype), exit_logits)
            active = active & ~leave
    final = net.head(h)
    if exit_logits is None:
        return final
    return torch.where(active.view(-1, 1), final, exit_logits.to(final.dtype))


# ------------------------------------------------------------------------------------ full vs skipped


def _net_device(net: SkipNetwork) -> torch.device:
    return next(net.parameters()).device


def _as_net_input(net: SkipNetwork, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device`` in the network's floating dtype (a float16/bfloat16 network gets half inputs)."""
    return x.to(device, dtype=next(net.parameters()).dtype) if x.is_floating_point() else x.to(device)


def _check_input(net: SkipNetwork, x: torch.Tensor) -> None:
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


def time_policy(net: SkipNetwork, x: torch.Tensor, policy: Policy, batch_size: int | None = None, warmup: int = 3,
                repeats: int = 20, device: str | torch.device | None = None, include_masked: bool = True,
                threads: int | None = None, number: int | None = None, min_repeat_s: float = 0.02) -> PolicyTiming:
    """Time ``net(x)`` (full), ``net.run(x, policy)`` (skipped) and :func:`run_masked` interleaved.

    Args:
        x: (N, 3, H, W) normalised images; split into batches of ``batch_size`` (default N) that one timed
            call runs one after another, so batch-1 latency is averaged over N different inputs (and their
            different decisions). N must be a multiple of ``batch_size``.
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

            def full() -> None:
                with torch.inference_mode():
                    for c in chunks:
                        net(c)

            def skipped() -> None:
                with torch.inference_mode():
                    for c in chunks:
                        net.run(c, policy)

            def masked() -> None:
                with torch.inference_mode():
                    for c in chunks:
                        run_masked(net, c, policy)

        fns: dict[str, Callable[[], None]] = {"full": full, "skipped": skipped}
        if include_masked:
            fns["masked"] = masked
        stats = measure_interleaved(fns, warmup=warmup, repeats=repeats, device=dev, number=number, threads=threads,
                                    batch_size=bs, batches_per_call=len(chunks), min_repeat_s=min_repeat_s)
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


# ------------------------------------------------------------------------------------ latency profile


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


def profile_blocks(net: SkipNetwork, batch_size: int = 1, device: str | torch.device | None = None,
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
    policy = GatePolicy(0.5)
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode():
            def timed(fn: Callable[[], object], label: str) -> float:
                def call() -> None:
                    with torch.inference_mode():
                        fn()

                return measure_latency(call, label=label, **kw).median_ms

            stem_ms = timed(lambda: net.stem(x), "stem")
            h = net.stem(x)
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
                bypass_ms.append(timed(lambda: block.bypass(hi), f"bypass{i}"))
                out = block(hi)
                if bs > 1 and block.downsample:  # identity blocks swap rows instead (swap_ms)
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
            hl = h
            head_ms = timed(lambda: net.head(hl), "head")
            h0 = net.stem(x)
            plan_ms = timed(lambda: PlanPolicy(0.5).plan(net, h0), "plan") if net.plan_head is not None else 0.0
            both = measure_interleaved({"full": lambda: _inference(net, x),
                                        "full_run": lambda: _inference(net.run, x, FullPolicy())}, **kw)
    finally:
        net.train(was_training)
    full_ms, full_run_ms = both["full"].median_ms, both["full_run"].median_ms
    # inside a forward the blocks stream their data through the caches: scale their one-by-one times to the
    # measured forward; what run() adds over the plain forward is the engine's fixed cost
    scale = max(1.0, (full_ms - stem_ms - head_ms) / sum(block_ms)) if sum(block_ms) > 0 else 1.0
    engine = max(0.0, full_run_ms - full_ms)
    return BlockProfile(model=net.meta.display_name, batch_size=bs, input_hw=(int(x.shape[-2]), int(x.shape[-1])),
                        names=list(net.block_names), downsample=[b.downsample for b in net.blocks], gated=gated,
                        stem_ms=stem_ms, block_ms=block_ms, bypass_ms=bypass_ms, gate_ms=gate_ms, mix_ms=mix_ms,
                        swap_ms=swap_ms, block_half_ms=half_ms, plan_ms=plan_ms, block_scale=scale,
                        head_ms=head_ms, engine_ms=engine, full_ms=full_ms, full_run_ms=full_run_ms,
                        info=device_info(dev, next(net.parameters()).dtype, both["full"].threads))


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
#: default model on CIFAR-10 test batches of 256 showed 0.26-0.6 (skipviz.network.misplaced_rows).
SWAP_FRACTION_ESTIMATE = 0.3


def predict_latency(profile: BlockProfile, executed, gates_evaluated=None, planned: bool = False) -> float:
    """Predicted latency (ms per batch of ``profile.batch_size``) of :meth:`SkipNetwork.run` for a decision set.

    Args:
        executed: a fraction of the gated blocks executed (ungated blocks always run), or (L,) per-block
            fractions / bools of the batch executing each block, or an (N, L) bool mask (N samples).
        gates_evaluated: like ``executed`` for gate evaluation (default: every gated block's gate runs).
        planned: the decisions come from the plan head (:class:`~skipviz.policies.PlanPolicy`): its time
            (``plan_ms``) is counted once and no gate is evaluated.
    Model: stem + head + engine overhead + per block: all run -> block time; none -> bypass time; a fraction p ->
    the block on that share of the rows (:meth:`BlockProfile.block_rows_ms`) plus the data movement: for an
    identity block the swap of its m misplaced rows (``m * swap_ms``; m replayed from an (N, L) mask with
    :func:`~skipviz.network.misplaced_rows`, else estimated as ``SWAP_FRACTION_ESTIMATE * min(k, N - k)``), for a
    downsampling block the gather/scatter and the bypass of the other rows; plus the gate decisions.
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
    total = profile.stem_ms + profile.head_ms + profile.engine_ms + (profile.plan_ms if planned else 0.0)
    for i in range(profile.num_blocks):
        if p[i] >= 1.0:
            total += profile.block_rows_ms(i, 1.0)
        elif p[i] <= 0.0:
            total += profile.bypass_ms[i]
        elif profile.downsample[i] or swaps is None:
            total += profile.block_rows_ms(i, p[i]) + profile.mix_ms[i] + \
                ((1 - p[i]) * profile.bypass_ms[i] if profile.downsample[i] else 0.0)
        else:
            m = moved[i] if moved is not None else SWAP_FRACTION_ESTIMATE * min(p[i], 1 - p[i]) * bs
            total += profile.block_rows_ms(i, p[i]) + m * swaps[i]
        total += (1.0 if ge[i] > 0 else 0.0) * profile.gate_ms[i]
    return float(total)


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
        out = asdict(self)
        out.update(error_ms=self.error_ms, relative_error=self.relative_error)
        return out


def check_prediction(profile: BlockProfile, net: SkipNetwork, x: torch.Tensor, policy: Policy, warmup: int = 3,
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
            for i, rec in enumerate(r.records):
                ev[i] = 1.0 if rec.gate_evaluated and profile.gated[i] else 0.0
            # the plan head's time counts only when it ran (overrides may force every gated block)
            planned = policy.decides_up_front and any(rec.gate_evaluated for rec in r.records)
            preds.append(predict_latency(profile, r.executed, ev, planned=planned))
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
        out = asdict(self)
        out.update(flops_fraction=self.flops_fraction, latency_fraction=self.latency_fraction)
        return out


def gate_cost(net: SkipNetwork, profile: BlockProfile, planned: bool = False) -> GateCost:
    """Gate heads' share of FLOPs (``net.flop_table``) and of latency (``profile``) of the full network; with
    ``planned``, the plan head's instead (one per input, for :class:`~skipviz.policies.PlanPolicy`)."""
    table = net.flop_table(profile.input_hw)
    if planned:
        return GateCost(gates="plan head", gate_flops=table.plan, flops_full=table.full, gate_ms=profile.plan_ms,
                        full_ms=profile.full_ms, batch_size=profile.batch_size)
    return GateCost(gates=len(table.gates), gate_flops=int(sum(table.gates.values())), flops_full=table.full,
                    gate_ms=profile.gates_ms, full_ms=profile.full_ms, batch_size=profile.batch_size)


# -------------------------------------------------------------------------------------------- benchmark


def random_gated_model(arch: str = "cifar_resnet20", seed: int = 0) -> SkipNetwork:
    """Random-init model whose gates fire on some inputs only (as the tests' ``tiny_net``): a stand-in for
    timing when no trained weights exist. Its accuracy means nothing; its latency does."""
    from . import create_model

    torch.manual_seed(seed)
    net = create_model(arch)
    if not net.gated_blocks:
        raise ValueError(f"{arch} has no gate heads to randomise")
    with torch.no_grad():
        for g in net.gates.values():
            torch.nn.init.normal_(g.fc2.weight, std=3.0)
            torch.nn.init.normal_(g.fc2.bias, std=1.0)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.1)
    return net.eval()


@dataclass
class BenchConfig:
    """Settings of one latency benchmark run."""

    model: str | None = None  # registered name; None: the default model if its weights exist, else random init
    policy: str = "gates"  # gates (GatePolicy) | plan (PlanPolicy: needs a model with a plan head)
    thresholds: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 256])
    batch1_images: int = 32  # single-image runs per timed call at batch 1 (different inputs, decisions)
    repeats: int = 15
    warmup: int = 3
    profile_repeats: int = 10
    device: str = "auto"
    threads: int | None = None
    inputs: str = "auto"  # auto | cifar10 | random
    seed: int = 0
    min_repeat_s: float = 0.02  # calls per repeat are calibrated so one repeat lasts this long (0: one call)

    @classmethod
    def quick(cls, **kw) -> "BenchConfig":
        base = dict(batch_sizes=[1, 4], batch1_images=2, repeats=2, warmup=1, profile_repeats=2, min_repeat_s=0.0)
        base.update(kw)
        return cls(**base)


def load_bench_model(cfg: BenchConfig) -> tuple[SkipNetwork, str]:
    """The benchmark's gated model and a label saying which (trained weights or RANDOM INIT)."""
    from . import DEFAULT_MODEL, create_model, list_models

    name = cfg.model
    if name is None:
        if DEFAULT_MODEL in list_models(pretrained=True):
            return create_model(DEFAULT_MODEL), f"{DEFAULT_MODEL} (trained weights)"
        return random_gated_model("cifar_resnet20", cfg.seed), \
            "cifar_resnet20 (RANDOM INIT, randomised gates: no trained weights in data/)"
    if name.endswith(":random"):
        arch = name[: -len(":random")]
        return random_gated_model(arch, cfg.seed), f"{arch} (RANDOM INIT, randomised gates)"
    net = create_model(name)
    if not net.gated_blocks:
        raise ValueError(f"{name} has no gate heads: the latency benchmark times gate thresholds")
    return net, name + (" (trained weights)" if "." in name else " (random init)")


def bench_inputs(net: SkipNetwork, cfg: BenchConfig, n: int) -> tuple[torch.Tensor, str]:
    """(n, 3, H, W) normalised inputs: the first n CIFAR-10 test images when available, else random normal."""
    from .data import cifar10_root, load_split, normalize

    if cfg.inputs not in ("auto", "cifar10", "random"):
        raise ValueError(f"inputs must be auto, cifar10 or random, got {cfg.inputs!r}")
    root = cifar10_root() if cfg.inputs != "random" else None
    if cfg.inputs == "cifar10" and root is None:
        raise ValueError("inputs=cifar10 but the CIFAR-10 folder is not here (set SKIPVIZ_CIFAR10)")
    if root is not None and tuple(net.meta.input_size) == (3, 32, 32):
        ds = load_split(root, "test", progress=False)
        if len(ds) >= n:
            return normalize(ds.images[:n], net.meta.mean, net.meta.std), f"CIFAR-10 test images 0..{n - 1}"
    g = torch.Generator().manual_seed(cfg.seed)
    return torch.randn(n, *net.meta.input_size, generator=g), "RANDOM normal tensors (no CIFAR-10 here)"


def run_benchmark(cfg: BenchConfig, log: Callable[[str], None] | None = None) -> dict:
    """Full / skipped / masked latency of gate thresholds at each batch size, gate cost, prediction error.

    Returns a JSON-ready dict: ``environment``, ``settings``, ``model``, ``inputs``, ``rows`` (one per
    batch size x threshold, see :class:`PolicyTiming`), ``gate_cost`` and ``prediction`` per batch size.
    """
    log = log or (lambda s: None)
    if not cfg.thresholds or any(not 0.0 <= float(t) <= 1.0 for t in cfg.thresholds):
        raise ValueError(f"thresholds must be a non-empty list in [0, 1], got {cfg.thresholds}")
    if not cfg.batch_sizes or any(int(b) < 1 for b in cfg.batch_sizes):
        raise ValueError(f"batch sizes must be >= 1, got {cfg.batch_sizes}")
    if cfg.batch1_images < 1:
        raise ValueError("batch1_images must be >= 1")
    _check_counts(cfg.warmup, cfg.repeats)
    if cfg.policy not in POLICIES:
        raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {cfg.policy!r}")
    dev = resolve_device(cfg.device)
    net, model_label = load_bench_model(cfg)
    net = net.to(dev).eval()
    policy_for(net, cfg.policy)  # a plan on a network without a plan head fails here, before any timing
    n_inputs = max(max(cfg.batch_sizes), cfg.batch1_images)
    x_all, inputs_label = bench_inputs(net, cfg, n_inputs)
    log(f"model: {model_label}; inputs: {inputs_label}; device: {dev}")
    rows, gate_costs, profiles = [], [], []
    for bs in cfg.batch_sizes:
        x = x_all[: cfg.batch1_images] if bs == 1 else x_all[:bs]
        prof = profile_blocks(net, bs, dev, x=x_all[:bs], warmup=cfg.warmup, repeats=cfg.profile_repeats,
                              threads=cfg.threads, min_repeat_s=cfg.min_repeat_s / 2)
        profiles.append(prof.to_dict())
        gate_costs.append(gate_cost(net, prof, planned=cfg.policy == "plan").to_dict())
        for t in cfg.thresholds:
            pol = policy_for(net, cfg.policy, float(t))
            tm = time_policy(net, x, pol, batch_size=bs, warmup=cfg.warmup, repeats=cfg.repeats, device=dev,
                             threads=cfg.threads, min_repeat_s=cfg.min_repeat_s)
            check = check_prediction(prof, net, x, pol, warmup=cfg.warmup, repeats=max(2, cfg.repeats // 2),
                                     threads=cfg.threads, min_repeat_s=cfg.min_repeat_s)
            row = tm.to_dict()
            free_saved = check.decision_free_time_saved_fraction
            row.update(threshold=float(t), predicted_ms=check.predicted_ms,
                       prediction_measured_ms=check.measured_ms, prediction_relative_error=check.relative_error,
                       decision_free_time_saved_fraction=free_saved,
                       decision_free_efficiency=(free_saved / tm.flops_saved_fraction
                                                 if tm.flops_saved_fraction > 0 else None))
            rows.append(row)
            eff = "n/a" if tm.efficiency is None else f"{tm.efficiency:.2f}"
            log(f"batch {bs:4d} threshold {t:.2f}: full {tm.full_ms:.2f} ms, skipped {tm.skipped_ms:.2f} ms, "
                f"masked {tm.masked_ms:.2f} ms, FLOPs saved {tm.flops_saved_fraction:.1%}, time saved "
                f"{tm.time_saved_fraction:.1%}, efficiency {eff}, predicted {check.predicted_ms:.2f} ms "
                f"({check.relative_error:+.1%})")
    env = device_info(dev, next(net.parameters()).dtype, cfg.threads)
    return {"environment": env.to_dict(), "settings": asdict(cfg), "model": model_label, "policy": cfg.policy,
            "weights_sha256": net.meta.weights_sha256, "inputs": inputs_label, "rows": rows,
            "gate_cost": gate_costs, "profiles": profiles,
            "notes": "latencies are ms per batch (medians over repeats, interleaved full/skipped/masked); batch 1 "
                     f"is averaged over {cfg.batch1_images} different images; efficiency = time saved fraction / "
                     "FLOPs saved fraction (gate FLOPs counted as spent), from the medians over the run; paired "
                     "efficiency = the median (and quartiles) of the same ratio per interleaved round, full and "
                     "skipped back to back, so drifts of the machine's speed cancel; masked = every block computed and "
                     "mixed by the gate, as published SkipNet/ConvNet-AIG code; ceiling: free decisions = the "
                     "share of the full run's time the bypassed blocks account for, and the efficiency it allows, "
                     "from the per-block profile (the same decisions at no decision cost)"}


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def environment_markdown(env: dict) -> str:
    """One Markdown line saying where a benchmark ran (a :meth:`DeviceInfo.to_dict`)."""
    return (f"Device: **{env['device_type']}** ({env['device_name']}), {env['threads']} threads, {env['dtype']}; "
            f"torch {env['torch_version']}, torchvision {env['torchvision_version']}, Python "
            f"{env['python_version']}; {env['date']}; 1-min load average at the end {env['load_average_1min']}"
            + (f"; CPU allocator: {env['allocator']}." if env.get("allocator") else "."))


def report_header(title: str, report: dict, inputs_note: str) -> list[str]:
    """The first lines every benchmark's Markdown shares: ``# title: model``, where it ran, the inputs."""
    return [f"# {title}: {report['model']}", "", environment_markdown(report["environment"]),
            f"Inputs: {report['inputs']}; {inputs_note}.", ""]


def report_footer(report: dict) -> list[str]:
    """The last lines of an engine-variant benchmark's Markdown: units, method, the command that wrote it."""
    return ["", "ms per batch. " + report["method"] + ".", "", f"Command: `{report['command']}`", ""]


def engine_bench_report(model: str, inputs: str, settings: dict, script: str, method: str, rows: list) -> dict:
    """The JSON of an engine-variant benchmark (``benchmarks/bench_<script>.py``): model, inputs, where it ran,
    settings, the command line, the method and one row per batch size."""
    return {"model": model, "inputs": inputs, "environment": device_info("cpu").to_dict(), "settings": settings,
            "command": f"python benchmarks/{script} " + shlex.join(sys.argv[1:]), "method": method, "rows": rows}


def time_engine_variants(callers: Mapping[str, Callable[[], object]], batch_size: int, batches_per_call: int,
                         warmup: int, repeats: int, base: str, new: str, speedup: str) -> dict:
    """Time two engine variants of the full and the skipped run round-robin (:func:`measure_interleaved`, one
    call per repeat) and return one result row: ``<variant>_<kind>_ms`` and ``_iqr_ms`` (per batch) for every
    ``callers`` key ``"<variant>/<kind>"`` (kind ``full`` or ``skipped``), and ``<kind>_<speedup>_speedup`` =
    ``base`` time / ``new`` time."""
    stats = measure_interleaved(callers, warmup=warmup, repeats=repeats, device="cpu", batch_size=batch_size,
                                batches_per_call=batches_per_call, min_repeat_s=0.0, number=1)
    row: dict = {"batch_size": batch_size}
    for name, st in stats.items():
        key = name.replace("/", "_")
        row[f"{key}_ms"] = st.per_batch_ms
        row[f"{key}_iqr_ms"] = st.iqr_ms / st.batches_per_call
    for kind in ("full", "skipped"):
        row[f"{kind}_{speedup}_speedup"] = row[f"{base}_{kind}_ms"] / row[f"{new}_{kind}_ms"]
    return row


def add_engine_bench_arguments(p: argparse.ArgumentParser, out_dir: str | Path, warmup: int = 3,
                               quick_help: str = "tiny smoke setting") -> None:
    """The options shared by the engine-variant benchmarks (``bench_memory_format.py``, ``bench_fold_bn.py``):
    model, batch sizes, gate threshold of the skipped run, warm-up, threads, inputs, ``--quick``, output folder."""
    p.add_argument("--model", default=None, help="registered model (default: the default model, else random init)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--threshold", type=float, default=0.5, help="gate threshold of the skipped run")
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--inputs", default="auto", choices=["auto", "cifar10", "random"])
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", default=str(out_dir))


def results_markdown(report: dict) -> str:
    """The benchmark's Markdown table (one row per batch size x threshold) plus gate cost and environment."""
    policy = {"gates": "per-block gates (GatePolicy)", "plan": "plan head, every block decided at the stem "
              "(PlanPolicy)"}[report.get("policy", "gates")]
    lines = [f"# Latency benchmark: {report['model']}, {policy}", "", environment_markdown(report["environment"]),
             f"Inputs: {report['inputs']}.", "",
             "| batch | threshold | blocks run | FLOPs saved | full ms | skipped ms | masked ms | time saved "
             "| efficiency | paired efficiency (IQR) | masked time saved | predicted ms (err) "
             "| ceiling: free decisions |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        q = r.get("paired_efficiency_quartiles")
        paired = _fmt(r.get("paired_efficiency"), ".2f") + (f" ({q[0]:.2f}-{q[1]:.2f})" if q else "")
        lines.append(
            f"| {r['batch_size']} | {r['threshold']:.2f} | {r['blocks_executed_mean']:.2f}/{r['blocks_total']} | "
            f"{r['flops_saved_fraction']:.1%} | {r['full_ms']:.3f} | {r['skipped_ms']:.3f} | "
            f"{_fmt(r['masked_ms'], '.3f')} | {r['time_saved_fraction']:.1%} | {_fmt(r['efficiency'], '.2f')} | "
            f"{paired} | "
            f"{_fmt(r['masked_time_saved_fraction'], '.1%')} | {r['predicted_ms']:.3f} "
            f"({r['prediction_relative_error']:+.1%}) | {_fmt(r.get('decision_free_time_saved_fraction'), '.1%')} "
            f"saved, {_fmt(r.get('decision_free_efficiency'), '.2f')} |")
    lines += ["", "Decision heads (gate heads, all evaluated, or the plan head), share of the full network:", "",
              "| batch | gates | FLOPs share | latency share |", "|---:|---:|---:|---:|"]
    for g in report["gate_cost"]:
        lines.append(f"| {g['batch_size']} | {g['gates']} | {g['flops_fraction']:.2%} | {g['latency_fraction']:.2%} |")
    lines += ["", report["notes"] + ".", ""]
    return "\n".join(lines)


def write_results(report: dict, out_dir: str | Path, stem: str | None = None,
                  markdown: Callable[[dict], str] | None = None) -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` (``markdown(report)``, default :func:`results_markdown`) under
    ``out_dir``; ``stem`` defaults to ``latency_<device>``. Returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or f"latency_{report['environment']['device_type']}"
    jp, mp = out / f"{stem}.json", out / f"{stem}.md"
    jp.write_text(json.dumps(report, indent=1, default=str))
    mp.write_text((markdown or results_markdown)(report))
    return jp, mp


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared by ``benchmarks/bench_latency.py`` and ``skipviz bench``)."""
    p.add_argument("--model", default=None, help="registered model name, or ARCH:random for random-init gates "
                                                 "(default: the default model if its weights exist, else random)")
    p.add_argument("--policy", default="gates", choices=sorted(POLICIES),
                   help="gates: per-block gates; plan: the plan head (writes latency_plan_<device>)")
    p.add_argument("--thresholds", type=_float_list, default=None, help="comma-separated gate thresholds")
    p.add_argument("--batch-sizes", type=_int_list, default=None, help="comma-separated batch sizes (default 1,256)")
    p.add_argument("--batch1-images", type=int, default=None, help="images timed one by one at batch 1")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default torch's)")
    p.add_argument("--inputs", default="auto", choices=["auto", "cifar10", "random"])
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test")
    p.add_argument("--out", default="benchmarks/results", help="folder for latency_<device>.json/.md")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    base = BenchConfig.quick() if args.quick else BenchConfig()
    for name in ("model", "thresholds", "batch_sizes", "batch1_images", "repeats", "warmup", "threads"):
        v = getattr(args, name)
        if v is not None:
            setattr(base, name, v)
    base.device, base.inputs, base.policy = args.device, args.inputs, args.policy
    return base


def cmd_bench(args: argparse.Namespace) -> int:
    """``skipviz bench``: run the latency benchmark, print progress and the table, write the results."""
    try:
        cfg = config_from_args(args)
        report = run_benchmark(cfg, log=lambda s: print(s, flush=True))
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stem = f"latency{'_plan' if cfg.policy == 'plan' else ''}_{report['environment']['device_type']}"
    if cfg.threads:  # an explicit thread count is a configuration of its own: kept beside the default's
        stem += f"_{cfg.threads}thread"
    jp, mp = write_results(report, args.out, stem)
    print(results_markdown(report))
    print(f"wrote {jp} and {mp}")
    return 0


def add_cli(subparsers) -> None:
    """Add ``skipviz bench`` to the ``skipviz`` command."""
    p = subparsers.add_parser("bench", help="measure full vs skipped vs masked latency (benchmarks/results)")
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)


__all__ = ["BenchConfig", "BlockProfile", "DeviceInfo", "GateCost", "LatencyStats", "PolicyTiming",
           "PredictionCheck", "add_cli", "add_engine_bench_arguments", "check_prediction", "device_info",
           "engine_bench_report", "gate_cost", "keep_heap_memory", "measure_interleaved", "measure_latency",
           "predict_latency", "profile_blocks", "random_gated_model", "report_footer", "report_header",
           "resolve_device", "results_markdown", "run_benchmark", "run_masked", "time_engine_variants", "time_policy",
           "write_results"]
