"""Model cards' decision points priced with what their decisions cost: the gates' and the plan head's operating
points of a distilled card (:mod:`skipviz.training.distill_export`) and its recommended decision source, the
defaults of a CIFAR card, and the early exits of both.

A gate decision costs time at every gated block whatever it decides, and the plan head once per input: timed
inside runs that skip nothing (:func:`~skipviz.measure.profile.decision_cost`), the shipped EfficientNet-Lite0's
nine gates took 7.0-8.2 % of a batch-1 run on the 2-core AMD EPYC (2026-12-07, four runs), while its one gate
threshold within a point of accuracy cut 1.3 % of the FLOPs: at that default the gates ran slower than the full
network. So a point must
also save batch-1 time, predicted in units of the full run as its FLOPs cut less every decision's measured share
(:func:`decision_time_saved`), as the early exits' blocks are chosen (:mod:`skipviz.training.exit_points`). A
source without a fast point defaults to threshold 0, at which no probability is below the threshold: every block
runs and no head is evaluated (``Reason.CANNOT_SKIP``), the full network. :func:`reprice_decisions` applies this
to a card already written, from the curves it holds; a CIFAR card keeps its own export's rules, and
:func:`veto_unpaid_defaults` only replaces a default that does not pay by 0. :func:`add_exit_points` chooses the
early exits of a card written without them (the CIFAR cards) the way distilled cards choose theirs.

The exits' blocks are chosen with a time model in FLOPs, and an exit bypasses the network's tail, whose blocks
can take less than their FLOPs' share of the time: on the CIFAR ResNet-56 the best exits (after blocks 24 and 25,
2.4 % of FLOPs cut) were predicted to save 1.1 % of a batch-1 run and, timed, made it 1.7 % slower (the same
decisions replayed for free saved 0.48 of their FLOPs' share). So the exits' default is then timed at batch 1
against the full network (:func:`batch1_saving`, paired photo by photo) and kept only where it saves time
(:func:`exit_card_entries`).
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch

from ..data import TensorDataset
from ..engine.network import SkipNetwork
from ..evaluate import curve_row, operating_point
from ..measure.profile import DecisionCost, decision_cost
from .exit_points import ExitPoints, ExitPointsConfig, exit_operating_points

if TYPE_CHECKING:  # pragma: no cover
    from .distill_export import HeadsExportConfig

__all__ = ["add_exit_points", "batch1_saving", "decision_costs", "decision_defaults", "decision_time_saved",
           "default_source", "exit_card_entries", "reprice_decisions", "threshold_points", "veto_unpaid_defaults"]


def default_source(points: dict) -> str:
    """The decision source a card recommends (its ``default_source``) from its operating points: the early exits
    when their faithful point met its rule on validation and cuts more FLOPs there than the gates' fast point
    (more saved, and the network's answers kept), else the gates."""
    def cut(source: str, name: str) -> float | None:
        point = (points.get(source) or {}).get(name) or {}
        val = point.get("validation") if point.get("threshold") is not None else None
        return val.get("flops_saved_fraction") if isinstance(val, dict) else None

    exits, gates = cut("early_exit", "faithful"), cut("gates", "fast")
    met = ((points.get("early_exit") or {}).get("faithful") or {}).get("rule_met_on_validation", False)
    return "early_exit" if exits is not None and met and exits > (gates or 0.0) else "gates"


def decision_time_saved(curve: pd.DataFrame, cost: DecisionCost) -> pd.Series:
    """Batch-1 time saved, predicted in units of the full run, at each row of a gate or plan threshold curve
    (rows: ``flops_saved_fraction``, decision heads' FLOPs counted as spent): the FLOPs cut less every decision's
    measured share of the run (``cost``: ``checks`` decisions per input, each ``cost.fraction``; all of them made
    at every threshold above 0)."""
    return curve["flops_saved_fraction"] - cost.checks * cost.fraction


def threshold_points(val: dict, test: dict | None, cfg: HeadsExportConfig, labelled: bool,
                      costs: dict[str, DecisionCost]) -> dict:
    """The gates' and the plan's fast and faithful points, chosen on the validation curves ``val`` and reported
    on the test curves ``test`` (either, or a source in it, may be missing: no test record then): each the
    largest FLOPs cut meeting its rule that also saves batch-1 time with its decisions' measured cost (``costs`` by
    source; the curves gain ``time_saved_fraction_predicted``)."""
    points = {}
    for source in ("gates", "plan"):
        test_curve = (test or {}).get(source)
        for curve in (val[source], test_curve) if test_curve is not None else (val[source],):
            curve["time_saved_fraction_predicted"] = decision_time_saved(curve, costs[source])
        paying = {"cutting_only": True, "by": "time_saved_fraction_predicted"}
        fast = (operating_point(val[source], max_drop_points=cfg.max_drop_points, **paying) if labelled else
                operating_point(val[source], min_agreement=cfg.unlabelled_fast_agreement, **paying))
        faithful = operating_point(val[source], min_agreement=cfg.min_agreement, margin_se=cfg.faithful_margin_se,
                                   **paying)
        points[source] = {name: {"threshold": t, "validation": curve_row(val[source], t),
                                 "test": curve_row(test_curve, t)}
                          for name, t in (("fast", fast), ("faithful", faithful))}
    return points


def decision_defaults(points: dict, costs: dict[str, DecisionCost], cfg: HeadsExportConfig,
                       labelled: bool) -> tuple[dict, dict]:
    """The card's ``default_policy`` (the gates) and the plan's default fields from the fast points: a source
    without one defaults to threshold 0 (no head evaluated, the full network), and says why."""
    rule = (f"largest FLOPs cut on validation with accuracy drop <= {cfg.max_drop_points} points vs the published "
            "full network" if labelled else f"largest FLOPs cut on validation with top-1 agreement >= "
            f"{cfg.unlabelled_fast_agreement} with the full network (no labels)")
    rule += (" that saves batch-1 time, predicted as the FLOPs cut less each decision at its measured share of the "
             "full run (time_model); none: threshold 0, at which no head is evaluated and every block runs")
    out = []
    for source in ("gates", "plan"):
        fast = points[source]["fast"]["threshold"]
        out.append({"threshold": 0.0 if fast is None else fast, "operating_point": None if fast is None else "fast",
                    "rule": rule, "time_model": {"decision_cost": costs[source].to_dict(),
                                                 "predicted_time_saved": "flops_saved_fraction - checks * fraction"}})
    gates, plan = out
    return {"name": "gates", **gates}, {"default_threshold": plan["threshold"], "default_rule": plan["rule"],
                                        "time_model": plan["time_model"]}


_CURVE_COLUMNS = {"threshold", "flops_saved_fraction", "accuracy_drop_points", "agreement_with_full"}


def _distilled_curves(card: dict, where: Path) -> tuple[dict, dict]:
    """The gates' and the plan's validation and test curves of a distilled card, as DataFrames by source (test:
    only the sources the card has); ``ValueError`` naming what is missing."""
    plan, test_m = card.get("plan") or {}, card.get("metrics_test") or {}
    val = {"gates": (card.get("metrics_validation") or {}).get("gate_curve"),
           "plan": (plan.get("validation") or {}).get("curve")}
    test = {"gates": test_m.get("gate_curve"), "plan": plan.get("curve_test")}
    frames = {}
    for split, curves in (("validation", val), ("test", test)):
        frames[split] = {s: pd.DataFrame(c) for s, c in curves.items() if c}
        for s, frame in frames[split].items():
            if not _CURVE_COLUMNS <= set(frame.columns):
                raise ValueError(f"{where}: its {s} {split} curve lacks {sorted(_CURVE_COLUMNS - set(frame.columns))}")
    if set(frames["validation"]) != {"gates", "plan"}:
        raise ValueError(f"{where}: the card holds no validation curve for "
                         f"{' and '.join(sorted({'gates', 'plan'} - set(frames['validation'])))}")
    return frames["validation"], frames["test"]


def decision_costs(net: SkipNetwork, sources: tuple[str, ...], cfg: "HeadsExportConfig | None" = None
                   ) -> dict[str, DecisionCost]:
    """What one decision of each of ``sources`` costs inside a batch-1 run of ``net``
    (:func:`~skipviz.measure.profile.decision_cost`), timed on ``cfg.check_cost_inputs`` seeded random inputs in
    ``cfg.check_cost_rounds`` paired rounds (default :class:`HeadsExportConfig`)."""
    from .distill_export import HeadsExportConfig

    cfg = cfg or HeadsExportConfig()
    x = torch.randn(cfg.check_cost_inputs, *net.meta.input_size, generator=torch.Generator().manual_seed(0))
    return {source: decision_cost(net, x, source, rounds=cfg.check_cost_rounds) for source in sources}


def reprice_decisions(net: SkipNetwork, card_path: Path, cfg: "HeadsExportConfig | None" = None) -> dict:
    """Price a card's gate and plan decisions again with their cost measured here and now
    (:func:`decision_costs` on ``net``, the card's network, in eval mode), from the threshold curves the card
    already holds (no image is evaluated again; the early exits, chosen with their own measured cost, are left as
    they are). A distilled card's points are chosen again with the rules of
    :func:`~skipviz.training.distill_export.export_heads` (``cfg``, default :class:`HeadsExportConfig`); a CIFAR
    card keeps its export's rules and only a default that does not pay is set to 0
    (:func:`veto_unpaid_defaults`). Rewrites the card at ``card_path`` (the weights, and so ``weights_sha256``, are
    unchanged) and returns it. ``ValueError`` for a card whose curves it cannot read."""
    from ..measure.clock import software_versions

    card = json.loads(card_path.read_text())
    if "backbone" in card:  # distilled heads (skipviz train-heads); a CIFAR card names its "source" checkpoint
        val, test = _distilled_curves(card, card_path)  # checked before anything is timed
        _rechoose_points(card, val, test, decision_costs(net, ("gates", "plan"), cfg), cfg)
        what = ("the gates' and the plan's operating points and defaults chosen again from the card's curves with "
                "the decisions' cost measured then (time_model)")
    else:
        veto_unpaid_defaults(card, decision_costs(net, ("gates", "plan"), cfg))
        what = ("a gate or plan default that saves no batch-1 time with its decisions' cost measured then set to 0 "
                "(vetoed, time_model)")
    card["repriced"] = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "software": software_versions(), "reproduce": f"skipviz reprice-card --model {card['name']}",
                        "what": what}
    card_path.write_text(json.dumps(card, indent=2))
    return card


