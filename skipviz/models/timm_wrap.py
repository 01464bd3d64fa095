"""Any timm network whose residual blocks timm exposes as a block list, as a skippable network:
``create_model("timm:<name>", weights=PATH, num_classes=..., classes=...)``.

Families (timm's model classes, and the models built on them):

* ResNet (``timm.models.resnet.ResNet``: ResNet, ResNeXt, SE-ResNet, ResNet-D...): ``layer1..4``; a block
  with ``downsample is None`` has an identity shortcut.
* EfficientNet / MobileNet (``EfficientNet``, ``MobileNetV3``: EfficientNet, EfficientNet-Lite, MixNet,
  MNASNet, MobileNet-V2/V3/V4...): ``blocks[stage][j]``; a block with ``has_skip`` has one.
* ConvNeXt (``ConvNeXt``): ``stages[s].blocks[j]`` (identity ``shortcut``); each stage's ``downsample`` is a
  block of its own that always runs.
* Vision Transformer (``VisionTransformer`` and its subclasses: ViT, DeiT, ...): ``blocks[i]``, every one
  ``x + attn(x)`` then ``x + mlp(x)``. The tokens (N, L, C) travel through the engine as a (N, C, L, 1) view
  of the same memory (:func:`token_grid`), so the gate, probe and plan heads, the spatial KL (a distribution
  over the L tokens) and the row moves of the engine work unchanged.

Identity-shortcut blocks become bypass-able engine blocks (bypass = identity, really skipped); the others
(downsampling, widening) always run. Every module is timm's own, shared, never copied; a wrapped block's
``forward`` is timm's ``forward`` and the full policy's logits equal timm's own forward bit for bit (the
network keeps timm's memory layout, NCHW, and folds nothing). At inference an identity block of a known timm
class runs in place on the engine's batch (``forward_``: the same operations in the same order, the shortcut
add done into the input; float addition is commutative, so the bits are the same), others run ``forward`` and
copy into it.

Weights: a safetensors or weights-only torch file of timm's key layout (``module.`` prefixes dropped),
checked key by key (:func:`~skipviz.models._state_check.check_state_dict` names the first mismatch); or a
heads file exported by ``skipviz train --model timm:<name>`` (gate, probe and plan heads only), whose card
(beside it, or inside the file's metadata) names the backbone file and its SHA-256. Never downloaded:
``pretrained=False`` always.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .._checkpoint import CheckpointError, apply_state_dict, load_state_dict
from ..engine.blocks import SkippableBlock
from ..engine.heads import GateHead, PlanHead, ProbeHead
from ..engine.network import SkipNetwork
from ._state_check import check_state_dict, strip_common_prefix
from .weights import ModelMeta, read_card, sha256_file

__all__ = ["CARD_METADATA_KEY", "FAMILIES", "HEAD_PREFIXES", "TIMM_PREFIX", "TimmBlock", "TimmHead", "TimmSkipNetwork",
           "TimmStem", "UnsupportedModelError", "create_timm_model", "read_heads_card", "supported_text", "token_grid",
           "tokens", "wrap_timm"]

TIMM_PREFIX = "timm:"
HEAD_PREFIXES = ("gates.", "probes.", "plan_head.")
#: the safetensors metadata entry holding an exported heads file's model card (JSON)
CARD_METADATA_KEY = "skipviz_card"

#: family -> (timm class names it covers, readable description); matched on the class and its bases
FAMILIES: dict[str, tuple[tuple[str, ...], str]] = {
    "resnet": (("ResNet",), "ResNet / ResNeXt / SE-ResNet (timm ResNet)"),
    "efficientnet": (("EfficientNet", "MobileNetV3"), "EfficientNet / MobileNet (timm EfficientNet, MobileNetV3)"),
    "convnext": (("ConvNeXt",), "ConvNeXt"),
    "vit": (("VisionTransformer",), "Vision Transformer (timm VisionTransformer: ViT, DeiT, ...)"),
}

#: the top-level children of each family's model that its stem runs; the block containers are below; every
#: other child belongs to the head
_STEM_CHILDREN = {"resnet": ("conv1", "bn1", "act1", "maxpool"), "efficientnet": ("conv_stem", "bn1"),
                  "convnext": ("stem",), "vit": ("patch_embed", "pos_drop", "patch_drop", "norm_pre")}
_BLOCK_CHILDREN = {"resnet": ("layer1", "layer2", "layer3", "layer4"), "efficientnet": ("blocks",),
                   "convnext": ("stages",), "vit": ("blocks",)}


class UnsupportedModelError(ValueError):
    """A timm model SkipViz cannot wrap; the message says why and what is supported."""


def supported_text() -> str:
    """The timm families SkipViz wraps, in words (for messages and the Model page)."""
    return "; ".join(desc for _, desc in FAMILIES.values())


def family_of(model: nn.Module) -> str:
    """The family key of a timm model instance, or :class:`UnsupportedModelError` naming why."""
    names = {c.__name__ for c in type(model).__mro__}
    for family, (classes, _) in FAMILIES.items():
        if names.intersection(classes):
            return family
    raise UnsupportedModelError(
        f"{type(model).__name__} cannot be wrapped: SkipViz skips residual blocks that timm exposes as a block list "
        f"with identity shortcuts, and knows that layout for: {supported_text()}. {type(model).__name__} is none "
        "of them (its blocks, if any, are not a list SkipViz knows how to run one by one).")


# ------------------------------------------------------------------------------------------------ tokens
def token_grid(t: torch.Tensor) -> torch.Tensor:
    """Tokens (N, L, C) as the engine's (N, C, L, 1) feature map: a view of the same memory (no copy)."""
    return t.unsqueeze(2).permute(0, 3, 1, 2)


