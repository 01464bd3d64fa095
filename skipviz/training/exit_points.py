"""Early-exit operating points for a model card: the blocks an exit is checked after and the fast and faithful
exit thresholds, chosen on the validation split and reported on the test split.

An exit policy (:class:`~skipviz.policies.EarlyExitPolicy`) has two knobs: the confidence threshold and the
blocks after which an input may leave (``blocks``). Every check costs a probe head inside the run - on the 2-core
AMD EPYC about 0.9 % of a batch-1 EfficientNet-Lite0 run each, so nine checks cost about what the faithful
point's exits saved - while a late or a rarely taken exit saves little. The blocks are one set per model (the
card's ``early_exit.blocks``, what :func:`~skipviz.policies.policy_for` builds with), chosen for the batch-1 time
the two named points save together, predicted by a cost model in units of the full run: an input's FLOPs (at
batch 1 the bypassed blocks' time follows their FLOPs: the same decisions replayed for free saved 0.93-1.19 of
their FLOPs' share, ``benchmarks/batch1_decision_ceiling.py``) plus each check it passes at its measured share of
the full run (:func:`~skipviz.measure.profile.decision_cost`, a ratio of paired times: machine drift, which
moved that forward between 12 and 20 ms within minutes, cancels; a per-block profile did not, its block times
varied by half between runs). The named points differ in their threshold only, so a dashboard slider over the
threshold reaches both.

The choice is made on every probe's answer for every validation input, taken from one full run
(:func:`probe_outputs`) and replayed for any set of blocks and any threshold (:func:`simulate_exits`): backward
elimination from every block with a probe, dropping the check whose removal saves the most predicted time while
both points keep meeting their rules. The curves the card reports are then measured with the real engine.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..data import TensorDataset, normalize
from ..engine.flops import FlopTable
from ..engine.network import SkipNetwork
from ..evaluate.loop import PolicyEval, agreement_margin_words, curve_row, operating_point, threshold_curve
from ..measure.profile import DecisionCost
from ..policies import EarlyExitPolicy

__all__ = ["ExitPointsConfig", "ExitPoints", "ProbeOutputs", "choose_exit_blocks", "exit_operating_points",
           "probe_outputs", "simulate_exits"]


@dataclass(frozen=True)
class ExitPointsConfig:
    thresholds: tuple[float, ...] = (0.7, 0.75, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.96, 0.98)
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


@dataclass(frozen=True)
class ProbeOutputs:
    """Every probe's answer for every input of a split, from one full run: ``confidence`` (N, L) the top-class
    probability of the probe after each block, ``prediction`` (N, L) its class, ``full`` (N,) the full network's
    class, ``labels`` (N,) (-1: unlabelled)."""

    confidence: torch.Tensor
    prediction: torch.Tensor
    full: torch.Tensor
    labels: torch.Tensor


@torch.no_grad()
def probe_outputs(net: SkipNetwork, data: TensorDataset, batch_size: int = 100) -> ProbeOutputs:
    """Every block and every probe run on every image of ``data`` (the full path, as the engine runs it when
    nobody leaves). ``net`` needs probe heads."""
    if net.probes is None:
        raise ValueError(f"{net.meta.display_name} has no probe heads: there are no exits to choose")
    conf, pred, full = [], [], []
    was_training = net.training
    net.eval()
    try:
        for i in range(0, len(data), batch_size):
            x = normalize(data.images[i: i + batch_size], net.meta.mean, net.meta.std)
            logits, _, probes = net.forward_train(x, force_full=True)
            c, p = torch.stack([torch.softmax(lg.float(), 1) for lg in probes], 1).max(2)
            conf.append(c)
            pred.append(p)
            full.append(logits.argmax(1))
    finally:
        net.train(was_training)
    return ProbeOutputs(torch.cat(conf), torch.cat(pred), torch.cat(full), data.labels.clone())


def simulate_exits(outputs: ProbeOutputs, table: FlopTable, blocks: list[int], threshold: float,
                   check_fraction: float | None = None) -> dict:
    """What :class:`~skipviz.policies.EarlyExitPolicy` at ``threshold`` checking after ``blocks`` gives on the
    inputs of ``outputs``, without running it: a curve row (accuracy, FLOPs with the probes counted, agreement
    with the full network, accuracy drop, n) plus ``exit_block`` (N,) (-1: no exit) and, given the cost of one
    check as a share of the full run (``check_fraction``), ``time_saved_fraction``: the batch-1 time saved
    predicted by the module's cost model (the input's FLOPs without the probes' plus its checks)."""
    n, L = outputs.confidence.shape
    checked = sorted(b for b in set(int(b) for b in blocks) if 0 <= b < L - 1)
    exit_block = torch.full((n,), -1, dtype=torch.long)
    pred = outputs.full.clone()
    for b in checked:
        leave = (exit_block < 0) & (outputs.confidence[:, b] >= threshold)
        exit_block[leave] = b
        pred[leave] = outputs.prediction[leave, b]
    per_block = np.asarray(table.blocks, dtype=np.float64)
    is_check = np.zeros(L)
    is_check[checked] = 1.0
    probes = is_check * (np.asarray(table.probes, dtype=np.float64) if table.probes else 0.0)
    spent = np.cumsum(per_block + probes)
    stay = exit_block.numpy() < 0
    last = np.where(stay, L - 1, exit_block.numpy())  # the last block each input runs
    flops = table.stem + spent[last] + np.where(stay, table.head, 0)
    labelled = bool((outputs.labels >= 0).all())
    acc = float((pred == outputs.labels).double().mean()) if labelled else float("nan")
    full_acc = float((outputs.full == outputs.labels).double().mean()) if labelled else float("nan")
    row = {"threshold": float(threshold), "blocks": checked, "accuracy": acc, "flops_mean": float(flops.mean()),
           "flops_full": table.full, "flops_saved_fraction": 1.0 - float(flops.mean()) / table.full, "n": n,
           "agreement_with_full": float((pred == outputs.full).double().mean()),
           "accuracy_drop_points": 100.0 * (full_acc - acc), "exit_block": exit_block}
    if check_fraction is not None:
        work = table.stem + np.cumsum(per_block)[last] + np.where(stay, table.head, 0)
        checks = np.cumsum(is_check)[last]
        row["time_saved_fraction"] = 1.0 - float(work.mean()) / table.full - float(checks.mean()) * check_fraction
    return row


