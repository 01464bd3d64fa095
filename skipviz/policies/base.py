"""The policy interface: what the engine asks for every block, and what it gets back.

A policy is asked once per block with the features entering that block, ``h`` of shape (M, C, H, W) for
the M samples still running, and returns a :class:`Decision`; or it decides every block up front from the
stem's output and returns a :class:`Plan`. A decision that is the same for every sample (``execute`` a Python
bool) lets the engine run or bypass the whole batch without gathering.

The policies themselves: :mod:`skipviz.policies.simple` (full, static mask, early exit, frozen),
:mod:`skipviz.policies.threshold` (learned gates, the plan head), :mod:`skipviz.policies.kl` (KL redundancy).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Union

import torch

from ..engine.trace import BlockRecord, Reason

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.flops import FlopTable
    from ..engine.network import SkipNetwork

__all__ = ["Decision", "Override", "Plan", "Policy", "check_threshold", "normalise_overrides"]

Override = Union[str, float]  # "run" | "skip" | a per-block threshold in [0, 1]


@dataclass
class Decision:
    """What to do with one block for the M samples entering it.

    ``execute``: (M,) bool tensor, or a Python bool for "the same for all". ``reason``: (M,) int tensor of
    :class:`~skipviz.engine.trace.Reason` codes, or one code. ``score``: (M,) float tensor, a float, or ``None``.
    ``evaluated``: whether the policy's head (gate) ran, so its FLOPs count.
    """

    execute: torch.Tensor | bool
    reason: torch.Tensor | int
    score: torch.Tensor | float | None = None
    threshold: float | None = None
    evaluated: bool = False


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


#: The reasons whose words depend on nothing but the code (:meth:`Policy.reason_text`).
_FIXED_REASONS: dict[Reason, str] = {
    Reason.FULL: "full network: every block runs",
    Reason.FORCED_RUN: "forced run by override",
    Reason.FORCED_SKIP: "forced skip by override",
    Reason.STATIC_SKIP: "static mask",
    Reason.STATIC_RUN: "not in static mask",
    Reason.NOT_GATED: "no gate on this block: always runs",
    Reason.CANNOT_SKIP: "threshold 0: no probability is below it, so the block runs and its head is not evaluated",
}


class Plan:
    """Every block's decision for the N samples of one batch, made before block 0 (see :meth:`Policy.plan`).

    Per block ``index``: ``execute`` (N,) bool tensor or one bool, ``score`` (N,) float tensor, float or
    ``None``, ``reason`` (N,) int tensor or one code, ``threshold`` and ``evaluated`` as in :class:`Decision`.
    :meth:`decide` hands the engine block ``index``'s decision for the rows it holds now.
    """

    def __init__(self, execute: list, score: list, reason: list, threshold: list, evaluated: list) -> None:
        self.execute, self.score, self.reason = execute, score, reason
        self.threshold, self.evaluated = threshold, evaluated

    def decide(self, index: int, rows: torch.Tensor | None = None) -> Decision:
        """Block ``index``'s decision for the samples ``rows`` (M,) of the batch, in that order (the engine
        moves rows to keep executing samples contiguous); ``None``: all N samples in batch order."""
        ex, sc, re = self.execute[index], self.score[index], self.reason[index]
        if rows is not None:
            pick = (lambda v: v.index_select(0, rows) if torch.is_tensor(v) else v)
            ex, sc, re = pick(ex), pick(sc), pick(re)
        return Decision(ex, re, sc, self.threshold[index], self.evaluated[index])

    def uniform(self) -> bool:
        """Whether every block's decision is one Python bool for the whole batch (a batch of one, or every
        block forced): the engine then needs no per-row work (:meth:`SkipNetwork.run`)."""
        return all(e.__class__ is bool for e in self.execute)

    def records(self) -> list[BlockRecord]:
        """The engine's per-block records of this plan for the whole batch in batch order (no row moved)."""
        return [BlockRecord(None, ex, re, sc, th, ev) for ex, re, sc, th, ev
                in zip(self.execute, self.reason, self.score, self.threshold, self.evaluated)]