def tokens(h: torch.Tensor) -> torch.Tensor:
    """The engine's (N, C, L, 1) map back to timm's tokens (N, L, C): a view when ``h`` came from
    :func:`token_grid` (or is a row slice of one), else a copy."""
    return h.permute(0, 2, 3, 1).flatten(1, 2)


def _is_token_view(h: torch.Tensor) -> bool:
    """Whether ``h`` (N, C, L, 1) lies in memory as dense (N, L, C) tokens, so :func:`tokens` is a view of it."""
    n, c, l, _ = h.shape
    return h.stride(1) == 1 and (l == 1 or h.stride(2) == c) and (n == 1 or h.stride(0) == l * c)


# ------------------------------------------------------------------------------ in-place block bodies
def _act_(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act(x)`` written into ``x``: a ReLU in place (the same bits), any other activation copied in."""
    if type(act) is nn.ReLU:
        return x.relu_()
    return x.copy_(act(x))


def _resnet_add_(b: nn.Module, x: torch.Tensor, r: torch.Tensor, act: nn.Module) -> None:
    """The end of timm's ResNet blocks: squeeze-excite and drop-path on the branch ``r``, then
    ``x <- act(x + r)`` in place (timm: ``r += shortcut``; the same bits)."""
    if b.se is not None:
        r = b.se(r)
    if b.drop_path is not None:
        r = b.drop_path(r)
    _act_(act, x.add_(r))


def _resnet_basic_(b: nn.Module, x: torch.Tensor) -> None:
    """timm ``BasicBlock.forward`` with an identity shortcut, the add done into ``x`` (N, C, H, W)."""
    r = b.aa(b.act1(b.drop_block(b.bn1(b.conv1(x)))))
    _resnet_add_(b, x, b.bn2(b.conv2(r)), b.act2)


def _resnet_bottleneck_(b: nn.Module, x: torch.Tensor) -> None:
    """timm ``Bottleneck.forward`` with an identity shortcut, the add done into ``x`` (N, C, H, W)."""
    r = b.act1(b.bn1(b.conv1(x)))
    r = b.aa(b.act2(b.drop_block(b.bn2(b.conv2(r)))))
    _resnet_add_(b, x, b.bn3(b.conv3(r)), b.act3)


def _depthwise_separable_(b: nn.Module, x: torch.Tensor) -> None:
    """timm ``DepthwiseSeparableConv.forward`` with ``has_skip``, the add done into ``x``."""
    r = x
    if b.conv_s2d is not None:
        r = b.bn_s2d(b.conv_s2d(r))
    r = b.se(b.aa(b.bn1(b.conv_dw(r))))
    r = b.bn2(b.conv_pw(r))
    x.add_(b.drop_path(r))


def _inverted_residual_(b: nn.Module, x: torch.Tensor) -> None:
    """timm ``InvertedResidual.forward`` with ``has_skip``, the add done into ``x``."""
    r = x
    if b.conv_s2d is not None:
        r = b.bn_s2d(b.conv_s2d(r))
    r = b.bn1(b.conv_pw(r))
    r = b.se(b.aa(b.bn2(b.conv_dw(r))))
    r = b.bn3(b.conv_pwl(r))
    x.add_(b.drop_path(r))


def _convnext_block_(b: nn.Module, x: torch.Tensor) -> None:
    """timm ``ConvNeXtBlock.forward`` with an identity shortcut, the add done into ``x`` (N, C, H, W)."""
    r = b.conv_dw(x)
    if b.use_conv_mlp:
        r = b.mlp(b.norm(r))
    else:
        r = b.mlp(b.norm(r.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
    if b.gamma is not None:
        r = r.mul(b.gamma.reshape(1, -1, 1, 1))
    x.add_(b.drop_path(r))


def _vit_block_(b: nn.Module, t: torch.Tensor) -> None:
    """timm ViT ``Block.forward`` (no mask), both residual adds done into the tokens ``t`` (N, L, C)."""
    t.add_(b.drop_path1(b.ls1(b.attn(b.norm1(t), attn_mask=None, is_causal=False))))
    t.add_(b.drop_path2(b.ls2(b.mlp(b.norm2(t)))))


def _inplace_bodies() -> dict[type, Callable[[nn.Module, torch.Tensor], None]]:
    """timm block class -> its forward with the shortcut add done in place. Exact classes only: a subclass may
    change ``forward`` (``CondConvResidual`` does), and then runs ``forward`` and a copy."""
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
    from timm.models.convnext import ConvNeXtBlock
    from timm.models.resnet import BasicBlock, Bottleneck
    from timm.models.vision_transformer import Block

    return {BasicBlock: _resnet_basic_, Bottleneck: _resnet_bottleneck_, DepthwiseSeparableConv: _depthwise_separable_,
            InvertedResidual: _inverted_residual_, ConvNeXtBlock: _convnext_block_, Block: _vit_block_}


def _has_identity_shortcut(family: str, block: nn.Module) -> bool:
    """Whether timm's ``block`` adds its input unchanged to its output (the engine may then bypass it)."""
    if family == "resnet":
        return getattr(block, "downsample", 0) is None
    if family == "efficientnet":
        return bool(getattr(block, "has_skip", False))
    if family == "convnext":
        return isinstance(getattr(block, "shortcut", None), nn.Identity)
    return True  # ViT blocks: x + attn(norm(x)), then x + mlp(norm(x)); the shape is kept (checked on a probe run)


# ------------------------------------------------------------------------------------------ the modules
class _RootTensors(nn.Module):
    """The timm model's own parameters and buffers (ViT's ``cls_token``, ``pos_embed``...), registered here
    through the very dicts the model holds them in: moved, cast and loaded together with the network."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._parameters = model._parameters
        self._buffers = model._buffers


class TimmStem(nn.Module):
    """timm's ``forward_features`` up to the first block: (N, 3, H, W) -> (N, C0, H0, W0); for a ViT the
    embedded tokens (N, L, C) as a (N, C, L, 1) view (:func:`token_grid`)."""

    def __init__(self, family: str, model: nn.Module) -> None:
        super().__init__()
        self.family = family
        for name in _STEM_CHILDREN[family]:
            self.add_module(name, getattr(model, name))
        self.root = _RootTensors(model)
        self.__dict__["_model"] = model  # not a submodule: its parts are registered here, in the blocks, the head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self._model
        if self.family == "resnet":
            return m.maxpool(m.act1(m.bn1(m.conv1(x))))
        if self.family == "efficientnet":
            return m.bn1(m.conv_stem(x))
        if self.family == "convnext":
            return m.stem(x)
        return token_grid(m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x)))))


class TimmHead(nn.Module):
    """The rest of timm's ``forward_features`` after the last block, then timm's ``forward_head``:
    (N, C_L, H_L, W_L) -> (N, K) logits (a ViT's (N, C, L, 1) map read as its tokens)."""

    def __init__(self, family: str, model: nn.Module, children: Sequence[str]) -> None:
        super().__init__()
        self.family = family
        for name in children:
            self.add_module(name, getattr(model, name))
        self.__dict__["_model"] = model

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        m = self._model
        if self.family == "efficientnet" and hasattr(m, "bn2"):  # EfficientNet (MobileNetV3 has its conv in the head)
            h = m.bn2(m.conv_head(h))
        elif self.family == "convnext":
            h = m.norm_pre(h)
        elif self.family == "vit":
            h = m.norm(tokens(h))
        return m.forward_head(h)


class TimmBlock(SkippableBlock):
    """One timm block: (N, C_in, H, W) -> (N, C_out, H', W') (a ViT block: (N, C, L, 1) -> same, its tokens).

    ``forward`` is timm's ``forward``. With an identity shortcut the block is bypass-able (``bypass`` is ``x``)
    and runs in place at inference (``forward_``); a block that changes the shape (``downsample``) always runs.
    """

    def __init__(self, block: nn.Module, identity: bool, on_tokens: bool, in_channels: int, out_channels: int,
                 body: Callable[[nn.Module, torch.Tensor], None] | None) -> None:
        super().__init__()
        self.block = block
        self.downsample = not identity
        self.bypassable = identity
        self.on_tokens = on_tokens
        self.in_channels, self.out_channels = in_channels, out_channels
        self.__dict__["_body"] = body  # a plain function, not state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.on_tokens:
            return token_grid(self.block(tokens(x)))
        return self.block(x)

    def forward_(self, x: torch.Tensor) -> torch.Tensor:
        """In place, for inference: ``x`` (which may be a row window of the batch) overwritten by
        ``forward(x)``, the same bits."""
        if self.downsample:
            raise ValueError("a block that changes the shape cannot run in place")
        body = self._body
        if body is None or (self.on_tokens and not _is_token_view(x)):
            return x.copy_(self.forward(x))
        body(self.block, tokens(x) if self.on_tokens else x)
        return x

    def bypass(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample:
            raise ValueError(f"this block changes the shape ({self.in_channels} -> {self.out_channels} channels or "
                             "its resolution) with no identity shortcut: it has no bypass and always runs")
        return x


class TimmSkipNetwork(SkipNetwork):
    """A :class:`SkipNetwork` over a timm model, in timm's memory layout (NCHW): the full policy computes what
    timm's own forward computes, bit for bit. ``timm_model`` is the wrapped model (its modules are shared)."""

    memory_format = torch.contiguous_format

    @property
    def timm_model(self) -> nn.Module:
        return self.stem._model


# ------------------------------------------------------------------------------------------------ FLOPs
def _count_cpu_attention() -> None:
    """Give ``FlopCounterMode`` the FLOPs of the CPU kernel of ``scaled_dot_product_attention`` (counted on GPU,
    not on CPU in torch 2.x): a ViT's attention would otherwise cost nothing in the FLOP table."""
    from torch.utils import flop_counter

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


# --------------------------------------------------------------------------------------------- wrapping
def _block_list(family: str, model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(timm module path, module) of every block in execution order (ConvNeXt: each stage's downsample too)."""
    if family == "resnet":
        return [(f"{layer}.{j}", b) for layer in _BLOCK_CHILDREN["resnet"] for j, b in enumerate(getattr(model, layer))]
    if family == "efficientnet":
        return [(f"blocks.{s}.{j}", b) for s, stage in enumerate(model.blocks) for j, b in enumerate(stage)]
    if family == "convnext":
        out = []
        for s, stage in enumerate(model.stages):
            if not isinstance(stage.downsample, nn.Identity):
                out.append((f"stages.{s}.downsample", stage.downsample))
            out += [(f"stages.{s}.blocks.{j}", b) for j, b in enumerate(stage.blocks)]
        return out
    return [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]


def _input_size(model: nn.Module, family: str, input_size: int | Sequence[int] | None) -> tuple[int, int, int]:
    if input_size is not None:
        size = (input_size,) * 2 if isinstance(input_size, int) else tuple(int(v) for v in input_size)[-2:]
        return (3, int(size[0]), int(size[1]))
    if family == "vit":
        h, w = model.patch_embed.img_size
        return (3, int(h), int(w))
    size = (model.pretrained_cfg or {}).get("input_size") or (3, 224, 224)
    return (3, int(size[-2]), int(size[-1]))


def wrap_timm(model: nn.Module, name: str, classes: Sequence[str] | None = None, gates: bool = False,
              probes: bool = False, plan: bool = False, gate_hidden: int = 16, plan_grid: int = 4,
              plan_hidden: int = 128, input_size: int | Sequence[int] | None = None) -> TimmSkipNetwork:
    """Wrap a timm model instance (its modules are shared, not copied; put in eval mode) as a skippable network.

    One probe forward at ``input_size`` (default: the model's, from timm's ``pretrained_cfg``) records each
    block's channels and checks that the identity-shortcut blocks keep their input's shape. ``gates``: a gate
    head on every bypass-able block; ``probes``: a linear probe after every block; ``plan``: a plan head on the
    stem's output. The heads start untrained. Raises :class:`UnsupportedModelError` naming why a model cannot
    be wrapped.
    """
    family = family_of(model)
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    if num_classes <= 0:
        raise UnsupportedModelError(f"timm:{name} was built without a classifier (num_classes=0): SkipViz runs "
                                    "classifiers; build it with its number of classes")
    model.eval()
    size = _input_size(model, family, input_size)
    listed = _block_list(family, model)
    if not listed:
        raise UnsupportedModelError(f"timm:{name} has no blocks: nothing could be skipped")
    stem = TimmStem(family, model)
    head_children = [c for c, _ in model.named_children()
                     if c not in _STEM_CHILDREN[family] and c not in _BLOCK_CHILDREN[family]]
    head = TimmHead(family, model, head_children)
    bodies = _inplace_bodies()
    on_tokens = family == "vit"
    shapes: list[tuple[torch.Size, torch.Size]] = []
    p = next(model.parameters())
    with torch.no_grad():
        h = stem(torch.zeros(1, *size, dtype=p.dtype, device=p.device))
        stem_channels = int(h.shape[1])
        for _, b in listed:
            out = token_grid(b(tokens(h))) if on_tokens else b(h)
            shapes.append((h.shape, out.shape))
            h = out
    blocks, names = [], []
    for (path, b), (shape_in, shape_out) in zip(listed, shapes):
        identity = _has_identity_shortcut(family, b) and shape_in == shape_out
        blocks.append(TimmBlock(b, identity, on_tokens, int(shape_in[1]), int(shape_out[1]),
                                bodies.get(type(b)) if identity else None))
        names.append(path)
    if not any(b.bypassable for b in blocks):
        raise UnsupportedModelError(f"timm:{name} has no block with an identity shortcut (every block changes the "
                                    "shape): nothing could be skipped")
    if classes is None:
        classes = _default_classes(num_classes)
    if len(classes) != num_classes:
        raise ValueError(f"{len(classes)} class names for a classifier of {num_classes} classes")
    cfg = model.pretrained_cfg or {}
    crop = float(cfg.get("crop_pct") or 0.875)
    meta = ModelMeta(arch=f"{TIMM_PREFIX}{name}", classes=list(classes), input_size=size,
                     mean=tuple(cfg.get("mean") or (0.485, 0.456, 0.406)),
                     std=tuple(cfg.get("std") or (0.229, 0.224, 0.225)),
                     resize=int(math.floor(min(size[1:]) / crop)))
    gate_heads = ({i: GateHead(b.in_channels, gate_hidden) for i, b in enumerate(blocks) if b.bypassable}
                  if gates else None)
    probe_heads = [ProbeHead(b.out_channels, num_classes) for b in blocks] if probes else None
    _count_cpu_attention()
    net = TimmSkipNetwork(stem, blocks, head, names, meta, gate_heads, probe_heads)
    if plan and gate_heads:
        net.plan_head = PlanHead(stem_channels, sorted(gate_heads), plan_grid, plan_hidden)
    return net.eval()


def _default_classes(num_classes: int) -> list[str]:
    if num_classes == 1000:
        from .efficientnet_lite import imagenet_classes

        return imagenet_classes()
    return [str(i) for i in range(num_classes)]


# ---------------------------------------------------------------------------------------------- weights
def _build_timm(name: str, num_classes: int | None, timm_kwargs: dict) -> nn.Module:
    import timm

    if not timm.is_model(name):
        near = timm.list_models(f"*{name.split('.')[0][:12]}*")[:8]
        raise KeyError(f"timm has no model {name!r}" + (f"; similar: {', '.join(near)}" if near else ""))
    kwargs = dict(timm_kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    return timm.create_model(name, pretrained=False, **kwargs)  # never downloads


def _classifier_keys(model: nn.Module) -> tuple[str, ...]:
    try:
        clf = model.get_classifier()
    except (AttributeError, TypeError):
        return ()
    ids = {id(t) for t in clf.state_dict(keep_vars=True).values()}
    return tuple(k for k, t in model.state_dict(keep_vars=True).items() if id(t) in ids)


def read_heads_card(path: str | os.PathLike) -> dict:
    """The model card of an exported heads file: the ``.json`` beside it, else the copy in the file's
    safetensors metadata (an uploaded file travels without its neighbour); ``{}`` when there is neither."""
    p = Path(path)
    card = read_card(p.with_suffix(".json"))
    if card or p.suffix != ".safetensors":
        return card
    from safetensors import safe_open

    try:
        with safe_open(str(p), "pt") as f:
            raw = (f.metadata() or {}).get(CARD_METADATA_KEY)
    except Exception:  # an unreadable file is reported by load_state_dict with its reason
        return {}
    if not raw:
        return {}
    try:
        card = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p.name}: its embedded model card is not JSON ({e})") from e
    return card if isinstance(card, dict) else {}


def _heads_only(state: dict) -> bool:
    return bool(state) and all(k.startswith(HEAD_PREFIXES) for k in state)


def _load_heads(net: SkipNetwork, heads: dict[str, torch.Tensor], source: str) -> None:
    """Load gate/probe/plan head tensors strictly into the heads ``net`` has (adding a plan head sized from the
    file when ``net`` has none)."""
    w1, w2 = heads.get("plan_head.fc1.weight"), heads.get("plan_head.fc2.weight")
    if w1 is not None and w2 is not None and net.plan_head is None and net.gated_blocks:
        channels = net.blocks[0].in_channels
        grid = int(round(math.sqrt(w1.shape[1] / channels)))
        net.plan_head = PlanHead(channels, net.gated_blocks, max(1, grid), w1.shape[0])
    parts = {"gates": net.gates, "probes": net.probes, "plan_head": net.plan_head}
    apply_state_dict(nn.ModuleDict({k: m for k, m in parts.items() if m is not None and len(list(m.parameters()))}),
                     heads, source=source)


def create_timm_model(name: str, weights: str | os.PathLike | None = None, num_classes: int | None = None,
                      classes: Sequence[str] | None = None, gates: bool | None = None, probes: bool | None = None,
                      plan: bool | None = None, gate_hidden: int | None = None, plan_grid: int | None = None,
                      plan_hidden: int | None = None, input_size: int | Sequence[int] | None = None, **timm_kwargs: Any) -> TimmSkipNetwork:
    """``timm.create_model(name, pretrained=False, num_classes=..., **timm_kwargs)`` wrapped by :func:`wrap_timm`.

    Args:
        name: a timm model name (``resnet50``, ``convnext_tiny``, ``vit_small_patch16_224``...).
        weights: ``None`` (timm's random init), a backbone file (safetensors or weights-only torch; timm's key
            layout, optionally with SkipViz head tensors), or an exported heads file (its card names the backbone).
        num_classes: the classifier's size; by default the file's (read from its classifier), else timm's.
        classes: one name per class (default: the card's, ImageNet's for 1,000 classes, else "0", "1", ...).
        gates, probes, plan: add untrained heads (default: the heads the file or its card carries, else none);
            gate_hidden, plan_grid, plan_hidden: their sizes (default 16, 4, 128, or the card's).
        input_size: (3, H, W) or H the network is measured and preprocessed at (default: timm's).
        **timm_kwargs: timm's model arguments (``layers=``, ``depths=``, ``embed_dim=``...).
    """
    path = Path(weights) if weights is not None else None
    state: dict[str, torch.Tensor] = {}
    card: dict = {}
    if path is not None:
        state = strip_common_prefix(load_state_dict(path))
        card = read_heads_card(path)
    if _heads_only(state):
        return _create_from_heads(name, path, state, card, num_classes=num_classes, classes=classes, gates=gates,
                                  probes=probes, plan=plan, gate_hidden=gate_hidden, plan_grid=plan_grid,
                                  plan_hidden=plan_hidden, input_size=input_size, **timm_kwargs)
    heads = {k: v for k, v in state.items() if k.startswith(HEAD_PREFIXES)}
    backbone = {k: v for k, v in state.items() if k not in heads}
    model = _build_timm(name, num_classes, timm_kwargs)
    what = f"timm:{name}" + (f" ({', '.join(f'{k}={v}' for k, v in timm_kwargs.items())})" if timm_kwargs else "")
    if path is not None:
        clf = _classifier_keys(model)
        if num_classes is None and clf and clf[0] in backbone and backbone[clf[0]].dim() >= 1:
            file_classes = int(backbone[clf[0]].shape[0])
            if file_classes != model.num_classes:  # the user's fine-tuned classifier: build it at the file's size
                model = _build_timm(name, file_classes, timm_kwargs)
        check_state_dict(model, backbone, path.name, what, _classifier_keys(model))
        model.load_state_dict(backbone, strict=True)
    classes = classes if classes is not None else card.get("classes")
    net = wrap_timm(model, name, classes, gates=bool(gates if gates is not None else any(k.startswith("gates.") for k in heads)),
                    probes=bool(probes if probes is not None else any(k.startswith("probes.") for k in heads)),
                    plan=bool(plan), gate_hidden=gate_hidden or 16, plan_grid=plan_grid or 4,
                    plan_hidden=plan_hidden or 128, input_size=input_size)
    if heads:
        _load_heads(net, heads, path.name)
    if path is not None:
        sha = sha256_file(path)
        net.meta.weights_name, net.meta.weights_path, net.meta.weights_sha256 = path.stem, str(path), sha
        net.meta.card = {**card, "backbone": {"model": f"{TIMM_PREFIX}{name}", "file": path.name,
                                              "path": str(path.resolve()), "sha256": sha}}
    return net


def _create_from_heads(name: str, path: Path, heads: dict, card: dict, **kwargs: Any) -> TimmSkipNetwork:
    """An exported heads file on the backbone its card names (that file, checked by SHA-256)."""
    backbone = card.get("backbone") or {}
    model_name = card.get("model") or backbone.get("model")
    if model_name and model_name != f"{TIMM_PREFIX}{name}":
        raise CheckpointError(f"{path.name}: these heads were trained for {model_name}, not {TIMM_PREFIX}{name}")
    if not backbone.get("path"):
        raise CheckpointError(f"{path.name} holds decision heads only, and no model card (beside it as "
                              f"{path.with_suffix('.json').name}, or in the file) names the backbone they were "
                              "trained on: pass weights= the backbone file with the heads in it, or keep the card")
    bpath = Path(backbone["path"])
    if not bpath.is_file():
        raise CheckpointError(f"{path.name}: its backbone {bpath} is not on this machine (the card records it and "
                              f"its SHA-256 {str(backbone.get('sha256'))[:12]}...)")
    sha = sha256_file(bpath)
    if backbone.get("sha256") and backbone["sha256"] != sha:
        raise CheckpointError(f"{path.name}: its heads were trained on backbone {backbone['sha256'][:12]}..., but "
                              f"{bpath} is now {sha[:12]}...")
    built = dict(card.get("model_kwargs") or {})
    timm_kwargs = built.pop("timm_kwargs", {}) or {}
    explicit = {k: v for k, v in kwargs.items() if v is not None}
    net = create_timm_model(name, weights=bpath, **{**built, **timm_kwargs, **explicit})
    _load_heads(net, heads, path.name)
    net.meta.weights_name, net.meta.weights_path, net.meta.weights_sha256 = path.stem, str(path), sha256_file(path)
    net.meta.card = {**card, "backbone": {**backbone, "sha256": sha}}
    if card.get("classes") and kwargs.get("classes") is None:
        net.meta.classes = list(card["classes"])
    return net
