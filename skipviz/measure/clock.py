"""Clocks and the facts every measurement carries: devices, synchronisation, environment, timed callables.

* :func:`resolve_device` / :func:`synchronize` / :func:`device_label` - which device, waiting for its work.
* :func:`device_info` (:class:`DeviceInfo`), :func:`software_versions`, :func:`environment` - where and with
  what a figure was measured (device, threads, dtype, versions, date).
* :func:`measure_interleaved` / :func:`measure_latency` - warm-up, repeated timed calls, median and
  inter-quartile range. On CPU through ``torch.utils.benchmark.Timer.timeit``; on CUDA with CUDA events and a
  synchronisation after each repeat.
* :func:`measure_per_input` - variants paired input by input: each input through every variant back to back.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from .._allocator import allocator_setting
from .._env import __version__, package_version

__all__ = ["DeviceInfo", "LatencyStats", "asdict_with", "cpu_name", "device_info", "device_label", "environment", "latency_of_rounds",
           "measure_interleaved", "measure_latency", "measure_per_input", "resolve_device", "software_versions", "synchronize"]


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


def device_label(device: torch.device | str | None = None) -> str:
    """``"GPU (name)"`` when CUDA is used, else ``"CPU (n threads)"``."""
    dev = torch.device(device) if device is not None else resolve_device()
    if dev.type == "cuda":
        return f"GPU ({torch.cuda.get_device_name(dev)})"
    return f"CPU ({torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''})"


def cpu_name() -> str:
    """The CPU model as the kernel names it (``/proc/cpuinfo``), e.g. ``"AMD EPYC"``; recorded with every figure."""
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
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()
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


def asdict_with(obj, *properties: str) -> dict:
    """``dataclasses.asdict(obj)`` followed by the named (computed) properties: a result's JSON."""
    out = asdict(obj)
    out.update({name: getattr(obj, name) for name in properties})
    return out


def software_versions() -> dict:
    """Python, torch, torchvision, numpy and platform versions (a model card's ``software``)."""
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": package_version("torchvision"), "numpy": np.__version__, "platform": platform.platform()}


def environment(device: torch.device | str = "cpu") -> dict:
    """Library versions and the machine a run used (what a reviewer needs to judge a reproduction)."""
    dev = torch.device(device)
    versions = software_versions()
    out = {"skipviz": __version__, "torch": versions["torch"], "torchvision": versions["torchvision"],
           "numpy": versions["numpy"], "python": versions["python"], "platform": versions["platform"],
           "processor": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
           "device": str(dev), "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}
    if dev.type == "cuda" and torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
        out["gpu"] = torch.cuda.get_device_name(dev)
    return out


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
        self.fn, self.device, self.label = fn, device, label
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


def _time_call(name: str, fn: Callable[[int], object], i: int, device: torch.device) -> float:
    """Seconds of one call ``fn(i)`` of the variant ``name`` (:func:`measure_per_input`), ``device`` synchronised
    before and after it."""
    import time

    synchronize(device)
    t0 = time.perf_counter()
    fn(i)
    synchronize(device)
    return time.perf_counter() - t0


def measure_per_input(fns: Mapping[str, Callable[[int], object]], n_inputs: int, rounds: int = 10, warmup: int = 1,
                      device: str | torch.device | None = None, threads: int | None = None) -> dict[str, np.ndarray]:
    """Time variants input by input: in every round each input goes through every variant (``fns[name](i)`` for
    input ``i``) back to back, in an order that rotates between inputs and rounds, so each input's variants are
    timed milliseconds apart. :func:`measure_interleaved` pairs whole calls: where a call covers many inputs (a
    sample of photos at batch 1, 0.1-0.4 s) the machine's drift between the variants of one round left per-round
    differences of +-0.6 ms per photo on the 2-core AMD EPYC, against a 12 ms photo; paired photo by photo, the
    same check's quartiles shrank and its medians stopped moving between runs
    (``benchmarks/exit_check_breakdown.py``).

    Returns ``{name: (rounds, n_inputs) seconds}``. One host clock per call (:func:`_time_call`), the device
    synchronised before and after it; ``warmup`` untimed rounds first; ``threads`` intra-op threads on CPU while
    timing (default: torch's current setting).
    """
    _check_counts(warmup, rounds)
    if n_inputs < 1:
        raise ValueError(f"n_inputs must be >= 1, got {n_inputs}")
    if not fns:
        raise ValueError("nothing to time: give at least one callable")
    dev = resolve_device(device)
    names = list(fns)
    out = {name: np.zeros((int(rounds), int(n_inputs))) for name in names}
    old_threads = torch.get_num_threads()
    torch.set_num_threads(int(threads or old_threads))
    try:
        for r in range(-int(warmup), int(rounds)):
            for i in range(int(n_inputs)):
                k = (r + i) % len(names)
                for name in names[k:] + names[:k]:
                    if r < 0:
                        fns[name](i)
                    else:
                        out[name][r, i] = _time_call(name, fns[name], i, dev)
    finally:
        torch.set_num_threads(old_threads)
    return out


#: how :func:`latency_of_rounds` statistics were timed (``LatencyStats.method``)
PER_INPUT_METHOD = "skipviz.measure.clock.measure_per_input (each input through every variant back to back), time.perf_counter"


def latency_of_rounds(label: str, times_s: np.ndarray, device: str | torch.device | None, threads: int,
                      batch_size: int = 1) -> LatencyStats:
    """:class:`LatencyStats` of one variant of :func:`measure_per_input` (``times_s``: (rounds, n_inputs) seconds):
    one repeat per round, its time the round's total over the inputs (``batches_per_call`` = n_inputs, so
    ``per_batch_ms`` is per input), the r-th repeats of two variants from the same round."""
    times_s = np.asarray(times_s, dtype=np.float64)
    return _stats(label, times_s.sum(1).tolist(), resolve_device(device), PER_INPUT_METHOD, 1, int(threads),
                  int(batch_size), int(times_s.shape[1]))


def measure_latency(fn: Callable[[], object], warmup: int = 3, repeats: int = 20,
                    device: str | torch.device | None = None, number: int | None = None, label: str = "",
                    threads: int | None = None, batch_size: int = 1, batches_per_call: int = 1,
                    min_repeat_s: float = 0.02) -> LatencyStats:
    """Latency of ``fn()`` (which must do its own work on ``device``): median / quartiles over ``repeats``."""
    return measure_interleaved({label or getattr(fn, "__name__", "fn"): fn}, warmup, repeats, device, number, threads,
                               batch_size, batches_per_call, min_repeat_s)[label or getattr(fn, "__name__", "fn")]