def _points(outputs: ProbeOutputs, table: FlopTable, check_fraction: float, blocks: list[int],
            cfg: ExitPointsConfig, max_drop: float | None) -> dict:
    """The fast and faithful thresholds for ``blocks`` by predicted time saved, and that time (0 for a point
    whose rule no threshold meets)."""
    curve = pd.DataFrame([{k: v for k, v in simulate_exits(outputs, table, blocks, t, check_fraction).items()
                           if k not in ("exit_block", "blocks")} for t in cfg.thresholds])
    fast = operating_point(curve, max_drop, cfg.fast_min_agreement, cutting_only=True, by="time_saved_fraction")
    faithful = operating_point(curve, None, cfg.min_agreement, cfg.faithful_margin_se, cutting_only=True,
                               by="time_saved_fraction")
    saved = {name: (curve_row(curve, t) or {}).get("time_saved_fraction", 0.0)
             for name, t in (("fast", fast), ("faithful", faithful))}
    return {"blocks": list(blocks), "fast_threshold": fast, "faithful_threshold": faithful,
            "fast_time_saved": saved["fast"], "faithful_time_saved": saved["faithful"],
            "time_saved": saved["fast"] + saved["faithful"]}


def choose_exit_blocks(outputs: ProbeOutputs, table: FlopTable, check_fraction: float, cfg: ExitPointsConfig,
                       max_drop: float | None) -> list[dict]:
    """Backward elimination over the blocks an exit is checked after, from every block with a probe: each step
    drops the check whose removal raises the two points' predicted time saved the most (or keeps it: a check no
    validation input leaves at is pure cost), as long as every point the set before met its rule still meets
    it. Returns the path (one :func:`_points` row per step, the last is the choice)."""
    L = outputs.confidence.shape[1]
    current = _points(outputs, table, check_fraction, list(range(L - 1)), cfg, max_drop)
    path = [current]
    met = [name for name in ("fast", "faithful") if current[f"{name}_threshold"] is not None]
    while len(current["blocks"]) > 1:
        tries = [_points(outputs, table, check_fraction, [b for b in current["blocks"] if b != drop], cfg, max_drop)
                 for drop in current["blocks"]]
        tries = [r for r in tries if all(r[f"{name}_threshold"] is not None for name in met)]
        best = max(tries, key=lambda r: (r["time_saved"], -len(r["blocks"])), default=None)
        if best is None or best["time_saved"] < current["time_saved"]:
            break
        current = best
        path.append(current)
    return path


