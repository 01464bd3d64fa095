"""Early-exit operating points for a model card: the probes' ``min_block`` and the fast and faithful exit
thresholds, chosen on the validation split and reported on the test split.

An exit policy (:class:`~skipviz.policies.EarlyExitPolicy`) has two knobs: the confidence threshold and the
first block after which an input may leave (``min_block``: the earliest probes are the weakest). ``min_block``
is one per model (the card's ``early_exit.min_block``, what :func:`~skipviz.policies.policy_for` builds with);
the named points differ in their threshold only, so a dashboard slider over the threshold reaches both.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from ..data import TensorDataset
from ..engine.network import SkipNetwork
from ..evaluate.loop import PolicyEval, agreement_margin_words, curve_row, evaluate_policy, operating_point
from ..policies import EarlyExitPolicy

__all__ = ["ExitPointsConfig", "ExitPoints", "exit_operating_points"]


@dataclass(frozen=True)
class ExitPointsConfig:
    thresholds: tuple[float, ...] = (0.7, 0.75, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.96, 0.98)
    min_blocks: tuple[int, ...] = (0, 2, 4, 6, 8)
    max_drop_points: float = 1.0
    # The probes are distilled on the training images: on images like them their answers can beat the full
    # network's (Imagenette val: exits at 0.7 scored 0.9 points above the published network while changing
    # 9.6 % of its answers). An accuracy bound alone would then pick exits that replace the network's answers
    # with the probes' guesses; the fast point also keeps this top-1 agreement with the full network.
    fast_min_agreement: float = 0.95
    min_agreement: float = 0.99
    # faithful: the 99 % must hold at the lower end of the validation agreement's Wilson interval at this many
    # standard errors (skipviz.evaluate.agreement_meets): at the bare estimate the shipped ImageNet exits kept
    # 99.1 % of 1,000 validation answers and 98.6 % of the 3,025 test photos
    faithful_margin_se: float = 1.0
    batch_size: int = 100


@dataclass
class ExitPoints:
    """What :func:`exit_operating_points` chose: ``min_block``, the card's ``operating_points.early_exit``
    entries (``points``), the validation table over every ``min_block`` (``choice``) and the curves at the chosen
    ``min_block`` (``validation``, ``test``: one row per threshold)."""

    min_block: int
    points: dict
    choice: list[dict]
    validation: pd.DataFrame
    test: pd.DataFrame | None

    def card_section(self, cfg: ExitPointsConfig) -> dict:
        """The card's ``early_exit`` section: the default threshold (the faithful point, else the most cautious
        threshold), ``min_block`` and how both were chosen."""
        faithful = self.points["faithful"]["threshold"]
        return {"default_threshold": faithful if faithful is not None else max(cfg.thresholds),
                "operating_point": "faithful",
                "min_block": self.min_block,
                "rule": "min_block: the one whose fast and faithful points together cut the most FLOPs on "
                        "validation (ties: the smaller); default threshold: the faithful point (an exit answers "
                        "with a probe's prediction, so the card's default keeps the full network's answers)",
                "min_block_choice": self.choice,
                "validation_curve": self.validation.to_dict("records")}


def _curve(net: SkipNetwork, data: TensorDataset, reference: PolicyEval, min_block: int,
           cfg: ExitPointsConfig) -> pd.DataFrame:
    rows = []
    for t in cfg.thresholds:
        ev = evaluate_policy(net, data, EarlyExitPolicy(t, min_block=min_block), cfg.batch_size)
        summary = {k: v for k, v in ev.summary(reference).items() if k != "policy"}
        rows.append({"threshold": float(t), "min_block": int(min_block), **summary})
    return pd.DataFrame(rows)


def exit_operating_points(net: SkipNetwork, val_set: TensorDataset, val_reference: PolicyEval,
                          test_set: TensorDataset | None = None, test_reference: PolicyEval | None = None,
                          cfg: ExitPointsConfig = ExitPointsConfig()) -> ExitPoints:
    """Choose the exits' ``min_block`` and their fast and faithful thresholds on ``val_set`` and report them on
    ``test_set``. Agreement and accuracy drop are against the ``*_reference`` full runs (the network itself,
    or the published network a fine-tuned copy is judged against). Fast: the largest FLOPs cut with an accuracy
    drop <= ``max_drop_points`` (when the split is labelled) and agreement >= ``fast_min_agreement``; faithful:
    the largest cut with agreement >= ``min_agreement``."""
    labelled = bool((val_set.labels >= 0).all())
    max_drop = cfg.max_drop_points if labelled else None
    curves, choice = {}, []
    for mb in cfg.min_blocks:
        if mb >= len(net.blocks) - 1:
            continue
        curve = curves[mb] = _curve(net, val_set, val_reference, mb, cfg)
        fast = operating_point(curve, max_drop, cfg.fast_min_agreement, cutting_only=True)
        faithful = operating_point(curve, None, cfg.min_agreement, cfg.faithful_margin_se, cutting_only=True)
        cut = {name: (curve_row(curve, t) or {}).get("flops_saved_fraction", 0.0)
               for name, t in (("fast", fast), ("faithful", faithful))}
        choice.append({"min_block": int(mb), "fast_threshold": fast, "faithful_threshold": faithful,
                       "fast_flops_saved": cut["fast"], "faithful_flops_saved": cut["faithful"]})
    best = max(choice, key=lambda r: (r["fast_flops_saved"] + r["faithful_flops_saved"], -r["min_block"]))
    mb = best["min_block"]
    val_curve = curves[mb]
    test_curve = (_curve(net, test_set, test_reference, mb, cfg)
                  if test_set is not None and test_reference is not None else None)
    rules = {"fast": (f"largest FLOPs cut on validation with accuracy drop <= {cfg.max_drop_points} points and top-1 "
                      f"agreement >= {cfg.fast_min_agreement:.0%} with the full network (decision heads counted)"
                      if labelled else f"largest FLOPs cut on validation with top-1 agreement >= "
                                       f"{cfg.fast_min_agreement:.0%} with the full network (no labels)"),
             "faithful": (f"largest FLOPs cut on validation with top-1 agreement >= {cfg.min_agreement:.0%} with the "
                          "full network (decision heads counted)" + agreement_margin_words(cfg.faithful_margin_se))}
    points = {}
    for name in ("fast", "faithful"):
        t = best[f"{name}_threshold"]
        points[name] = {"threshold": t, "min_block": mb, "rule": rules[name], "rule_met_on_validation": t is not None,
                        "validation": curve_row(val_curve, t), "test": curve_row(test_curve, t)}
    return ExitPoints(mb, points, choice, val_curve, test_curve)
