"""Exporting a :func:`~skipviz.training.finetune.finetune` run: weights and model card with the threshold
curves (gates, plan, early exits) on the validation split and on ``test/``, and the two operating points chosen
on validation: **fast** (the largest FLOPs cut with an accuracy drop <= 0.5 points against the same full
network; the gates' default threshold) and **faithful** (the largest cut with >= 99 % top-1 agreement with it).

The card's default decision source (``default_source``) is the one, of the gates and the plan, whose fast point
saves the most batch-1 time on validation, predicted from a per-block profile measured at the start of the
export with every decision head's time counted: 24 gate decisions took 0.7 ms of a 3.0 ms batch-1 ResNet-56 run
on a 2-core AMD EPYC (about 30 us each inside the run), the plan head one decision per input.

The early exits on the probe heads are chosen as a distilled card's are
(:func:`~skipviz.training.decision_points.add_exit_points`: the blocks checked and the thresholds by the batch-1
time predicted with a check's measured cost, the accuracy bound of the gates' fast point); with no paying point
the exits' default checks nowhere.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..data import TensorDataset
from ..engine.network import SkipNetwork
from ..evaluate.loop import agreement_margin_words, evaluate_policy, operating_point, pick_threshold, within_drop
from ..measure.clock import device_info
from ..measure.predict import predict_latency
from ..measure.profile import BlockProfile, profile_blocks
from ..models._registry import create_model
from ..policies.threshold import policy_for
from .decision_points import add_exit_points
from .exit_points import ExitPointsConfig
from .export import export
from .finetune import FinetuneConfig
from .joint import TrainConfig, load_data
from .plan import PlanConfig, export_plan

__all__ = ["FinetuneExportConfig", "export_finetuned", "reproduce_command"]


@dataclass
class FinetuneExportConfig:
    """Exporting a :func:`finetune` run: thresholds of the gate curve, the operating-point rules, and the plan
    head fitted afterwards from the trained gates (:func:`skipviz.training.plan.export_plan`)."""

    run_dir: str = "runs/cifar_resnet56_gated"
    thresholds: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))
    max_drop_points: float = 0.5  # "fast": largest FLOPs cut with at most this accuracy drop vs full
    min_agreement: float = 0.99  # "faithful": largest FLOPs cut with at least this top-1 agreement with full
    faithful_margin_se: float = 1.0  # ... with this many standard errors to spare (skipviz.evaluate.agreement_meets)
    plan: bool = True
    plan_epochs: int = 40
    progress: bool = True
    profile_repeats: int = 15  # the batch-1 profile behind default_source (skipviz.measure.profile.profile_blocks)
    profile_min_repeat_s: float = 0.01


#: The FinetuneConfig fields ``skipviz finetune`` sets from its arguments (the others keep their defaults).
_COMMAND_FIELDS = {"arch", "init", "data_root", "epochs", "seed", "target_rate", "batch_size", "val_size", "out_dir",
                   "threads", "autocast_bf16", "limit_train", "model_kwargs"}


def reproduce_command(cfg: FinetuneConfig) -> str:
    """The command that trains (or resumes) ``cfg``'s run and exports it: ``skipviz finetune ... --export`` when its
    arguments can say every setting that differs from the defaults, else the same through Python."""
    default = FinetuneConfig()
    if any(getattr(cfg, k) != getattr(default, k) for k in asdict(cfg) if k not in _COMMAND_FIELDS):
        return ("python -c \"import json; from skipviz.training.finetune import FinetuneConfig, finetune; "
                "from skipviz.training.finetune_export import FinetuneExportConfig, export_finetuned; "
                f"finetune(FinetuneConfig(**json.load(open('{cfg.out_dir}/config.json')))); "
                f"export_finetuned(FinetuneExportConfig(run_dir='{cfg.out_dir}'))\"")
    args = [f"--arch {cfg.arch}", f"--epochs {cfg.epochs}", f"--seed {cfg.seed}", f"--target-rate {cfg.target_rate}",
            f"--batch-size {cfg.batch_size}", f"--val-size {cfg.val_size}", f"--out {cfg.out_dir}"]
    args += [f"--threads {cfg.threads}"] if cfg.threads else []
    args += [f"--init {cfg.init}"] if cfg.init else []
    args += [f"--data {cfg.data_root}"] if cfg.data_root else []
    args += [f"--limit-train {cfg.limit_train}"] if cfg.limit_train else []
    args += ["--bf16"] if cfg.autocast_bf16 else []
    return f"skipviz finetune {' '.join(args)} --export"


def _row(rows: list[dict], threshold: float) -> dict:
    return next(r for r in rows if r["threshold"] == threshold)


def _operating_points(val_rows: list[dict], test_rows: list[dict], fast: float, cfg: FinetuneExportConfig) -> dict:
    """``{"fast": {...}, "faithful": {...}}`` for one decision source: the threshold, its test metrics (flat),
    its validation metrics, the rule and whether the validation curve met it."""
    val = pd.DataFrame(val_rows)
    fast = fast if fast is not None else pick_threshold(val, cfg.max_drop_points)
    faithful = operating_point(val, min_agreement=cfg.min_agreement, margin_se=cfg.faithful_margin_se)
    met_faithful = faithful is not None
    if faithful is None:  # the closest the curve comes: the threshold of highest agreement
        faithful = float(val.sort_values(["agreement_with_full", "threshold"], ascending=[False, True]).iloc[0]["threshold"])
    points = {}
    for name, t, rule, met in (
            ("fast", fast, f"largest FLOPs cut on validation with accuracy drop <= {cfg.max_drop_points} points vs "
                           "the same full network (decision heads counted)",
             within_drop(_row(val_rows, fast)["accuracy_drop_points"], cfg.max_drop_points)),
            ("faithful", faithful, f"largest FLOPs cut on validation with top-1 agreement >= {cfg.min_agreement:.0%} "
                                   "with the same full network (decision heads counted)"
                                   + agreement_margin_words(cfg.faithful_margin_se), met_faithful)):
        test = {k: v for k, v in _row(test_rows, t).items() if k != "threshold"}
        points[name] = {"threshold": t, **test, "validation": _row(val_rows, t), "rule": rule,
                        "rule_met_on_validation": bool(met)}
    return points


def _default_source(net: SkipNetwork, val_set: TensorDataset, points: dict, profile: BlockProfile) -> dict:
    """The card's ``default_source`` section: of the sources with operating points, the one whose fast point saves
    the most batch-1 time on the validation split, predicted from ``profile`` (a batch-1 profile of the network)
    with every gate decision (or the plan head, once) counted; each source's predicted time saved."""
    L = net.num_blocks
    full_ms = predict_latency(profile, np.ones(L), np.zeros(L))
    saved = {}
    for source, point in points.items():
        executed = evaluate_policy(net, val_set, policy_for(net, source, point["fast"]["threshold"])).executed
        ms = predict_latency(profile, executed.mean(0), planned=source == "plan")
        saved[source] = {"threshold": point["fast"]["threshold"], "predicted_ms": ms,
                         "predicted_time_saved_fraction": 1.0 - ms / full_ms}
    best = max(saved, key=lambda k: saved[k]["predicted_time_saved_fraction"])
    return {"source": best, "predicted_full_ms": full_ms, "fast_points": saved,
            "rule": "the decision source whose fast point saves the most batch-1 time on validation, predicted from "
                    "the per-block profile (skipviz.measure.predict.predict_latency; gate decisions, or the plan "
                    "head once, counted)",
            "profile": {"device": profile.info.to_dict(), "full_ms": profile.full_ms, "gate_ms": list(profile.gate_ms),
                        "plan_ms": profile.plan_ms, "block_ms": list(profile.block_ms)}}


