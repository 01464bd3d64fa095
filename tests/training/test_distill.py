"""Heads distilled over the frozen published EfficientNet-Lite0, on a tiny Imagenette-shaped folder."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from skipviz import create_model
from skipviz.data import load_imagenette
from skipviz.evaluate import operating_point
from skipviz.training.distill import DistillConfig, distill_heads, with_extra_images
from skipviz.training.distill_export import HeadsExportConfig, export_heads

QUICK_CHECK_COST = dict(check_cost_inputs=2, check_cost_rounds=2)  # the exits' time model: a rough check cost


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
                                                plan_thresholds=(0.5,), exit_thresholds=(0.9,), plan_epochs=2,
                                                **QUICK_CHECK_COST),
                              dest=tmp_path / "data", data_root=str(tiny_imagenette))
    assert card["backbone"]["sha256"] and card["dataset"]["validation"]["carved_from"] == "train/"
    assert set(card["operating_points"]) == {"gates", "plan", "early_exit"}
    exits = card["early_exit"]  # the exits' blocks and default, chosen on validation (training/exit_points)
    assert exits["blocks_choice"][0]["blocks"] == list(range(15)) and 0.0 <= exits["default_threshold"] <= 1.0
    # the chosen blocks, or none where the default, timed at batch 1, saved no time (on these random photos)
    withdrawn = exits["blocks"] == []
    assert withdrawn or exits["blocks"] == exits["blocks_choice"][-1]["blocks"]
    chosen = exits["blocks_choice"][-1]["blocks"]
    unmet = all(p["threshold"] is None for p in card["operating_points"]["early_exit"].values())
    assert withdrawn == (exits.get("batch1_check", {}).get("saved_fraction", 1.0) <= 0 or unmet)
    assert exits["time_model"]["check_cost"]["check_ms"] >= 0.0 and exits["time_model"]["check_cost"]["checks"] == 15
    assert all(r["blocks"] == chosen for r in card["metrics_test"]["early_exit_curve"])
    assert create_model("efficientnet_lite0", weights=path).meta.source_options("early_exit")["blocks"] == \
        exits["blocks"]  # what policy_for builds the exits with
    assert card["training"]["cpu"] and card["classes"][701] == "parachute"
    # the gates' and the plan's points pay for their decisions, measured inside runs; without one: threshold 0
    gates, plan = card["default_policy"], card["plan"]
    assert gates["time_model"]["decision_cost"]["checks"] == 9 and plan["time_model"]["decision_cost"]["checks"] == 1
    for source, default in (("gates", gates["threshold"]), ("plan", plan["default_threshold"])):
        fast = card["operating_points"][source]["fast"]
        assert default == (fast["threshold"] if fast["threshold"] is not None else 0.0)
        if fast["threshold"] is not None:
            assert fast["validation"]["time_saved_fraction_predicted"] > 0
    assert all("time_saved_fraction_predicted" in r for r in card["metrics_validation"]["gate_curve"])
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
    # 10 of 1,000 images lost is a drop of exactly one point, whatever the float arithmetic makes of it
    at_bound = curve.assign(accuracy_drop_points=[0.0, 100 * (0.739 - 0.729), 2.0])
    assert at_bound["accuracy_drop_points"][1] > 1.0 and operating_point(at_bound, max_drop_points=1.0) == 0.3


@pytest.fixture(scope="module")
def other_photos(tmp_path_factory):
    """Five unlabelled images of other sizes in nested folders (what --extra-images points at)."""
    root = tmp_path_factory.mktemp("other")
    rng = np.random.default_rng(1)
    for k in range(5):
        d = root / f"set{k % 2}"
        d.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40 + k, 60, 3), dtype=np.uint8)).save(d / f"{k}.png")
    return root


def test_extra_images_join_the_training_split_only(tiny_imagenette, other_photos, tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPVIZ_CACHE", str(tmp_path / "cache"))
    net = create_model("efficientnet_lite0", plan=False)
    train = load_imagenette(tiny_imagenette, "train", progress=False)
    cfg = DistillConfig(data_root=str(tiny_imagenette), extra_images=str(other_photos), extra_limit=3)
    both = with_extra_images(cfg, net, train, progress=False)
    assert len(both) == len(train) + 3
    assert torch.equal(both.images[: len(train)], train.images) and both.images.shape[1:] == (3, 224, 224)
    assert (both.labels[len(train):] == -1).all() and torch.equal(both.labels[: len(train)], train.labels)
    extra = both.files[len(train):]
    assert all(f.startswith("extra:other") for f in extra) and len(set(extra)) == 3
    assert both.files_sha256 != train.files_sha256
    again = with_extra_images(cfg, net, train, progress=False)  # the same seeded choice
    assert again.files == both.files
    assert with_extra_images(DistillConfig(), net, train) is train


def test_distill_with_extra_images_records_them_in_the_card(tiny_imagenette, other_photos, tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPVIZ_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    cfg = DistillConfig(data_root=str(tiny_imagenette), out_dir=str(run), epochs=1, batch_size=4, val_size=4,
                        monitor_size=2, extra_images=str(other_photos), extra_limit=4)
    distill_heads(cfg, progress=False)
    teacher = torch.load(run / "teacher.pt", weights_only=True)
    assert teacher["logits"].shape[1] == 12 - 4 + 4  # the training split (12 - 4 validation) and the extras
    _, card = export_heads(HeadsExportConfig(run_dir=str(run), gate_thresholds=(0.5,), plan_thresholds=(0.5,),
                                             exit_thresholds=(0.9,), plan_epochs=1, **QUICK_CHECK_COST),
                           dest=tmp_path / "data", data_root=str(tiny_imagenette))
    assert card["dataset"]["train"]["extra_images"] == {"folder": str(other_photos), "limit": 4, "n": 4,
                                                        "labels_used": False}
    assert card["dataset"]["validation"]["n"] == 4
    assert "--extra-images" in card["reproduce"]


def test_a_fine_tuned_backbone_ships_whole_and_is_judged_against_the_published_one(tiny_imagenette, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.setenv("SKIPVIZ_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    cfg = DistillConfig(data_root=str(tiny_imagenette), out_dir=str(run), epochs=1, batch_size=4, val_size=4,
                        monitor_size=2, backbone_lr=1e-3)
    published = create_model("efficientnet_lite0", plan=False).state_dict()
    distill_heads(cfg, progress=False)
    ckpt = torch.load(run / "last.pt", weights_only=True)["heads"]
    assert set(published) <= set(ckpt)  # every tensor is saved, and the backbone did move
    assert not torch.equal(ckpt["blocks.1.block.conv_pw.weight"], published["blocks.1.block.conv_pw.weight"])
    record = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    assert record["train_full_kl"] > 0 and 0 <= record["val_full_agreement"] <= 1
    from skipviz.training import distill_export

    measured = []  # the network's tensors each time the export measures a curve
    curves = distill_export._curves
    monkeypatch.setattr(distill_export, "_curves", lambda net, *a, **k: (
        measured.append({n: v.detach().clone() for n, v in net.state_dict().items()}), curves(net, *a, **k))[1])
    path, card = export_heads(HeadsExportConfig(run_dir=str(run), gate_thresholds=(0.5,), plan_thresholds=(0.5,),
                                                exit_thresholds=(0.9,), plan_epochs=1, **QUICK_CHECK_COST),
                              dest=tmp_path / "data", data_root=str(tiny_imagenette))
    assert path.name == "efficientnet_lite0_imagenet_tuned_gated.safetensors"
    from safetensors.torch import load_file

    shipped_file = load_file(str(path))
    assert measured and set(shipped_file) == set(measured[0])
    for state in measured:  # what was measured is exactly what ships (the plan head fitted at export included)
        for name, value in state.items():
            assert torch.equal(shipped_file[name].to(value.dtype), value), name
    assert card["name"] == "efficientnet_lite0.imagenet_tuned_gated" and "--backbone-lr 0.001" in card["reproduce"]
    tuned = card["backbone"]["fine_tuned"]
    assert tuned["full_vs_published"]["test"]["n"] == 6 and 0 <= tuned["full_vs_published"]["test"]["agreement"] <= 1
    assert card["backbone"]["sha256"]  # the published file it started from
    net = create_model("efficientnet_lite0", weights=path)
    shipped = net.state_dict()
    key = "blocks.1.block.conv_pw.weight"
    torch.testing.assert_close(shipped[key], ckpt[key].half().float())  # float16 storage, float32 network
    # the curves' agreement is with the published network's answers, not the copy's own
    from skipviz import FullPolicy
    from skipviz.evaluate import evaluate_policy

    test_set = load_imagenette(tiny_imagenette, "val", progress=False)
    ref = evaluate_policy(create_model("efficientnet_lite0", plan=False), test_set, FullPolicy())
    own = evaluate_policy(net, test_set, FullPolicy())
    assert tuned["full_vs_published"]["test"]["agreement"] == pytest.approx(own.agreement(ref))
    assert card["metrics_test"]["published_full_accuracy"] == pytest.approx(ref.accuracy)
    # every curve in the card was measured on the shipped (rounded) tensors, the plan head fitted at export too
    from skipviz.evaluate import threshold_curve
    from skipviz.policies import PlanPolicy

    plan, _ = threshold_curve(net, test_set, [0.5], PlanPolicy, ref)
    assert plan.iloc[0]["agreement_with_full"] == pytest.approx(card["plan"]["curve_test"][0]["agreement_with_full"])
    assert plan.iloc[0]["flops_saved_fraction"] == pytest.approx(card["plan"]["curve_test"][0]["flops_saved_fraction"])


def test_a_run_is_not_resumed_as_another_kind_of_run(tiny_imagenette, tmp_path, monkeypatch):
    import dataclasses

    monkeypatch.setenv("SKIPVIZ_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    cfg = DistillConfig(data_root=str(tiny_imagenette), out_dir=str(run), epochs=1, batch_size=4, val_size=4,
                        monitor_size=2)
    distill_heads(cfg, progress=False)
    with pytest.raises(ValueError, match="backbone_lr=0.0, not 0.001.*--out"):
        distill_heads(dataclasses.replace(cfg, backbone_lr=1e-3), progress=False)
    # a run folder whose config claims a fine-tuned backbone but whose checkpoint holds heads only is not exported
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**saved, "backbone_lr": 1e-3}))
    with pytest.raises(ValueError, match="holds only heads"):
        export_heads(HeadsExportConfig(run_dir=str(run), gate_thresholds=(0.5,), plan_thresholds=(0.5,),
                                       exit_thresholds=(0.9,), plan_epochs=1, **QUICK_CHECK_COST),
                     dest=tmp_path / "data", data_root=str(tiny_imagenette))


def test_the_card_recommends_exits_only_when_their_faithful_point_saves_more():
    from skipviz.training.decision_points import default_source

    def point(t, cut, met=True):
        return {"threshold": t, "rule_met_on_validation": met, "validation": {"flops_saved_fraction": cut}}

    gates = {"fast": point(0.1, 0.04)}
    assert default_source({"gates": gates, "early_exit": {"faithful": point(0.9, 0.14)}}) == "early_exit"
    assert default_source({"gates": gates, "early_exit": {"faithful": point(0.9, 0.03)}}) == "gates"
    assert default_source({"gates": gates, "early_exit": {"faithful": point(0.9, 0.14, met=False)}}) == "gates"
    assert default_source({"gates": gates, "early_exit": {"faithful": {"threshold": None}}}) == "gates"
    assert default_source({"gates": {"fast": {"threshold": None}}, "early_exit": {"faithful": point(0.9, 0.1)}}) \
        == "early_exit"
