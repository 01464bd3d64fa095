"""The threshold policies: one global threshold plus per-block overrides, over a decision source.

* :class:`GatePolicy` - learned gate heads (ConvNet-AIG / SkipNet style): execute when the gate's
  probability >= threshold, one global threshold plus per-block overrides (force run, force skip, or a
  per-block threshold).
* :class:`PlanPolicy` - BlockDrop-style: the network's plan head decides every gated block of a sample at
  once, from the stem's output, before block 0 (:meth:`Policy.plan`).

:data:`DECISION_SOURCES` is the one table of the decision sources (``"gates"``, ``"plan"``, and ``"early_exit"``:
:class:`~skipviz.policies.simple.EarlyExitPolicy` on the probe heads, also one threshold plus per-block
overrides): their policy, their labels, where the model card keeps their default threshold. :func:`policy_for`
builds a network's policy for a source.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

import torch

from ..engine.trace import Reason
from .base import Decision, Override, Plan, Policy, _fmt, check_threshold, normalise_overrides
from .simple import EarlyExitPolicy, FullPolicy

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.flops import FlopTable
    from ..engine.heads import PlanHead
    from ..engine.network import SkipNetwork

__all__ = ["DECISION_SOURCES", "DecisionSource", "GatePolicy", "PlanPolicy", "THRESHOLD_POLICIES", "make_policy",
           "offered_sources", "policy_for",
           "score_label"]


_GATE_RUN, _GATE_SKIP = int(Reason.GATE_RUN), int(Reason.GATE_SKIP)
_CANNOT_SKIP = int(Reason.CANNOT_SKIP)


class GatePolicy(Policy):
    """Learned gates: block i runs for a sample when ``sigmoid(gate_i(h)) >= threshold_i``.

    ``threshold`` is the global threshold; ``overrides`` maps a block index to ``"run"`` (force run),
    ``"skip"`` (force skip) or a float (that block's own threshold). Blocks without a gate head always run.
    The gate is evaluated on every running sample (its FLOPs count) unless the block is forced or its threshold
    is 0 (a probability is never below 0: the block runs whatever the gate says, so the gate is not evaluated and
    costs nothing; ``Reason.CANNOT_SKIP``). A batch of one is decided on the host from the gate's probability in
    float64 (:meth:`GateHead.probability_of_one`), a batch from float32 probabilities: the two agree except for a
    probability within float rounding (~1e-7) of the threshold.
    """

    name = "gates"

    def __init__(self, threshold: float = 0.5, overrides: Mapping[int, Override] | None = None) -> None:
        self.threshold = check_threshold(threshold, "threshold")
        self.overrides: dict[int, Override] = normalise_overrides(overrides)

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
        if t <= 0.0:  # no probability is below 0: the decision is known without the gate
            return Decision(True, _CANNOT_SKIP, None, t, False)
        if h.shape[0] == 1:  # batch of one: decide on the host from one read-back, no gather/scatter needed
            p = gate.probability_of_one(h)
            run = p >= t
            return Decision(run, _GATE_RUN if run else _GATE_SKIP, p, t, True)
        prob = torch.sigmoid(gate(h))
        execute = prob >= t
        reason = torch.where(execute, int(Reason.GATE_RUN), int(Reason.GATE_SKIP))
        return Decision(execute=execute, reason=reason, score=prob, threshold=t, evaluated=True)

    def head_flops(self, table: "FlopTable") -> list[int]:
        return [table.gates.get(i, 0) if self.evaluates(i) else 0 for i in range(len(table.blocks))]

    def evaluates(self, index: int) -> bool:
        """Whether block ``index``'s head is evaluated (where the network has one): not forced, threshold above 0."""
        return not isinstance(self.overrides.get(index), str) and self.threshold_for(index) > 0.0

    def config(self) -> dict:
        return {"name": self.name, "threshold": self.threshold,
                "overrides": {str(k): v for k, v in sorted(self.overrides.items())}}

    def reason_text(self, code: Reason, score: float | None, threshold: float | None, index: int,
                    exit_block: int | None = None) -> str:
        text = super().reason_text(code, score, threshold, index, exit_block)
        if code in (Reason.GATE_RUN, Reason.GATE_SKIP) and isinstance(self.overrides.get(index), float):
            text += " (block threshold)"
        return text

    @classmethod
    def from_config(cls, config: Mapping) -> "GatePolicy":
        return cls(config.get("threshold", 0.5), config.get("overrides", {}))


class PlanPolicy(GatePolicy):
    """Plan up front (BlockDrop-style): the network's plan head (:class:`~skipviz.engine.heads.PlanHead`) reads the
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
        th: list = [0.0 if r == _CANNOT_SKIP else None for r in re]  # threshold 0 recorded, as GatePolicy does
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
                t = self.threshold if ov is None else ov
                if t > 0.0:
                    free.append((i, j, t))
                elif 0 <= i < n_blocks:  # threshold 0: runs whatever the plan says (GatePolicy.decide)
                    re[i] = _CANNOT_SKIP
        return ex, re, free

    def decide(self, net: "SkipNetwork", index: int, h: torch.Tensor) -> Decision:
        raise TypeError("PlanPolicy decides every block at once: call plan() with the stem's output "
                        "(SkipNetwork.run does)")

    def head_flops(self, table: "FlopTable") -> list[int]:
        # the head runs when a block it decides has a threshold above 0 (its blocks are not in the table: any)
        evaluated = self.threshold > 0.0 or any(isinstance(v, float) and v > 0.0 for v in self.overrides.values())
        return [table.plan if i == 0 and evaluated else 0 for i in range(len(table.blocks))]

    def reason_text(self, code: Reason, score: float | None, threshold: float | None, index: int,
                    exit_block: int | None = None) -> str:
        if code in (Reason.PLAN_RUN, Reason.PLAN_SKIP):
            op = ">=" if code == Reason.PLAN_RUN else "<"
            text = f"plan {_fmt(score)} {op} {_fmt(threshold)} (decided at the stem)"
            return text + (" (block threshold)" if isinstance(self.overrides.get(index), float) else "")
        return super().reason_text(code, score, threshold, index, exit_block)


_PLAN_RUN, _PLAN_SKIP = int(Reason.PLAN_RUN), int(Reason.PLAN_SKIP)


_NOT_GATED, _FORCED_RUN, _FORCED_SKIP = int(Reason.NOT_GATED), int(Reason.FORCED_RUN), int(Reason.FORCED_SKIP)


@dataclass(frozen=True)
class DecisionSource:
    """One decision source of the threshold policies: its policy class (``policy.name`` is the source's name,
    the ``--policy`` choice of ``skipviz predict / audit / bench``), the dashboard's label for it, what a block's
    score is under it, what the threshold does (``rule``, a sentence for the slider), where the model card keeps
    its default threshold (``card[card_section][card_field]``; ``fallback_threshold`` when the card has none) and
    further constructor arguments (``card_options``, read from the same card section), and the benchmark's title
    for it."""

    policy: type[Policy]
    label: str
    score_label: str
    card_section: str
    card_field: str
    title: str
    rule: str
    fallback_threshold: float = 0.5
    card_options: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.policy.name

    def offered_by(self, net: "SkipNetwork") -> bool:
        """Whether ``net`` has the heads this source reads (gate heads, a plan head, probe heads)."""
        if self.name == "plan":
            return net.plan_head is not None
        if self.name == "early_exit":
            return net.probes is not None and len(net.blocks) > 1
        return bool(net.gated_blocks)

    def missing_heads(self, net: "SkipNetwork") -> str:
        """Why ``net`` cannot use this source, in words (for the ``ValueError`` of :func:`policy_for`)."""
        if self.name == "plan":
            return f"{net.meta.display_name} has no plan head: train one with `skipviz train-plan`"
        if self.name == "early_exit":
            return f"{net.meta.display_name} has no probe heads to exit on"
        return f"{net.meta.display_name} has no gate heads"


#: The decision sources by name: per-block gates, the plan head at the stem, or early exits on the probe heads.
DECISION_SOURCES: dict[str, DecisionSource] = {s.name: s for s in (
    DecisionSource(GatePolicy, "per-block gates", "gate probability", "default_policy", "threshold",
                   "per-block gates (GatePolicy)", "a block runs when its gate probability >= this threshold"),
    DecisionSource(PlanPolicy, "plan at the stem (every block decided up front)", "plan probability", "plan",
                   "default_threshold", "plan head, every block decided at the stem (PlanPolicy)",
                   "a block runs when its plan probability >= this threshold"),
    DecisionSource(EarlyExitPolicy, "early exits (probe confidence after each block)",
                   "probe confidence (top-class probability)", "early_exit", "default_threshold",
                   "early exits on the probe heads (EarlyExitPolicy)",
                   "an input leaves after a block when the probe there gives its top class a probability >= this "
                   "threshold: the later blocks are bypassed and the probe's prediction is the answer (higher: "
                   "fewer exits, more compute)", fallback_threshold=0.95, card_options=("min_block", "blocks")),
)}

#: The policies driven by one global threshold plus per-block overrides, by name (from :data:`DECISION_SOURCES`).
THRESHOLD_POLICIES: dict[str, type[Policy]] = {name: s.policy for name, s in DECISION_SOURCES.items()}


def offered_sources(net: "SkipNetwork") -> list[str]:
    """The decision sources ``net`` has the heads for, in :data:`DECISION_SOURCES` order: ``"gates"`` with gate
    heads, ``"plan"`` with a plan head, ``"early_exit"`` with probe heads."""
    return [name for name, src in DECISION_SOURCES.items() if src.offered_by(net)]


def policy_for(net: "SkipNetwork", source: str = "gates", threshold: float | None = None,
               overrides: Mapping[int, Override] | None = None) -> Policy:
    """The threshold policy of ``net`` for a decision source: its per-block gates (``"gates"``), its plan head
    (``"plan"``) or early exits on its probe heads (``"early_exit"``), at ``threshold`` (default: the model
    card's default for that source, :meth:`~skipviz.models.weights.ModelMeta.default_threshold`) with per-block
    ``overrides`` and the source's card options (the exits' ``blocks`` and ``min_block``); :class:`FullPolicy`
    when the source decides no block (no gate heads, or a plan head over no blocks) and there are no overrides. ``ValueError``
    for an unknown source, or for a source whose heads the network lacks."""
    if source not in DECISION_SOURCES:
        raise ValueError(f"unknown policy {source!r}; known: {sorted(DECISION_SOURCES)}")
    src = DECISION_SOURCES[source]
    if source in ("plan", "early_exit") and not src.offered_by(net):
        raise ValueError(src.missing_heads(net))
    if source != "early_exit":
        decided = net.plan_head.gated_blocks if source == "plan" else net.gated_blocks
        if not decided and not overrides:  # nothing for this source to decide
            return FullPolicy()
    t = net.meta.default_threshold(source) if threshold is None else threshold
    return src.policy(t, overrides, **net.meta.source_options(source))


def make_policy(net: "SkipNetwork", threshold: float, overrides: Mapping[int, Override] | None = None,
                source: str = "gates") -> Policy:
    """The policy the dashboard's controls describe: learned gates (or, with ``source="plan"`` and a plan head,
    the plan at the stem; with ``source="early_exit"`` and probe heads, early exits) at ``threshold`` with
    per-block overrides (``"auto"`` entries dropped); the gates when the network lacks the source's heads, full if
    it has no gates either."""
    if source not in DECISION_SOURCES:
        raise ValueError(f"unknown decision source {source!r}; known: {sorted(DECISION_SOURCES)}")
    ov = normalise_overrides(overrides, auto=True)
    return policy_for(net, source if DECISION_SOURCES[source].offered_by(net) else "gates", threshold, ov)


def score_label(source: str) -> str:
    """What a block's score is under a decision source or policy name (``trace.policy``): ``"plan probability"``
    (decided at the stem by the plan head), the probe's confidence for early exits, or, for every other policy,
    ``"gate probability"``."""
    return (DECISION_SOURCES.get(source) or DECISION_SOURCES["gates"]).score_label
