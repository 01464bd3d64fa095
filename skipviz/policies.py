"""Decision sources: which blocks run for which input, and why.

A policy is asked once per block with the features entering that block, ``h`` of shape (M, C, H, W) for
the M samples still running, and returns a :class:`Decision`. A decision that is the same for every sample
(``execute`` a Python bool) lets the engine run or bypass the whole batch without gathering.

Policies here:

* :class:`FullPolicy` - nothing skipped; the reference every other run is compared against.
* :class:`StaticMaskPolicy` - a fixed set of blocks bypassed for every input.
* :class:`GatePolicy` - learned gate heads (ConvNet-AIG / SkipNet style): execute when the gate's
  probability >= threshold, one global threshold plus per-block overrides (force run, force skip, or a
  per-block threshold).
* :class:`EarlyExitPolicy` - probe heads after each block; a sample stops once its top-class probability
  reaches the threshold and every later block is bypassed.
* :class:`PlanPolicy` - BlockDrop-style: the network's plan head decides every gated block of a sample at
  once, from the stem's output, before block 0 (:meth:`Policy.plan`).

The KL-redundancy policy lives in :mod:`skipviz.redundancy` and builds on :class:`StaticMaskPolicy`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Union

import torch

from .trace import BlockRecord, Reason

if TYPE_CHECKING:  # pragma: no cover
    from .network import FlopTable, PlanHead, SkipNetwork

Override = Union[str, float]  # "run" | "skip" | a per-block threshold in [0, 1]


@dataclass
class Decision:
    """What to do with one block for the M samples entering it.

    ``execute``: (M,) bool tensor, or a Python bool for "the same for all". ``reason``: (M,) int tensor of
    :class:`~skipviz.trace.Reason` codes, or one code. ``score``: (M,) float tensor, a float, or ``None``.
    ``evaluated``: whether the policy's head (gate) ran, so its FLOPs count.
    """

    execute: torch.Tensor | bool
    reason: torch.Tensor | int
    score: torch.Tensor | float | None = None
    threshold: float | None = None
    evaluated: bool = False


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


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
        other loop over the blocks (``forward_intermediates``, ``timing.run_masked``)."""
        return None

    def decide(self, net: "SkipNetwork", index: int, h: torch.Tensor) -> Decision:
        raise NotImplementedError

    def exit_after(self, net: "SkipNetwork", index: int,
                   h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """After block ``index``: ``(exit (M,) bool, probe_logits (M, K), confidence (M,))``, or ``None``."""
        return None

    def head_flops(self, table: "FlopTable") -> list[int]:
        """FLOPs of the per-block head this policy evaluates (gate or probe), one entry per block."""
        return [0] * len(table.blocks)

    def config(self) -> dict:
        """JSON-ready description of the policy (recorded in traces and audits)."""
        return {"name": self.name}

    def reason_text(self, code: Reason, score: float | None, threshold: float | None, index: int,
                    exit_block: int | None = None) -> str:
        texts = {
            Reason.FULL: "full network: every block runs",
            Reason.GATE_RUN: f"gate {_fmt(score)} >= {_fmt(threshold)}",
            Reason.GATE_SKIP: f"gate {_fmt(score)} < {_fmt(threshold)}",
            Reason.FORCED_RUN: "forced run by override",
            Reason.FORCED_SKIP: "forced skip by override",
            Reason.STATIC_SKIP: "static mask",
            Reason.STATIC_RUN: "not in static mask",
            Reason.NOT_GATED: "no gate on this block: always runs",
            Reason.EXITED: f"bypassed: early exit after block {exit_block}",
            Reason.EXIT_CONTINUE: f"probe {_fmt(score)} < {_fmt(threshold)}: continue",
            Reason.EXIT_NOW: f"probe {_fmt(score)} >= {_fmt(threshold)}: exit after this block",
        }
        return texts.get(code, code.name.lower())


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


def _check_threshold(t: float, what: str) -> float:
    t = float(t)
    if not 0.0 <= t <= 1.0 or math.isnan(t):
        raise ValueError(f"{what} must be in [0, 1], got {t}")
    return t


_GATE_RUN, _GATE_SKIP = int(Reason.GATE_RUN), int(Reason.GATE_SKIP)


class GatePolicy(Policy):
    """Learned gates: block i runs for a sample when ``sigmoid(gate_i(h)) >= threshold_i``.

    ``threshold`` is the global threshold; ``overrides`` maps a block index to ``"run"`` (force run),
    ``"skip"`` (force skip) or a float (that block's own threshold). Blocks without a gate head always run.
    The gate is evaluated on every running sample (its FLOPs count) unless the block is forced. A batch of
    one is decided on the host from the gate's probability in float64 (:meth:`GateHead.probability_of_one`), a
    batch from float32 probabilities: the two agree except for a probability within float rounding (~1e-7) of
    the threshold.
    """

    name = "gates"

    def __init__(self, threshold: float = 0.5, overrides: Mapping[int, Override] | None = None) -> None:
        self.threshold = _check_threshold(threshold, "threshold")
        self.overrides: dict[int, Override] = {}
        for k, v in (overrides or {}).items():
            if isinstance(v, str):
                if v not in ("run", "skip"):
                    raise ValueError(f"override for block {k} must be 'run', 'skip' or a threshold, got {v!r}")
                self.overrides[int(k)] = v
            else:
                self.overrides[int(k)] = _check_threshold(v, f"threshold override for block {k}")

    def threshold_for(self, index: int) -> float:
        ov = self.overrides.get(index)
        return ov if isinstance(ov, float) else self.threshold

    def decide(self, net: "SkipNetwork", index: int, h: torch.Tensor) -> Decision:
        ov = self.overrides.get(index)
        if ov == "run":
            return Decision(execute=True, reason=int(Reason.FORCED_RUN))
        if ov == "skip":
            return Decision(execute=False, reason=int(Reason.FORCED_SKIP))
        gate = net.gate(index)
        if gate is None:
            return Decision(execute=True, reason=int(Reason.NOT_GATED))
        t = ov if isinstance(ov, float) else self.threshold
        if h.shape[0] == 1:  # batch of one: decide on the host from one read-back, no gather/scatter needed
            p = gate.probability_of_one(h)
            run = p >= t
            return Decision(run, _GATE_RUN if run else _GATE_SKIP, p, t, True)
        prob = torch.sigmoid(gate(h))
        execute = prob >= t
        reason = torch.where(execute, int(Reason.GATE_RUN), int(Reason.GATE_SKIP))
        return Decision(execute=execute, reason=reason, score=prob, threshold=t, evaluated=True)

    def head_flops(self, table: "FlopTable") -> list[int]:
        return [table.gates.get(i, 0) if not isinstance(self.overrides.get(i), str) else 0
                for i in range(len(table.blocks))]

    def config(self) -> dict:
        return {"name": self.name, "threshold": self.threshold,
                "overrides": {str(k): v for k, v in sorted(self.overrides.items())}}

    def reason_text(self, code: Reason, score: float | None, threshold: float | None, index: int,
                    exit_block: int | None = None) -> str:
        text = super().reason_text(code, score, threshold, index, exit_block)
        if code in (Reason.GATE_RUN, Reason.GATE_SKIP) and isinstance(self.overrides.get(index), float):
            text += " (block threshold)"
        return text


class EarlyExitPolicy(Policy):
    """Stop once the probe head after a block is confident: top-class probability >= ``threshold``.

    Every block runs until the exit; the blocks after it are bypassed and the prediction is the probe's.
    ``min_block`` keeps the earliest (weakest) probes from exiting.
    """

    name = "early_exit"

    def __init__(self, threshold: float = 0.9, min_block: int = 0) -> None:
        self.threshold = _check_threshold(threshold, "threshold")
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


class PlanPolicy(GatePolicy):
    """Plan up front (BlockDrop-style): the network's plan head (:class:`~skipviz.network.PlanHead`) reads the
    stem's output and gives every gated block an execute probability at once; block i runs for a sample when
    its probability >= ``threshold_i`` (global threshold, per-block overrides as in :class:`GatePolicy`).

    One small head and one device-to-host read per batch, instead of a gate head and a read per block: at batch 1
    the block loop does no policy work at all. As for :class:`GatePolicy`, a batch of one compares a float64
    probability finished on the host, a batch a float32 one: they can decide differently only for a probability
    within float rounding (~1e-7) of the threshold. The plan cannot react to what the blocks compute, so at equal
    compute it is usually a little less accurate than per-block gates (model card, ``plan`` section).
    """

    name = "plan"

    def plan(self, net: "SkipNetwork", h: torch.Tensor) -> Plan:
        head = net.plan_head
        if head is None:
            raise ValueError(f"{net.meta.display_name} has no plan head: train one with `skipviz train-plan`")
        n_blocks = len(net.blocks)
        ex, re, free = self._layout(head, n_blocks)
        sc: list = [None] * n_blocks
        th: list = [None] * n_blocks
        ev: list = [False] * n_blocks
        if not free:
            return Plan(ex, sc, re, th, ev)
        if h.shape[0] == 1:  # a batch of one: one read-back, then Python values only
            probs = head.probabilities_of_one(h)
            for i, j, t in free:
                p = probs[j]
                run = p >= t
                ex[i], sc[i], re[i], th[i], ev[i] = run, p, _PLAN_RUN if run else _PLAN_SKIP, t, True
        else:
            probs = torch.sigmoid(head(h))  # (N, G)
            for i, j, t in free:
                run = probs[:, j] >= t
                ex[i], sc[i], th[i], ev[i] = run, probs[:, j], t, True
                re[i] = torch.where(run, _PLAN_RUN, _PLAN_SKIP)
        ev[0] = True  # the plan head's FLOPs are counted once, with block 0 (head_flops)
        return Plan(ex, sc, re, th, ev)

    def _layout(self, head: "PlanHead", n_blocks: int) -> tuple[list, list, list[tuple[int, int, float]]]:
        """What the overrides fix before any input: the execute flags and reasons of forced and ungated blocks,
        and ``(block, column of the head's output, threshold)`` of the blocks the head decides. A few list
        entries, rebuilt per batch, so edits of ``threshold`` or ``overrides`` always apply."""
        overrides = self.overrides
        ex: list = [True] * n_blocks
        re: list = [_NOT_GATED] * n_blocks
        for i, ov in overrides.items():  # forced blocks, gated or not, as GatePolicy.decide
            if 0 <= i < n_blocks and ov == "run":
                re[i] = _FORCED_RUN
            elif 0 <= i < n_blocks and ov == "skip":
                ex[i], re[i] = False, _FORCED_SKIP
        free: list[tuple[int, int, float]] = []
        for j, i in enumerate(head.gated_blocks):
            ov = overrides.get(i)
            if not isinstance(ov, str):
                free.append((i, j, self.threshold if ov is None else ov))
        return ex, re, free

    def decide(self, net: "SkipNetwork", index: int, h: torch.Tensor) -> Decision:
        raise TypeError("PlanPolicy decides every block at once: call plan() with the stem's output "
                        "(SkipNetwork.run does)")

    def head_flops(self, table: "FlopTable") -> list[int]:
        return [table.plan if i == 0 else 0 for i in range(len(table.blocks))]

    def reason_text(self, code: Reason, score: float | None, threshold: float | None, index: int,
                    exit_block: int | None = None) -> str:
        if code in (Reason.PLAN_RUN, Reason.PLAN_SKIP):
            op = ">=" if code == Reason.PLAN_RUN else "<"
            text = f"plan {_fmt(score)} {op} {_fmt(threshold)} (decided at the stem)"
            return text + (" (block threshold)" if isinstance(self.overrides.get(index), float) else "")
        return super().reason_text(code, score, threshold, index, exit_block)


_PLAN_RUN, _PLAN_SKIP = int(Reason.PLAN_RUN), int(Reason.PLAN_SKIP)
_NOT_GATED, _FORCED_RUN, _FORCED_SKIP = int(Reason.NOT_GATED), int(Reason.FORCED_RUN), int(Reason.FORCED_SKIP)


#: The policies driven by one global threshold plus per-block overrides, by name (the ``--policy`` choices of
#: ``skipviz predict / audit / bench`` and the dashboard's decision sources).
THRESHOLD_POLICIES: dict[str, type[GatePolicy]] = {"gates": GatePolicy, "plan": PlanPolicy}


def policy_for(net: "SkipNetwork", source: str = "gates", threshold: float | None = None,
               overrides: Mapping[int, Override] | None = None) -> Policy:
    """The threshold policy of ``net`` for a decision source: its per-block gates (``"gates"``) or its plan head
    (``"plan"``), at ``threshold`` (default: the model card's default for that source,
    :meth:`~skipviz.weights.ModelMeta.default_threshold`) with per-block ``overrides``; :class:`FullPolicy` when
    the source decides no block (no gate heads, or a plan head over no blocks) and there are no overrides. ``ValueError`` for an unknown source, or for ``"plan"`` on
    a network without a plan head."""
    if source not in THRESHOLD_POLICIES:
        raise ValueError(f"unknown policy {source!r}; known: {sorted(THRESHOLD_POLICIES)}")
    if source == "plan" and net.plan_head is None:
        raise ValueError(f"{net.meta.display_name} has no plan head: train one with `skipviz train-plan`")
    decided = net.plan_head.gated_blocks if source == "plan" else net.gated_blocks
    if not decided and not overrides:  # nothing for this source to decide
        return FullPolicy()
    return THRESHOLD_POLICIES[source](net.meta.default_threshold(source) if threshold is None else threshold,
                                      overrides)


def policy_from_config(config: Mapping) -> Policy:
    """Rebuild a policy from :meth:`Policy.config` output (used to reproduce audited runs)."""
    name = config.get("name")
    if name == "full":
        return FullPolicy()
    if name == "static":
        return StaticMaskPolicy(config.get("skip", []))
    if name == "gates":
        return GatePolicy(config.get("threshold", 0.5), {int(k): v for k, v in config.get("overrides", {}).items()})
    if name == "plan":
        return PlanPolicy(config.get("threshold", 0.5), {int(k): v for k, v in config.get("overrides", {}).items()})
    if name == "early_exit":
        return EarlyExitPolicy(config.get("threshold", 0.9), config.get("min_block", 0))
    if name == "kl_redundancy":
        from .redundancy import KLRedundancyPolicy

        return KLRedundancyPolicy.from_config(config)
    raise ValueError(f"unknown policy {name!r}")
