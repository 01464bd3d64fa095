"""The decision and read-out heads a :class:`~skipviz.engine.network.SkipNetwork` carries.

* :class:`GateHead` - ConvNet-AIG-style per-block gate: pooled features -> tiny MLP -> one execute logit.
* :class:`PlanHead` - BlockDrop-style plan head: every gated block's execute logit at once, from the stem.
* :class:`ProbeHead` - a linear classifier on a block's pooled output (early exits, prediction KL).

At inference the gate, plan and probe heads take folded fast paths (:mod:`skipviz.engine.folding`); a batch of
one is read back once and finished on the host.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .folding import _Fold, bn_is_foldable, folding_enabled

__all__ = ["HEAD_PREFIXES", "GateHead", "PlanHead", "ProbeHead"]

#: The state-dict key prefixes of a SkipNetwork's decision and read-out heads (``gates.``, ``probes.``,
#: ``plan_head.``): what a heads-only weights file holds, and what training treats as new parameters.
HEAD_PREFIXES = ("gates.", "probes.", "plan_head.")


def _sigmoid(v: float) -> float:
    """The logistic function of a Python float, without overflow for large negative or positive ``v``."""
    return 1.0 / (1.0 + math.exp(-v)) if v >= 0.0 else math.exp(v) / (1.0 + math.exp(v))


_ANY_AUTOCAST = getattr(torch._C, "_is_any_autocast_enabled", None)


def _autocast_enabled(h: torch.Tensor) -> bool:
    """Whether autocast is on (for ``h``'s device). One call into torch where it offers the any-device check:
    ``torch.is_autocast_enabled(h.device.type)`` measured 8 µs per gate decision inside a batch-1 run."""
    return bool(_ANY_AUTOCAST()) if _ANY_AUTOCAST is not None else torch.is_autocast_enabled(h.device.type)


def _channel_sums(h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, C, H, W) -> (N, C) sums over the map, accumulated and returned in ``dtype`` (float32 for half-precision
    maps; the same call as ``h.sum((2, 3))`` otherwise)."""
    return h.sum((2, 3)) if h.dtype == dtype else h.sum((2, 3), dtype=dtype)


class GateHead(nn.Module):
    """ConvNet-AIG-style gate: pooled features -> tiny MLP -> one logit per sample.

    Input (N, C, H, W); output (N,) logits; ``sigmoid`` of it is the probability that the block executes.
    """

    def __init__(self, channels: int, hidden: int = 16, init_bias: float = 2.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, 1)
        nn.init.constant_(self.fc2.bias, init_bias)  # start with every block executing
        # inference fast path (_folded_weights): w1 (C, hidden), b1 (hidden,), w2 (hidden, 1), b2 (1,), w2 as
        # floats, b2 as a float
        self._folded: _Fold | None = None

    def folds(self, h: torch.Tensor | None = None) -> bool:
        """Whether calls take the folded inference path (eval mode, running statistics, autograd off, folding
        not switched off by :func:`inference_folding`, and, given the input ``h``, no autocast on its device:
        autocast would run the folded layers in half precision on the map's sums, which overflow where the
        module path's mean does not)."""
        return (bn_is_foldable(self._modules["bn"]) and not self.training
                and (h is None or not _autocast_enabled(h)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.folds(h):
            w1, b1, w2, b2, _, _ = self._folded_weights(h)
            logits = torch.addmm(b2, torch.addmm(b1, _channel_sums(h, w1.dtype), w1).relu_(), w2).squeeze(1)
            return logits if logits.dtype == h.dtype else logits.to(h.dtype)
        z = F.relu(self.bn(self.fc1(h.mean((2, 3)))))
        return self.fc2(z).squeeze(1)

    def probability_of_one(self, h: torch.Tensor) -> float:
        """``sigmoid(forward(h))`` for a batch of ONE, (1, C, H, W) -> a Python float.

        At inference the folded first layer runs on ``h``'s device (2 kernels) and its ``hidden`` outputs are
        read back once; the ReLU, the second layer and the sigmoid are finished on the host in float64 (the
        same maths, rounded once instead of per float32 kernel): the gate's latency at batch 1 is dominated by
        per-kernel dispatch, not arithmetic. Otherwise (training, autograd) the module path and one read.
        """
        if h.shape[0] != 1:
            raise ValueError(f"a batch of one is expected, got {h.shape[0]}")
        if not self.folds(h):
            return float(torch.sigmoid(self(h)).detach().item())
        w1, b1, _, _, w2, b2 = self._folded_weights(h)
        z = torch.addmm(b1, _channel_sums(h, w1.dtype), w1).tolist()[0]
        return _sigmoid(b2 + sum(w * a for w, a in zip(w2, z) if a > 0.0))

    def _folded_weights(self, h: torch.Tensor) -> tuple:
        """The inference weights, with the spatial mean's 1/(H*W) and the eval-mode BatchNorm folded into
        ``fc1``: 2 kernels for the first layer instead of 4 module calls. Cached until a parameter or buffer is
        replaced, moved, cast or changed in place (:class:`_Fold`), or the input size or dtype changes. Equal to
        the module path up to float rounding. For float16/bfloat16 input the folded weights are float32 and the
        channel sums are taken in float32 (:func:`_channel_sums`): a half-precision sum over a large map
        overflows where the module path's mean does not.
        """
        m = self._modules  # plain dict reads: no nn.Module.__getattr__ on the hot path
        p1, p2, bn = m["fc1"]._parameters, m["fc2"]._parameters, m["bn"]
        pb, bb = bn._parameters, bn._buffers
        sources = (p1["weight"], p1["bias"], pb["weight"], pb["bias"], bb["running_mean"], bb["running_var"],
                   p2["weight"], p2["bias"], bb.get("num_batches_tracked"))  # see folded_conv_bn_weights
        extra = (h.shape[2] * h.shape[3], h.dtype)
        cache = self._folded
        if cache is None or not cache.valid_for(sources, extra):
            fc1, bn, fc2 = self.fc1, self.bn, self.fc2
            with torch.no_grad():
                scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
                acc = torch.float32 if h.dtype in (torch.float16, torch.bfloat16) else h.dtype
                w1 = (fc1.weight * (scale / extra[0]).unsqueeze(1)).to(acc).t().contiguous()
                b1 = ((fc1.bias - bn.running_mean) * scale + bn.bias).to(acc)
                w2, b2 = fc2.weight.to(acc).t().contiguous(), fc2.bias.to(acc)
                cache = self._folded = _Fold(sources, extra, (w1, b1, w2, b2, fc2.weight[0].double().tolist(),
                                                              float(fc2.bias)))
        return cache.values


class PlanHead(nn.Module):
    """BlockDrop-style plan head: every gated block's execute logit at once, from the stem's output.

    The stem's output (N, C0, H0, W0) is average-pooled to a ``grid`` x ``grid`` map, flattened (C0 * grid^2,
    :meth:`features`) and read by a two-layer MLP: (N, G) logits, one per block of ``gated_blocks`` (in that
    order). Used by :class:`~skipviz.policies.PlanPolicy`; trained by distillation from the per-block gates
    (:func:`skipviz.training.plan.fit_plan_head`, :func:`skipviz.training.plan.export_plan`).
    """

    def __init__(self, channels: int, gated_blocks: Sequence[int], grid: int = 4, hidden: int = 128) -> None:
        super().__init__()
        self.grid = int(grid)
        self.gated_blocks = [int(i) for i in gated_blocks]
        self.fc1 = nn.Linear(channels * self.grid * self.grid, hidden)
        self.fc2 = nn.Linear(hidden, len(self.gated_blocks))

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """What the MLP reads: (N, C0, H0, W0) -> (N, C0 * grid^2), the stem output average-pooled."""
        return F.adaptive_avg_pool2d(h, self.grid).flatten(1)

    def mlp(self, z: torch.Tensor) -> torch.Tensor:
        """The two-layer MLP on features ``z`` (N, C0 * grid^2) -> (N, G) logits, as modules (training)."""
        return self.fc2(F.relu(self.fc1(z)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.training and not torch.is_grad_enabled():
            return self._inference_logits(h)
        return self.mlp(self.features(h))

    def _inference_logits(self, h: torch.Tensor) -> torch.Tensor:
        """``forward`` at inference, (N, C0, H0, W0) -> (N, G): 2 GEMMs and no module calls
        (:meth:`_inference_features`). Equal to the module path up to float rounding."""
        return self._inference_mlp(*self._inference_features(h))

    def _inference_mlp(self, z: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
        """The MLP at inference on features ``z`` (N, F) read with ``w1`` (hidden, F) -> (N, G) logits."""
        p1, p2 = self._modules["fc1"]._parameters, self._modules["fc2"]._parameters  # no __getattr__
        return F.linear(F.linear(z, w1, p1["bias"]).relu_(), p2["weight"], p2["bias"])

    def _inference_features(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pooled map as ``fc1`` reads it at inference and the ``fc1`` weight to read it with: ``(z (N, F),
        w1 (hidden, F))``. When the grid divides the map, the pooling is a fixed-window ``avg_pool2d`` (the same
        windows as adaptive pooling, measured a little faster). A channels-last pooled map is read through a
        view in its own memory order (N, grid * grid * C0), with ``fc1``'s columns reordered to match
        (:meth:`_channels_last_fc1`): no flattening copy."""
        g = self.grid
        hh, ww = h.shape[-2], h.shape[-1]
        pooled = F.avg_pool2d(h, (hh // g, ww // g)) if hh % g == 0 and ww % g == 0 else \
            F.adaptive_avg_pool2d(h, g)  # (N, C0, grid, grid)
        if not pooled.is_contiguous() and pooled.is_contiguous(memory_format=torch.channels_last):
            return pooled.permute(0, 2, 3, 1).reshape(pooled.shape[0], -1), self._channels_last_fc1()
        return pooled.flatten(1), self._modules["fc1"]._parameters["weight"]

    def _channels_last_fc1(self) -> torch.Tensor:
        """``fc1.weight`` (hidden, C0 * grid^2) with its columns in channels-last order (grid, grid, C0);
        cached until the weight is replaced, moved, cast or changed in place."""
        w = self._modules["fc1"]._parameters["weight"]
        cache: _Fold | None = self.__dict__.get("_skipviz_cl_fc1")
        if cache is None or not cache.valid_for((w,)):
            with torch.no_grad():
                g = self.grid
                cl = w.detach().view(w.shape[0], -1, g, g).permute(0, 2, 3, 1).reshape(w.shape[0], -1).contiguous()
            cache = _Fold((w,), (), (cl,))
            self.__dict__["_skipviz_cl_fc1"] = cache  # a plain attribute: not in the state dict
        return cache.values[0]

    def probabilities_of_one(self, h: torch.Tensor) -> list[float]:
        """``sigmoid(forward(h))`` for a batch of ONE, (1, C0, H0, W0) -> G Python floats, read back once and
        finished on the host."""
        if h.shape[0] != 1:
            raise ValueError(f"a batch of one is expected, got {h.shape[0]}")
        if self.training or torch.is_grad_enabled():
            return [_sigmoid(v) for v in self(h)[0].tolist()]
        # inference: matrix-vector products, measured faster than 1-row GEMMs (equal up to float rounding)
        p1, p2 = self._modules["fc1"]._parameters, self._modules["fc2"]._parameters
        z, w1 = self._inference_features(h)
        if z.dtype != w1.dtype:  # autocast: the features in the autocast dtype, the weights as stored
            return [_sigmoid(v) for v in self._inference_mlp(z, w1)[0].tolist()]
        hidden = torch.addmv(p1["bias"], w1, z[0]).relu_()
        return [_sigmoid(v) for v in torch.addmv(p2["bias"], p2["weight"], hidden).tolist()]


class ProbeHead(nn.Module):
    """Linear classifier on a block's pooled output: (N, C, H, W) -> (N, K) logits.

    At inference (eval mode, no autograd, folding on, no autocast) the spatial mean's 1/(H*W) is folded into a
    transposed, contiguous copy of the weight, (C, K), read by one ``addmm`` on the map's channel sums. Measured
    inside batch-1 runs of the shipped EfficientNet-Lite0 (16 Imagenette photos, each variant after the other
    per image, 480-640 paired runs, AMD EPYC, 2 threads): its nine exit probes added 1.47 and 1.54 ms (medians,
    two runs) to a 17-18 ms forward through ``nn.Linear`` on the mean, and 1.19 and 1.25 ms this way. Most of
    what is left is not the weights: nine 10-class probes in their place still added 0.89 ms. Equal to the
    module path up to float rounding; cached like the gates' folds.
    """

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)
        self._folded: _Fold | None = None  # (w (C, K) with 1/(H*W) folded in, b (K,))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.training and folding_enabled() and not _autocast_enabled(h):
            w, b = self._folded_weights(h)
            logits = torch.addmm(b, _channel_sums(h, w.dtype), w)
            return logits if logits.dtype == h.dtype else logits.to(h.dtype)
        return self.fc(h.mean((2, 3)))

    def confidence_of_one(self, h: torch.Tensor) -> tuple[torch.Tensor, float]:
        """For a batch of ONE, (1, C, H, W) -> the logits (1, K) and the top class's softmax probability as a
        Python float, read back once: what an exit check needs, in fewer operations than ``forward`` then a
        softmax, a maximum, a comparison and a read-back per tensor (a batch-1 check is a handful of tiny
        operations, each paying its fixed cost)."""
        if h.shape[0] != 1:
            raise ValueError(f"a batch of one is expected, got {h.shape[0]}")
        logits = self(h)
        return logits, float(torch.softmax(logits, 1).max())

    def _folded_weights(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w, b)``: the weight (C, K), transposed, contiguous and divided by the map's H*W, and the bias (K,);
        float32 for a half-precision map (its channel sums are taken in float32, :func:`_channel_sums`). Cached
        until the weight or bias is replaced, moved, cast or changed in place, or the map's size or dtype
        changes."""
        p = self._modules["fc"]._parameters
        sources = (p["weight"], p["bias"])
        extra = (h.shape[2] * h.shape[3], h.dtype)
        cache = self._folded
        if cache is None or not cache.valid_for(sources, extra):
            with torch.no_grad():
                acc = torch.float32 if h.dtype in (torch.float16, torch.bfloat16) else h.dtype
                w = (p["weight"].to(acc) / extra[0]).t().contiguous()
                cache = self._folded = _Fold(sources, extra, (w, p["bias"].to(acc)))
        return cache.values
