"""Row movement of the engine: whole-row gathers and scatters in the batch's memory layout, and the swap that
makes an identity block's executing rows one contiguous window (:meth:`SkipNetwork._run_contiguous`).

:func:`misplaced_rows` replays that arrangement on a decision mask, for latency prediction.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["gather_rows", "misplaced_rows", "scatter_rows_"]


def _dense_rows(t: torch.Tensor) -> torch.Tensor | None:
    """An (N, R) view of ``t`` (N, ...) with one row per sample in memory order, when every sample is one dense
    block of R elements (contiguous or channels-last layout); else ``None``."""
    if t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)):
        r = math.prod(t.shape[1:])
        return t.as_strided((t.shape[0], r), (r, 1))
    return None


def gather_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t.index_select(0, index)``, (N, ...) -> (K, ...), in ``t``'s memory layout.

    ``index_select`` returns a default-contiguous (NCHW) tensor whatever its input's layout: on a channels-last
    batch that is a transposing copy, and the convolutions after it would run on NCHW input. Copying whole rows
    of a flat view keeps the layout and moves memory in order (4.6x faster for a 40-row swap of the default
    model's first stage, measured).
    """
    flat = _dense_rows(t)
    if flat is None:
        return t.index_select(0, index)
    return flat.index_select(0, index).as_strided((index.numel(),) + tuple(t.shape[1:]),
                                                  (flat.shape[1],) + tuple(t.stride()[1:]))


def scatter_rows_(t: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``t.index_copy_(0, index, src)``: rows ``index`` of ``t`` (N, ...) overwritten by ``src`` (K, ...), in
    place, as whole-row copies when both have the same dense row layout (see :func:`gather_rows`)."""
    flat, flat_src = _dense_rows(t), _dense_rows(src)
    if flat is None or flat_src is None or t.shape[1:] != src.shape[1:] or t.stride()[1:] != src.stride()[1:]:
        return t.index_copy_(0, index, src)
    flat.index_copy_(0, index, flat_src)
    return t


def _densest_window(flags: list[bool], k: int) -> int:
    """Start of the first window ``flags[s:s+k]`` holding the most ``True`` entries (0 < k <= len(flags))."""
    inside = best = sum(flags[:k])
    start = 0
    for s in range(1, len(flags) - k + 1):
        inside += flags[s + k - 1] - flags[s - 1]
        if inside > best:
            best, start = inside, s
    return start


def _swap_plan(flags: list[bool], k: int) -> tuple[int, list[int], list[int]]:
    """How :meth:`SkipNetwork._run_contiguous` makes the ``k`` rows flagged True (0 < k < len) contiguous:
    ``(start, dst, src)``: the window ``[start, start + k)`` and the row swap ``h[dst] = h[src]`` (empty when
    the window already holds every executing row). ``len(dst) == 2 * m`` for m misplaced rows."""
    start = _densest_window(flags, k)
    end = start + k
    misplaced_skip = [p for p in range(start, end) if not flags[p]]
    if not misplaced_skip:
        return start, [], []
    misplaced_run = [p for p in range(start) if flags[p]] + [p for p in range(end, len(flags)) if flags[p]]
    return start, misplaced_skip + misplaced_run, misplaced_run + misplaced_skip


def misplaced_rows(executed: Sequence[Sequence[bool]], in_place: Sequence[bool]) -> list[int]:
    """Replay the engine's row arrangement on a decision mask: how many rows each block's swap moves.

    Args:
        executed: (N, L) per-sample, per-block "the block runs" flags of one batch (no early exits).
        in_place: (L,) whether block i runs in place on a contiguous window (an identity-shortcut block at
            inference, :meth:`SkipNetwork._run_contiguous`); other blocks gather and scatter and keep the order.
    Returns:
        (L,) ``m``: misplaced rows swapped before block i (the swap copies 2m rows), 0 where nothing moves.
    """
    n = len(executed)
    order = list(range(n))  # order[p]: the sample held by row p
    out = []
    for i, movable in enumerate(in_place):
        flags = [bool(executed[order[p]][i]) for p in range(n)]
        k = sum(flags)
        if not movable or k in (0, n):
            out.append(0)
            continue
        _, dst, src = _swap_plan(flags, k)
        moved = [order[q] for q in src]
        for p, sample in zip(dst, moved):
            order[p] = sample
        out.append(len(dst) // 2)
    return out