class Policy:
    """Base class. Subclasses implement :meth:`decide` (block by block, from the features entering the block)
    or :meth:`plan` (every block at once, from the stem's output); early-exit policies also
    :meth:`exit_after`."""

    name = "policy"

    @property
    def decides_up_front(self) -> bool:
        """Whether this policy overrides :meth:`plan` (decides every block at the stem)."""
        return type(self).plan is not Policy.plan

    @property
    def exits_early(self) -> bool:
        """Whether this policy overrides :meth:`exit_after` (samples may leave after a block)."""
        return type(self).exit_after is not Policy.exit_after

    def plan(self, net: "SkipNetwork", h: torch.Tensor) -> Plan | None:
        """Decide every block up front from the stem's output ``h`` (N, C0, H0, W0), or ``None`` (the
        default) to be asked block by block with :meth:`decide`. Callers: :meth:`SkipNetwork.run` and every
        other loop over the blocks (``forward_intermediates``, ``measure.runs.run_masked``)."""
        return None

    def decide(self, net: "SkipNetwork", index: int, h: torch.Tensor) -> Decision:
        raise NotImplementedError

    def exit_after(self, net: "SkipNetwork", index: int,
                   h: torch.Tensor) -> tuple[torch.Tensor | bool, torch.Tensor, torch.Tensor | float] | None:
        """After block ``index``: ``(exit (M,) bool, probe_logits (M, K), confidence (M,))``, or ``None``; for a
        batch of one (M = 1) the exit and the confidence may be a Python bool and float (decided on the host)."""
        return None

    def head_flops(self, table: "FlopTable") -> list[int]:
        """FLOPs of the per-block head this policy evaluates (gate or probe), one entry per block."""
        return [0] * len(table.blocks)

    def config(self) -> dict:
        """JSON-ready description of the policy (recorded in traces and audits)."""
        return {"name": self.name}

    @classmethod
    def from_config(cls, config: Mapping) -> "Policy":
        """Rebuild the policy from :meth:`config` output (:func:`skipviz.policies.policy_from_config`)."""
        return cls()

    def reason_text(self, code: Reason, score: float | None, threshold: float | None, index: int,
                    exit_block: int | None = None) -> str:
        # only the text asked for is formatted: building all eleven per call took 0.3 ms per input of a
        # ResNet-56 audit (54,000 calls for 2,000 inputs, cProfile, 2-core AMD EPYC)
        fixed = _FIXED_REASONS.get(code)
        if fixed is not None:
            return fixed
        if code is Reason.GATE_RUN:
            return f"gate {_fmt(score)} >= {_fmt(threshold)}"
        if code is Reason.GATE_SKIP:
            return f"gate {_fmt(score)} < {_fmt(threshold)}"
        if code is Reason.EXITED:
            return f"bypassed: early exit after block {exit_block}"
        if code is Reason.EXIT_CONTINUE:
            return f"probe {_fmt(score)} < {_fmt(threshold)}: continue"
        if code is Reason.EXIT_NOW:
            return f"probe {_fmt(score)} >= {_fmt(threshold)}: exit after this block"
        return code.name.lower()


def check_threshold(t: float, what: str) -> float:
    t = float(t)
    if not 0.0 <= t <= 1.0 or math.isnan(t):
        raise ValueError(f"{what} must be in [0, 1], got {t}")
    return t


def normalise_overrides(overrides: Mapping | None, auto: bool = False) -> dict[int, Override]:
    """Per-block overrides as every policy holds them: block index (int) -> ``"run"`` (force run), ``"skip"``
    (force skip) or that block's own threshold (a float in [0, 1]). With ``auto``, ``"auto"`` entries (a page
    widget's "no override") are dropped; ``ValueError`` for anything else."""
    out: dict[int, Override] = {}
    for k, v in (overrides or {}).items():
        if isinstance(v, str):
            if auto and v == "auto":
                continue
            if v not in ("run", "skip"):
                raise ValueError(f"override for block {k} must be 'run', 'skip' or a threshold, got {v!r}")
            out[int(k)] = v
        else:
            out[int(k)] = check_threshold(v, f"threshold override for block {k}")
    return out
