"""The skipping engine: a residual network whose blocks can be bypassed per input, for real.

A :class:`SkipNetwork` is a stem, an ordered list of :class:`SkippableBlock` and a head, plus optional
per-block gate heads (decide whether a block runs) and probe heads (a class distribution after every block).

:meth:`SkipNetwork.run` executes a batch under a :class:`~skipviz.policies.Policy`. For every block only the
samples that execute it are computed; the other samples take the block's bypass (identity, or the shortcut of
a downsampling block). At inference an identity block's executing samples are made contiguous in the batch
(the few misplaced rows swapped) and the block updates them in place (:meth:`SkipNetwork._run_contiguous`);
with autograd on, or for a downsampling block, they are gathered, run and scattered back
(:meth:`SkipNetwork._apply_block`). A bypassed block's
``forward`` is never called for that sample, so the saved FLOPs are saved time too. Nothing is multiplied by
zero.

At inference (eval mode, autograd off) each convolution-BatchNorm pair runs as one convolution with the BN
folded into its weights (:func:`conv_bn`) and each gate head's BN and spatial mean are folded into its first
layer; a batch of one reads the gate back once and decides on the host (:meth:`GateHead.probability_of_one`).
Training and attributions (autograd on) run the modules as written; :func:`inference_folding` switches the
folds off for a context.
"""
from __future__ import annotations

import contextlib
import math
import operator
import threading
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torch.utils.flop_counter import FlopCounterMode

from .policies import FullPolicy, Policy
from .trace import BlockRecord, Reason, SkipResult
from .weights import ModelMeta


