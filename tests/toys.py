"""The tests' shared toy models and inputs, made by the tests themselves (no downloads, no shared data)."""
from __future__ import annotations

import torch


def varied_images(n: int, seed: int) -> torch.Tensor:
    """(n, 3, 32, 32) inputs whose brightness, contrast and colour differ per sample."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    scale = torch.rand(n, 1, 1, 1, generator=g) * 2 + 0.2
    shift = torch.randn(n, 3, 1, 1, generator=g)
    return x * scale + shift


def tiny_net():
    """A CIFAR ResNet-20 with random weights and gates that fire on some inputs and not others: the library's
    :func:`~skipviz.models.toy.random_gated_model` (non-trivial BN statistics, so blocks are not identities), each
    gate then centred on a calibration batch so that about half of varied inputs execute each block."""
    from skipviz.models.toy import random_gated_model

    net = random_gated_model("cifar_resnet20", seed=0)
    with torch.no_grad():
        feats = net.forward_intermediates(varied_images(64, seed=123), intermediates_only=True, include_stem=True)
        for i in net.gated_blocks:
            gate = net.gate(i)
            gate.fc2.bias -= gate(feats[i]).median()
    return net
