"""The tests' shared toy models and inputs, made by the tests themselves (no downloads, no shared data)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval


#: The small shipped CIFAR model (ResNet-20, 9 blocks) that the dashboard tests drive: a whole-script AppTest run
#: per interaction stays fast. ``skipviz.CIFAR_MODEL`` (the ResNet-56 the dashboard offers) is tested where the
#: product's choice matters (the Model page's one-click buttons, the browser test).
SMALL_CIFAR_MODEL = "cifar_resnet20.cifar10_gated"


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


def reference_forward(net, x, skip=frozenset(), fold=True):
    """Hand-written CIFAR ResNet forward that omits the blocks in ``skip`` (written out, not the engine's code).
    ``fold``: each conv-BN pair as torch's own fused eval-mode convolution (``fuse_conv_bn_eval``), as the
    engine runs at inference; else the modules one after the other."""

    def conv_bn(h, conv, bn):
        return fuse_conv_bn_eval(conv, bn)(h) if fold else bn(conv(h))

    h = F.relu(conv_bn(x, net.stem[0], net.stem[1]))
    for i, b in enumerate(net.blocks):
        if i in skip:
            if b.downsample:  # option-A shortcut: subsample by 2, zero-pad the new channels
                h = h[:, :, ::2, ::2]
                extra = b.out_channels - b.in_channels
                h = torch.cat([h.new_zeros(h.shape[0], extra // 2, *h.shape[2:]), h,
                               h.new_zeros(h.shape[0], extra - extra // 2, *h.shape[2:])], 1)
            continue
        out = F.relu(conv_bn(h, b.conv1, b.bn1))
        out = conv_bn(out, b.conv2, b.bn2)
        sc = h
        if b.downsample:
            sc = h[:, :, ::2, ::2]
            extra = b.out_channels - b.in_channels
            sc = torch.cat([sc.new_zeros(sc.shape[0], extra // 2, *sc.shape[2:]), sc,
                            sc.new_zeros(sc.shape[0], extra - extra // 2, *sc.shape[2:])], 1)
        h = F.relu(out + sc)
    return net.head.fc(h.mean((2, 3)))


class FakeClock:
    """A deterministic stand-in for the timing source under every measurement
    (``skipviz.measure.clock._Clock.once``, seconds per call of one timed repeat, and ``_time_call``, one call on
    one input of ``measure_per_input``): the full pass takes
    ``full_s``, the skipped pass ``full_s - saving_s``, each plus a seeded normal draw of standard deviation
    ``spread_s``. With a spread far wider than the saving it is a noisy machine on which no saving is
    measurable; with a small one, a clear saving. Nothing is timed for real, so tests stay fast.

    Use: ``FakeClock(...).install(monkeypatch)``; :meth:`busy` makes the load average exceed the core count,
    :meth:`quiet` sets it to zero (the tests' own machine may be busy).
    """

    def __init__(self, full_s: float = 2e-3, saving_s: float = 0.0, spread_s: float = 1e-3, seed: int = 0) -> None:
        import numpy as np

        self.full_s, self.saving_s, self.spread_s = full_s, saving_s, spread_s
        self.rng = np.random.default_rng(seed)
        self.calls = 0

    def once(self, timed, number: int) -> float:
        self.calls += 1
        name = timed.label  # the variant's name in measure_interleaved
        base = self.full_s - (self.saving_s if name == "skipped" else 0.0)
        return max(1e-6, base + float(self.rng.normal(0.0, self.spread_s)))

    def per_input(self, name: str) -> float:
        """One call of one variant on one input (``skipviz.measure.clock._time_call``): as :meth:`once`."""
        self.calls += 1
        base = self.full_s - (self.saving_s if name == "skipped" else 0.0)
        return max(1e-6, base + float(self.rng.normal(0.0, self.spread_s)))

    def install(self, monkeypatch) -> "FakeClock":
        from skipviz.measure import clock

        fake = self
        monkeypatch.setattr(clock._Clock, "once", lambda timed, number: fake.once(timed, number))
        monkeypatch.setattr(clock, "_time_call", lambda name, fn, i, device: fake.per_input(name))
        return self

    @staticmethod
    def busy(monkeypatch, load: float = 64.0) -> None:
        import os

        monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))

    @staticmethod
    def quiet(monkeypatch) -> None:
        FakeClock.busy(monkeypatch, load=0.0)
