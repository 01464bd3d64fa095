"""The policies without a learned threshold.

* :class:`FullPolicy` - nothing skipped; the reference every other run is compared against.
* :class:`StaticMaskPolicy` - a fixed set of blocks bypassed for every input.
* :class:`EarlyExitPolicy` - probe heads after each block; a sample stops once its top-class probability
  reaches the threshold and every later block is bypassed.
* :class:`FrozenPolicy` - replays one input's decisions (the differentiable "skipped run" of attributions).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from ..engine.trace import Reason
from .base import Decision, Policy, check_threshold

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.flops import FlopTable
    from ..engine.network import SkipNetwork

__all__ = ["EarlyExitPolicy", "FrozenPolicy", "FullPolicy", "StaticMaskPolicy"]


class FullPolicy(Policy):
    """Every block runs for every input (no gate is evaluated)."""

    name = "full"

    def decide(self, net: "SkipNetwork", index: int, h: torch.Tensor) -> Decision:
        return Decision(execute=True, reason=int(Reason.FULL))


class StaticMaskPolicy(Policy):
    """Bypass a fixed set of blocks for every input."""

    name = "static"

    def __init__(self, skip: set[int] | list[int] | tuple[int, ...]) -> None:
        self.skip = frozenset(int(i) for i in skip)

    def decide(self, net: "SkipNetwork", index: int, h: torch.Tensor) -> Decision:
        if index in self.skip:
            return Decision(execute=False, reason=int(Reason.STATIC_SKIP))
        return Decision(execute=True, reason=int(Reason.STATIC_RUN))

    def config(self) -> dict:
        return {"name": self.name, "skip": sorted(self.skip)}

    @classmethod
    def from_config(cls, config: Mapping) -> "StaticMaskPolicy":
        return cls(config.get("skip", []))


class EarlyExitPolicy(Policy):
    """Stop once the probe head after a block is confident: top-class probability >= ``threshold``.

    Every block runs until the exit; the blocks after it are bypassed and the prediction is the probe's.
    ``min_block`` keeps the earliest (weakest) probes from exiting.
    """

    name = "early_exit"

    def __init__(self, threshold: float = 0.9, min_block: int = 0) -> None:
        self.threshold = check_threshold(threshold, "threshold")
        self.min_block = int(min_block)

    def decide(self, net: "SkipNetwork", index: int, h: torch.Tensor) -> Decision:
        return Decision(execute=True, reason=int(Reason.EXIT_CONTINUE), threshold=self.threshold)

    def exit_after(self, net: "SkipNetwork", index: int,
                   h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        probe = net.probe(index)
        if probe is None or index < self.min_block or index == len(net.blocks) - 1:
            return None
        logits = probe(h)
        conf = torch.softmax(logits, dim=1).amax(1)
        return conf >= self.threshold, logits, conf

    def head_flops(self, table: "FlopTable") -> list[int]:
        n = len(table.blocks)
        return [table.probes[i] if table.probes and self.min_block <= i < n - 1 else 0 for i in range(n)]

    def config(self) -> dict:
        return {"name": self.name, "threshold": self.threshold, "min_block": self.min_block}

    @classmethod
    def from_config(cls, config: Mapping) -> "EarlyExitPolicy":
        return cls(config.get("threshold", 0.9), config.get("min_block", 0))


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
