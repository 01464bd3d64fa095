"""What SkipViz knows about each timm family it wraps (private; :mod:`skipviz.models.timm_wrap` is the wrapper).

* :data:`FAMILIES` - timm's model classes per family; :func:`family_of` picks a model's family (or raises
  :class:`UnsupportedModelError` naming what is supported, :func:`supported_text`).
* Layout: the top-level children the stem runs (:data:`STEM_CHILDREN`) and the block containers
  (:data:`BLOCK_CHILDREN`); :func:`block_list` - every block in execution order; :func:`has_identity_shortcut`
  - whether the engine may bypass a block; :func:`model_input_size` - the (3, H, W) the model is measured at.
* ViT tokens: (N, L, C) travel through the engine as a (N, C, L, 1) view of the same memory (:func:`token_grid`,
  :func:`tokens`, :func:`is_token_view`); :func:`count_cpu_attention` gives the FLOP counter the CPU attention
  kernel's FLOPs.
* :func:`inplace_bodies` - timm's block forwards with the shortcut add done in place (the same operations in the
  same order, so the same bits), for the blocks of known classes.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

__all__ = ["BLOCK_CHILDREN", "FAMILIES", "STEM_CHILDREN", "UnsupportedModelError", "block_list",
           "count_cpu_attention", "family_of", "has_identity_shortcut", "inplace_bodies", "is_token_view",
           "model_input_size", "supported_text", "token_grid", "tokens"]

#: family -> (timm class names it covers, readable description); matched on the class and its bases
FAMILIES: dict[str, tuple[tuple[str, ...], str]] = {
    "resnet": (("ResNet",), "ResNet / ResNeXt / SE-ResNet (timm ResNet)"),
    "efficientnet": (("EfficientNet", "MobileNetV3"), "EfficientNet / MobileNet (timm EfficientNet, MobileNetV3)"),
    "convnext": (("ConvNeXt",), "ConvNeXt"),
    "vit": (("VisionTransformer",), "Vision Transformer (timm VisionTransformer: ViT, DeiT, ...)"),
}

#: the top-level children of each family's model that its stem runs; the block containers are below; every
#: other child belongs to the head
STEM_CHILDREN = {"resnet": ("conv1", "bn1", "act1", "maxpool"), "efficientnet": ("conv_stem", "bn1"),
                  "convnext": ("stem",), "vit": ("patch_embed", "pos_drop", "patch_drop", "norm_pre")}
BLOCK_CHILDREN = {"resnet": ("layer1", "layer2", "layer3", "layer4"), "efficientnet": ("blocks",),
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


def is_token_view(h: torch.Tensor) -> bool:
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


def inplace_bodies() -> dict[type, Callable[[nn.Module, torch.Tensor], None]]:
    """timm block class -> its forward with the shortcut add done in place. Exact classes only: a subclass may
    change ``forward`` (``CondConvResidual`` does), and then runs ``forward`` and a copy."""
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
    from timm.models.convnext import ConvNeXtBlock
    from timm.models.resnet import BasicBlock, Bottleneck
    from timm.models.vision_transformer import Block

    return {BasicBlock: _resnet_basic_, Bottleneck: _resnet_bottleneck_, DepthwiseSeparableConv: _depthwise_separable_,
            InvertedResidual: _inverted_residual_, ConvNeXtBlock: _convnext_block_, Block: _vit_block_}


def has_identity_shortcut(family: str, block: nn.Module) -> bool:
    """Whether timm's ``block`` adds its input unchanged to its output (the engine may then bypass it)."""
    if family == "resnet":
        return getattr(block, "downsample", 0) is None
    if family == "efficientnet":
        return bool(getattr(block, "has_skip", False))
    if family == "convnext":
        return isinstance(getattr(block, "shortcut", None), nn.Identity)
    return True  # ViT blocks: x + attn(norm(x)), then x + mlp(norm(x)); the shape is kept (checked on a probe run)


# ------------------------------------------------------------------------------------------------ FLOPs
def count_cpu_attention() -> None:
    """Give ``FlopCounterMode`` the FLOPs of the CPU kernel of ``scaled_dot_product_attention`` (counted on GPU,
    not on CPU in torch 2.x): a ViT's attention would otherwise cost nothing in the FLOP table."""
    from torch.utils import flop_counter

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


# ---------------------------------------------------------------------------------------------- layout
def block_list(family: str, model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(timm module path, module) of every block in execution order (ConvNeXt: each stage's downsample too)."""
    if family == "resnet":
        return [(f"{layer}.{j}", b) for layer in BLOCK_CHILDREN["resnet"] for j, b in enumerate(getattr(model, layer))]
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


def model_input_size(model: nn.Module, family: str, input_size: int | Sequence[int] | None
                     ) -> tuple[int, int, int]:
    """The (3, H, W) a model is measured and preprocessed at: ``input_size`` when given (H, or (H, W) as its last
    two), a ViT's patch-embedding size, else timm's ``pretrained_cfg`` (224 x 224 when it has none)."""
    if input_size is not None:
        size = (input_size,) * 2 if isinstance(input_size, int) else tuple(int(v) for v in input_size)[-2:]
        return (3, int(size[0]), int(size[1]))
    if family == "vit":
        h, w = model.patch_embed.img_size
        return (3, int(h), int(w))
    size = (model.pretrained_cfg or {}).get("input_size") or (3, 224, 224)
    return (3, int(size[-2]), int(size[-1]))
