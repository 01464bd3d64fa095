"""timm networks wrapped as skippable networks (skipviz.models.timm_wrap): tiny random-init variants of each
family, built by timm itself with small depths and widths, at 32x32."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from skipviz import CheckpointError, FullPolicy, GatePolicy, StaticMaskPolicy, create_model
from skipviz.models.timm_wrap import UnsupportedModelError

# zero_init_last=False: timm zeroes each residual branch's last BatchNorm, so skipping would change nothing
FAMILIES = {
    "resnet18": dict(layers=(2, 2, 1, 1), channels=(8, 16, 24, 32), stem_width=8, zero_init_last=False),
    "resnet50": dict(layers=(2, 1, 2, 1), channels=(8, 16, 24, 32), stem_width=8, zero_init_last=False),
    "mobilenetv2_035": {},
    "tf_efficientnet_lite0": {},  # TF "same" padding
    "mobilenetv3_small_050": {},
    "convnext_atto": dict(depths=(2, 1, 2, 1), dims=(8, 16, 24, 32)),  # conv MLP
    "convnext_tiny": dict(depths=(2, 1, 2, 1), dims=(8, 16, 24, 32)),  # channels-last MLP
    "vit_tiny_patch16_224": dict(depth=3, embed_dim=16, num_heads=2, img_size=32, patch_size=8),
    "vit_small_patch16_224": dict(depth=2, embed_dim=16, num_heads=2, img_size=32, patch_size=8, reg_tokens=2,
                                  global_pool="avg", fc_norm=True),
}


def _build(name: str, **kw):
    torch.manual_seed(0)
    size = {} if name.startswith("vit") else {"input_size": 32}
    net = create_model(f"timm:{name}", num_classes=10, **size, **FAMILIES[name], **kw)
    if not name.startswith("vit"):
        with torch.no_grad():  # random BatchNorm statistics: blocks whose output differs from their input
            for m in net.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
    return net


@pytest.fixture(scope="module")
def nets():
    return {name: _build(name, gates=True, probes=True, plan=True) for name in FAMILIES}


@pytest.fixture(scope="module")
def x():
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_full_policy_is_timms_own_forward_bit_for_bit(nets, x, name):
    net = nets[name]
    with torch.no_grad():
        ref = net.timm_model(x)
        assert torch.equal(net(x), ref)
        assert torch.equal(net.run(x, FullPolicy()).logits, ref)
        assert torch.equal(net.run(x[:1], FullPolicy()).logits, net.timm_model(x[:1]))
    assert ref.shape == (6, 10) and sum(b.bypassable for b in net.blocks) >= 1


def _reference(net, x, skip: set[int]) -> torch.Tensor:
    """timm's block modules run one by one (timm's own forward), the blocks in ``skip`` left out."""
    with torch.no_grad():
        h = net.stem(x)
        for i, b in enumerate(net.blocks):
            h = h if i in skip else b(h)
        return net.head(h)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_bypassed_block_is_never_called(nets, x, name):
    net = nets[name]
    target = max(i for i, b in enumerate(net.blocks) if b.bypassable)
    rows_seen: list[int] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: rows_seen.append(int(args[0].shape[0])))
             for m in net.blocks[target].block.modules() if m is not net.blocks[target].block]
    try:
        with torch.no_grad():
            out = net.run(x, StaticMaskPolicy({target})).logits
        assert rows_seen == []  # batch: not one submodule of the block ran
        for k in range(2):
            net.run(x[k: k + 1], StaticMaskPolicy({target}))
        assert rows_seen == []  # batch of one
        executed = torch.tensor([True, False, True, False, False, True])

        class Half(StaticMaskPolicy):
            def decide(self, net_, index, h):
                from skipviz.policies import Decision
                return Decision(execute=executed.clone(), reason=0) if index == target else super().decide(net_, index, h)

        with torch.no_grad():
            mixed = net.run(x, Half(set())).logits
        assert rows_seen and set(rows_seen) == {3}  # only the 3 executing samples went through the block
    finally:
        for h in hooks:
            h.remove()
    assert torch.allclose(out, _reference(net, x, {target}), atol=1e-5, rtol=1e-4)
    full, skipped = _reference(net, x, set()), _reference(net, x, {target})
    want = torch.where(executed[:, None], full, skipped)
    assert torch.allclose(mixed, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["resnet18", "convnext_tiny", "vit_tiny_patch16_224", "mobilenetv2_035"])
def test_gated_runs_match_the_reference_per_sample(nets, x, name):
    net = nets[name]
    with torch.no_grad():
        res = net.run(x, GatePolicy(0.88))
        for n in range(x.shape[0]):
            skip = {i for i in range(net.num_blocks) if not bool(res.executed[n, i])}
            assert torch.allclose(res.logits[n], _reference(net, x[n: n + 1], skip)[0], atol=1e-5, rtol=1e-4)
    assert 0 < float(res.executed.float().mean()) < 1


@pytest.mark.parametrize("name", ["resnet50", "tf_efficientnet_lite0", "convnext_atto", "vit_tiny_patch16_224"])
def test_flops_intermediates_and_kl_redundancy(nets, x, name):
    from torch.utils.flop_counter import FlopCounterMode

    from skipviz import redundancy
    from skipviz.policies.kl import KLRedundancyPolicy

    net = nets[name]
    table = net.flop_table()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net.timm_model(torch.zeros(1, 3, 32, 32))
    assert table.full == counter.get_total_flops() > 0
    assert all(f > 0 for f in table.blocks) and len(table.gates) == len(net.gated_blocks)
    logits, feats = net.forward_intermediates(x)
    assert len(feats) == net.num_blocks and torch.equal(logits, net.timm_model(x).detach())
    m = redundancy.kl_matrix(net, x[:2])
    assert m.shape == (2, net.num_blocks, net.num_blocks) and bool(torch.isfinite(m).all())
    policy = KLRedundancyPolicy.calibrate(net, x, q=0.5)
    assert all(net.blocks[i].bypassable for i in policy.skip)
    net.run(x, policy)


def test_vit_attention_flops_are_counted(nets):
    table = nets["vit_tiny_patch16_224"].flop_table()
    tokens, dim = 17, 16
    attention = 2 * 2 * tokens * tokens * dim  # q @ k^T and attn @ v, per block
    linear_only = sum(nets["vit_tiny_patch16_224"].flop_table().blocks) - 3 * attention
    assert linear_only > 0 and table.blocks[0] >= attention


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_captum_explanations_run(nets, x, name):
    from skipviz.explain import explain

    net = nets[name]
    target = max(i for i, b in enumerate(net.blocks) if b.bypassable)
    ex = explain(net, x[:1], StaticMaskPolicy({target}), ig_steps=4, n_steps=2)
    for method, maps in ex.maps.items():
        assert maps["full"].shape == (32, 32) and np.isfinite(maps["skipped"]).all(), method
    assert ex.importance is not None and target in ex.importance.skipped


def test_audit_runs_on_a_timm_model(nets, tmp_path):
    from skipviz.audit.run import run_audit

    net = nets["convnext_tiny"]
    for k in range(3):
        Image.fromarray(np.random.default_rng(k).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / f"{k}.png")
    target = max(i for i, b in enumerate(net.blocks) if b.bypassable)
    run = run_audit([tmp_path], net, StaticMaskPolicy({target}), tmp_path / "audit.sqlite", thumbnails=False)
    assert len(run.ok_records) == 3 and not run.failed_records


# ---------------------------------------------------------------------------------------------- weights
def _timm(name: str, num_classes: int = 10):
    import timm

    torch.manual_seed(3)
    kw = dict(FAMILIES[name])
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kw).eval()


def test_weights_from_safetensors_and_torch_files(tmp_path):
    from safetensors.torch import save_file

    model = _timm("resnet18")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "mine.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "mine.pth")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        for f in ("mine.safetensors", "mine.pth"):
            # num_classes is read from the file's classifier: 10, not timm's default 1000
            net = create_model("timm:resnet18", weights=tmp_path / f, input_size=32, **FAMILIES["resnet18"])
            assert torch.equal(net(x), ref) and net.meta.num_classes == 10
            assert net.meta.weights_sha256 and net.meta.card["backbone"]["sha256"] == net.meta.weights_sha256


def test_a_mismatched_file_names_the_first_mismatch(tmp_path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in _timm("resnet18").state_dict().items()}, str(tmp_path / "r.safetensors"))
    with pytest.raises(CheckpointError, match=r"first mismatch: fc.weight is \(10, 32\) in the file but \(7, 32\).*"
                                              r"pass num_classes=10"):
        create_model("timm:resnet18", weights=tmp_path / "r.safetensors", num_classes=7, **FAMILIES["resnet18"])
    with pytest.raises(CheckpointError, match=r"first mismatch: layer1.0.conv1.weight is \(8, 64, 3, 3\) in the "
                                              r"file but \(16, 64, 3, 3\) in the model \(27 of another shape\)"):
        create_model("timm:resnet18", weights=tmp_path / "r.safetensors",
                     **{**FAMILIES["resnet18"], "channels": (16, 16, 24, 32)})
    with pytest.raises(CheckpointError, match=r"does not fit timm:resnet50 .*first mismatch: layer1.0.conv1.weight "
                                              r"is \(8, 64, 3, 3\) in the file but \(8, 64, 1, 1\) in the model \(48 "
                                              r"missing, 26 of another shape, 12 unexpected\)"):
        create_model("timm:resnet50", weights=tmp_path / "r.safetensors", **FAMILIES["resnet50"])
    torch.save({"w": torch.zeros(1), "f": print}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused"):
        create_model("timm:resnet18", weights=tmp_path / "evil.pt")


def test_unwrappable_models_say_why_and_what_is_supported():
    with pytest.raises(UnsupportedModelError, match="no block with an identity shortcut"):
        create_model("timm:test_efficientnet_evos", num_classes=10, input_size=32)
    with pytest.raises(UnsupportedModelError, match=r"NormFreeNet cannot be wrapped.*ResNet.*EfficientNet / MobileNet"
                                                    r".*ConvNeXt.*Vision Transformer"):
        create_model("timm:test_nfnet", num_classes=10)
    with pytest.raises(UnsupportedModelError, match="without a classifier"):
        create_model("timm:resnet18", num_classes=0, **FAMILIES["resnet18"])
    with pytest.raises(KeyError, match="timm has no model 'resnet_nonexistent'"):
        create_model("timm:resnet_nonexistent")


def test_meta_follows_timms_preprocessing_config():
    net = create_model("timm:convnext_atto", num_classes=3, classes=["a", "b", "c"], **FAMILIES["convnext_atto"])
    assert net.meta.input_size == (3, 224, 224) and net.meta.resize == 256  # crop_pct 0.875
    assert net.meta.classes == ["a", "b", "c"] and net.meta.arch == "timm:convnext_atto"
    assert net.gates is not None and not net.gated_blocks and net.probes is None  # no heads unless asked
