"""What a timm weights file holds, for :func:`skipviz.models.timm_wrap.create_timm_model` (private).

* :func:`heads_only` - whether a file holds only SkipViz's decision heads
  (:data:`skipviz.engine.heads.HEAD_PREFIXES`: an exported heads file); :func:`load_heads` - those
  tensors loaded strictly into a wrapped network's heads.
* :func:`read_heads_card` - an exported heads file's model card: the ``.json`` beside it, else the copy in its
  safetensors metadata (:data:`CARD_METADATA_KEY`).
* :func:`build_timm` - timm's model by name, never downloaded; :func:`classifier_keys` - its classifier's keys
  (the file's classifier size sets ``num_classes``).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from .._checkpoint import CheckpointError, apply_state_dict
from ..engine.heads import HEAD_PREFIXES, PlanHead
from ..engine.network import SkipNetwork
from .weights import read_card

__all__ = ["CARD_METADATA_KEY", "HEAD_PREFIXES", "build_timm", "classifier_keys", "heads_only", "load_heads",
           "read_heads_card"]

#: the safetensors metadata entry holding an exported heads file's model card (JSON)
CARD_METADATA_KEY = "skipviz_card"


def build_timm(name: str, num_classes: int | None, timm_kwargs: dict) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=..., **timm_kwargs)``: never downloads;
    ``KeyError`` naming similar models for a name timm does not know."""
    import timm

    if not timm.is_model(name):
        near = timm.list_models(f"*{name.split('.')[0][:12]}*")[:8]
        raise KeyError(f"timm has no model {name!r}" + (f"; similar: {', '.join(near)}" if near else ""))
    kwargs = dict(timm_kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    return timm.create_model(name, pretrained=False, **kwargs)  # never downloads


def classifier_keys(model: nn.Module) -> tuple[str, ...]:
    """The state-dict keys of a timm model's classifier (``get_classifier()``), ``()`` when it has none."""
    try:
        clf = model.get_classifier()
    except (AttributeError, TypeError):
        return ()
    ids = {id(t) for t in clf.state_dict(keep_vars=True).values()}
    return tuple(k for k, t in model.state_dict(keep_vars=True).items() if id(t) in ids)


def read_heads_card(path: str | os.PathLike) -> dict:
    """The model card of an exported heads file: the ``.json`` beside it, else the copy in the file's
    safetensors metadata (an uploaded file travels without its neighbour); ``{}`` when there is neither."""
    p = Path(path)
    card = read_card(p.with_suffix(".json"))
    if card or p.suffix != ".safetensors":
        return card
    from safetensors import safe_open

    try:
        with safe_open(str(p), "pt") as f:
            raw = (f.metadata() or {}).get(CARD_METADATA_KEY)
    except Exception:  # an unreadable file is reported by load_state_dict with its reason
        return {}
    if not raw:
        return {}
    try:
        card = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p.name}: its embedded model card is not JSON ({e})") from e
    return card if isinstance(card, dict) else {}


def heads_only(state: dict) -> bool:
    """Whether a state dict holds decision-head tensors and nothing else (an exported heads file)."""
    return bool(state) and all(k.startswith(HEAD_PREFIXES) for k in state)


def load_heads(net: SkipNetwork, heads: dict[str, torch.Tensor], source: str) -> None:
    """Load gate/probe/plan head tensors strictly into the heads ``net`` has (adding a plan head sized from the
    file when ``net`` has none)."""
    w1, w2 = heads.get("plan_head.fc1.weight"), heads.get("plan_head.fc2.weight")
    if w1 is not None and w2 is not None and net.plan_head is None and net.gated_blocks:
        channels = net.blocks[0].in_channels
        grid = int(round(math.sqrt(w1.shape[1] / channels)))
        net.plan_head = PlanHead(channels, net.gated_blocks, max(1, grid), w1.shape[0])
    parts = {"gates": net.gates, "probes": net.probes, "plan_head": net.plan_head}
    apply_state_dict(nn.ModuleDict({k: m for k, m in parts.items() if m is not None and len(list(m.parameters()))}),
                     heads, source=source)
