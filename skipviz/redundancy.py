"""Inter-layer redundancy: how much does each block change what the network "sees" or "believes"?

Two ways to turn a block's output into a probability distribution, so that blocks can be compared with
the Kullback-Leibler divergence ``KL(p || q) = sum_d p_d (log p_d - log q_d)``:

``"prediction"`` (prediction KL)
    The class distribution read out after each block by the network's probe heads:
    ``p_i = softmax(net.probe(i)(out_i))``, a distribution over the K classes. Comparing blocks i and j
    asks "how much did the belief about the class change between these depths?". Needs trained probe heads
    (the CIFAR models have one after every block); a network without probes raises ``ValueError``.

``"spatial"`` (spatial-attention KL, the default)
    Where in the image a block's output is active: ``a_i = mean_c |out_i[c]|`` (N, H_i, W_i) is resized to a
    common grid (adaptive average pooling down to the grid, bilinear interpolation up to it; the default grid
    is the smallest block resolution of the network, 8x8 for CIFAR ResNets, 7x7 for ImageNet ResNets at 224)
    and normalised to sum to 1 over the G = gh * gw positions. It needs no trained heads, so it works on any
    backbone, torchvision ImageNet ResNets included.

Numerical safety: distributions are built in log space (``log_softmax`` for predictions); spatial maps are
clamped to ``eps`` and renormalised before the log, and an all-zero map becomes the uniform distribution, so
no divergence is ever NaN or infinite. Divergences are clamped at 0 (tiny negative rounding errors).

Matrix convention: ``M[n, i, j] = KL(p_i || p_j)`` for input n: row i is the block whose distribution is the
reference ``p``, column j the one it is compared to. ``divergence="js"`` gives the symmetric, bounded
(by log 2) Jensen-Shannon divergence ``JS = 0.5 KL(p_i || m) + 0.5 KL(p_j || m)``, ``m = (p_i + p_j) / 2``.

:func:`kl_between` is the one KL of the package (the audit's KL(full || skipped) between logits included,
:func:`kl_from_logits`); the policy built on these scores is :class:`skipviz.policies.kl.KLRedundancyPolicy`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .data import TensorDataset, normalize

if TYPE_CHECKING:  # pragma: no cover
    from .engine.network import SkipNetwork

Method = Literal["spatial", "prediction"]
Divergence = Literal["kl", "js"]
METHODS: tuple[str, ...] = ("spatial", "prediction")
DIVERGENCES: tuple[str, ...] = ("kl", "js")
EPS = 1e-8

METHOD_DESCRIPTIONS: dict[str, str] = {
    "prediction": "Prediction KL: the class distribution the probe head after each block reads out "
                  "(softmax of net.probe(i)), compared between blocks. Needs trained probe heads.",
    "spatial": "Spatial-attention KL: each block's output -> channel mean of |activation| -> resized to a common "
               "grid -> normalised to a distribution over positions, compared between blocks. Needs no trained "
               "heads; works on any backbone.",
}
DIVERGENCE_DESCRIPTIONS: dict[str, str] = {
    "kl": "KL(i || j): asymmetric, row block i is the reference distribution.",
    "js": "Jensen-Shannon: symmetric, bounded by log 2 = 0.693.",
}


def available_methods(net: "SkipNetwork") -> list[str]:
    """The KL definitions ``net`` supports: prediction KL needs probe heads, spatial KL works everywhere."""
    return [m for m in METHODS if m != "prediction" or net.probes is not None]


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown KL method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def _check_divergence(divergence: str) -> str:
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}")
    return divergence


def _check_input(net: "SkipNetwork", x: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(x):
        raise TypeError(f"expected a tensor of images (N, 3, H, W), got {type(x).__name__}")
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("empty batch: give at least one image")
    if not x.is_floating_point():
        raise ValueError("expected normalised float images; convert uint8 images with skipviz.data.normalize")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("images contain NaN or infinite values")
    return x


def default_grid(net: "SkipNetwork", input_hw: tuple[int, int] | None = None) -> tuple[int, int]:
    """The smallest spatial size among the block outputs for ``input_hw`` (default: the model's input size)."""
    hw = tuple(input_hw or net.meta.input_size[-2:])
    dev = next(net.parameters()).device
    with torch.no_grad():
        feats = net.forward_intermediates(torch.zeros(1, 3, *hw, device=dev), intermediates_only=True)
    return min((int(f.shape[-2]), int(f.shape[-1])) for f in feats)


def _resize(m: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(N, 1, H, W) -> (N, 1, gh, gw): average pooling when shrinking, bilinear interpolation when growing."""
    h, w = m.shape[-2:]
    if (h, w) == tuple(grid):
        return m
    if h >= grid[0] and w >= grid[1]:
        return F.adaptive_avg_pool2d(m, grid)
    return F.interpolate(m, size=grid, mode="bilinear", align_corners=False)


def spatial_log_distribution(feat: torch.Tensor, grid: tuple[int, int], eps: float = EPS) -> torch.Tensor:
    """A feature map as a log-distribution over grid positions.

    Args:
        feat: (N, C, H, W) block output (any resolution, any channel count).
        grid: (gh, gw) common grid.
    Returns:
        (N, gh * gw) log-probabilities; every row is finite and ``exp`` sums to 1 (all-zero maps -> uniform).
    """
    a = feat.detach().float().abs().mean(1, keepdim=True)  # (N, 1, H, W)
    a = _resize(a, grid).flatten(1).clamp_min(0)  # (N, G)
    total = a.sum(1, keepdim=True)
    g = a.shape[1]
    p = torch.where(total > 0, a / total.clamp_min(torch.finfo(a.dtype).tiny), torch.full_like(a, 1.0 / g))
    p = p.clamp_min(eps)
    p = p / p.sum(1, keepdim=True)
    return p.log()


def prediction_log_distribution(net: "SkipNetwork", index: int, feat: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) features after block ``index`` -> (N, K) class log-probabilities from ``net.probe(index)``."""
    probe = net.probe(index)
    if probe is None:
        raise ValueError(f"prediction KL needs probe heads, and {net.meta.arch} has none after block {index}; "
                         "use method='spatial' (works on any backbone)")
    return F.log_softmax(probe(feat).float(), dim=1)


@torch.no_grad()
def block_log_distributions(net: "SkipNetwork", x: torch.Tensor, method: Method = "spatial",
                            grid: tuple[int, int] | None = None, with_inputs: bool = False,
                            eps: float = EPS) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Each block's output as a distribution (full network, via ``net.forward_intermediates``).

    Args:
        x: (N, 3, H, W) normalised images.
        method: ``"spatial"`` or ``"prediction"`` (see the module docstring).
        grid: (gh, gw) for ``"spatial"``; default :func:`default_grid`.
        with_inputs: also return each block's *input* distribution (for the redundancy score of the block):
            spatial: the map of the block's input (the previous block's output, or the stem's);
            prediction: the probe of block i applied to the block's bypass ``net.blocks[i].bypass(input)``
            (the same shape as its output), i.e. what that probe would say were the block skipped; NaN for a
            block that has no bypass (``block.bypassable`` False).
    Returns:
        ``out`` (N, L, D) log-probabilities (D = gh * gw or K), or ``(inp, out)`` both (N, L, D).
    """
    _check_method(method)
    x = _check_input(net, x)
    if method == "prediction" and net.probes is None:
        raise ValueError(f"prediction KL needs probe heads, and {net.meta.arch} has none; use method='spatial' "
                         "(works on any backbone)")
    if net.training:
        raise RuntimeError("put the network in eval mode (net.eval()) before measuring redundancy")
    feats = net.forward_intermediates(x, intermediates_only=True, include_stem=True)  # [stem, out_0, ...]
    if method == "spatial":
        grid = tuple(grid) if grid is not None else min((int(f.shape[-2]), int(f.shape[-1])) for f in feats[1:])
        if len(grid) != 2 or min(grid) < 1:
            raise ValueError(f"grid must be two positive ints, got {grid}")
        logs = [spatial_log_distribution(f, grid, eps) for f in feats]
        out = torch.stack(logs[1:], 1)
        if not with_inputs:
            return out
        return torch.stack(logs[:-1], 1), out
    out = torch.stack([prediction_log_distribution(net, i, f) for i, f in enumerate(feats[1:])], 1)
    if not with_inputs:
        return out
    # a block without a bypass (it changes the shape and always runs) has no "were it skipped": NaN there
    inp = torch.stack([prediction_log_distribution(net, i, b.bypass(feats[i])) if b.bypassable
                       else torch.full_like(out[:, i], float("nan")) for i, b in enumerate(net.blocks)], 1)
    return inp, out


def kl_between(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Elementwise-paired KL(p || q): (..., D) log-probs, (..., D) log-probs -> (...) >= 0."""
    return (logp.exp() * (logp - logq)).sum(-1).clamp_min(0)


def kl_from_logits(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) || softmax(q)) per sample, in float64: (N, K) logits, (N, K) logits -> (N,) >= 0 (the audit's
    KL(full || skipped))."""
    return kl_between(torch.log_softmax(p_logits.double(), dim=1), torch.log_softmax(q_logits.double(), dim=1))


def pairwise_divergence(logp: torch.Tensor, divergence: Divergence = "kl") -> torch.Tensor:
    """All-pairs divergence between L distributions, batched.

    Args:
        logp: (N, L, D) log-probabilities.
    Returns:
        (N, L, L): ``[n, i, j] = KL(p_i || p_j)`` (or the symmetric JS); zero diagonal, non-negative, finite.
    """
    _check_divergence(divergence)
    p = logp.exp()
    if divergence == "kl":
        neg_entropy = (p * logp).sum(-1)  # (N, L)
        cross = torch.einsum("nid,njd->nij", p, logp)  # sum_d p_i log p_j
        out = neg_entropy.unsqueeze(2) - cross
    else:
        m = 0.5 * (p.unsqueeze(2) + p.unsqueeze(1))  # (N, L, L, D)
        logm = m.clamp_min(torch.finfo(m.dtype).tiny).log()
        kl_im = (p.unsqueeze(2) * (logp.unsqueeze(2) - logm)).sum(-1)
        kl_jm = (p.unsqueeze(1) * (logp.unsqueeze(1) - logm)).sum(-1)
        out = 0.5 * (kl_im + kl_jm)
    out = out.clamp_min(0)
    eye = torch.eye(out.shape[-1], dtype=torch.bool, device=out.device)
    return out.masked_fill(eye, 0.0)


def kl_matrix(net: "SkipNetwork", x: torch.Tensor, method: Method = "spatial", divergence: Divergence = "kl",
              grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Per-input L x L divergence matrix between blocks.

    Args:
        x: (N, 3, H, W) normalised images (or one image (3, H, W)).
    Returns:
        (N, L, L) float32 on the CPU: ``[n, i, j] = KL(p_i || p_j)`` for ``divergence="kl"``, the symmetric JS
        divergence for ``"js"``; p_i is block i's distribution under ``method``.
    """
    logp = block_log_distributions(net, x, method, grid)
    return pairwise_divergence(logp, divergence).cpu()


def adjacent(matrix: torch.Tensor) -> torch.Tensor:
    """(N, L, L) -> (N, L - 1): the adjacent-block series ``[n, i] = M[n, i, i + 1]``."""
    return torch.diagonal(matrix, offset=1, dim1=-2, dim2=-1)


@torch.no_grad()
def block_io_divergence(net: "SkipNetwork", x: torch.Tensor, method: Method = "spatial",
                        grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Per input and block, KL(input distribution || output distribution) of the block.

    Args:
        x: (N, 3, H, W). Returns: (N, L) float32, >= 0 (see :func:`block_log_distributions` for "input").
    """
    inp, out = block_log_distributions(net, x, method, grid, with_inputs=True)
    return kl_between(inp, out).cpu()


def _images(net: "SkipNetwork", data: TensorDataset | torch.Tensor, max_samples: int | None) -> torch.Tensor:
    """A data set (uint8 images) or a float tensor -> float normalised (N, 3, H, W) (at most ``max_samples``)."""
    if isinstance(data, TensorDataset):
        images = data.images
        if max_samples is not None:
            images = images[:max_samples]
        return images  # normalised per batch later
    if not torch.is_tensor(data):
        raise TypeError(f"expected a TensorDataset or an image tensor, got {type(data).__name__}")
    if data.dim() != 4:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(data.shape)}")
    return data[:max_samples] if max_samples is not None else data


def _batches(net: "SkipNetwork", images: torch.Tensor, batch_size: int):
    dev = next(net.parameters()).device
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    for i in range(0, images.shape[0], batch_size):
        xb = images[i: i + batch_size].to(dev)
        if xb.dtype == torch.uint8:
            xb = normalize(xb, net.meta.mean, net.meta.std)
        yield xb


@dataclass
class RedundancyStats:
    """Divergences between blocks over a data set.

    ``mean_matrix`` (L, L): the mean per-input matrix. ``adjacent`` DataFrame, one row per adjacent pair
    (``from``, ``to``, ``mean`` and one column per percentile, e.g. ``p10``, ``p50``, ``p90``).
    ``io`` DataFrame, one row per block: mean/percentiles of KL(block input || block output).
    """

    method: str
    divergence: str
    block_names: list[str]
    n: int
    mean_matrix: np.ndarray
    adjacent: pd.DataFrame
    io: pd.DataFrame
    percentiles: tuple[float, ...] = (10.0, 50.0, 90.0)
    grid: tuple[int, int] | None = None

    def matrix_frame(self) -> pd.DataFrame:
        """The mean matrix as a labelled DataFrame (rows: block i, columns: block j)."""
        return pd.DataFrame(self.mean_matrix, index=self.block_names, columns=self.block_names)


def _pct_frame(values: np.ndarray, percentiles: Sequence[float], base: dict[str, list]) -> pd.DataFrame:
    """values (N, M) -> DataFrame with base columns plus mean and percentile columns over N."""
    frame = pd.DataFrame(base)
    frame["mean"] = values.mean(0) if len(values) else np.nan
    for p in percentiles:
        frame[f"p{p:g}"] = np.percentile(values, p, axis=0) if len(values) else np.nan
    return frame


def dataset_redundancy(net: "SkipNetwork", data: TensorDataset | torch.Tensor, method: Method = "spatial",
                       divergence: Divergence = "kl", grid: tuple[int, int] | None = None, batch_size: int = 256,
                       max_samples: int | None = None,
                       percentiles: Sequence[float] = (10.0, 50.0, 90.0)) -> RedundancyStats:
    """Mean L x L matrix, adjacent-block series with percentiles, and block input/output KL over a data set.

    ``data``: a :class:`~skipviz.data.TensorDataset` (uint8 images, normalised here with the model's
    statistics) or a float tensor (N, 3, H, W) already normalised.
    """
    _check_method(method)
    _check_divergence(divergence)
    if any(not 0 <= p <= 100 for p in percentiles):
        raise ValueError(f"percentiles must lie in [0, 100], got {list(percentiles)}")
    images = _images(net, data, max_samples)
    if images.shape[0] == 0:
        raise ValueError("the data set is empty")
    if method == "spatial" and grid is None:
        grid = default_grid(net, tuple(images.shape[-2:]))
    total, n = None, 0
    adj, io = [], []
    for xb in _batches(net, images, batch_size):
        inp, out = block_log_distributions(net, xb, method, grid, with_inputs=True)
        mat = pairwise_divergence(out, divergence).double().cpu()
        total = mat.sum(0) if total is None else total + mat.sum(0)
        n += mat.shape[0]
        adj.append(adjacent(mat))
        io.append(kl_between(inp, out).double().cpu())
    names = net.block_names
    adj_np = torch.cat(adj).numpy()
    io_np = torch.cat(io).numpy()
    adj_frame = _pct_frame(adj_np, percentiles, {"from": names[:-1], "to": names[1:],
                                                 "pair": [f"{a} → {b}" for a, b in zip(names[:-1], names[1:])]})
    io_frame = _pct_frame(io_np, percentiles, {"block": list(range(len(names))), "name": names,
                                               "downsample": [b.downsample for b in net.blocks]})
    return RedundancyStats(method=method, divergence=divergence, block_names=list(names), n=n,
                           mean_matrix=(total / n).numpy(), adjacent=adj_frame, io=io_frame,
                           percentiles=tuple(float(p) for p in percentiles),
                           grid=tuple(grid) if grid is not None else None)


__all__ = [
    "DIVERGENCES", "DIVERGENCE_DESCRIPTIONS", "METHODS", "METHOD_DESCRIPTIONS", "RedundancyStats", "adjacent",
    "block_io_divergence", "block_log_distributions", "dataset_redundancy", "default_grid", "kl_between",
    "kl_from_logits", "kl_matrix", "pairwise_divergence", "prediction_log_distribution", "spatial_log_distribution",
]
