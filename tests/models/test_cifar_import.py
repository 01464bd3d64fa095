"""Importing the public CIFAR ResNet checkpoints (akamaster/pytorch_resnet_cifar10 layout): the imported
network's logits against an independent reference forward written here, the model card, clear errors."""
from __future__ import annotations

import collections
import json
import math
from datetime import datetime

import pytest
import torch
import torch.nn.functional as F

from skipviz import CheckpointError, create_model, import_cifar_resnet
from skipviz.models.cifar_import import akamaster_file
from skipviz.models.weights import IMAGENET_MEAN, IMAGENET_STD, sha256_file

LICENSE = "Copyright (c) 2018, Someone\n\nRedistribution and use ... are permitted (test notice)."


def akamaster_state(depth: int, seed: int = 0) -> collections.OrderedDict:
    """Random tensors in the akamaster key layout (``module.`` prefix, no ``num_batches_tracked``)."""
    g = torch.Generator().manual_seed(seed)
    sd = collections.OrderedDict()

    def conv(key: str, c_out: int, c_in: int) -> None:
        sd[f"module.{key}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=g) * math.sqrt(2 / (9 * c_in))

    def bn(key: str, c: int) -> None:
        sd[f"module.{key}.weight"] = 1 + 0.2 * torch.randn(c, generator=g)
        sd[f"module.{key}.bias"] = 0.1 * torch.randn(c, generator=g)
        sd[f"module.{key}.running_mean"] = 0.1 * torch.randn(c, generator=g)
        sd[f"module.{key}.running_var"] = 0.5 + torch.rand(c, generator=g)

    conv("conv1", 16, 3)
    bn("bn1", 16)
    in_c = 16
    for s, width in enumerate((16, 32, 64), start=1):
        for b in range((depth - 2) // 6):
            conv(f"layer{s}.{b}.conv1", width, in_c)
            bn(f"layer{s}.{b}.bn1", width)
            conv(f"layer{s}.{b}.conv2", width, width)
            bn(f"layer{s}.{b}.bn2", width)
            in_c = width
    sd["module.linear.weight"] = 0.1 * torch.randn(10, 64, generator=g)
    sd["module.linear.bias"] = 0.1 * torch.randn(10, generator=g)
    return sd


def reference_forward(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """The CIFAR ResNet of He et al. with option-A shortcuts in plain functional ops over the raw state dict:
    (N, 3, 32, 32) normalised -> (N, 10) logits."""
    def p(key):
        return sd[f"module.{key}"]

    def bn(h, key):
        return F.batch_norm(h, p(f"{key}.running_mean"), p(f"{key}.running_var"), p(f"{key}.weight"),
                            p(f"{key}.bias"), training=False, eps=1e-5)

    h = F.relu(bn(F.conv2d(x, p("conv1.weight"), padding=1), "bn1"))
    n = sum(1 for k in sd if k.startswith("module.layer1.") and k.endswith(".conv1.weight"))
    for s in (1, 2, 3):
        for b in range(n):
            key = f"layer{s}.{b}"
            stride = 2 if s > 1 and b == 0 else 1
            out = F.relu(bn(F.conv2d(h, p(f"{key}.conv1.weight"), stride=stride, padding=1), f"{key}.bn1"))
            out = bn(F.conv2d(out, p(f"{key}.conv2.weight"), padding=1), f"{key}.bn2")
            shortcut = h
            if stride != 1:  # option A as published: subsample, pad planes // 4 zero channels on each side
                planes = out.shape[1]
                shortcut = F.pad(h[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))
            h = F.relu(out + shortcut)
    return F.linear(h.mean((2, 3)), p("linear.weight"), p("linear.bias"))


def _save_source(tmp_path, sd, name="resnet20-test.th", legacy=True, **extra):
    path = tmp_path / "src" / name
    path.parent.mkdir(exist_ok=True)
    (path.parent / "LICENSE").write_text(LICENSE)
    torch.save({"best_prec1": 91.5, "state_dict": sd, **extra}, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.mark.parametrize("depth,legacy", [(20, True), (32, False)])
def test_synthetic_checkpoint_logits_match_reference(tmp_path, depth, legacy):
    sd = akamaster_state(depth)
    src = _save_source(tmp_path, sd, name=f"resnet{depth}-test.th", legacy=legacy)
    out, card = import_cifar_resnet(src, tmp_path / "out")
    assert out == tmp_path / "out" / f"cifar_resnet{depth}_akamaster.safetensors"
    net = create_model(f"cifar_resnet{depth}", weights=out)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference_forward(sd, x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(net.forward_train(x, force_full=True)[0], reference_forward(sd, x),
                                   atol=1e-4, rtol=1e-4)


def test_card_contents(tmp_path):
    src = _save_source(tmp_path, akamaster_state(20))
    out, card = import_cifar_resnet(src, tmp_path / "imported.safetensors")
    assert out == tmp_path / "imported.safetensors"
    assert json.loads(out.with_suffix(".json").read_text()) == card
    assert card["arch"] == "cifar_resnet20"
    assert card["source"]["file"] == "resnet20-test.th"
    assert card["source"]["sha256"] == sha256_file(src)
    assert card["source"]["best_prec1"] == pytest.approx(91.5)
    assert card["source"]["repository"] == "https://github.com/akamaster/pytorch_resnet_cifar10"
    assert card["license"]["notice"] == LICENSE
    assert card["normalization"]["mean"] == list(IMAGENET_MEAN) and card["normalization"]["std"] == list(IMAGENET_STD)
    assert card["model_kwargs"] == {"gates": False, "probes": False, "mean": list(IMAGENET_MEAN),
                                    "std": list(IMAGENET_STD)}
    assert card["weights_sha256"] == sha256_file(out)
    assert datetime.fromisoformat(card["date"])
    net = create_model("cifar_resnet20", weights=out)
    assert net.meta.mean == IMAGENET_MEAN and net.meta.std == IMAGENET_STD
    assert net.gated_blocks == [] and net.probes is None
    assert net.meta.card == card and net.meta.weights_sha256 == card["weights_sha256"]


def test_real_resnet20_matches_reference(tmp_path):
    src = akamaster_file(20)
    if src is None:
        pytest.skip("the public ResNet-20 checkpoint is not on this machine (set SKIPVIZ_AKAMASTER to the folder "
                    "of akamaster/pytorch_resnet_cifar10's resnet*.th files)")
    out, card = import_cifar_resnet(src, tmp_path)
    raw = torch.load(src, map_location="cpu", weights_only=True)
    net = create_model("cifar_resnet20", weights=out)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(2)) - mean) / std
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference_forward(raw["state_dict"], x), atol=1e-4, rtol=1e-4)
    assert card["source"]["best_prec1"] == pytest.approx(raw["best_prec1"])
    assert "Yerlan Idelbayev" in card["license"]["notice"]


def test_other_architectures_are_clear_errors(tmp_path):
    from torchvision.models import resnet18

    tv = tmp_path / "resnet18.pth"
    torch.save(resnet18(weights=None).state_dict(), tv)
    with pytest.raises(CheckpointError, match="not a CIFAR ResNet.*do not map"):
        import_cifar_resnet(tv, tmp_path)
    option_b = akamaster_state(20)
    option_b["module.layer2.0.shortcut.0.weight"] = torch.zeros(32, 16, 1, 1)
    with pytest.raises(CheckpointError, match="option-B"):
        import_cifar_resnet(_save_source(tmp_path, option_b, name="b.th"), tmp_path)
    uneven = collections.OrderedDict((k, v) for k, v in akamaster_state(32).items() if not k.startswith("module.layer3.4."))
    with pytest.raises(CheckpointError, match="stages"):
        import_cifar_resnet(_save_source(tmp_path, uneven, name="uneven.th"), tmp_path)
    narrow = akamaster_state(20)
    narrow["module.linear.weight"] = torch.zeros(10, 32)
    with pytest.raises(CheckpointError, match="does not fit"):
        import_cifar_resnet(_save_source(tmp_path, narrow, name="narrow.th"), tmp_path)


@pytest.mark.parametrize("legacy", [True, False])
def test_truncated_file(tmp_path, legacy):
    src = _save_source(tmp_path, akamaster_state(20), legacy=legacy)
    data = src.read_bytes()
    for cut in (40, 300, len(data) // 2, len(data) - 3):
        short = tmp_path / f"short{cut}.th"
        short.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated"):
            import_cifar_resnet(short, tmp_path)


class Exploit:
    """Unpickling this would run code (it creates a marker file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("legacy", [True, False])
def test_pickle_with_objects_is_refused_without_unsafe_advice(tmp_path, legacy):
    marker = tmp_path / "pwned"
    src = _save_source(tmp_path, akamaster_state(20), legacy=legacy, payload=Exploit(marker))
    with pytest.raises(CheckpointError, match="refused") as err:
        import_cifar_resnet(src, tmp_path)
    assert not marker.exists()
    message = str(err.value)
    assert "weights_only" not in message and "False" not in message and "trust" not in message
    text = _save_source(tmp_path, akamaster_state(20), name="text.th", arch="resnet20")
    with pytest.raises(CheckpointError, match="other than tensors and numbers"):
        import_cifar_resnet(text, tmp_path)
