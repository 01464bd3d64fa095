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

This module is the generic wrapper (the stem, block and head modules, :func:`wrap_timm`, :func:`create_timm_model`);
what differs between the families (their classes and layout, ViT tokens, the in-place block bodies) is
:mod:`skipviz.models._timm_families`, and what a weights file holds (head tensors, an exported heads file's card)
is :mod:`skipviz.models._timm_weights`.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .._checkpoint import CheckpointError, load_state_dict
from ..engine.blocks import SkippableBlock
from ..engine.heads import GateHead, PlanHead, ProbeHead
from ..engine.network import SkipNetwork
from ._state_check import check_state_dict, strip_common_prefix
from ._timm_families import (BLOCK_CHILDREN, FAMILIES, STEM_CHILDREN, UnsupportedModelError, block_list,
                             count_cpu_attention, family_of, has_identity_shortcut, inplace_bodies, is_token_view,
                             model_input_size, supported_text, token_grid, tokens)
from ._timm_weights import (CARD_METADATA_KEY, HEAD_PREFIXES, build_timm, classifier_keys, heads_only, load_heads,
                            read_heads_card)
from .weights import ModelMeta, sha256_file

__all__ = ["CARD_METADATA_KEY", "FAMILIES", "HEAD_PREFIXES", "TIMM_PREFIX", "TimmBlock", "TimmHead", "TimmSkipNetwork",
           "TimmStem", "UnsupportedModelError", "create_timm_model", "read_heads_card", "supported_text", "token_grid",
           "tokens", "wrap_timm"]

TIMM_PREFIX = "timm:"


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
        for name in STEM_CHILDREN[family]:
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
        if body is None or (self.on_tokens and not is_token_view(x)):
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


# --------------------------------------------------------------------------------------------- wrapping
def _probe_shapes(model: nn.Module, stem: TimmStem, listed: Sequence[tuple[str, nn.Module]],
                  size: tuple[int, int, int], on_tokens: bool) -> tuple[int, list[tuple[torch.Size, torch.Size]]]:
    """One forward of a (1, *size) zero image through the stem and every block: the stem's output channels and
    each block's (input shape, output shape) in the engine's layout."""
    shapes: list[tuple[torch.Size, torch.Size]] = []
    p = next(model.parameters())
    with torch.no_grad():
        h = stem(torch.zeros(1, *size, dtype=p.dtype, device=p.device))
        stem_channels = int(h.shape[1])
        for _, b in listed:
            out = token_grid(b(tokens(h))) if on_tokens else b(h)
            shapes.append((h.shape, out.shape))
            h = out
    return stem_channels, shapes


def _timm_meta(model: nn.Module, name: str, classes: Sequence[str] | None, num_classes: int,
               size: tuple[int, int, int]) -> ModelMeta:
    """The wrapped network's metadata: its class names (default: ImageNet's for 1,000 classes, else "0", "1",
    ...) and timm's preprocessing (``pretrained_cfg``'s mean, std and crop fraction) at ``size`` (3, H, W)."""
    if classes is None:
        classes = _default_classes(num_classes)
    if len(classes) != num_classes:
        raise ValueError(f"{len(classes)} class names for a classifier of {num_classes} classes")
    cfg = model.pretrained_cfg or {}
    crop = float(cfg.get("crop_pct") or 0.875)
    return ModelMeta(arch=f"{TIMM_PREFIX}{name}", classes=list(classes), input_size=size,
                     mean=tuple(cfg.get("mean") or (0.485, 0.456, 0.406)),
                     std=tuple(cfg.get("std") or (0.229, 0.224, 0.225)),
                     resize=int(math.floor(min(size[1:]) / crop)))


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
    size = model_input_size(model, family, input_size)
    listed = block_list(family, model)
    if not listed:
        raise UnsupportedModelError(f"timm:{name} has no blocks: nothing could be skipped")
    stem = TimmStem(family, model)
    head_children = [c for c, _ in model.named_children()
                     if c not in STEM_CHILDREN[family] and c not in BLOCK_CHILDREN[family]]
    head = TimmHead(family, model, head_children)
    bodies = inplace_bodies()
    on_tokens = family == "vit"
    stem_channels, shapes = _probe_shapes(model, stem, listed, size, on_tokens)
    blocks, names = [], []
    for (path, b), (shape_in, shape_out) in zip(listed, shapes):
        identity = has_identity_shortcut(family, b) and shape_in == shape_out
        blocks.append(TimmBlock(b, identity, on_tokens, int(shape_in[1]), int(shape_out[1]),
                                bodies.get(type(b)) if identity else None))
        names.append(path)
    if not any(b.bypassable for b in blocks):
        raise UnsupportedModelError(f"timm:{name} has no block with an identity shortcut (every block changes the "
                                    "shape): nothing could be skipped")
    meta = _timm_meta(model, name, classes, num_classes, size)
    gate_heads = ({i: GateHead(b.in_channels, gate_hidden) for i, b in enumerate(blocks) if b.bypassable}
                  if gates else None)
    probe_heads = [ProbeHead(b.out_channels, num_classes) for b in blocks] if probes else None
    count_cpu_attention()
    net = TimmSkipNetwork(stem, blocks, head, names, meta, gate_heads, probe_heads)
    if plan and gate_heads:
        net.plan_head = PlanHead(stem_channels, sorted(gate_heads), plan_grid, plan_hidden)
    return net.eval()


def _default_classes(num_classes: int) -> list[str]:
    """ImageNet's class names for a 1,000-class classifier, else ``"0"``, ``"1"``, ..."""
    if num_classes == 1000:
        from .efficientnet_lite import imagenet_classes

        return imagenet_classes()
    return [str(i) for i in range(num_classes)]


# ---------------------------------------------------------------------------------------------- weights
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
    if heads_only(state):
        return _create_from_heads(name, path, state, card, num_classes=num_classes, classes=classes, gates=gates,
                                  probes=probes, plan=plan, gate_hidden=gate_hidden, plan_grid=plan_grid,
                                  plan_hidden=plan_hidden, input_size=input_size, **timm_kwargs)
    heads = {k: v for k, v in state.items() if k.startswith(HEAD_PREFIXES)}
    backbone = {k: v for k, v in state.items() if k not in heads}
    model = build_timm(name, num_classes, timm_kwargs)
    what = f"timm:{name}" + (f" ({', '.join(f'{k}={v}' for k, v in timm_kwargs.items())})" if timm_kwargs else "")
    if path is not None:
        clf = classifier_keys(model)
        if num_classes is None and clf and clf[0] in backbone and backbone[clf[0]].dim() >= 1:
            file_classes = int(backbone[clf[0]].shape[0])
            if file_classes != model.num_classes:  # the user's fine-tuned classifier: build it at the file's size
                model = build_timm(name, file_classes, timm_kwargs)
        check_state_dict(model, backbone, path.name, what, classifier_keys(model))
        model.load_state_dict(backbone, strict=True)
    classes = classes if classes is not None else card.get("classes")
    net = wrap_timm(model, name, classes, gates=bool(gates if gates is not None else any(k.startswith("gates.") for k in heads)),
                    probes=bool(probes if probes is not None else any(k.startswith("probes.") for k in heads)),
                    plan=bool(plan), gate_hidden=gate_hidden or 16, plan_grid=plan_grid or 4,
                    plan_hidden=plan_hidden or 128, input_size=input_size)
    if heads:
        load_heads(net, heads, path.name)
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
    load_heads(net, heads, path.name)
    net.meta.weights_name, net.meta.weights_path, net.meta.weights_sha256 = path.stem, str(path), sha256_file(path)
    net.meta.card = {**card, "backbone": {**backbone, "sha256": sha}}
    if card.get("classes") and kwargs.get("classes") is None:
        net.meta.classes = list(card["classes"])
    return net
