"""torchvision's ImageNet ResNets (18/34/50/101) wrapped as skippable backbones.

Weights come from a local file (``weights=PATH``) or from torchvision's cache (``weights="IMAGENET1K_V1"``,
looked up in ``torch.hub.get_dir()/checkpoints``); nothing is ever downloaded. No gate heads by default
(there are no trained ones): use the full, static-mask or KL-redundancy policies.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .._checkpoint import apply_state_dict, load_state_dict
from ._registry import register_model
from ..engine.blocks import SkippableBlock
from ..engine.folding import ConvBNStem, bn_is_foldable, conv_bn
from ..engine.heads import GateHead, ProbeHead
from ..engine.network import SkipNetwork
from .weights import IMAGENET_MEAN, IMAGENET_STD, ModelMeta, sha256_file

ARCHS = {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights", "resnet50": "ResNet50_Weights",
         "resnet101": "ResNet101_Weights"}


class TorchvisionBlock(SkippableBlock):
    """A torchvision ``BasicBlock``/``Bottleneck``; bypass = identity, or ReLU(downsample(x)) for the first
    block of a stage. (N, C_in, H, W) -> (N, C_out, H/s, W/s)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.downsample = block.downsample is not None
        last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
        self.out_channels = last_bn.num_features
        self.in_channels = block.conv1.in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bn_is_foldable(self.block.bn1):
            return self.block(x)  # torchvision's own forward: training, attributions
        return self.residual(x).add_(self.shortcut(x)).relu_()

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch of torchvision's ``BasicBlock``/``Bottleneck.forward``, without the add; at
        inference each conv-BN pair is one convolution (:func:`~skipviz.engine.folding.conv_bn`)."""
        b = self.block
        out = b.relu(conv_bn(x, b.conv1, b.bn1))
        out = conv_bn(out, b.conv2, b.bn2)
        if hasattr(b, "conv3"):
            out = conv_bn(b.relu(out), b.conv3, b.bn3)
        return out

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """``x``, or torchvision's ``downsample`` (1x1 conv, BN; folded at inference) for a stage's first block."""
        if not self.downsample:
            return x
        conv, bn = self.block.downsample
        return conv_bn(x, conv, bn)

    def bypass(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.shortcut(x)) if self.downsample else x


class TorchvisionHead(nn.Module):
    def __init__(self, avgpool: nn.Module, fc: nn.Linear) -> None:
        super().__init__()
        self.avgpool, self.fc = avgpool, fc

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(h), 1))


def cached_weights_path(arch: str, tag: str) -> Path:
    """Where torchvision's own download of ``arch``/``tag`` would sit in the local cache."""
    import torchvision  # on use: the CIFAR models and the dashboard start without paying for its import

    enum = getattr(torchvision.models, ARCHS[arch])
    w = enum[tag]
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)


def wrap_torchvision(model: nn.Module, arch: str, classes: list[str], gates: bool = False,
                     probes: bool = False) -> SkipNetwork:
    """Wrap a torchvision ResNet instance (its modules are shared, not copied) as a :class:`SkipNetwork`."""
    stem = ConvBNStem(model.conv1, model.bn1, model.relu, model.maxpool)
    blocks, names = [], []
    for s, layer in enumerate((model.layer1, model.layer2, model.layer3, model.layer4)):
        for j, b in enumerate(layer):
            blocks.append(TorchvisionBlock(b))
            names.append(f"layer{s + 1}.{j}")
    gate_heads = {i: GateHead(b.in_channels) for i, b in enumerate(blocks) if not b.downsample} if gates else None
    probe_heads = [ProbeHead(b.out_channels, len(classes)) for b in blocks] if probes else None
    meta = ModelMeta(arch=arch, classes=classes, input_size=(3, 224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     resize=256)
    return SkipNetwork(stem, blocks, TorchvisionHead(model.avgpool, model.fc), names, meta, gate_heads, probe_heads)


def build_torchvision_resnet(arch: str, weights_tag: str | None = None, weights_path: str | None = None,
                             num_classes: int = 1000, gates: bool = False, probes: bool = False) -> SkipNetwork:
    """A torchvision ResNet (weights from a local file or torchvision's cache, never downloaded) as a
    :class:`SkipNetwork`."""
    import torchvision

    enum = getattr(torchvision.models, ARCHS[arch])
    classes = list(enum.IMAGENET1K_V1.meta["categories"]) if num_classes == 1000 else [str(i) for i in range(num_classes)]
    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    path = None
    if weights_tag is not None:
        if weights_tag not in enum.__members__:
            raise KeyError(f"{arch} has no weights {weights_tag!r}; known: {list(enum.__members__)}")
        path = cached_weights_path(arch, weights_tag)
        if not path.is_file():
            raise FileNotFoundError(
                f"{arch}.{weights_tag} weights are not in torchvision's local cache ({path}). SkipViz never "
                f"downloads: fetch them once with torchvision (models.{arch}(weights='{weights_tag}')) on a "
                f"connected machine, or pass weights=PATH to a local file.")
    elif weights_path is not None:
        path = Path(weights_path)
    if path is not None:
        apply_state_dict(model, load_state_dict(path), source=path.name)
    net = wrap_torchvision(model, arch, classes, gates=gates, probes=probes)
    if path is not None:
        net.meta.weights_name = weights_tag or path.stem
        net.meta.weights_path = str(path)
        net.meta.weights_sha256 = sha256_file(path)
        if weights_tag:
            w = enum[weights_tag]
            net.meta.card = {"source": "torchvision", "weights": f"{ARCHS[arch]}.{weights_tag}",
                             "metrics": w.meta.get("_metrics", {}), "num_params": w.meta.get("num_params")}
    return net


def _register(arch: str) -> None:
    @register_model(arch)
    def build(weights_tag: str | None = None, **kwargs) -> SkipNetwork:
        return build_torchvision_resnet(arch, weights_tag=weights_tag, **kwargs)

    build.loads_own_weights = True


for _a in ARCHS:
    _register(_a)