def _rechoose_points(card: dict, val: dict, test: dict, costs: dict[str, DecisionCost],
                     cfg: "HeadsExportConfig | None") -> None:
    """A distilled card's gate and plan points, defaults, curves and recommended source, chosen again in place."""
    from .distill_export import HeadsExportConfig

    cfg = cfg or HeadsExportConfig()
    test_m, plan = card.get("metrics_test") or {}, card["plan"]
    labelled = card["metrics_validation"].get("full_accuracy") is not None
    points = threshold_points(val, test, cfg, labelled, costs)
    card["operating_points"].update(points)
    if test_m.get("blocks_mean_correct") is not None:  # measured at the old default, kept with its threshold
        test_m.setdefault("outcome_threshold", card["default_policy"]["threshold"])
    card["default_policy"], plan_defaults = decision_defaults(points, costs, cfg, labelled)
    plan.update(plan_defaults)
    card["metrics_validation"]["gate_curve"] = val["gates"].to_dict("records")
    plan["validation"]["curve"] = val["plan"].to_dict("records")
    if "gates" in test:
        test_m["gate_curve"] = test["gates"].to_dict("records")
    if "plan" in test:
        plan["curve_test"] = test["plan"].to_dict("records")
    card["default_source"] = default_source(card["operating_points"])


