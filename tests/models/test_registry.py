"""The registry: one entry point, metadata that travels with the model, no downloads."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from skipviz import create_model, list_models, list_pretrained


def test_every_cifar_depth_builds_with_the_right_block_count():
    for depth in (20, 32, 44, 56, 110):
        net = create_model(f"cifar_resnet{depth}")
        assert net.num_blocks == 3 * (depth - 2) // 6
        assert len(net.gated_blocks) == net.num_blocks - 2  # the two downsampling blocks have no gate
        assert net.meta.arch == f"cifar_resnet{depth}" and net.meta.input_size == (3, 32, 32)
    assert {"cifar_resnet20", "cifar_resnet110", "resnet18", "resnet50"} <= set(list_models())
    assert any(w.tag == "cifar10_gated" for w in list_pretrained())


def test_torchvision_resnets_wrap_without_weights_and_never_download(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    net = create_model("resnet50")
    assert net.num_blocks == 16 and sum(b.downsample for b in net.blocks) == 4
    assert len(net.meta.classes) == 1000 and net.meta.input_size == (3, 224, 224)
    with pytest.raises(FileNotFoundError, match="never\\s+downloads"):
        create_model("resnet18.IMAGENET1K_V1")
    with pytest.raises(KeyError, match="unknown model"):
        create_model("resnet7")


def test_torchvision_weights_from_a_local_file(tmp_path):
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    net = create_model("resnet18", weights=path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = ref.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
        # the same weights, in the engine's channels-last layout, each BN folded into its convolution
        assert torch.allclose(net(x), expected, atol=1e-4, rtol=1e-4)
    with torch.enable_grad():  # the module path: bit-exact
        assert torch.equal(net(x), expected.detach())


def test_preprocessing_turns_any_image_into_the_model_input():
    net = create_model("cifar_resnet20")
    for im in (Image.new("RGB", (640, 480), "red"), Image.new("RGB", (7, 3), "blue")):
        x = net.meta.preprocess(im)
        assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32
    red = net.meta.denormalize(net.meta.preprocess(Image.new("RGB", (50, 50), (255, 0, 0))))
    assert torch.allclose(red[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.0]), atol=1e-5)


def test_missing_pretrained_file_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPVIZ_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="README"):
        create_model("cifar_resnet56.cifar10_gated")


def test_a_weights_file_with_a_plan_head_loads_into_the_plain_architecture(tmp_path):
    import skipviz
    from skipviz import PlanPolicy, dashboard

    shipped = create_model(skipviz.CIFAR_MODEL)
    path = Path(shipped.meta.weights_path)
    arch = shipped.meta.arch
    plain = create_model(arch, weights=path)  # no card kwargs: the head is sized from the file
    assert plain.plan_head is not None and plain.plan_head.gated_blocks == shipped.gated_blocks
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain.run(x, PlanPolicy(0.5)).executed, shipped.run(x, PlanPolicy(0.5)).executed)
    uploaded = dashboard.load_uploaded_weights(arch, path.read_bytes(), path.name)  # the Model page
    assert uploaded.net.plan_head is not None
    assert dashboard.decision_sources(uploaded.net) == ["gates", "plan", "early_exit"]
