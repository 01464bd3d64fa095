"""The policies without a learned threshold.

* :class:`FullPolicy` - nothing skipped; the reference every other run is compared against.
* :class:`StaticMaskPolicy` - a fixed set of blocks bypassed for every input.
* :class:`EarlyExitPolicy` - probe heads after each block; a sample stops once its top-class probability
  reaches the threshold and every later block is bypassed.
* :class:`FrozenPolicy` - replays one input's decisions (the differentiable "skipped run" of attributions).
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from ..engine.trace import Reason
from .base import Decision, Override, Policy, check_threshold, normalise_overrides

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


_EXIT_CONTINUE = int(Reason.EXIT_CONTINUE)
_CONTINUE = Decision(execute=True, reason=_EXIT_CONTINUE)


@functools.lru_cache(maxsize=256)
def _rounded(value: float, dtype: torch.dtype) -> float:
    """``value`` as a tensor of ``dtype`` holds it (``conf >= t`` on a tensor compares with ``t`` so rounded)."""
    return float(torch.tensor(value, dtype=dtype))


class EarlyExitPolicy(Policy):
    """Stop once the probe head after a block is confident: top-class probability >= ``threshold``.

    Every block runs until the exit; the blocks after it are bypassed and the prediction is the probe's.
    Where exits are checked: after ``blocks`` when given (the model card's ``early_exit.blocks``, chosen for the
    time they save: every check costs a probe), else after every block from ``min_block`` on (the earliest,
    weakest probes kept from exiting; cards and audit records written before ``blocks`` existed). Built by
    :func:`~skipviz.policies.threshold.policy_for`, both come from the card. ``overrides`` as for the gates:
    ``"skip"`` bypasses that block for every sample still in the network, ``"run"`` runs it (the default before
    an exit), a float is the exit threshold after that block (an exit check there wherever it is). No sample
    leaves after the last block (the network's own head reads it). A block's decision carries the exit threshold
    only where an exit is checked after it.
    """

    name = "early_exit"

    def __init__(self, threshold: float = 0.9, overrides: Mapping[int, Override] | None = None,
                 min_block: int = 0, blocks: Sequence[int] | None = None) -> None:
        self.threshold = check_threshold(threshold, "threshold")
        self.overrides: dict[int, Override] = normalise_overrides(overrides)
        self.min_block = int(min_block)
        if self.min_block < 0:
            raise ValueError(f"min_block must be >= 0, got {min_block}")
        self.blocks: frozenset[int] | None = None if blocks is None else frozenset(int(b) for b in blocks)
        if self.blocks is not None and any(b < 0 for b in self.blocks):
            raise ValueError(f"exit blocks must be >= 0, got {sorted(self.blocks)}")

    def threshold_for(self, index: int) -> float:
        ov = self.overrides.get(index)
        return ov if isinstance(ov, float) else self.threshold

    def exits_possible_after(self, net: "SkipNetwork", index: int) -> bool:
        """Whether a sample can leave after block ``index``: a probe there, not the last block, and the block one
        of ``blocks`` (without ``blocks``: at or after ``min_block``) or given a float override."""
        # the policy's own settings first: most blocks are not checked, and the network's attributes go through
        # nn.Module.__getattr__ (this and decide() measured 66 us per 16-block run before, 15 us after)
        if not (self._checked(index) or isinstance(self.overrides.get(index), float)):
            return False
        return net.probes is not None and index < len(net.blocks) - 1

    def _checked(self, index: int) -> bool:
        return index in self.blocks if self.blocks is not None else index >= self.min_block

    def decide(self, net: "SkipNetwork", index: int, h: torch.Tensor) -> Decision:
        ov = self.overrides.get(index)
        t = self.threshold_for(index) if self.exits_possible_after(net, index) else None
        if ov == "skip":
            return Decision(execute=False, reason=int(Reason.FORCED_SKIP), threshold=t)
        if ov == "run":
            return Decision(execute=True, reason=int(Reason.FORCED_RUN), threshold=t)
        if t is None:
            return _CONTINUE  # the same for every unchecked block (the engine copies a decision, never changes it)
        return Decision(execute=True, reason=_EXIT_CONTINUE, threshold=t)

    def exit_after(self, net: "SkipNetwork", index: int,
                   h: torch.Tensor) -> tuple[torch.Tensor | bool, torch.Tensor, torch.Tensor | float] | None:
        if not self.exits_possible_after(net, index):
            return None
        probe = net.probe(index)
        if h.shape[0] == 1:  # a batch of one: decided on the host, one read-back (see SkipNetwork.run)
            logits, top = probe.confidence_of_one(h)
            # against the threshold as the batched comparison sees it: rounded to the logits' dtype
            return top >= _rounded(self.threshold_for(index), logits.dtype), logits, top
        logits = probe(h)
        conf = torch.softmax(logits, dim=1).amax(1)
        return conf >= self.threshold_for(index), logits, conf

    def head_flops(self, table: "FlopTable") -> list[int]:
        n = len(table.blocks)
        return [table.probes[i] if table.probes and i < n - 1 and (self._checked(i) or isinstance(
            self.overrides.get(i), float)) else 0 for i in range(n)]

    def reason_text(self, code: Reason, score: float | None, threshold: float | None, index: int,
                    exit_block: int | None = None) -> str:
        if code is Reason.EXIT_CONTINUE and score is None:  # no exit checked after this block
            return "runs: no exit after this block"
        return super().reason_text(code, score, threshold, index, exit_block)

    def config(self) -> dict:
        out = {"name": self.name, "threshold": self.threshold, "min_block": self.min_block,
               "overrides": {str(k): v for k, v in sorted(self.overrides.items())}}
        if self.blocks is not None:
            out["blocks"] = sorted(self.blocks)
        return out

    @classmethod
    def from_config(cls, config: Mapping) -> "EarlyExitPolicy":
        return cls(config.get("threshold", 0.9), config.get("overrides", {}), config.get("min_block", 0),
                   config.get("blocks"))


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
                   h: torch.Tensor) -> tuple[torch.Tensor | bool, torch.Tensor, torch.Tensor | float] | None:
        if self.exit_block is None or index != self.exit_block:
            return None
        logits = net.probe(index)(h)
        return (torch.ones(h.shape[0], dtype=torch.bool, device=h.device), logits,
                torch.softmax(logits, 1).amax(1))

    def config(self) -> dict:
        return {"name": self.name, "executed": self.executed, "exit_block": self.exit_block}