@dataclass
class ExitPoints:
    """What :func:`exit_operating_points` chose: ``blocks`` (where exits are checked), the card's
    ``operating_points.early_exit`` entries (``points``), the elimination path (``choice``), the measured cost of
    a check the time was predicted with, and the measured curves at the chosen blocks (``validation``, ``test``:
    one row per threshold)."""

    blocks: list[int]
    points: dict
    choice: list[dict]
    check_cost: DecisionCost
    validation: pd.DataFrame
    test: pd.DataFrame | None

    def card_section(self, cfg: ExitPointsConfig) -> dict:
        """The card's ``early_exit`` section: the default threshold (the faithful point, else the most cautious
        threshold), ``blocks`` and how both were chosen. With no point at all (no threshold meets a rule and saves
        time at any set of blocks) ``blocks`` is empty: the default checks nowhere, so it is the full network."""
        faithful = self.points["faithful"]["threshold"]
        some = faithful is not None or self.points["fast"]["threshold"] is not None
        return {"default_threshold": faithful if faithful is not None else max(cfg.thresholds),
                "operating_point": "faithful" if faithful is not None else None,
                "blocks": list(self.blocks) if some else [],
                "rule": "blocks: backward elimination from every block with a probe, each step dropping the exit "
                        "check whose removal most raises the batch-1 time the fast and faithful points save "
                        "together on validation, predicted as an input's FLOPs plus each check it passes at the "
                        "measured share of the full run below, while both points keep meeting their rules; "
                        "default threshold: the faithful point (an exit answers with a probe's prediction, so the "
                        "card's default keeps the full network's answers)",
                "blocks_choice": self.choice,
                "time_model": {"check_cost": self.check_cost.to_dict(),
                               "model": "batch-1 time of an input = its FLOPs (without the probes') over the full "
                                        "network's + check_cost.fraction per exit check it passes"},
                "validation_curve": self.validation.to_dict("records")}


def _curve(net: SkipNetwork, data: TensorDataset, reference: PolicyEval, blocks: list[int],
           cfg: ExitPointsConfig) -> pd.DataFrame:
    """The exits' threshold curve on ``data`` with the real engine, checking after ``blocks``."""
    curve, _ = threshold_curve(net, data, cfg.thresholds, lambda t: EarlyExitPolicy(t, blocks=blocks), reference,
                               cfg.batch_size)
    curve.insert(1, "blocks", [list(blocks)] * len(curve))
    return curve


def exit_operating_points(net: SkipNetwork, val_set: TensorDataset, val_reference: PolicyEval,
                          check_cost: DecisionCost, test_set: TensorDataset | None = None,
                          test_reference: PolicyEval | None = None,
                          cfg: ExitPointsConfig = ExitPointsConfig()) -> ExitPoints:
    """Choose the blocks exits are checked after (:func:`choose_exit_blocks`, by the batch-1 time predicted with
    ``check_cost``) and the fast and faithful thresholds on ``val_set``, measure the curve there and on
    ``test_set`` with the real engine and report both points. Agreement and accuracy drop are against the
    ``*_reference`` full runs (the network itself, or the published network a fine-tuned copy is judged
    against). Fast: the most time saved with an accuracy drop <= ``max_drop_points`` (when the split is
    labelled) and agreement >= ``fast_min_agreement``; faithful: the most time saved with agreement >=
    ``min_agreement``."""
    labelled = bool((val_set.labels >= 0).all())
    max_drop = cfg.max_drop_points if labelled else None
    outputs = probe_outputs(net, val_set, cfg.batch_size)
    outputs = ProbeOutputs(outputs.confidence, outputs.prediction, torch.as_tensor(val_reference.predictions),
                           outputs.labels)  # agreement with the reference the card is judged against
    table = net.flop_table(tuple(val_set.images.shape[-2:]))
    path = choose_exit_blocks(outputs, table, check_cost.fraction, cfg, max_drop)
    best = path[-1]
    blocks = best["blocks"]
    val_curve = _curve(net, val_set, val_reference, blocks, cfg)
    # the predicted batch-1 time saved the blocks and thresholds were chosen by, next to the measured FLOPs cut
    val_curve["time_saved_fraction_predicted"] = [simulate_exits(outputs, table, blocks, t, check_cost.fraction)[
        "time_saved_fraction"] for t in cfg.thresholds]
    test_curve = (_curve(net, test_set, test_reference, blocks, cfg)
                  if test_set is not None and test_reference is not None else None)
    rules = {"fast": (f"most batch-1 time saved (predicted) on validation with accuracy drop <= "
                      f"{cfg.max_drop_points} points and top-1 agreement >= {cfg.fast_min_agreement:.0%} with the "
                      "full network (decision heads counted)"
                      if labelled else f"most batch-1 time saved (predicted) on validation with top-1 agreement >= "
                                       f"{cfg.fast_min_agreement:.0%} with the full network (no labels)"),
             "faithful": (f"most batch-1 time saved (predicted) on validation with top-1 agreement >= "
                          f"{cfg.min_agreement:.0%} with the full network (decision heads counted)"
                          + agreement_margin_words(cfg.faithful_margin_se))}
    points = {}
    for name in ("fast", "faithful"):
        t = best[f"{name}_threshold"]
        points[name] = {"threshold": t, "blocks": list(blocks), "rule": rules[name],
                        "rule_met_on_validation": t is not None, "validation": curve_row(val_curve, t),
                        "test": curve_row(test_curve, t)}
    return ExitPoints(blocks, points, path, check_cost, val_curve, test_curve)
