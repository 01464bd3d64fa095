"""Inference convolutions as one oneDNN primitive: prepacked weights, bias and activation fused.

``F.conv2d`` on CPU hands oneDNN the weight in PyTorch's plain layout, so every call reorders it into the blocked
layout the kernel reads, and the activation is a second pass over the output. :func:`conv_act` packs each
convolution's (folded) weight once, caches it, and runs ``torch.ops.mkldnn._convolution_pointwise`` (the op
PyTorch's own compiler emits for frozen CPU convolutions) with the ReLU6 or ReLU fused into the primitive.
Measured on full forwards of the shipped EfficientNet-Lite0 (2-core AMD EPYC Zen 4, 2 threads, float32,
interleaved paired rounds): 0.73-0.80 of the plain path's time at batch 1 and 0.89-0.95 at batch 32
(``benchmarks/bench_conv_variants.py``). Equal to ``F.conv2d`` and the activation up to float rounding (tests).
Fusing the identity blocks' residual add as well (the op's ``binary`` form) measured no further gain. Not every
convolution gains: timed one by one, every EfficientNet-Lite0 convolution took 0.58-0.92 of the plain time at batch
1, but the CIFAR ResNets' dense 3x3 convolutions on 16 x 16 and 8 x 8 maps took 1.14-1.49 (the op's fixed cost over
a 30-60 us convolution), and a whole batch-1 ResNet-56 forward 1.19-1.32. So a model family opts in by calling it
(EfficientNet-Lite does, :mod:`skipviz.models.efficientnet_lite`); the CIFAR ResNets keep ``F.conv2d``.

The packed weight is an opaque oneDNN tensor: it lives in a cache keyed weakly by the convolution module (not in
the module, so copies and state dicts never see it), next to the tensor it was packed from; a new fold, a new
padding or a dropped module replaces or frees it. The path applies to float32 CPU tensors without autocast or
autograd, outside any dispatch mode (``FlopCounterMode`` counts the plain convolution), while
``torch.backends.mkldnn`` is enabled; anything else, a PyTorch without the op, or an op that refuses a
convolution, runs ``F.conv2d`` as before. :data:`ENABLED` switches it off for a comparison.
"""
from __future__ import annotations

import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ENABLED", "conv_act", "fused_path_available", "packed_weight"]

#: Whether :func:`conv_act` may take the fused oneDNN path (benchmarks switch it off to compare).
ENABLED: bool = True

_OPS = getattr(torch.ops, "mkldnn", None)
_POINTWISE = getattr(_OPS, "_convolution_pointwise", None) if _OPS is not None else None
_REORDER = getattr(_OPS, "_reorder_convolution_weight", None) if _OPS is not None else None
_ANY_AUTOCAST = getattr(torch._C, "_is_any_autocast_enabled", None)
_DISPATCH_MODES = torch._C._len_torch_dispatch_stack
_HAVE_OPS = _POINTWISE is not None and _REORDER is not None and torch.backends.mkldnn.is_available()

#: conv module -> (source weight, its in-place version, padding, packed weight); ``None`` as the packed weight:
#: oneDNN refused it
_PACKED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()

#: activation module type -> (oneDNN post-op, its scalars)
_FUSED_ACTIVATIONS: dict[type, tuple[str, list[float]]] = {
    nn.Identity: ("none", []), nn.ReLU: ("relu", []), nn.ReLU6: ("hardtanh", [0.0, 6.0])}


def fused_path_available() -> bool:
    """Whether this PyTorch has the oneDNN ops and oneDNN is built in and enabled (``torch.backends.mkldnn``)."""
    return _HAVE_OPS and torch._C._get_mkldnn_enabled()


def packed_weight(conv: nn.Module) -> torch.Tensor | None:
    """The oneDNN weight cached for ``conv`` (an opaque ``torch._mkldnn`` tensor), or ``None``: not packed yet,
    or refused."""
    entry = _PACKED.get(conv)
    return None if entry is None else entry[3]


def _packed(conv: nn.Module, w: torch.Tensor, padding: tuple[int, int], stride: tuple[int, int],
            dilation: tuple[int, int], groups: int) -> torch.Tensor | None:
    """``w`` packed for ``conv`` (cached while ``w`` is the same tensor, unchanged in place, at the same padding),
    or ``None`` where oneDNN refused it."""
    entry = _PACKED.get(conv)
    version = _version(w)
    if entry is not None and entry[0] is w and entry[1] == version and entry[2] == padding:
        return entry[3]
    with _LOCK:
        try:
            packed = _REORDER(w, list(padding), list(stride), list(dilation), groups, None)
        except RuntimeError:
            packed = None
        _PACKED[conv] = (w, version, padding, packed)
    return packed


def _version(w: torch.Tensor) -> int:
    """``w``'s in-place version counter (0 for an inference tensor, which keeps none: the engine's folded weights
    made under ``inference_mode`` are new tensors whenever their sources change)."""
    return 0 if w.is_inference() else w._version


def conv_act(x: torch.Tensor, conv: nn.Module, w: torch.Tensor, b: torch.Tensor | None,
             padding: tuple[int, int] | str, activation: nn.Module) -> torch.Tensor:
    """``activation(conv2d(x, w, b))`` with ``conv``'s stride, dilation and groups and the given ``padding``
    (symmetric, per dimension, or ``F.conv2d``'s ``"same"``/``"valid"``, which take the plain path):
    (N, C_in, H, W) -> (N, C_out, H', W'), channels-last for a channels-last ``x`` and contiguous for a
    contiguous one (oneDNN returns channels-last for both: the fused path copies that back, a cost only layouts
    other than the engine's pay).

    ``w`` (C_out, C_in/groups, kh, kw) and ``b`` (C_out,) are the weights to apply (e.g. BatchNorm folded in);
    ``conv`` keys the packed-weight cache. Inference only: no autograd through the fused path.
    """
    stride, dilation, groups = conv.stride, conv.dilation, conv.groups
    act = type(activation)
    fused = _FUSED_ACTIVATIONS.get(act)
    if (ENABLED and fused is not None and x.device.type == "cpu" and x.dtype == torch.float32
            and w.dtype == torch.float32 and not isinstance(padding, str) and not torch.is_grad_enabled()
            and fused_path_available()
            and not _DISPATCH_MODES()  # a FLOP counter or fake tensors see the plain aten convolution
            and not (_ANY_AUTOCAST() if _ANY_AUTOCAST is not None else torch.is_autocast_enabled("cpu"))):
        pad = tuple(padding)
        pw = _packed(conv, w, pad, stride, dilation, groups)
        if pw is not None:
            try:
                y = _POINTWISE(x, pw, b, list(pad), list(stride), list(dilation), groups, fused[0], fused[1], None)
            except RuntimeError:  # refused at run time (a shape or layout it does not take): the plain path
                with _LOCK:
                    _PACKED[conv] = (w, _version(w), pad, None)
            else:
                return y.contiguous() if x.is_contiguous() and not y.is_contiguous() else y
    y = F.conv2d(x, w, b, stride, padding, dilation, groups)
    if act is nn.ReLU6:
        return y.clamp_(0.0, 6.0)
    if act is nn.ReLU:
        return y.relu_()
    return y if act is nn.Identity else activation(y)
