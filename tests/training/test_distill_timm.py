"""Heads distilled from a user's frozen timm network (skipviz train --model timm:NAME): a tiny random-init
ResNet saved as the user's weights file, on tiny image folders made here (labelled and unlabelled)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from skipviz import create_model
from skipviz.training.distill import DistillConfig, distill_heads
from skipviz.training.distill_export import HeadsExportConfig, export_heads

TINY = dict(layers=(2, 2, 1, 1), channels=(8, 16, 24, 32), zero_init_last=False)
EXPORT = dict(gate_thresholds=(0.3, 0.5), plan_thresholds=(0.5,), exit_thresholds=(0.9,), plan_epochs=2, batch_size=8,
              check_cost_inputs=2, check_cost_rounds=2)


def _images(d, n, rng, size=(40, 36)):
    d.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(d / f"{k}.png")


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    """The user's trained network: a tiny timm ResNet (3 classes) saved as safetensors."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=3, **TINY)
    path = tmp_path_factory.mktemp("user") / "my_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for c in ("cat", "dog", "owl"):
            _images(root / split / c, n, rng)
    return root


def _cfg(tmp_path, backbone, data, **kw) -> DistillConfig:
    return DistillConfig(model="timm:resnet18", weights=str(backbone), data_root=str(data), out_dir=str(tmp_path / "run"),
                         model_kwargs={"input_size": 32, "classes": ["cat", "dog", "owl"], **TINY}, epochs=1,
                         batch_size=4, val_fraction=0.25, monitor_size=4, **kw)


def test_distil_export_and_open_a_timm_models_heads(backbone, folder, tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPVIZ_CACHE", str(tmp_path / "cache"))
    cfg = _cfg(tmp_path, backbone, folder)
    distill_heads(cfg, progress=False)
    distill_heads(cfg, progress=False)  # finished: resuming does nothing more
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 1
    path, card = export_heads(HeadsExportConfig(run_dir=str(tmp_path / "run"), **EXPORT), dest=tmp_path / "data")
    assert path.name == "timm_resnet18_heads.safetensors"
    assert card["backbone"]["sha256"] and card["backbone"]["path"] == str(backbone.resolve())
    assert card["dataset"]["test"]["n"] == 6 and card["dataset"]["validation"]["n"] == 4
    assert card["metrics_test"]["full_accuracy"] is not None and card["training"]["labels_used"] is False
    assert set(card["operating_points"]) == {"gates", "plan", "early_exit"} and card["model"] == "timm:resnet18"
    net = create_model("timm:resnet18", weights=path)
    assert net.plan_head is not None and net.gated_blocks and net.probes is not None
    assert net.meta.classes == ["cat", "dog", "owl"] and net.meta.default_threshold() == card["default_policy"]["threshold"]
    user = create_model("timm:resnet18", weights=backbone, input_size=32, **TINY)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), user(x))  # the user's backbone is untouched
        net.run(x, __import__("skipviz").PlanPolicy(0.5))
    # the dashboard's upload path: the heads file alone (its card rides in the safetensors metadata)
    from skipviz import dashboard

    lm = dashboard.load_uploaded_weights("timm:resnet18", path.read_bytes(), path.name)
    assert lm.net.meta.operating_points() == net.meta.operating_points() and lm.net.plan_head is not None


def test_unlabelled_images_and_a_plain_folder(backbone, tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPVIZ_CACHE", str(tmp_path / "cache"))
    _images(tmp_path / "photos", 10, np.random.default_rng(1), size=(30, 50))
    cfg = _cfg(tmp_path, backbone, tmp_path / "photos")
    distill_heads(cfg, progress=False)
    path, card = export_heads(HeadsExportConfig(run_dir=str(tmp_path / "run"), **EXPORT), dest=tmp_path / "data")
    assert card["dataset"]["test"] is None and card["metrics_validation"]["full_accuracy"] is None
    assert "no labels" in card["default_policy"]["rule"]
    assert json.loads(path.with_suffix(".json").read_text())["weights_sha256"] == card["weights_sha256"]


def test_the_cli_trains_a_timm_model(backbone, folder, tmp_path, monkeypatch, capsys):
    from skipviz.cli import main

    monkeypatch.setenv("SKIPVIZ_CACHE", str(tmp_path / "cache"))
    rc = main(["train", "--model", "timm:resnet18", "--weights", str(backbone), "--data", str(folder),
               "--classes-from-folders", "--input-size", "32", "--timm-kwargs", json.dumps(TINY), "--epochs", "1",
               "--batch-size", "4", "--out", str(tmp_path / "cli_run")])
    assert rc == 0
    cfg = json.loads((tmp_path / "cli_run" / "config.json").read_text())
    assert cfg["model_kwargs"]["classes"] == ["cat", "dog", "owl"] and cfg["val_fraction"] == 0.2


def test_a_model_without_weights_is_refused(tmp_path):
    with pytest.raises(ValueError, match="give its weights file"):
        distill_heads(DistillConfig(model="timm:resnet18", data_root=str(tmp_path), out_dir=str(tmp_path / "r")),
                      progress=False)
