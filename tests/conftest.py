"""Shared fixtures: tiny models and images made by the tests themselves (no downloads, no shared data)."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_net():
    """A CIFAR ResNet-20 with random weights and gates that fire on some inputs and not others."""
    from skipviz import create_model

    torch.manual_seed(0)
    net = create_model("cifar_resnet20")
    with torch.no_grad():
        for g in net.gates.values():
            torch.nn.init.normal_(g.fc2.weight, std=3.0)
            torch.nn.init.normal_(g.fc2.bias, std=1.0)
        for m in net.modules():  # non-trivial BN statistics so blocks are not identities
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.1)
        net.eval()
        # centre each gate on a calibration batch so that about half of varied inputs execute each block
        feats = net.forward_intermediates(varied_images(64, seed=123), intermediates_only=True, include_stem=True)
        for i in net.gated_blocks:
            gate = net.gate(i)
            gate.fc2.bias -= gate(feats[i]).median()
    return net


def varied_images(n: int, seed: int) -> torch.Tensor:
    """(n, 3, 32, 32) inputs whose brightness, contrast and colour differ per sample."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    scale = torch.rand(n, 1, 1, 1, generator=g) * 2 + 0.2
    shift = torch.randn(n, 3, 1, 1, generator=g)
    return x * scale + shift


@pytest.fixture()
def batch():
    return varied_images(8, seed=1)


@contextlib.contextmanager
def app_environment(env: dict[str, str], unset: tuple[str, ...] = ()):
    """Environment variables for a module of Streamlit AppTests (``unset`` removed), with the process-wide
    resource cache cleared on entry and exit: one model per process, built under this environment."""
    from streamlit.runtime.caching import cache_resource

    old = {k: os.environ.get(k) for k in [*env, *unset]}
    os.environ.update(env)
    for k in unset:
        os.environ.pop(k, None)
    cache_resource.clear()
    try:
        yield env
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        cache_resource.clear()


ROOT = Path(__file__).resolve().parent.parent


def run_quick_benchmark(script: str, out: Path, stem: str) -> tuple[subprocess.CompletedProcess, dict, str]:
    """Run ``benchmarks/<script> --quick --inputs random --out <out>`` in a fresh process and return the process,
    the JSON report ``<stem>.json`` and the Markdown ``<stem>.md`` it wrote."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--inputs", "random",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, json.loads((out / f"{stem}.json").read_text()), (out / f"{stem}.md").read_text()
