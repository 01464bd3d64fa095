"""Shared fixtures: tiny models and images made by the tests themselves (no downloads, no shared data)."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import toys
from toys import varied_images  # noqa: F401  (tests import it from here)

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_net():
    """A CIFAR ResNet-20 with random weights and gates that fire on some inputs and not others (:func:`toys.tiny_net`)."""
    return toys.tiny_net()


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