class SkippableBlock(nn.Module):
    """A residual block ``y = act(residual(x) + shortcut(x))`` that can be bypassed.

    ``forward(x)``: (N, C_in, H, W) -> (N, C_out, H', W'). ``bypass(x)``: the output when the block is
    skipped, same shapes: ``x`` itself for an identity-shortcut block, the shortcut alone for a downsampling
    block (kept non-negative, like the block's post-activation output).
    """

    downsample: bool = False

    def bypass(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch, before the add and the final ReLU: (N, C_in, H, W) -> (N, C_out, H', W').
        Optional: a block without it runs ``forward_`` as ``forward`` plus a copy."""
        raise NotImplementedError

    def forward_(self, x: torch.Tensor) -> torch.Tensor:
        """In-place forward of an identity-shortcut block, for inference: overwrite ``x`` (N, C, H, W), which
        may be a view of a larger batch, with ``relu(x + residual(x))`` and return it: the same bits as
        ``forward`` (x + r == r + x exactly), with no output batch allocated. Only for callers that hold no
        other reference to ``x`` and need no gradients."""
        if self.downsample:
            raise ValueError("a downsampling block changes the shape: it cannot run in place")
        try:
            r = self.residual(x)
        except NotImplementedError:
            return x.copy_(self(x))
        return x.add_(r).relu_()


def _sigmoid(v: float) -> float:
    """The logistic function of a Python float, without overflow for large negative or positive ``v``."""
    return 1.0 / (1.0 + math.exp(-v)) if v >= 0.0 else math.exp(v) / (1.0 + math.exp(v))


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


def bn_is_foldable(bn: nn.Module) -> bool:
    """Whether ``bn`` (a BatchNorm in eval mode using running statistics) may be folded away: no autograd,
    folding not switched off (:func:`inference_folding`)."""
    return not bn.training and bn.track_running_stats and not torch.is_grad_enabled() and _FOLDING.get()


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
            layout = (torch.channels_last if conv.weight.dim() == 4 and not conv.weight.is_contiguous()
                      and conv.weight.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)
            cache = _Fold(sources, (), (w.detach().contiguous(memory_format=layout), b.detach()))
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
    (:func:`skipviz.train.fit_plan_head`, :func:`skipviz.train.export_plan`).
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
    """Linear classifier on a block's pooled output: (N, C, H, W) -> (N, K) logits."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(h.mean((2, 3)))


@dataclass(frozen=True)
class FlopTable:
    """FLOPs (``FlopCounterMode`` counts, 2 per multiply-add) of each part for ONE input of a given size."""

    input_hw: tuple[int, int]
    stem: int
    blocks: list[int]
    bypass: list[int]
    head: int
    gates: dict[int, int] = field(default_factory=dict)
    probes: list[int] = field(default_factory=list)
    plan: int = 0  # the plan head, once per input (0: none)

    @property
    def full(self) -> int:
        """The full network: stem + every block + classifier head (no gates, no probes)."""
        return self.stem + sum(self.blocks) + self.head

    def to_dict(self) -> dict:
        """JSON-ready (gate keys as strings), for a model card."""
        return {"input_hw": list(self.input_hw), "stem": self.stem, "blocks": list(self.blocks),
                "bypass": list(self.bypass), "head": self.head, "gates": {str(k): v for k, v in self.gates.items()},
                "probes": list(self.probes), "plan": self.plan}

    @classmethod
    def from_dict(cls, d: dict) -> "FlopTable":
        return cls(input_hw=(int(d["input_hw"][0]), int(d["input_hw"][1])), stem=int(d["stem"]),
                   blocks=[int(v) for v in d["blocks"]], bypass=[int(v) for v in d["bypass"]], head=int(d["head"]),
                   gates={int(k): int(v) for k, v in d["gates"].items()}, probes=[int(v) for v in d["probes"]],
                   plan=int(d.get("plan", 0)))


def count_flops(fn, *args) -> int:
    """FLOPs of ``fn(*args)`` by ``torch.utils.flop_counter.FlopCounterMode``."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return int(counter.get_total_flops())


def _dense_rows(t: torch.Tensor) -> torch.Tensor | None:
    """An (N, R) view of ``t`` (N, ...) with one row per sample in memory order, when every sample is one dense
    block of R elements (contiguous or channels-last layout); else ``None``."""
    if t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)):
        r = math.prod(t.shape[1:])
        return t.as_strided((t.shape[0], r), (r, 1))
    return None


def gather_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t.index_select(0, index)``, (N, ...) -> (K, ...), in ``t``'s memory layout.

    ``index_select`` returns a default-contiguous (NCHW) tensor whatever its input's layout: on a channels-last
    batch that is a transposing copy, and the convolutions after it would run on NCHW input. Copying whole rows
    of a flat view keeps the layout and moves memory in order (4.6x faster for a 40-row swap of the default
    model's first stage, measured).
    """
    flat = _dense_rows(t)
    if flat is None:
        return t.index_select(0, index)
    return flat.index_select(0, index).as_strided((index.numel(),) + tuple(t.shape[1:]),
                                                  (flat.shape[1],) + tuple(t.stride()[1:]))


def scatter_rows_(t: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``t.index_copy_(0, index, src)``: rows ``index`` of ``t`` (N, ...) overwritten by ``src`` (K, ...), in
    place, as whole-row copies when both have the same dense row layout (see :func:`gather_rows`)."""
    flat, flat_src = _dense_rows(t), _dense_rows(src)
    if flat is None or flat_src is None or t.shape[1:] != src.shape[1:] or t.stride()[1:] != src.stride()[1:]:
        return t.index_copy_(0, index, src)
    flat.index_copy_(0, index, flat_src)
    return t


def _densest_window(flags: list[bool], k: int) -> int:
    """Start of the first window ``flags[s:s+k]`` holding the most ``True`` entries (0 < k <= len(flags))."""
    inside = best = sum(flags[:k])
    start = 0
    for s in range(1, len(flags) - k + 1):
        inside += flags[s + k - 1] - flags[s - 1]
        if inside > best:
            best, start = inside, s
    return start


def _swap_plan(flags: list[bool], k: int) -> tuple[int, list[int], list[int]]:
    """How :meth:`SkipNetwork._run_contiguous` makes the ``k`` rows flagged True (0 < k < len) contiguous:
    ``(start, dst, src)``: the window ``[start, start + k)`` and the row swap ``h[dst] = h[src]`` (empty when
    the window already holds every executing row). ``len(dst) == 2 * m`` for m misplaced rows."""
    start = _densest_window(flags, k)
    end = start + k
    misplaced_skip = [p for p in range(start, end) if not flags[p]]
    if not misplaced_skip:
        return start, [], []
    misplaced_run = [p for p in range(start) if flags[p]] + [p for p in range(end, len(flags)) if flags[p]]
    return start, misplaced_skip + misplaced_run, misplaced_run + misplaced_skip


def misplaced_rows(executed: Sequence[Sequence[bool]], in_place: Sequence[bool]) -> list[int]:
    """Replay the engine's row arrangement on a decision mask: how many rows each block's swap moves.

    Args:
        executed: (N, L) per-sample, per-block "the block runs" flags of one batch (no early exits).
        in_place: (L,) whether block i runs in place on a contiguous window (an identity-shortcut block at
            inference, :meth:`SkipNetwork._run_contiguous`); other blocks gather and scatter and keep the order.
    Returns:
        (L,) ``m``: misplaced rows swapped before block i (the swap copies 2m rows), 0 where nothing moves.
    """
    n = len(executed)
    order = list(range(n))  # order[p]: the sample held by row p
    out = []
    for i, movable in enumerate(in_place):
        flags = [bool(executed[order[p]][i]) for p in range(n)]
        k = sum(flags)
        if not movable or k in (0, n):
            out.append(0)
            continue
        _, dst, src = _swap_plan(flags, k)
        moved = [order[q] for q in src]
        for p, sample in zip(dst, moved):
            order[p] = sample
        out.append(len(dst) // 2)
    return out


class SkipNetwork(nn.Module):
    """A skippable residual network.

    Args:
        stem: (N, 3, H, W) -> (N, C0, H0, W0).
        blocks: residual blocks in execution order.
        head: (N, C_L, H_L, W_L) -> (N, K) logits (pooling + classifier).
        block_names: one readable name per block (``"stage1.block0"``).
        meta: classes, input size, normalisation, weights identity (see :class:`~skipviz.weights.ModelMeta`).
        gates: block index -> gate head, for the blocks that have one.
        probes: one probe head per block, or ``None``.
    """

    #: Activations and convolution weights are channels-last (NHWC in memory): on CPU the default model's full
    #: forward is 1.34x / 1.27x / 1.29x faster than in NCHW at batch 1 / 64 / 256
    #: (benchmarks/results/memory_format_cpu.md), and with weights and inputs in the same layout no convolution
    #: reorders its weights on every call.
    memory_format: torch.memory_format = torch.channels_last

    def __init__(self, stem: nn.Module, blocks: Sequence[SkippableBlock], head: nn.Module, block_names: Sequence[str],
                 meta: ModelMeta, gates: dict[int, GateHead] | None = None,
                 probes: Sequence[ProbeHead] | None = None) -> None:
        super().__init__()
        if len(block_names) != len(blocks):
            raise ValueError("one name per block")
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.gates = nn.ModuleDict({str(i): g for i, g in (gates or {}).items()})
        self.probes = nn.ModuleList(probes) if probes is not None else None
        self.plan_head: PlanHead | None = None  # optional: assign one to use PlanPolicy
        self.block_names = list(block_names)
        self.meta = meta
        self._flop_cache: dict[tuple, FlopTable] = {}  # (input_hw, plan head, gate heads, probes) -> table
        self._flop_lock = threading.Lock()
        self.to(memory_format=self.memory_format)  # weights in the activations' layout: no per-call reorder

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        """The stem on ``x`` (N, 3, H, W) laid out as ``memory_format`` (a no-op when it already is)."""
        return self.stem(x.contiguous(memory_format=self.memory_format))

    # ----------------------------------------------------------------------------------------- structure
    def gate(self, index: int) -> GateHead | None:
        return self.gates._modules.get(str(index))  # one dict lookup (hot path: once per block per run)

    def probe(self, index: int) -> ProbeHead | None:
        return self.probes[index] if self.probes is not None else None

    @property
    def gated_blocks(self) -> list[int]:
        return sorted(int(k) for k in self.gates.keys())

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_channels(self) -> list[int]:
        """Output channels of each block."""
        return [b.out_channels for b in self.blocks]

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Plain full forward, (N, 3, H, W) -> (N, K) logits; no gates evaluated."""
        h = self._stem(x)
        inplace = not torch.is_grad_enabled()  # the loop owns h: identity blocks may update it in place
        for block in self.blocks:
            # written inline here and in run(): a helper call per block measured 6-10 µs per batch-1 forward
            h = block.forward_(h) if inplace and not block.downsample else block(h)
        return self.head(h)

    def run(self, x: torch.Tensor, policy: Policy | None = None) -> SkipResult:
        """Run a batch under ``policy`` (default: full), really skipping bypassed blocks.

        Args:
            x: (N, 3, H, W) normalised images.
        Returns:
            :class:`~skipviz.trace.SkipResult` with ``logits`` (N, K) and the decisions (``executed`` (N, L),
            ``scores`` (N, L), ``traces()``).
        """
        policy = policy or FullPolicy()
        n = x.shape[0]
        hw = (int(x.shape[-2]), int(x.shape[-1]))
        h = self._stem(x)  # a fresh tensor that only this loop holds: safe to update in place without autograd
        inplace = not torch.is_grad_enabled()
        records: list[BlockRecord] = []
        rows: torch.Tensor | None = None  # None: every sample still running (no early exits yet)
        exit_block: torch.Tensor | None = None
        exit_logits: list[tuple[torch.Tensor, torch.Tensor]] = []
        # with no exits, mixed identity blocks run on a contiguous window of the batch, in place (_run_contiguous)
        exits = policy.exits_early  # only early-exit policies are asked after each block
        partition = inplace and not exits
        plan = policy.plan(self, h)  # every block decided up front, or None: block by block
        if plan is not None and not exits and plan.uniform():
            # one Python bool per block for every row (a batch of one): run the blocks as the plain forward
            # does, with no per-block policy or bookkeeping work; the records come from the plan afterwards
            for execute, block in zip(plan.execute, self.blocks):
                if not execute:
                    h = block.bypass(h)
                else:
                    h = block.forward_(h) if inplace and not block.downsample else block(h)
            return SkipResult(self, policy, self.head(h), plan.records(), hw, None)
        for i, block in enumerate(self.blocks):
            d = policy.decide(self, i, h) if plan is None else plan.decide(i, rows)
            execute = d.execute
            rec = BlockRecord(rows, execute, d.reason, d.score, d.threshold, d.evaluated)
            records.append(rec)
            if execute.__class__ is bool:  # one decision for every row (a batch of one, a forced or full block)
                if not execute:
                    h = block.bypass(h)
                else:
                    h = block.forward_(h) if inplace and not block.downsample else block(h)
            elif partition and not block.downsample:
                h, rows = self._run_contiguous(block, h, execute, rows)
            else:
                h = self._apply_block(block, h, execute, inplace)
            ex = policy.exit_after(self, i, h) if exits else None
            if ex is not None:
                leave, logits, conf = ex
                rec.score, rec.gate_evaluated = conf, True
                rec.exit_now = leave
                if bool(leave.any()):
                    all_rows = rows if rows is not None else torch.arange(n, device=x.device)
                    if exit_block is None:
                        exit_block = torch.full((n,), -1, dtype=torch.long)
                    exit_block[all_rows[leave].cpu()] = i
                    exit_logits.append((all_rows[leave], logits[leave]))
                    stay = ~leave
                    rows, h = all_rows[stay], h[stay]
                    if rows.numel() == 0:
                        # everyone has left: later blocks are bypassed with no work at all
                        for j in range(i + 1, len(self.blocks)):
                            records.append(BlockRecord(rows=rows, execute=False, reason=int(Reason.EXITED), score=None,
                                                       threshold=None, gate_evaluated=False))
                        break
        if rows is not None and rows.numel() == 0:
            logits = exit_logits[0][1].new_empty((n, exit_logits[0][1].shape[1]))
        else:
            final = self.head(h)
            logits = final if rows is None else final.new_empty((n, final.shape[1])).index_copy(0, rows, final)
        for r, lg in exit_logits:
            logits = logits.index_copy(0, r, lg.to(logits.dtype))
        return SkipResult(self, policy, logits, records, hw, exit_block)

    @staticmethod
    def _run_contiguous(block: SkippableBlock, h: torch.Tensor, execute: torch.Tensor | bool,
                        rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run an identity-shortcut block in place on the rows of ``h`` that execute it, without gathering
        them into a new batch or scattering results back.

        The k executing rows are first made contiguous: of all windows ``h[s:s+k]`` the one already holding
        the most executing rows is chosen (the first such window), and each skipping row inside it is swapped
        with an executing row outside it (2m row copies for m misplaced rows, instead of 2k for a gather plus a
        scatter; rows executing the previous block tend to stay together, so m is small). The block then
        updates the view ``h[s:s+k]`` in place (``forward_``) and the bypassed rows are left as they are,
        which is their identity output. ``rows`` (M,) records which sample of the batch each row of ``h``
        holds (``None``: row i is sample i); it is returned permuted, as a new tensor, so earlier
        :class:`BlockRecord` entries keep theirs. Inference only: no autograd, and ``h`` must be a tensor only
        the caller holds.

        h: (M, C, H, W); execute: (M,) bool or one bool for all. Returns ``(h, rows)``.
        """
        if not torch.is_tensor(execute):  # a scalar that is not a plain bool (run() takes those inline)
            return (block.forward_(h) if execute else h), rows
        flags = execute.tolist()  # one device->host read per block
        k = sum(flags)
        if k == len(flags):
            return block.forward_(h), rows
        if k == 0:
            return h, rows
        start, dst_rows, src_rows = _swap_plan(flags, k)
        if dst_rows:
            dst = torch.tensor(dst_rows, device=h.device)
            src = torch.tensor(src_rows, device=h.device)
            scatter_rows_(h, dst, gather_rows(h, src))  # the gather copies first: a true swap
            if rows is None:
                rows = torch.arange(len(flags), device=h.device)
            rows = rows.index_copy(0, dst, rows.index_select(0, src))
        block.forward_(h[start:start + k])
        return h, rows

    @staticmethod
    def _apply_block(block: SkippableBlock, h: torch.Tensor, execute: torch.Tensor | bool,
                     inplace: bool = False) -> torch.Tensor:
        """Gather the samples that execute ``block``, run it on them alone, scatter the result back.

        h: (M, C, H, W); execute: (M,) bool or a bool for all. Returns (M, C', H', W').
        ``inplace``: an identity block's results are scattered into ``h`` itself (no copy of the bypassed
        rows); only for callers that hold no other reference to ``h`` and need no gradients.
        """
        if not torch.is_tensor(execute):
            return block(h) if execute else block.bypass(h)
        run_idx = execute.nonzero().squeeze(1)  # one host sync per block
        k = run_idx.numel()
        if k == h.shape[0]:
            return block(h)
        if k == 0:
            return block.bypass(h)
        ran = block(gather_rows(h, run_idx))
        if not block.downsample:
            return scatter_rows_(h, run_idx, ran) if inplace else h.index_copy(0, run_idx, ran)
        skip_idx = (~execute).nonzero().squeeze(1)
        skipped = block.bypass(gather_rows(h, skip_idx))
        layout = (torch.channels_last if ran.dim() == 4 and not ran.is_contiguous()
                  and ran.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)
        # every row is written below, in place
        out = torch.empty((h.shape[0],) + ran.shape[1:], dtype=ran.dtype, device=ran.device, memory_format=layout)
        return scatter_rows_(scatter_rows_(out, run_idx, ran), skip_idx, skipped)

    def forward_intermediates(self, x: torch.Tensor, indices: Sequence[int] | int | None = None,
                              policy: Policy | None = None, intermediates_only: bool = False,
                              include_stem: bool = False):
        """Every block's output for a batch, as timm's ``forward_intermediates``.

        Args:
            x: (N, 3, H, W).
            indices: block indices to return (negative counts from the end), an int n for the last n blocks,
                or ``None`` for all.
            policy: run under a skipping policy (default: full). A bypassed block's "output" is its bypass.
                Early-exit policies are refused (``ValueError``): a sample that left has no later features.
            intermediates_only: return only the list.
            include_stem: put the stem output (the first block's input) first in the list.
        Returns:
            ``(logits (N, K), [ (N, C_i, H_i, W_i), ... ])`` or just the list.
        """
        nb = len(self.blocks)
        if indices is None:
            wanted = list(range(nb))
        elif isinstance(indices, int):
            wanted = list(range(nb - indices, nb))
        else:
            wanted = sorted(i % nb for i in indices)
        feats: list[torch.Tensor] = []
        h = self._stem(x)
        if include_stem:
            feats.append(h)
        policy = policy or FullPolicy()
        if policy.exits_early:
            raise ValueError(f"forward_intermediates cannot run an early-exit policy ({policy.name}): a sample "
                             "that exits has no later features; use run() for its decisions and logits")
        last = wanted[-1] if (intermediates_only and wanted) else nb - 1
        plan = policy.plan(self, h)
        for i, block in enumerate(self.blocks[: last + 1]):
            d = policy.decide(self, i, h) if plan is None else plan.decide(i)
            h = self._apply_block(block, h, d.execute)
            if i in wanted:
                feats.append(h)
        if intermediates_only:
            return feats
        return self.head(h), feats

    # ------------------------------------------------------------------------------------------- FLOPs
    def flop_table(self, input_hw: tuple[int, int] | None = None) -> FlopTable:
        """Per-part FLOPs for one input of ``input_hw`` (default: the model's input size), cached."""
        hw = tuple(input_hw or self.meta.input_size[-2:])
        # the heads themselves (held, so no id can be reused): a plan head, gate or probe assigned later changes
        # the table
        key = (hw, self.plan_head, tuple(self.gates.items()), tuple(self.probes or ()))
        with self._flop_lock:
            table = self._flop_cache.get(key)
            if table is None:
                table = self._card_flop_table(hw) or self._count_flops(hw)
                if len(self._flop_cache) >= 16:  # replaced heads are not kept alive without bound
                    self._flop_cache.clear()
                self._flop_cache[key] = table
        return table

    def _card_flop_table(self, hw: tuple[int, int]) -> FlopTable | None:
        """The table the model card recorded when these exact weights were exported (counted by the same
        ``FlopCounterMode`` code), or ``None``. Used only when the card names these weights' SHA-256 and its
        table has this network's shape; it spares the first prediction the ~2 s import that
        ``FlopCounterMode`` triggers (torch._dynamo). A test holds the shipped card equal to a fresh count."""
        card = self.meta.card or {}
        raw = (card.get("flops") or {}).get("table")
        if not raw or not self.meta.weights_sha256 or card.get("weights_sha256") != self.meta.weights_sha256:
            return None
        try:
            table = FlopTable.from_dict(raw)
        except (KeyError, TypeError, ValueError, IndexError):
            return None
        probes = self.probes is not None and len(self.probes) or 0
        if (table.input_hw != hw or len(table.blocks) != len(self.blocks) or len(table.bypass) != len(self.blocks)
                or sorted(table.gates) != self.gated_blocks or len(table.probes) != probes
                or (table.plan > 0) != (self.plan_head is not None)):
            return None
        if self.plan_head is not None:  # the card's plan cost holds only for a head of the card's shape
            head, shape = self.plan_head, (card.get("plan") or {}).get("head") or {}
            if (shape.get("grid") != head.grid or shape.get("hidden") != head.fc1.out_features
                    or list(shape.get("gated_blocks") or []) != head.gated_blocks):
                return None
        return table

    def _count_flops(self, hw: tuple[int, int]) -> FlopTable:
        was_training = self.training
        self.eval()
        try:
            p = next(self.parameters())
            x = torch.zeros(1, 3, *hw, device=p.device, dtype=p.dtype)
            with torch.no_grad():
                stem_flops = count_flops(self.stem, x)
                h = self._stem(x)
                plan = count_flops(self.plan_head, h) if self.plan_head is not None else 0
                blocks, bypass, gates, probes = [], [], {}, []
                for i, block in enumerate(self.blocks):
                    g = self.gate(i)
                    if g is not None:
                        gates[i] = count_flops(g, h)
                    blocks.append(count_flops(block, h))
                    bypass.append(count_flops(block.bypass, h))
                    h = block(h)
                    p = self.probe(i)
                    if p is not None:
                        probes.append(count_flops(p, h))
                head = count_flops(self.head, h)
        finally:
            self.train(was_training)
        return FlopTable(input_hw=hw, stem=stem_flops, blocks=blocks, bypass=bypass, head=head, gates=gates,
                         probes=probes, plan=plan)

    # ---------------------------------------------------------------------------------------- training
    def forward_train(self, x: torch.Tensor, gate_temperature: float = 1.0, hard: bool = True,
                      drop_prob: float = 0.0, force_full: bool = False):
        """Training forward with differentiable gates (Gumbel-sigmoid, straight-through when ``hard``).

        During training every block is computed and mixed as ``g * block(h) + (1 - g) * bypass(h)``
        (the only way gradients reach the gates); at inference :meth:`run` skips for real.
        ``drop_prob``: stochastic depth for ungated networks (a block is dropped with this probability).
        ``force_full``: every block runs (gates are not evaluated), for training the full network.

        Returns ``(logits (N, K), gate_probs (N, G) for the gated blocks, probe_logits list of (N, K))``;
        probe heads see detached features, so they never change the backbone.
        """
        h = self._stem(x)
        gate_probs, probe_logits = [], []
        for i, block in enumerate(self.blocks):
            g_head = self.gate(i)
            out = block(h)
            if g_head is not None and not force_full:
                logit = g_head(h)
                soft = torch.sigmoid(logit)
                if self.training:
                    u = torch.rand_like(logit).clamp(1e-6, 1 - 1e-6)
                    noisy = torch.sigmoid((logit + torch.log(u) - torch.log1p(-u)) / gate_temperature)
                    g = ((noisy >= 0.5).to(noisy.dtype) - noisy).detach() + noisy if hard else noisy
                else:
                    g = (soft >= 0.5).to(soft.dtype)
                gate_probs.append(soft)
                g = g.view(-1, 1, 1, 1)
                h = g * out + (1 - g) * block.bypass(h)
            elif drop_prob > 0 and self.training and not block.downsample and not force_full:
                keep = (torch.rand(h.shape[0], 1, 1, 1, device=h.device) >= drop_prob).to(h.dtype)
                h = keep * out + (1 - keep) * h
            else:
                h = out
            if self.probes is not None:
                probe_logits.append(self.probes[i](h.detach()))
        logits = self.head(h)
        probs = torch.stack(gate_probs, 1) if gate_probs else logits.new_zeros((x.shape[0], 0))
        return logits, probs, probe_logits
