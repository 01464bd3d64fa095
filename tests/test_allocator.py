"""skipviz._allocator: the process's CPU allocator keeps freed activation memory, and timings record it."""
from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from skipviz import _allocator, allocator_setting, keep_heap_memory
from skipviz.measure.clock import device_info
from skipviz.cli.bench_common import environment_markdown

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="mallopt is glibc's; elsewhere the setting is left alone (tested below)")


def _faults_per_round(rounds: int = 7) -> float:
    """Median minor page faults per round of four 16 MiB tensors alive at once and then freed (batch-256
    activations of the default model's first stage are 16 MiB each); the median ignores a one-off heap
    growth."""
    def one_round() -> None:
        live = [torch.empty(4 * 2**20).fill_(1.0) for _ in range(4)]
        del live

    one_round()
    counts = []
    for _ in range(rounds):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        one_round()
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return statistics.median(counts)


_MMAPPED_BYTES = """
import ctypes, sys, torch
from skipviz import keep_heap_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
if sys.argv[1] == "tuned":
    keep_heap_memory()
before = mallinfo2().hblkhd
t = torch.empty(int(sys.argv[2]) // 4).fill_(1.0)  # e.g. 16 MiB: one batch-256 activation of the CIFAR ResNets'
print(mallinfo2().hblkhd - before)                 # first stage; 64 MiB: over the mmap threshold
"""


def _mmapped_bytes(mode: str, size: int = 16 * 2**20) -> int:
    """Bytes glibc maps for one tensor of ``size`` bytes allocated by a fresh process (growth of its mmapped
    blocks)."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", _MMAPPED_BYTES, mode, str(size)], cwd=root, capture_output=True,
                          text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.split()[-1])


@glibc
def test_activations_come_from_the_heap_once_set():
    # by default glibc maps a fresh 16 MiB block (and unmaps it on free: faulted in again next time); once set,
    # it is served from the heap, whose freed memory is kept for the next batch
    assert _mmapped_bytes("default") >= 16 * 2**20
    assert _mmapped_bytes("tuned") == 0
    # above the 32 MiB threshold too (EfficientNet-Lite0's stem output at batch 32 is 51 MB)
    assert _mmapped_bytes("default", 64 * 2**20) >= 64 * 2**20
    assert _mmapped_bytes("tuned", 64 * 2**20) == 0


@glibc
def test_freed_activations_are_reused_without_page_faults():
    setting = keep_heap_memory()
    assert setting.tuned and setting.mmap_threshold == 32 * 2**20 and setting.trim_threshold == 512 * 2**20
    assert allocator_setting() == setting and keep_heap_memory() == setting  # idempotent
    assert setting.large_from_heap
    assert setting.label == (f"{setting.allocator}, mmap threshold 32 MiB, trim threshold 512 MiB, larger blocks "
                             "from the heap too")
    assert _faults_per_round() < 16


def test_timings_record_the_allocator_setting():
    keep_heap_memory()
    info = device_info("cpu")
    assert info.allocator == allocator_setting().label
    assert f"CPU allocator: {info.allocator}." in environment_markdown(info.to_dict())


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(_allocator, "_glibc", lambda: ("musl", "1.2"))
    monkeypatch.setattr(_allocator, "_setting", None)
    setting = keep_heap_memory()
    assert not setting.tuned and "not changed" in setting.label and "default settings" in setting.label
    partly = _allocator.AllocatorSetting("glibc 2.36 malloc", False, 32 * 2**20, None, "mallopt refused the trim "
                                         "threshold")
    assert partly.label == "glibc 2.36 malloc, mmap threshold 32 MiB (mallopt refused the trim threshold)"
    with pytest.raises(ValueError, match="mmap_threshold"):
        keep_heap_memory(mmap_threshold=64 * 2**20)  # above glibc's maximum: refused before any call
    with pytest.raises(ValueError, match="trim_threshold"):
        keep_heap_memory(trim_threshold=0)