def add_exit_points(net: SkipNetwork, card: dict, val_set: TensorDataset, test_set: TensorDataset | None,
                    exit_cfg: ExitPointsConfig, cost_cfg: "HeadsExportConfig | None" = None,
                    reference: SkipNetwork | None = None) -> dict:
    """Choose a card's early exits for ``net`` (it needs probe heads) as distilled cards do
    (:func:`~skipviz.training.exit_points.exit_operating_points`: the blocks checked and the fast and faithful
    thresholds by the batch-1 time predicted with a check's cost measured here and now, on ``val_set``, the card's
    validation split; the curves measured on ``test_set`` too), judged against ``reference``'s full network
    (default ``net``'s own; a fine-tuned copy is judged against the published network). Adds
    the card's ``early_exit`` section, ``operating_points.early_exit`` and the ``early_exit_curve`` of
    ``metrics_validation`` and ``metrics_test`` at the chosen blocks; returns the card (not written)."""
    from ..evaluate import evaluate_policy
    from ..policies import FullPolicy

    cost = decision_costs(net, ("early_exit",), cost_cfg)["early_exit"]
    reference = reference or net
    val_ref = evaluate_policy(reference, val_set, FullPolicy(), batch_size=exit_cfg.batch_size)
    test_ref = (evaluate_policy(reference, test_set, FullPolicy(), batch_size=exit_cfg.batch_size)
                if test_set is not None else None)
    exits = exit_operating_points(net, val_set, val_ref, cost, test_set, test_ref, exit_cfg)
    card["early_exit"], points = exit_card_entries(net, exits, exit_cfg, val_set)
    card.setdefault("operating_points", {})["early_exit"] = points
    card.setdefault("metrics_validation", {})["early_exit_curve"] = exits.validation.to_dict("records")
    if exits.test is not None:
        card.setdefault("metrics_test", {})["early_exit_curve"] = exits.test.to_dict("records")
    return card


