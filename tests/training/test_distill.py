"""Heads distilled over the frozen published EfficientNet-Lite0, on a tiny Imagenette-shaped folder."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from skipviz import create_model
from skipviz.data import load_imagenette
from skipviz.training.distill import DistillConfig, distill_heads
from skipviz.training.distill_export import HeadsExportConfig, export_heads, operating_point


@pytest.fixture(scope="module")
def tiny_imagenette(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenette")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 3)):
        for wnid in ("n01440764", "n03888257"):  # tench, parachute
            d = root / split / wnid
            d.mkdir(parents=True)
            for k in range(n):
                Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(d / f"{k}.JPEG")
    return root


def test_labels_are_imagenet_indices(tiny_imagenette, tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPVIZ_CACHE", str(tmp_path))
    data = load_imagenette(tiny_imagenette, "val", progress=False)
    assert sorted(set(data.labels.tolist())) == [0, 701]
    assert data.images.shape == (6, 3, 224, 224)


def test_distill_then_export_keeps_the_backbone_and_writes_a_card(tiny_imagenette, tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPVIZ_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    cfg = DistillConfig(data_root=str(tiny_imagenette), out_dir=str(run), epochs=1, batch_size=4, val_size=4,
                        monitor_size=2)
    before = create_model("efficientnet_lite0", plan=False).state_dict()
    distill_heads(cfg, progress=False)
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert all(k.startswith(("gates.", "probes.")) for k in ckpt["heads"])
    distill_heads(cfg, progress=False)  # finished: resuming does nothing more
    assert len((run / "log.jsonl").read_text().splitlines()) == 1
    path, card = export_heads(HeadsExportConfig(run_dir=str(run), gate_thresholds=(0.3, 0.5),
                                                plan_thresholds=(0.5,), exit_thresholds=(0.9,), plan_epochs=2),
                              dest=tmp_path / "data", data_root=str(tiny_imagenette))
    assert card["backbone"]["sha256"] and card["dataset"]["validation"]["carved_from"] == "train/"
    assert set(card["operating_points"]) == {"gates", "plan"}
    assert card["training"]["cpu"] and card["classes"][701] == "parachute"
    net = create_model("efficientnet_lite0", weights=path)
    assert net.plan_head is not None
    after = net.state_dict()
    for k, v in before.items():
        if not k.startswith(("gates.", "probes.", "plan_head.")):
            assert torch.equal(v, after[k]), k  # the published backbone is untouched


def test_operating_point_picks_the_largest_cut_meeting_the_bound():
    import pandas as pd

    curve = pd.DataFrame({"threshold": [0.1, 0.3, 0.5], "flops_saved_fraction": [0.1, 0.2, 0.4],
                          "accuracy_drop_points": [0.0, 0.8, 2.0], "agreement_with_full": [1.0, 0.99, 0.9]})
    assert operating_point(curve, max_drop_points=1.0) == 0.3
    assert operating_point(curve, min_agreement=0.995) == 0.1
    assert operating_point(curve, min_agreement=0.999999) == 0.1
    assert operating_point(curve.iloc[2:], max_drop_points=1.0) is None
