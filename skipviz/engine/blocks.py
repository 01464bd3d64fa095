"""The unit the engine skips: a residual block with a bypass."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["SkippableBlock"]


class SkippableBlock(nn.Module):
    """A residual block ``y = act(residual(x) + shortcut(x))`` that can be bypassed.

    ``forward(x)``: (N, C_in, H, W) -> (N, C_out, H', W'). ``bypass(x)``: the output when the block is
    skipped, same shapes: ``x`` itself for an identity-shortcut block, the shortcut alone for a downsampling
    block (kept non-negative, like the block's post-activation output).
    """

    downsample: bool = False
    #: whether the block has a bypass at all: a block that changes the shape without a parameter-free shortcut
    #: (an MBConv block widening the channels) always runs, and policies must not skip it
    bypassable: bool = True

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
