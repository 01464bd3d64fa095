"""skipviz._allocator: the process's CPU allocator keeps freed activation memory, and timings record it."""
from __future__ import annotations

import platform
import resource
import statistics

import pytest
import torch

from skipviz import _allocator, allocator_setting, keep_heap_memory
from skipviz.timing import device_info, environment_markdown

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


@glibc
def test_freed_activations_are_reused_without_page_faults():
    setting = keep_heap_memory()
    assert setting.tuned and setting.mmap_threshold == 32 * 2**20 and setting.trim_threshold == 512 * 2**20
    assert allocator_setting() == setting and keep_heap_memory() == setting  # idempotent
    assert setting.label.startswith("glibc ") and "mmap threshold 32 MiB" in setting.label
    # 64 MiB touched per round: without the setting glibc unmaps or trims it and faults it in again
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
    with pytest.raises(ValueError, match="mmap_threshold"):
        keep_heap_memory(mmap_threshold=64 * 2**20)  # above glibc's maximum: refused before any call
    with pytest.raises(ValueError, match="trim_threshold"):
        keep_heap_memory(trim_threshold=0)
