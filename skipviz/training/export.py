"""Exporting a trained gated model for the registry: the weights (safetensors) and the model card (JSON) with
every number measured on ``test/`` and the FLOP table the engine reads back."""
from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from ..engine.flops import FlopTable, count_network_flops
from ..engine.network import SkipNetwork
from ..evaluate.loop import blocks_by_outcome, early_exit_policy, evaluate_policy, pick_threshold, threshold_curve
from ..measure.clock import software_versions
from ..models._registry import create_model, data_dir
from ..models.weights import read_card, sha256_file
from ..policies.simple import FullPolicy
from .joint import TrainConfig, load_data, pick_device

__all__ = ["card_flops", "export", "refresh_card_flops", "save_weights", "software_versions"]


def card_flops(table: FlopTable) -> dict:
    """The model card's ``flops`` section: headline numbers plus the whole per-part table
    (:meth:`SkipNetwork.flop_table` reads it back instead of counting again)."""
    raw = table.to_dict()
    return {"full": table.full, "per_block": raw["blocks"], "gates": raw["gates"],
            "gate_fraction_of_full": sum(table.gates.values()) / table.full,
            "counter": "torch.utils.flop_counter.FlopCounterMode (2 FLOPs per multiply-add), "
                       f"{table.input_hw[0]}x{table.input_hw[1]} input",
            "table": raw}


def refresh_card_flops(card_path: str | Path) -> dict:
    """Recount the FLOPs of a shipped model and rewrite its card's ``flops`` section (nothing else changes).

    ``python -c "from skipviz.training.export import refresh_card_flops as r; r('data/cifar_resnet20_cifar10_gated.json')"``
    """
    card_path = Path(card_path)
    card = read_card(card_path)
    net = create_model(card["name"]).eval()
    card["flops"] = card_flops(count_network_flops(net, tuple(net.meta.input_size[-2:])))
    card_path.write_text(json.dumps(card, indent=2))
    return card["flops"]


