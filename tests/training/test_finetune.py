"""Fine-tuning an imported public CIFAR ResNet into a gated network, end to end on a tiny model and tiny data:
training, resuming, the speed and precision checks, and the export with its operating points."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from skipviz import create_model
from skipviz.policies import GatePolicy
from skipviz.training.finetune import FinetuneConfig, compare_precision, finetune, measure_step_speed
from skipviz.training.exit_points import ExitPointsConfig
from skipviz.training.finetune_export import FinetuneExportConfig, export_finetuned
from skipviz.models.weights import CIFAR10_CLASSES, IMAGENET_MEAN



def _image_folder(root, per_class: dict[str, int]):
    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for c, name in enumerate(CIFAR10_CLASSES):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):  # class-dependent colour so that there is something to learn
                base = np.full((32, 32, 3), 20 * c, dtype=np.int16)
                img = np.clip(base + rng.integers(0, 60, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    return root


def _akamaster_file(path, depth: int = 20):
    """A random cifar_resnet<depth> saved in the public checkpoints' layout (``module.`` keys, legacy format)."""
    torch.manual_seed(0)
    net = create_model(f"cifar_resnet{depth}", gates=False, probes=False)
    n = (depth - 2) // 6
    sd = {}
    for k, v in net.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        part, rest = k.split(".", 1)
        if part == "stem":
            index, rest = rest.split(".", 1)
            k = f"{'conv1' if index == '0' else 'bn1'}.{rest}"
        elif part == "blocks":
            index, rest = rest.split(".", 1)
            k = f"layer{int(index) // n + 1}.{int(index) % n}.{rest}"
        else:
            k = "linear." + rest.split(".", 1)[1]
        sd[f"module.{k}"] = v.contiguous() + (0.05 * torch.randn_like(v) if k.endswith("bn2.weight") else 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / "LICENSE").write_text("test licence notice")
    torch.save({"best_prec1": 90.0, "state_dict": sd}, path, _use_new_zipfile_serialization=False)
    return path


@pytest.fixture()
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPVIZ_CACHE", str(tmp_path / "cache"))
    root = _image_folder(tmp_path / "cifar", {"train": 5, "test": 2})
    src = _akamaster_file(tmp_path / "weights" / "resnet20-test.th")
    cfg = FinetuneConfig(arch="cifar_resnet20", init=str(src), data_root=str(root), out_dir=str(tmp_path / "run"),
                         epochs=2, batch_size=10, val_size=10, threads=1, target_rate=0.5)
    return cfg, tmp_path


def test_finetune_resume_and_export(tiny, capsys):
    cfg, tmp_path = tiny
    run = finetune(cfg, progress=False)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2]
    for key in ("val_full_acc", "val_gated_acc_t0.5", "val_agreement_t0.5"):
        assert all(0 <= r[key] <= 1 for r in log)
    assert all(-0.01 <= r["val_flops_saved_t0.5"] < 1 for r in log)  # < 0: every block ran, gate heads counted
    assert log[-1]["rate_target"] == pytest.approx(0.5) and "train_kl" in log[-1]
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and {"model", "optimizer", "generator", "torch_rng"} <= set(ckpt)
    longer = FinetuneConfig(**{**json.loads((run / "config.json").read_text()), "epochs": 3})
    finetune(longer, progress=False)
    assert "resumed from" in capsys.readouterr().out
    assert [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()] == [0, 1, 2, 3]

    (run / "speed.json").write_text(json.dumps({"float32": {"img_per_s": 1.0}}))
    path, card = export_finetuned(FinetuneExportConfig(run_dir=str(run), thresholds=(0.3, 0.5, 0.7), plan_epochs=2,
                                                       progress=False, profile_repeats=3, profile_min_repeat_s=0.001),
                                  dest=tmp_path / "data")
    assert path.name == "cifar_resnet20_cifar10_gated.safetensors"
    assert json.loads(path.with_suffix(".json").read_text()) == card
    gates = card["operating_points"]["gates"]
    assert card["default_policy"]["threshold"] == gates["fast"]["threshold"]
    for point in ("fast", "faithful"):
        assert gates[point]["threshold"] in (0.3, 0.5, 0.7)
        assert {"accuracy", "flops_saved_fraction", "agreement_with_full", "validation", "rule"} <= set(gates[point])
    assert set(card["operating_points"]["plan"]) == {"fast", "faithful"}
    assert card["license"]["notice"] == "test licence notice"
    assert card["source"]["file"] == "resnet20-test.th" and card["source"]["best_prec1"] == 90.0
    assert card["training"]["speed"] == {"float32": {"img_per_s": 1.0}} and card["training"]["epochs_run"] == 3
    assert {"blocks_mean_correct", "blocks_mean_wrong", "per_class", "early_exit_curve"} <= set(card["metrics_test"])
    # the exits chosen as a distilled card's, within the gates' accuracy bound; the curves at the blocks chosen
    exits = card["early_exit"]
    assert exits["time_model"]["check_cost"]["source"] == "early_exit" and "blocks_choice" in exits
    assert set(card["operating_points"]["early_exit"]) == {"fast", "faithful"}
    assert "0.5 points" in card["operating_points"]["early_exit"]["fast"]["rule"]
    assert {r["threshold"] for r in card["metrics_test"]["early_exit_curve"]} == set(ExitPointsConfig.thresholds)
    # the default source: the one whose fast point saves the most predicted batch-1 time on validation
    choice = card["default_source_choice"]
    assert set(choice["fast_points"]) == {"gates", "plan"} and card["default_source"] == choice["source"]
    saved = {k: v["predicted_time_saved_fraction"] for k, v in choice["fast_points"].items()}
    assert saved[card["default_source"]] == max(saved.values())
    assert choice["fast_points"]["plan"]["threshold"] == card["operating_points"]["plan"]["fast"]["threshold"]
    net = create_model("cifar_resnet20", weights=path)
    assert net.meta.default_source(["gates", "plan", "early_exit"]) == card["default_source"]
    assert net.meta.mean == IMAGENET_MEAN and net.gated_blocks and net.plan_head is not None
    assert net.meta.default_threshold() == gates["fast"]["threshold"]
    net.run(torch.randn(2, 3, 32, 32), GatePolicy(gates["faithful"]["threshold"]))


def test_speed_and_precision_checks(tiny):
    cfg, _ = tiny
    speed = measure_step_speed(cfg, steps=1, warmup=0)
    assert speed["img_per_s"] > 0 and speed["batch_size"] == cfg.batch_size
    rows = compare_precision(cfg, steps=2, progress=False)
    assert [r["precision"] for r in rows] == ["float32", "bf16 autocast"]
    assert all(0 <= r["val_full_acc"] <= 1 and r["steps"] == 2 for r in rows)



def test_finetune_command_trains_and_exports(tiny, capsys):
    from skipviz.cli import main

    cfg, tmp_path = tiny
    rc = main(["finetune", "--arch", "cifar_resnet20", "--init", cfg.init, "--data", cfg.data_root, "--out",
               cfg.out_dir, "--epochs", "1", "--batch-size", "10", "--val-size", "10", "--threads", "1",
               "--target-rate", "0.5", "--export", "--dest", str(tmp_path / "data")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "fast (gates" in out and "faithful (gates" in out
    card = json.loads((tmp_path / "data" / "cifar_resnet20_cifar10_gated.json").read_text())
    assert card["training"]["epochs_run"] == 1 and card["operating_points"]["gates"]["fast"]["threshold"] > 0
