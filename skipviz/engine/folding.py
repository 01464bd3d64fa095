"""Inference folding: each convolution-BatchNorm pair run as one convolution, cached folded weights.

At inference (eval mode, autograd off) :func:`conv_bn` runs a convolution with its BatchNorm folded into its
weights and bias (:func:`folded_conv_bn_weights`); the gate heads fold their BatchNorm and spatial mean the same
way (:mod:`skipviz.engine.heads`). :class:`_Fold` is the cache entry both use. Training and attributions (autograd
on) run the modules as written; :func:`inference_folding` switches the folds off for a context.
"""
from __future__ import annotations

import contextlib
import operator
from contextvars import ContextVar
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

__all__ = ["ConvBNStem", "bn_is_foldable", "conv_bn", "folded_conv_bn_weights", "folding_enabled", "memory_layout",
           "inference_folding"]


class _Fold:
    """A cache entry of folded inference weights: the source tensors they were computed from and a detached
    alias of each one's storage at fold time (both held, so that no later tensor or storage can take a freed
    one's ``id`` or address and pass for it: ``module.half()`` swaps a parameter's ``.data`` and keeps its
    version counter), each one's storage address and in-place version at fold time, an extra key (input size,
    dtype...) and the folded ``values``."""

    __slots__ = ("sources", "storages", "state", "extra", "values")

    def __init__(self, sources: tuple, extra: tuple, values: tuple) -> None:
        self.sources, self.extra, self.values = sources, extra, values
        self.storages = tuple(t.detach() if t is not None else None for t in sources)
        self.state = _fold_state(sources)

    def valid_for(self, sources: tuple, extra: tuple = ()) -> bool:
        """Whether ``sources`` are the same tensors with the same contents: not replaced, moved, cast or updated
        in place (``load_state_dict`` copies in place) since the fold. An edit through ``.data``
        (``w.data.mul_(2)``) bypasses the version counters, as it does for autograd, and is not seen."""
        return (extra == self.extra and all(map(operator.is_, sources, self.sources))
                and _fold_state(sources) == self.state)


def _fold_state(tensors: Sequence[torch.Tensor | None]) -> list[tuple[int, int] | None]:
    """Storage address and in-place version counter of each tensor (``None`` stays ``None``)."""
    return [(t.data_ptr(), t._version) if t is not None else None for t in tensors]  # a list: built fastest


_FOLDING: ContextVar[bool] = ContextVar("skipviz_inference_folding", default=True)


@contextlib.contextmanager
def inference_folding(enabled: bool) -> Iterator[None]:
    """Switch the inference folds (each BatchNorm into its convolution, the gate heads' BatchNorm and mean
    into their first layer) on or off within this context (per thread and task, so other dashboard sessions
    are not affected). Off, the modules run as written, as in training: to measure what folding buys
    (benchmarks/bench_fold_bn.py) or to rule it out when comparing with another implementation."""
    token = _FOLDING.set(bool(enabled))
    try:
        yield
    finally:
        _FOLDING.reset(token)


def folding_enabled() -> bool:
    """Whether inference folds apply now: no autograd, folding not switched off (:func:`inference_folding`)."""
    return not torch.is_grad_enabled() and _FOLDING.get()


def bn_is_foldable(bn: nn.Module) -> bool:
    """Whether ``bn`` (a BatchNorm in eval mode using running statistics) may be folded away: no autograd,
    folding not switched off (:func:`inference_folding`)."""
    return not bn.training and bn.track_running_stats and not torch.is_grad_enabled() and _FOLDING.get()


def memory_layout(w: torch.Tensor) -> torch.memory_format:
    """The memory format of a 4-D tensor: ``channels_last`` when it is stored so (and not also contiguous),
    else ``contiguous_format``; for keeping a derived weight in its source's layout."""
    if w.dim() == 4 and not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def folded_conv_bn_weights(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight (C_out, C_in/g, kh, kw) and bias (C_out,) of one convolution computing eval-mode
    ``bn(conv(x))``, by ``torch.nn.utils.fusion.fuse_conv_bn_weights``, in ``conv.weight``'s memory layout.

    Cached on ``conv`` until any of its source tensors is replaced, moved, cast or changed in place, or the
    BatchNorm counts another training batch.
    """
    p, bp, bb = conv._parameters, bn._parameters, bn._buffers  # dict reads: no nn.Module.__getattr__ (hot path)
    # num_batches_tracked: a train-mode forward updates the running statistics inside the kernel without
    # bumping their version counters, but it also counts the batch with a Python add_, which does
    sources = (p["weight"], p["bias"], bp["weight"], bp["bias"], bb["running_mean"], bb["running_var"],
               bb.get("num_batches_tracked"))
    cache: _Fold | None = conv.__dict__.get("_skipviz_folded")
    if cache is None or not cache.valid_for(sources):
        with torch.no_grad():
            w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                        bn.weight, bn.bias)
            cache = _Fold(sources, (), (w.detach().contiguous(memory_format=memory_layout(conv.weight)), b.detach()))
        conv.__dict__["_skipviz_folded"] = cache  # a plain attribute: not a parameter, not in the state dict
    return cache.values


def conv_bn(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """``bn(conv(x))``, (N, C_in, H, W) -> (N, C_out, H', W').

    At inference (``bn`` in eval mode, autograd off) it is ONE convolution with the BatchNorm folded into its
    weights and bias (:func:`folded_conv_bn_weights`): equal to the two modules up to float rounding, and
    measured faster for the default model (benchmarks/results/fold_bn_cpu.md). In training, with
    autograd on (attributions), or with folding switched off (:func:`inference_folding`), the modules run as
    written.
    """
    if not bn_is_foldable(bn) or conv.padding_mode != "zeros":
        return bn(conv(x))
    w, b = folded_conv_bn_weights(conv, bn)
    return F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)


class ConvBNStem(nn.Sequential):
    """A stem ``Sequential(conv, bn, *rest)`` (activation, pooling...) whose conv and BN fold at inference
    (:func:`conv_bn`): (N, 3, H, W) -> (N, C0, H0, W0). Same modules and state-dict keys as the plain
    ``Sequential``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn, *rest = self
        x = conv_bn(x, conv, bn)
        inference = not torch.is_grad_enabled()
        for m in rest:
            # at inference the conv's output is a fresh tensor: a ReLU applies in place, without a module call
            x = x.relu_() if inference and type(m) is nn.ReLU else m(x)
        return x