def save_weights(net: SkipNetwork, path: Path, arch: str) -> None:
    """Write ``net``'s state dict (on the CPU, contiguous) to ``path`` as safetensors."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(path), metadata={"arch": arch, "format": "skipviz.SkipNetwork"})


def export(cfg: TrainConfig, run_dir: Path, thresholds: list[float] | None = None, progress: bool = True,
           dest: Path | None = None) -> tuple[Path, dict]:
    """Evaluate a finished run and write ``<arch>_cifar10_gated.safetensors`` + model card JSON to ``data/``.

    The default threshold is chosen on the validation split (largest FLOPs cut with an accuracy drop
    <= 0.5 points against the full network); every number in the card is measured on ``test/``.
    """
    device = pick_device()
    train_set, val_set, test_set = load_data(cfg)
    net = create_model(cfg.arch, **cfg.model_kwargs).to(device)
    ckpt = torch.load(Path(run_dir) / "last.pt", map_location=device, weights_only=True)
    net.load_state_dict(ckpt["model"])
    net.eval()
    thresholds = thresholds or [round(t, 2) for t in np.linspace(0.1, 0.9, 9)]
    m = _export_metrics(net, val_set, test_set, thresholds, progress)
    dest = dest or data_dir()
    dest.mkdir(parents=True, exist_ok=True)
    weights_path = dest / f"{cfg.arch}_cifar10_gated.safetensors"
    save_weights(net, weights_path, cfg.arch)
    log = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines() if line.strip()]
    card = _gated_card(cfg, net, (train_set, val_set, test_set), m, log, device)
    card["weights_sha256"] = sha256_file(weights_path)
    card_path = weights_path.with_suffix(".json")
    card_path.write_text(json.dumps(card, indent=2))
    return weights_path, card


def _export_metrics(net: SkipNetwork, val_set, test_set, thresholds: list[float], progress: bool) -> dict:
    """The card's measurements: the full network and the gate curve on validation (the default threshold chosen
    there), the full network, the gate and early-exit curves and blocks by outcome on test."""
    val_full = evaluate_policy(net, val_set, FullPolicy(), progress=progress)
    val_curve, _ = threshold_curve(net, val_set, thresholds, reference=val_full, progress=progress)
    default_t = pick_threshold(val_curve)
    test_full = evaluate_policy(net, test_set, FullPolicy(), progress=progress)
    test_curve, test_evals = threshold_curve(net, test_set, thresholds, reference=test_full, progress=progress)
    gated = test_evals[thresholds.index(default_t)]
    exit_thresholds = [0.6, 0.8, 0.9, 0.99]
    exit_curve, _ = threshold_curve(net, test_set, exit_thresholds, make_policy=early_exit_policy,
                                    reference=test_full, progress=progress)
    outcome, per_class = blocks_by_outcome(gated, test_set.classes)
    return dict(val_full=val_full, val_curve=val_curve, default_t=default_t, test_full=test_full,
                test_curve=test_curve, gated=gated, exit_curve=exit_curve, outcome=outcome, per_class=per_class)


def _gated_card(cfg: TrainConfig, net: SkipNetwork, sets: tuple, m: dict, log: list, device: torch.device) -> dict:
    """The model card of an exported gated model (``weights_sha256`` filled in once the file is written)."""
    train_set, val_set, test_set = sets
    test_full, gated, default_t, outcome = m["test_full"], m["gated"], m["default_t"], m["outcome"]
    return {
        "name": f"{cfg.arch}.cifar10_gated",
        "architecture": {"arch": cfg.arch, "blocks": net.num_blocks, "gated_blocks": net.gated_blocks,
                         "block_names": net.block_names, "params": sum(p.numel() for p in net.parameters())},
        "model_kwargs": cfg.model_kwargs,
        "dataset": {"name": "CIFAR-10 (JPEG ImageFolder)", "root_basename": Path(val_set.root).name,
                    "train": {"n": len(train_set), "files_sha256": train_set.files_sha256},
                    "validation": {"n": len(val_set), "seed": cfg.seed, "files_sha256": val_set.files_sha256,
                                   "carved_from": "train/"},
                    "test": {"n": len(test_set), "files_sha256": test_set.files_sha256}},
        "training": {"config": asdict(cfg), "epochs_run": len(log), "log": log,
                     "device": str(device), "hardware_note": "trained on CPU (2 cores) - no GPU was available"
                     if device.type == "cpu" else "trained on GPU"},
        "default_policy": {"name": "gates", "threshold": default_t,
                           "rule": "largest FLOPs cut on validation with accuracy drop <= 0.5 points vs full"},
        "flops": card_flops(net.flop_table()),
        "metrics_test": {
            "full_accuracy": test_full.accuracy,
            "gated_accuracy": gated.accuracy,
            "gated_threshold": default_t,
            "gated_flops_mean": gated.flops_mean,
            "gated_flops_saved_fraction": gated.flops_saved_fraction,
            "gated_blocks_mean": gated.blocks_mean,
            "accuracy_drop_points": 100 * (test_full.accuracy - gated.accuracy),
            "agreement_with_full": gated.agreement(test_full),
            "blocks_mean_correct": outcome["correct"],
            "blocks_mean_wrong": outcome["wrong"],
            "per_class": m["per_class"].to_dict(orient="records"),
            "gate_curve": m["test_curve"].to_dict(orient="records"),
            "early_exit_curve": m["exit_curve"].to_dict(orient="records"),
        },
        "metrics_validation": {"full_accuracy": m["val_full"].accuracy,
                               "gate_curve": m["val_curve"].to_dict(orient="records")},
        "software": software_versions(),
        "weights_sha256": None,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "reproduce": f"skipviz train --arch {cfg.arch} --epochs {cfg.epochs} --seed {cfg.seed} --export",
    }
