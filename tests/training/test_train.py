"""Training and export on a tiny generated ImageFolder (the real run is in the README)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from skipviz import create_model
from skipviz.data import augment, load_split, train_val_split
from skipviz.engine.heads import PlanHead
from skipviz.training import (PlanConfig, TrainConfig, export, export_plan, fit_plan_head, one_cycle_lr, rate_target,
                              train)
from skipviz.models.weights import CIFAR10_CLASSES


@pytest.fixture()
def tiny_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPVIZ_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        for k, name in enumerate(CIFAR10_CLASSES):
            d = tmp_path / "tiny" / split / name
            d.mkdir(parents=True)
            for i in range(n):
                arr = (rng.random((32, 32, 3)) * 60 + k * 19).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{i}.jpg")
    return tmp_path / "tiny"


def test_split_is_seeded_and_disjoint():
    a, b = train_val_split(100, 20, seed=3)
    a2, b2 = train_val_split(100, 20, seed=3)
    assert np.array_equal(a, a2) and np.array_equal(b, b2)
    assert len(set(a) & set(b)) == 0 and len(a) + len(b) == 100


def test_augment_keeps_shape_and_pixels():
    x = torch.randint(0, 255, (6, 3, 32, 32), dtype=torch.uint8)
    y = augment(x, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == torch.uint8
    assert set(y.unique().tolist()) <= set(x.unique().tolist()) | {0}


def test_schedules():
    assert one_cycle_lr(0, 100, 0.1) < one_cycle_lr(15, 100, 0.1) == pytest.approx(0.1)
    assert one_cycle_lr(100, 100, 0.1) == pytest.approx(0.0, abs=1e-9)
    cfg = TrainConfig(target_rate=0.4, rate_ramp=0.5)
    assert rate_target(0.0, cfg) == 1.0 and rate_target(0.25, cfg) == pytest.approx(0.7)
    assert rate_target(0.9, cfg) == 0.4


def test_train_resume_and_export(tiny_folder, tmp_path):
    cfg = TrainConfig(data_root=str(tiny_folder), epochs=1, batch_size=16, val_size=8, monitor_size=8,
                      out_dir=str(tmp_path / "run"))
    run = train(cfg, progress=False)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and {"train_loss", "val_full_acc", "val_gated_acc", "gate_rate"} <= set(log[0])
    cfg.epochs = 2
    train(cfg, progress=False)  # resumes at epoch 2 from last.pt
    assert len((run / "log.jsonl").read_text().splitlines()) == 2
    weights, card = export(cfg, run, thresholds=[0.3, 0.6], progress=False, dest=tmp_path / "data")
    assert weights.stat().st_size < 20 * 2**20
    on_disk = json.loads(weights.with_suffix(".json").read_text())
    assert on_disk["weights_sha256"] == card["weights_sha256"]
    assert on_disk["dataset"]["test"]["files_sha256"] == load_split(tiny_folder, "test").files_sha256
    m = on_disk["metrics_test"]
    assert {"full_accuracy", "gated_accuracy", "gated_flops_saved_fraction", "gate_curve", "early_exit_curve",
            "blocks_mean_correct", "per_class"} <= set(m)
    assert len(m["gate_curve"]) == 2 and on_disk["default_policy"]["threshold"] in (0.3, 0.6)
    net = create_model("cifar_resnet20", weights=weights)
    assert net.meta.card["name"] == "cifar_resnet20.cifar10_gated"


def test_plan_head_fit_learns_the_targets_and_folds_the_standardisation():
    torch.manual_seed(0)
    feats = torch.randn(512, 32) * 5 + 3  # far from standardised
    teacher = torch.nn.Linear(32, 3)
    targets = torch.sigmoid(teacher(feats) / 5).detach()
    head = PlanHead(2, [0, 1, 2], grid=4, hidden=16)
    losses = fit_plan_head(head, feats, targets, PlanConfig(epochs=30, batch_size=64, lr=1e-2))
    assert losses[-1] < losses[0]
    with torch.no_grad():
        pred = torch.sigmoid(head.fc2(torch.relu(head.fc1(feats))))  # raw features: standardisation folded in
    assert (pred - targets).abs().mean() < 0.05 and not head.training


def test_train_plan_on_an_exported_model(tiny_folder, tmp_path):
    cfg = TrainConfig(data_root=str(tiny_folder), epochs=1, batch_size=16, val_size=8, monitor_size=8,
                      out_dir=str(tmp_path / "run"))
    weights, _ = export(cfg, train(cfg, progress=False), thresholds=[0.5], progress=False, dest=tmp_path / "gated")
    plan_cfg = PlanConfig(weights=str(weights), data_root=str(tiny_folder), epochs=2, val_size=8, grid=2, hidden=8)
    path, card = export_plan(plan_cfg, progress=False, dest=tmp_path / "planned")
    assert path.name == weights.name and card["model_kwargs"]["plan"] is True
    plan = card["plan"]
    assert len(plan["curve_test"]) == 9 and plan["default_threshold"] in [r["threshold"] for r in plan["curve_test"]]
    assert 0.0 <= plan["validation"]["val_decision_agreement"] <= 1.0 and len(plan["training"]["loss_per_epoch"]) == 2
    assert card["flops"]["table"]["plan"] > 0
    net = create_model("cifar_resnet20", weights=path, **card["model_kwargs"])  # the head's size from the card
    assert net.plan_head.grid == 2 and net.plan_head.fc1.out_features == 8
    assert net.flop_table().plan == card["flops"]["table"]["plan"]
    gated = create_model("cifar_resnet20", weights=weights)  # the source is left as it was
    for name, value in gated.state_dict().items():
        assert torch.equal(value, net.state_dict()[name])
    export_plan(PlanConfig(weights=str(path), data_root=str(tiny_folder), epochs=1, val_size=8), progress=False,
                dest=tmp_path / "again")  # a model that already has a plan head is trained afresh