def batch1_saving(net: SkipNetwork, policy, images: torch.Tensor, rounds: int = 10) -> dict:
    """``policy`` against the full network at batch 1 on ``images`` (N, 3, H, W, normalised), photo by photo
    (:func:`~skipviz.measure.saving.measure_saving` at batch 1): ``saved_fraction`` the median paired saving over
    the full run's median time, ``saved_interval`` its bootstrap 95 % interval in the same unit, ``full_ms`` per
    photo, ``images``, ``rounds``, the ``device`` label and model, and ``busy`` (why the machine was not idle)."""
    from ..measure.clock import device_info
    from ..measure.saving import measure_saving

    with torch.inference_mode():
        s = measure_saving(net, images, policy, batch_size=1, rounds=rounds)
    full = s.full_median_s
    return {"saved_fraction": s.saving_s / full, "saved_interval": [s.low_s / full, s.high_s / full],
            "full_ms": 1e3 * full, "images": int(images.shape[0]), "rounds": s.rounds, "device": s.device,
            "device_name": device_info(next(net.parameters()).device).device_name, "busy": s.busy}


def exit_card_entries(net: SkipNetwork, exits: ExitPoints, cfg: ExitPointsConfig, val_set: TensorDataset,
                      images: int = 32, rounds: int = 10) -> tuple[dict, dict]:
    """The card's ``early_exit`` section and ``operating_points.early_exit`` for ``exits``, the default timed at
    batch 1 on the first ``images`` of ``val_set`` (:func:`batch1_saving`, recorded as ``batch1_check``): a default
    that saves no time there (the median <= 0) leaves no exit point, and the section then checks nowhere."""
    import copy

    from ..data import normalize
    from ..policies import EarlyExitPolicy

    section, points = exits.card_section(cfg), copy.deepcopy(exits.points)
    if not section["blocks"]:
        return section, points
    x = normalize(val_set.images[:images], net.meta.mean, net.meta.std)
    check = batch1_saving(net, EarlyExitPolicy(section["default_threshold"], blocks=section["blocks"]), x, rounds)
    section["batch1_check"] = check
    if check["saved_fraction"] > 0:
        return section, points
    section.update(blocks=[], operating_point=None)
    lo, hi = check["saved_interval"]
    for point in points.values():
        point.update(threshold=None, rule_met_on_validation=False, validation=None, test=None,
                     rule=point["rule"] + f"; withdrawn: the default, timed at batch 1 (batch1_check), saved no time "
                                          f"({check['saved_fraction']:+.1%} of the run, 95 % interval {lo:+.1%} to "
                                          f"{hi:+.1%})")
    return section, points


def veto_unpaid_defaults(card: dict, costs: dict[str, DecisionCost]) -> dict:
    """A card written by the CIFAR exports (``skipviz train`` / ``finetune``, their own rules, not re-chosen
    here): the gates' and the plan's default thresholds kept where they save batch-1 time predicted with their
    decisions' measured cost (``costs`` by source; the FLOPs cut of the card's validation curve at the default),
    else set to 0 (no head evaluated: the full network), the threshold set aside under ``vetoed``. Each section
    records its ``time_model``. A card whose recommended source (``default_source``, else the gates) was vetoed
    recommends the other where that one pays. Returns the card (not written); ``ValueError`` when a default is
    not on its curve."""
    sections = {"gates": (card["default_policy"], "threshold", card["metrics_validation"]["gate_curve"]),
                "plan": (card["plan"], "default_threshold", card["plan"]["validation"]["curve"])}
    pays = {}
    for source, (section, field, curve) in sections.items():
        t = section[field]
        row = next((r for r in curve if r["threshold"] == t), None)
        if row is None:
            raise ValueError(f"the {source}' default {t} is not on the card's validation curve")
        saved = row["flops_saved_fraction"] - costs[source].checks * costs[source].fraction
        section["time_model"] = {"decision_cost": costs[source].to_dict(), "predicted_time_saved_at_default": saved,
                                 "predicted_time_saved": "flops_saved_fraction - checks * fraction"}
        pays[source] = saved > 0
        if saved <= 0:
            section[field] = 0.0
            section["vetoed"] = {"threshold": t, "why": f"{row['flops_saved_fraction']:.1%} of FLOPs cut on "
                                 f"validation against {costs[source].checks} decision(s) at "
                                 f"{costs[source].fraction:.2%} of a batch-1 run each: no time saved"}
    source = card.get("default_source", "gates")
    other = "plan" if source == "gates" else "gates"
    if source in pays and not pays[source] and pays[other]:
        card["default_source"] = other
    return card

