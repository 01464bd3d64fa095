"""Process-wide CPU allocator setting for inference: freed activation memory stays in the heap.

PyTorch's CPU tensors come from ``malloc``. glibc serves a block at or above its mmap threshold with a fresh
``mmap`` and unmaps it on ``free``, so such a batch's activations are page-faulted in again on every forward;
and the threshold is dynamic (it rises to the size of the largest mapped block freed so far, and the heap's free
top is trimmed back to the OS), so whether a 16 MiB activation of the default model at batch 256 is faulted in
on every call depends on what the process allocated before. Measured on the development machine's CPU: the
same full forward at batch 256 ran in 133 ms in some processes and 151-157 ms in others; with the setting below
it ran in 132-134 ms in every process, and the skipped runs did not change. A figure that depends on the
process's history is not a measurement, so the command line, the dashboard and the benchmarks fix it at start
(:func:`keep_heap_memory`) and every timing records the setting (``DeviceInfo.allocator``).

``mallopt`` with a fixed ``M_MMAP_THRESHOLD`` (32 MiB, glibc's largest; it also switches the dynamic threshold
off) and a large ``M_TRIM_THRESHOLD``: blocks below 32 MiB come from the heap, and up to ``trim_threshold``
bytes of freed heap are kept for reuse instead of being returned to the OS. With ``large_from_heap`` (the
default) ``M_MMAP_MAX`` is 0 as well, so blocks above 32 MiB come from the heap too: EfficientNet-Lite0's stem
output at batch 32 (51 MB) was otherwise mapped and faulted in on every forward, 29-31 ms for the stem instead
of 11 ms, and the full forward took 268-303 ms instead of 236-257 ms (2-core AMD EPYC). glibc still maps a block
when the heap cannot grow (and a thread's arena maps what exceeds its 64 MiB heaps). Elsewhere than glibc it
changes nothing and says so.
"""
from __future__ import annotations

import ctypes
import platform
import threading
from dataclasses import asdict, dataclass

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: larger values are refused


@dataclass(frozen=True)
class AllocatorSetting:
    """What the process's CPU allocator was told: ``tuned`` when ``mallopt`` accepted both settings."""

    allocator: str
    tuned: bool
    mmap_threshold: int | None = None
    trim_threshold: int | None = None
    note: str = ""
    large_from_heap: bool = False

    @property
    def label(self) -> str:
        """E.g. ``"glibc 2.36 malloc, mmap threshold 32 MiB, trim threshold 512 MiB, larger blocks from the
        heap too"``."""
        parts = [f"{name} {value // 2**20} MiB" for name, value in (("mmap threshold", self.mmap_threshold),
                                                                     ("trim threshold", self.trim_threshold)) if value]
        if self.large_from_heap:
            parts.append("larger blocks from the heap too")
        text = f"{self.allocator}, " + (", ".join(parts) if parts else "default settings")
        return text + (f" ({self.note})" if self.note else "")

    def to_dict(self) -> dict:
        return asdict(self)


_lock = threading.Lock()
_setting: AllocatorSetting | None = None


def _glibc() -> tuple[str, str]:
    name, version = platform.libc_ver()
    return name, version


def keep_heap_memory(mmap_threshold: int = MMAP_THRESHOLD_MAX,
                     trim_threshold: int = 512 * 1024 * 1024, large_from_heap: bool = True) -> AllocatorSetting:
    """Serve blocks below ``mmap_threshold`` bytes (with ``large_from_heap``, all blocks) from the heap and keep
    up to ``trim_threshold`` bytes of freed heap for reuse (glibc ``mallopt``), for the rest of the process. Returns the setting now in force
    (also :func:`allocator_setting`); on another C library nothing changes, and when glibc refuses a value the
    setting says which. The process then keeps up to ``trim_threshold`` bytes of freed memory instead of
    returning it to the OS (the ``skipviz`` command applies this to every subcommand, training included)."""
    global _setting
    if not 0 < mmap_threshold <= MMAP_THRESHOLD_MAX:
        raise ValueError(f"mmap_threshold must be in (0, {MMAP_THRESHOLD_MAX}], got {mmap_threshold}")
    if not 0 < trim_threshold < 2**31:
        raise ValueError(f"trim_threshold must be in (0, 2**31), got {trim_threshold}")
    name, version = _glibc()
    with _lock:
        if platform.system() != "Linux" or name != "glibc":
            _setting = AllocatorSetting(f"{platform.system()} {name or 'libc'} malloc".strip(), False,
                                        note="mallopt is glibc's: not changed")
            return _setting
        mallopt = ctypes.CDLL(None).mallopt
        mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        mmap_ok = bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold))
        trim_ok = bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
        heap_ok = bool(mallopt(M_MMAP_MAX, 0)) if large_from_heap else False
        allocator = f"glibc {version} malloc"
        if mmap_ok and trim_ok and (heap_ok or not large_from_heap):
            _setting = AllocatorSetting(allocator, True, mmap_threshold, trim_threshold, large_from_heap=heap_ok)
        else:  # say what is in force: any value may have been taken alone
            refused = " and ".join(n for n, ok in (("mmap threshold", mmap_ok), ("trim threshold", trim_ok),
                                                   ("mmap maximum", heap_ok or not large_from_heap)) if not ok)
            _setting = AllocatorSetting(allocator, False, mmap_threshold if mmap_ok else None,
                                        trim_threshold if trim_ok else None, note=f"mallopt refused the {refused}",
                                        large_from_heap=heap_ok)
        return _setting


def allocator_setting() -> AllocatorSetting:
    """The setting :func:`keep_heap_memory` put in force in this process, or the defaults if it was not called."""
    with _lock:
        if _setting is not None:
            return _setting
    name, version = _glibc()
    return AllocatorSetting(f"glibc {version} malloc" if name == "glibc" else f"{platform.system()} malloc", False)
