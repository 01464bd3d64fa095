"""One entry point over a registry of model families, as timm's ``create_model``.

The families register themselves on import (``skipviz.models`` imports every family after this module).

``create_model("cifar_resnet56")`` builds a randomly initialised network; ``create_model("cifar_resnet56",
weights="cifar10_gated")`` or ``create_model("cifar_resnet56.cifar10_gated")`` loads a pretrained tag that
the family registered; ``weights="path/to/file.safetensors"`` loads a local file safely.
"""
from __future__ import annotations

import os
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .._checkpoint import CheckpointError, apply_state_dict, load_state_dict
from ..engine.heads import PlanHead
from .timm_wrap import TIMM_PREFIX, create_timm_model
from .weights import read_card, sha256_file

__all__ = ["CIFAR_MODEL", "DEFAULT_MODEL", "PretrainedWeights", "create_model", "data_dir", "list_models", "list_pretrained",
           "register_model", "register_pretrained"]

#: The shipped CIFAR-10 model (32x32 inputs, ten classes): one click away on the dashboard, and the model the
#: tests and the CIFAR benchmarks use.
CIFAR_MODEL = "cifar_resnet56.cifar10_gated"
#: The model the command, the dashboard and the benchmarks use unless told otherwise.
DEFAULT_MODEL = "efficientnet_lite0.imagenet_gated"

_MODELS: dict[str, Callable[..., Any]] = {}
_PRETRAINED: dict[tuple[str, str], "PretrainedWeights"] = {}


def data_dir() -> Path:
    """Where shipped weights live: ``$SKIPVIZ_DATA_DIR`` or the repository's ``data/``."""
    env = os.environ.get("SKIPVIZ_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data"


@dataclass(frozen=True)
class PretrainedWeights:
    """A named set of weights for an architecture: a file under ``data/`` plus its model card."""

    arch: str
    tag: str
    filename: str
    description: str
    make_command: str = ""  # the command that creates the file (said when it is missing)
    title: str = ""  # a few words a user picks it by ("ImageNet, real photos (EfficientNet-Lite0)")

    @property
    def name(self) -> str:
        """The registry name ``arch.tag`` that :func:`create_model` takes."""
        return f"{self.arch}.{self.tag}"

    @property
    def path(self) -> Path:
        return data_dir() / self.filename

    @property
    def card_path(self) -> Path:
        return self.path.with_suffix(".json")

    def available(self) -> bool:
        return self.path.is_file()


def register_model(name: str) -> Callable:
    """Decorator: register a builder ``fn(**kwargs) -> SkipNetwork`` under ``name``."""

    def deco(fn: Callable) -> Callable:
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        _MODELS[name] = fn
        return fn

    return deco


def register_pretrained(weights: PretrainedWeights) -> None:
    _PRETRAINED[(weights.arch, weights.tag)] = weights


def list_models(pretrained: bool = False) -> list[str]:
    """Registered architectures, or with ``pretrained=True`` the ``arch.tag`` names whose file is present."""
    if pretrained:
        return sorted(f"{a}.{t}" for (a, t), w in _PRETRAINED.items() if w.available())
    return sorted(_MODELS)


def list_pretrained() -> list[PretrainedWeights]:
    return sorted(_PRETRAINED.values(), key=lambda w: (w.arch, w.tag))


def create_model(name: str, weights: str | os.PathLike | None = None, **kwargs: Any):
    """Build a registered model, optionally with weights.

    Args:
        name: an architecture (``list_models()``), ``arch.tag`` for registered pretrained weights, or
            ``timm:<name>`` for a timm model (:func:`~skipviz.models.timm_wrap.create_timm_model`).
        weights: ``None`` (random init, or the tag in ``name``), a registered tag, or a path to a
            ``.safetensors`` / weights-only torch file.
        **kwargs: passed to the family's builder (e.g. ``gates=False``).
    Returns:
        a :class:`~skipviz.engine.network.SkipNetwork` in eval mode.
    """
    if name.startswith(TIMM_PREFIX):  # any timm network with residual blocks (skipviz.models.timm_wrap)
        return create_timm_model(name[len(TIMM_PREFIX):], weights=weights, **kwargs).eval()
    arch, _, tag = name.partition(".")
    if tag and weights is not None:
        raise ValueError(f"give weights either in the name ({name!r}) or as weights=, not both")
    if arch not in _MODELS:
        raise KeyError(f"unknown model {arch!r}; registered: {', '.join(sorted(_MODELS))}")
    tag = tag or None
    if weights is not None and (arch, str(weights)) in _PRETRAINED:
        tag, weights = str(weights), None
    builder = _MODELS[arch]
    if tag is not None:
        pre = _PRETRAINED.get((arch, tag))
        if pre is None or getattr(builder, "loads_own_weights", False):
            # families with their own weight sources (torchvision, heads over a published backbone) resolve
            # tags themselves
            model = builder(weights_tag=tag, **kwargs)
            return model.eval()
        if not pre.available():
            raise FileNotFoundError(f"weights {arch}.{tag} are not in {pre.path.parent}; train them with the command "
                                    f"in the README, or pass weights=PATH")
        card = read_card(pre.card_path)
        model = builder(**{**card.get("model_kwargs", {}), **kwargs})
        _load_file(model, pre.path, weights_name=tag, card=card)
        return model.eval()
    if weights is not None:
        p = Path(weights)
        if not p.exists():
            raise CheckpointError(f"{p}: no such weights file (and not a registered tag for {arch}: "
                                  f"{[t for (a, t) in _PRETRAINED if a == arch]})")
        if getattr(builder, "loads_own_weights", False):
            # families wrapping another library's models read that library's key layout themselves
            return builder(weights_path=str(p), **kwargs).eval()
    # a weights file's card (beside it) says how the family builds the network it fits, as for a registered tag
    card = read_card(p.with_suffix(".json")) if weights is not None and p.suffix != ".json" else {}
    model = builder(**{**card.get("model_kwargs", {}), **kwargs})
    if weights is not None:
        _load_file(model, p, weights_name=p.stem, card=card)
    return model.eval()


def _load_file(model, path: Path, weights_name: str, card: dict) -> None:
    state = load_state_dict(path)
    _add_plan_head_for(model, state)
    apply_state_dict(model, state, source=path.name)
    model.meta.weights_name = weights_name
    model.meta.weights_path = str(path)
    model.meta.weights_sha256 = sha256_file(path)
    model.meta.card = card


def _add_plan_head_for(model, state: dict) -> None:
    """Give ``model`` the plan head a weights file carries (``plan_head.*``), sized from the file's tensors, when
    it was built without one: the shipped default's file loads into a plain ``create_model(arch, weights=...)``
    or a dashboard upload. A head that cannot fit (other channels or gated blocks) is left to
    :func:`apply_state_dict` to report."""
    w1, w2 = state.get("plan_head.fc1.weight"), state.get("plan_head.fc2.weight")
    if w1 is None or w2 is None or getattr(model, "plan_head", None) is not None or not model.gated_blocks:
        return
    channels = model.blocks[0].in_channels
    grid = int(round(math.sqrt(w1.shape[1] / channels)))
    if grid < 1 or grid * grid * channels != w1.shape[1] or w2.shape[0] != len(model.gated_blocks):
        return
    model.plan_head = PlanHead(channels, model.gated_blocks, grid, w1.shape[0])