def _training_section(run_dir: Path, fcfg: FinetuneConfig, log: list[dict]) -> dict:
    speed = run_dir / "speed.json"
    init_card = json.loads((run_dir / "init" / f"{fcfg.arch}_akamaster.json").read_text())
    return {"method": "fine-tuned from the imported public checkpoint: backbone, gate and probe heads jointly; "
                      "full-path CE + KL(full || gated) distillation + FLOPs-rate loss (skipviz.training.finetune)",
            "start": "the public checkpoint (measured here: 83.1% on the JPEG test/ before, plain fine-tuning "
                     "89.6% after 2 epochs), not from scratch: a from-scratch ResNet-56 needs far more CPU hours",
            "config": asdict(fcfg), "epochs_run": sum(1 for r in log if r.get("epoch", 0) > 0), "log": log,
            "hours": sum(r.get("seconds", 0.0) for r in log) / 3600, "init": init_card["source"],
            "speed": json.loads(speed.read_text()) if speed.is_file() else None,
            "device": "cpu", "cpu": device_info("cpu").device_name, "threads": fcfg.threads}


def export_finetuned(cfg: FinetuneExportConfig, dest: Path | None = None) -> tuple[Path, dict]:
    """Evaluate a finished :func:`finetune` run and write ``<arch>_cifar10_gated.safetensors`` + card to ``dest``
    (default ``data/``) with :func:`skipviz.training.export.export` (threshold curves on validation and ``test/``, blocks
    used by right vs wrong predictions, per class, early-exit curve), then the plan head
    (:func:`skipviz.training.plan.export_plan`) and the card's ``operating_points``: ``fast`` (the gates' default
    threshold) and ``faithful``, chosen on validation, reported on ``test/``."""
    run_dir = Path(cfg.run_dir)
    fcfg = FinetuneConfig(**json.loads((run_dir / "config.json").read_text()))
    tcfg = TrainConfig(arch=fcfg.arch, data_root=fcfg.data_root, epochs=fcfg.epochs, val_size=fcfg.val_size,
                       seed=fcfg.seed, limit_train=fcfg.limit_train, out_dir=str(run_dir),
                       model_kwargs=fcfg.model_kwargs)
    # first, while the machine is quiet: the default source is chosen by the batch-1 time predicted from it
    profile = profile_blocks(create_model(tcfg.arch, **(fcfg.model_kwargs or {}), plan=cfg.plan).eval(), 1,
                             repeats=cfg.profile_repeats, min_repeat_s=cfg.profile_min_repeat_s)
    weights_path, card = export(tcfg, run_dir, thresholds=list(cfg.thresholds), progress=cfg.progress, dest=dest)
    if cfg.plan:
        weights_path, card = export_plan(PlanConfig(arch=fcfg.arch, weights=str(weights_path), data_root=fcfg.data_root,
                                                    epochs=cfg.plan_epochs, val_size=fcfg.val_size, seed=fcfg.seed,
                                                    limit_train=fcfg.limit_train),
                                         progress=cfg.progress, dest=weights_path.parent)
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    card["training"] = _training_section(run_dir, fcfg, log)
    card["source"] = card["training"]["init"]
    card["license"] = json.loads((run_dir / "init" / f"{fcfg.arch}_akamaster.json").read_text())["license"]
    points = {"gates": _operating_points(card["metrics_validation"]["gate_curve"], card["metrics_test"]["gate_curve"],
                                         card["default_policy"]["threshold"], cfg)}
    if cfg.plan:
        points["plan"] = _operating_points(card["plan"]["validation"]["curve"], card["plan"]["curve_test"],
                                           card["plan"]["default_threshold"], cfg)
    card["operating_points"] = points
    card["default_policy"]["operating_point"] = "fast"
    net = create_model(tcfg.arch, weights=str(weights_path)).eval()
    _, val_set, test_set = load_data(tcfg)
    choice = _default_source(net, val_set, points, profile)
    card["default_source"], card["default_source_choice"] = choice["source"], choice
    if net.probes is not None:
        add_exit_points(net, card, val_set, test_set, ExitPointsConfig(max_drop_points=cfg.max_drop_points))
    card["reproduce"] = reproduce_command(fcfg)
    weights_path.with_suffix(".json").write_text(json.dumps(card, indent=2))
    return weights_path, card
