"""Model metadata: the fast preprocessing equals torchvision's reference transform bit for bit."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from skipviz.models.weights import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, ModelMeta

ROOT = Path(__file__).resolve().parents[2]
CIFAR = ModelMeta("cifar", [str(i) for i in range(10)], (3, 32, 32), CIFAR10_MEAN, CIFAR10_STD, resize=32)
IMAGENET = ModelMeta("imagenet", [str(i) for i in range(10)], (3, 224, 224), IMAGENET_MEAN, IMAGENET_STD, resize=256)


@pytest.mark.parametrize("meta", [CIFAR, IMAGENET], ids=["cifar", "imagenet"])
@pytest.mark.parametrize("size", [(32, 32), (40, 40), (100, 37), (37, 100), (33, 32), (300, 225), (640, 480),
                                  (256, 256), (1, 1)])
def test_preprocess_equals_the_torchvision_transform_bit_for_bit(meta, size):
    rgb = (np.random.default_rng(sum(size)).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    image = Image.fromarray(rgb)
    expected = meta.transforms()(image)
    got = meta.preprocess(image)
    assert got.shape == (1, *meta.input_size) and got.dtype == torch.float32
    assert torch.equal(got[0], expected)


@pytest.mark.parametrize("meta", [CIFAR, IMAGENET], ids=["cifar", "imagenet"])
def test_pixels_stacked_and_normalised_at_once_equal_preprocess_bit_for_bit(meta):
    rng = np.random.default_rng(3)
    images = [Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)) for w, h in
              [(32, 32), (640, 480), (100, 37), (300, 225)]]
    pixels = [meta.pixels(im) for im in images]
    assert all(p.dtype == np.uint8 and p.shape == (*meta.input_size[1:], 3) and p.flags.writeable for p in pixels)
    batch = meta.normalize(torch.from_numpy(np.stack(pixels)))
    assert batch.is_contiguous(memory_format=torch.channels_last)  # the engine's layout
    assert torch.equal(batch, meta.preprocess(images))
    assert meta.pixels(Image.new("L", (64, 64))) is None  # not RGB: only the reference transform prepares it


def test_preprocess_batches_several_images():
    images = [Image.new("RGB", (64, 48), (255, 0, 0)), Image.new("RGB", (20, 90), (0, 0, 255))]
    x = CIFAR.preprocess(images)
    assert x.shape == (2, 3, 32, 32)
    red = CIFAR.denormalize(x[:1])
    assert torch.allclose(red[0, :, 5, 5], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)


def test_the_default_model_predicts_without_importing_torchvision():
    """The dashboard's first prediction must not wait for torchvision's import (about 2 s on 2 cores)."""
    code = ("import sys; from PIL import Image; import skipviz; from skipviz import dashboard, figures; "
            "from skipviz.evaluate import calibration; "
            "net = skipviz.create_model(skipviz.CIFAR_MODEL).eval(); "
            "x = net.meta.preprocess(Image.new('RGB', (300, 200))); net.run(x, skipviz.GatePolicy(0.5)).traces(); "
            "print('torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("text", ["[1]", "{not json", '"card"'])
def test_a_malformed_model_card_is_a_clear_error(tmp_path, text):
    from skipviz import CheckpointError
    from skipviz.models.weights import read_card

    card = tmp_path / "w.json"
    card.write_text(text)
    with pytest.raises(CheckpointError, match="model card"):
        read_card(card)


def test_default_threshold_survives_missing_or_null_sections():
    from skipviz import create_model

    meta = create_model("cifar_resnet20").meta
    for card in ({}, {"default_policy": None, "plan": None}, {"default_policy": [], "plan": "x"}):
        m = ModelMeta(**{**meta.__dict__, "card": card})
        assert m.default_threshold("gates") == 0.5 == m.default_threshold("plan")


def test_operating_point_records_carry_their_rule_and_whether_validation_met_it():
    from skipviz.models.weights import ModelMeta, OperatingPoint

    card = {"operating_points": {"gates": {
        "fast": {"threshold": 0.3, "rule": "largest cut within 0.5 points", "rule_met_on_validation": True},
        "faithful": {"threshold": 0.1, "rule": "largest cut at 99 % agreement", "rule_met_on_validation": False},
        "none": {"threshold": None}}, "plan": {"fast": {"threshold": 0.2}}}}
    toy = dict(arch="toy", classes=["a", "b"], input_size=(3, 8, 8), mean=(0.5,) * 3, std=(0.5,) * 3, resize=8)
    meta = ModelMeta(**toy, card=card)
    assert meta.operating_point_records("gates") == [
        OperatingPoint("fast", 0.3, "largest cut within 0.5 points", True),
        OperatingPoint("faithful", 0.1, "largest cut at 99 % agreement", False)]
    assert meta.operating_point_records("plan") == [OperatingPoint("fast", 0.2, "", True)]
    assert ModelMeta(**toy).operating_point_records() == []


def _meta(card: dict) -> ModelMeta:
    return ModelMeta(arch="efficientnet_lite0", input_size=(3, 224, 224), classes=["a", "b"],
                     mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize=256, card=card)


def test_card_rows_read_the_default_point_of_a_distilled_card_and_never_show_nan():
    point = {"threshold": 0.1, "accuracy": 0.7402, "flops_saved_fraction": 0.043, "agreement_with_full": 0.9514}
    card = {"metrics_test": {"full_accuracy": 0.7484},
            "default_policy": {"name": "gates", "threshold": 0.1, "operating_point": "fast"},
            "operating_points": {"gates": {"fast": {"threshold": 0.1, "validation": {}, "test": point}}}}
    rows = dict(_meta(card).card_rows())
    assert rows["test accuracy (gated)"] == "74.02% at threshold 0.10" and rows["FLOPs saved (gated, test)"] == "4.3%"
    assert rows["agreement with full (test)"] == "95.14%"
    empty = {**card, "operating_points": {"gates": {"fast": {"threshold": None, "validation": None, "test": None}}}}
    assert not any("nan" in v for _, v in _meta(empty).card_rows())
    assert "test accuracy (gated)" not in dict(_meta(empty).card_rows())
    # a fine-tuned copy says so, and its agreement is with the published network
    tuned = {**card, "metrics_test": {"full_accuracy": 0.75, "published_full_accuracy": 0.7484},
             "backbone": {"fine_tuned": {"full_vs_published": {"test": {"agreement": 0.97}}}}}
    rows = dict(_meta(tuned).card_rows())
    assert "97.00%" in rows["backbone"] and rows["test accuracy (published network)"] == "74.84%"
    assert rows["agreement with the published network (test)"] == "95.14%"


def test_card_rows_list_every_named_point_with_its_test_record():
    exit_test = {"threshold": 0.9, "accuracy": 0.752, "flops_saved_fraction": 0.14, "agreement_with_full": 0.9921}
    card = {"operating_points": {
        "gates": {"fast": {"threshold": 0.1, "test": {"threshold": 0.1, "accuracy": 0.74,
                                                      "flops_saved_fraction": 0.043, "agreement_with_full": 0.95}}},
        "early_exit": {"faithful": {"threshold": 0.9, "min_block": 6, "test": exit_test},
                       "fast": {"threshold": None, "min_block": 6, "test": None}},
        "oracle": {"fast": {"threshold": 0.5, "test": exit_test}}}}  # not a decision source: not shown
    rows = dict(_meta(card).card_rows())
    assert rows["faithful point, early exits (probe confidence after each block) (test)"] == (
        "threshold 0.90, from block 6: 14.0% of FLOPs saved, 99.21% agreement with full, accuracy 75.20%")
    assert rows["fast point, per-block gates (test)"].startswith("threshold 0.10: 4.3% of FLOPs saved")
    assert not any("oracle" in k or k.startswith("fast point, early") for k in rows)
    card["operating_points"]["early_exit"]["faithful"]["blocks"] = [6, 8, 11]  # cards since the exits' blocks
    assert dict(_meta(card).card_rows())["faithful point, early exits (probe confidence after each block) (test)"] \
        .startswith("threshold 0.90, exits after blocks 6, 8, 11: 14.0% of FLOPs saved")


def test_default_source_is_the_cards_when_the_network_offers_it():
    meta = _meta({"default_source": "early_exit"})
    assert meta.default_source(["gates", "plan", "early_exit"]) == "early_exit"
    assert meta.default_source(["gates", "plan"]) == "gates"  # no probe heads: the first offered
    assert meta.default_source() == "early_exit" and _meta({}).default_source() == "gates"
    assert _meta({"default_source": "oracle"}).default_source(["plan"]) == "gates"  # gates: full without gate heads
