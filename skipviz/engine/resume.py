"""The full network's output for inputs that a skipped run already carried part of the way.

An audit checks every skipped answer against the full network (its shadow run). The full network need not start
again from the image: an input that ran every block under the policy already has the full network's output, and
an input that left at an early exit after block ``i`` holds the full network's state there, from which the full
network resumes (blocks ``i + 1`` on and the classifier head). Only inputs that bypassed a block before that
(gates, a plan, a forced skip) run from the stem. On the shipped ImageNet default (exits) the full network then
costs the blocks after the exits instead of a whole second forward.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .network import SkipNetwork
    from .trace import SkipResult

__all__ = ["full_logits"]


def _sources(result: "SkipResult", rows: list[int]) -> tuple[list[int], dict[int, list[int]], list[int]]:
    """Positions in ``rows`` whose full output is the skipped run's own (every block ran), those resuming from the
    state kept at their exit (exit block -> positions) and those starting from the image."""
    executed, exits = result.executed, result.exit_block
    kept = {int(r): i for i, rs, _ in (result.exit_states or []) for r in rs.tolist()}
    whole, resume, scratch = [], {}, []
    for pos, r in enumerate(rows):
        e = exits[r]
        if e is None and bool(executed[r].all()):
            whole.append(pos)
        elif e is not None and kept.get(r) == e and bool(executed[r, : e + 1].all()):
            resume.setdefault(e, []).append(pos)
        else:
            scratch.append(pos)
    return whole, resume, scratch


def _resume(net: "SkipNetwork", result: "SkipResult", rows: list[int],
            resume: dict[int, list[int]]) -> tuple[list[int], torch.Tensor]:
    """Run the full network on from the kept exit states: the inputs that left after block ``e`` join the
    others at block ``e + 1``, so each block runs once on everyone who needs it. Returns the positions and their
    logits (P, K) in that order."""
    states = {i: (rs.tolist(), hs) for i, rs, hs in result.exit_states or []}
    inplace = not torch.is_grad_enabled()
    h, order = None, []
    for j in range(min(resume) + 1, len(net.blocks)):
        if j - 1 in resume:
            kept_rows, hs = states[j - 1]
            pick = [kept_rows.index(rows[p]) for p in resume[j - 1]]
            joined = hs[torch.tensor(pick, device=hs.device)]  # a copy: the kept state is left as it was
            h = joined if h is None else torch.cat([h, joined])
            order += resume[j - 1]
        block = net.blocks[j]
        h = block.forward_(h) if inplace and not block.downsample else block(h)
    return order, net.head(h)


def full_logits(net: "SkipNetwork", x: torch.Tensor, result: "SkipResult",
                rows: Sequence[int] | None = None) -> torch.Tensor:
    """The full network's logits for ``rows`` of ``x`` (default: all), reusing the skipped run ``result``.

    Args:
        x: (N, 3, H, W) the normalised batch ``result`` came from (``net.run(x, policy, keep_exit_states=True)``;
            without the kept states an exited input starts from the image).
        rows: indices into the batch.
    Returns:
        (R, K) logits, one row per entry of ``rows``, in that order.
    """
    rows = list(range(x.shape[0])) if rows is None else [int(r) for r in rows]
    out: list[torch.Tensor | None] = [None] * len(rows)
    whole, resume, scratch = _sources(result, rows)
    for p in whole:
        out[p] = result.logits[rows[p]]
    if resume:
        order, logits = _resume(net, result, rows, resume)
        for k, p in enumerate(order):
            out[p] = logits[k]
    if scratch:
        logits = net(x[torch.tensor([rows[p] for p in scratch], device=x.device)])
        for k, p in enumerate(scratch):
            out[p] = logits[k]
    if not rows:
        return result.logits[:0]
    return torch.stack([o.to(result.logits.dtype) for o in out])
