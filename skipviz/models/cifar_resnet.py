"""CIFAR ResNets (He et al. 2016, section 4.2): depth 6n+2, three stages of n basic blocks at 16/32/64
channels, option-A (parameter-free) shortcuts, with a gate head on every identity-shortcut block and a probe
head after every block."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import PretrainedWeights, register_model, register_pretrained
from ..engine.blocks import SkippableBlock
from ..engine.folding import ConvBNStem, conv_bn
from ..engine.heads import GateHead, PlanHead, ProbeHead
from ..engine.network import SkipNetwork
from .weights import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, ModelMeta

DEPTHS = (20, 32, 44, 56, 110)
#: Depths whose shipped gated weights are made by fine-tuning the public checkpoint (``skipviz finetune``); the
#: others are trained from scratch (``skipviz train``).
FINETUNED_DEPTHS = (32, 44, 56)


class CifarBasicBlock(SkippableBlock):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU. (N, C_in, H, W) -> (N, C_out, H/s, W/s).

    A downsampling block (stride 2, channels doubled) has the option-A shortcut: subsample by 2 and pad the
    new channels with zeros; bypassing it costs no FLOPs.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.downsample = stride != 1 or in_channels != out_channels

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if not self.downsample:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_channels - self.in_channels
        return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch: (N, C_in, H, W) -> (N, C_out, H/s, W/s); at inference each conv-BN pair is one
        convolution (:func:`~skipviz.engine.folding.conv_bn`)."""
        return conv_bn(conv_bn(x, self.conv1, self.bn1).relu_(), self.conv2, self.bn2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # training, attributions: out of place, for autograd
            return F.relu(self.residual(x) + self.shortcut(x))
        # inference: the residual's output is a fresh tensor, so the shortcut is added to it in place, and a
        # downsampling block adds its subsampled input only to the channels the zero padding leaves non-zero:
        # no padded copy, no extra output batch (the same values: r + 0 = r)
        r = self.residual(x)
        if self.downsample:
            lo = (self.out_channels - self.in_channels) // 2
            r[:, lo: lo + self.in_channels].add_(x[:, :, :: self.stride, :: self.stride])
        else:
            r.add_(x)
        return r.relu_()

    def bypass(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x)  # the input is post-ReLU, so this stays non-negative


class CifarStem(ConvBNStem):
    """conv3x3-BN-ReLU: (N, 3, H, W) -> (N, C, H, W)."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__(nn.Conv2d(3, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class PoolClassifier(nn.Module):
    """Global average pool + linear: (N, C, H, W) -> (N, K)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.fc(h.mean((2, 3)))
        p = self._modules["fc"]._parameters  # inference: no module call, no nn.Module.__getattr__ (hot path)
        return F.linear(h.mean((2, 3)), p["weight"], p["bias"])


def cifar_resnet(depth: int, num_classes: int = 10, classes: list[str] | None = None, gates: bool = True,
                 gate_downsample: bool = False, probes: bool = True, gate_hidden: int = 16,
                 plan: bool = False, plan_grid: int = 4, plan_hidden: int = 128,
                 mean: tuple[float, float, float] | list[float] = CIFAR10_MEAN,
                 std: tuple[float, float, float] | list[float] = CIFAR10_STD) -> SkipNetwork:
    """Build a CIFAR ResNet of ``depth`` (6n+2) as a :class:`SkipNetwork`.

    ``gates``: a gate head on every identity-shortcut block (and on downsampling blocks too when
    ``gate_downsample``). ``probes``: a linear probe head after every block. ``plan``: a plan head deciding
    the gated blocks up front (:class:`~skipviz.engine.heads.PlanHead` of ``plan_grid`` and ``plan_hidden``, for
    ``PlanPolicy``). ``mean``/``std``: the input normalisation the weights were trained with (the CIFAR-10
    statistics by default; the imported public checkpoints use ImageNet's, :mod:`skipviz.models.cifar_import`),
    recorded in :class:`~skipviz.models.weights.ModelMeta`.
    """
    if (depth - 2) % 6 != 0 or depth < 8:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    classes = list(classes) if classes is not None else (CIFAR10_CLASSES if num_classes == 10 else
                                                         [str(i) for i in range(num_classes)])
    if len(classes) != num_classes:
        raise ValueError("one class name per class")
    blocks, names, in_ch = [], [], 16
    for stage, width in enumerate((16, 32, 64)):
        for j in range(n):
            stride = 2 if (stage > 0 and j == 0) else 1
            blocks.append(CifarBasicBlock(in_ch, width, stride))
            names.append(f"stage{stage + 1}.block{j}")
            in_ch = width
    gate_heads = {i: GateHead(b.in_channels, gate_hidden) for i, b in enumerate(blocks)
                  if gates and (gate_downsample or not b.downsample)}
    probe_heads = [ProbeHead(b.out_channels, num_classes) for b in blocks] if probes else None
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std are three per-channel values (std > 0), got {mean} and {std}")
    meta = ModelMeta(arch=f"cifar_resnet{depth}", classes=classes, input_size=(3, 32, 32),
                     mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std), resize=32)
    net = SkipNetwork(CifarStem(16), blocks, PoolClassifier(64, num_classes), names, meta, gate_heads, probe_heads)
    if plan:
        if not gate_heads:
            raise ValueError("a plan head decides the gated blocks: build with gates=True")
        net.plan_head = PlanHead(16, sorted(gate_heads), plan_grid, plan_hidden)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    for b in blocks:  # zero-init the last BN of each block: every block starts close to identity
        nn.init.zeros_(b.bn2.weight)
    return net


def _register(depth: int) -> None:
    @register_model(f"cifar_resnet{depth}")
    def build(**kwargs) -> SkipNetwork:
        return cifar_resnet(depth, **kwargs)

    if depth in FINETUNED_DEPTHS:
        how = (f"fine-tuned with learned gates from the public ResNet-{depth} checkpoint (akamaster, BSD-2) on "
               "CIFAR-10 by `skipviz finetune`")
        make = f"skipviz finetune --arch cifar_resnet{depth} --bf16 --export"
    else:
        how, make = "trained on CIFAR-10 by `skipviz train`", f"skipviz train --arch cifar_resnet{depth} --export"
    register_pretrained(PretrainedWeights(arch=f"cifar_resnet{depth}", tag="cifar10_gated",
                                          filename=f"cifar_resnet{depth}_cifar10_gated.safetensors",
                                          description=f"ResNet-{depth} with learned gates, {how}",
                                          make_command=make,
                                          title=f"CIFAR-10, 32x32 thumbnails of ten classes (ResNet-{depth})"))


for _d in DEPTHS:
    _register(_d)
