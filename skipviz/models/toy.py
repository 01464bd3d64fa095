"""Toy stand-ins: random-init networks whose gates fire on some inputs only, for timing without trained
weights and for the tests' shared toy models (``tests/toys.py``)."""
from __future__ import annotations

import torch

from ..engine.network import SkipNetwork
from ._registry import create_model

__all__ = ["random_gated_model"]


def random_gated_model(arch: str = "cifar_resnet20", seed: int = 0) -> SkipNetwork:
    """Random-init model whose gates fire on some inputs only (the tests' ``tiny_net``): a stand-in for
    timing when no trained weights exist. Its accuracy means nothing; its latency does."""
    torch.manual_seed(seed)
    net = create_model(arch)
    if not net.gated_blocks:
        raise ValueError(f"{arch} has no gate heads to randomise")
    with torch.no_grad():
        for g in net.gates.values():
            torch.nn.init.normal_(g.fc2.weight, std=3.0)
            torch.nn.init.normal_(g.fc2.bias, std=1.0)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.1)
    return net.eval()
