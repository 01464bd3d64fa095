"""What every explanation shares: the private model replica Captum hooks into (one per model, refreshed when
its weights change, serialised by a lock), and one input's decisions under a policy.

Captum registers hooks on the model's modules. All attribution runs on a private replica of the model (a deep
copy made once per model), so concurrent users of one cached model neither see each other's hooks nor disturb
plain ``net.run`` calls on the original.
"""
from __future__ import annotations

import copy
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..policies.base import Policy
from ..policies.simple import FullPolicy

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.network import SkipNetwork

__all__ = ["RunDecisions", "replica", "run_decisions"]


class _Replica:
    def __init__(self, net: "SkipNetwork") -> None:
        self.lock = threading.Lock()
        self.fingerprint = _fingerprint(net)
        self.model = _clone(net)


_REPLICAS: "weakref.WeakKeyDictionary[SkipNetwork, _Replica]" = weakref.WeakKeyDictionary()


_REPLICAS_LOCK = threading.Lock()


_LOCK_FACTORIES = {type(threading.Lock()): threading.Lock, type(threading.RLock()): threading.RLock}


def _fingerprint(net: "SkipNetwork") -> tuple:
    """Changes when a parameter or buffer is replaced or modified in place (``_version`` counters)."""
    return tuple((id(t), t._version) for t in list(net.parameters()) + list(net.buffers()))


def _clone(net: "SkipNetwork") -> "SkipNetwork":
    """Deep copy of the model in eval mode; locks it holds are replaced by fresh ones (locks cannot be copied)."""
    memo: dict[int, object] = {}
    for m in net.modules():
        for v in vars(m).values():
            make = _LOCK_FACTORIES.get(type(v))
            if make is not None:
                memo[id(v)] = make()
    return copy.deepcopy(net, memo).eval()


def replica(net: "SkipNetwork") -> tuple["SkipNetwork", threading.Lock]:
    """The private copy of ``net`` that explanations hook into, and the lock that serialises its use."""
    with _REPLICAS_LOCK:
        rep = _REPLICAS.get(net)
        if rep is None or rep.fingerprint != _fingerprint(net):
            rep = _Replica(net)
            _REPLICAS[net] = rep
        return rep.model, rep.lock


@dataclass(frozen=True)
class RunDecisions:
    """What a policy did for one input: ``executed`` (L,), reason texts, the prediction, the exit block."""

    policy: dict
    executed: list[bool]
    reasons: list[str]
    exit_block: int | None
    predicted_index: int
    predicted_label: str
    confidence: float


def _check_one(net: "SkipNetwork", x: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(x):
        raise TypeError(f"expected an image tensor (1, 3, H, W), got {type(x).__name__}")
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[0] != 1 or x.shape[1] != 3:
        raise ValueError(f"explanations work on one image at a time: expected (1, 3, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point() or not bool(torch.isfinite(x).all()):
        raise ValueError("expected a normalised, finite float image (see net.meta.preprocess)")
    return x.detach().to(next(net.parameters()).device)


def _check_target(net: "SkipNetwork", target: int) -> int:
    k = net.meta.num_classes
    if not 0 <= int(target) < k:
        raise ValueError(f"target class {target} out of range: the model has {k} classes")
    return int(target)


def run_decisions(net: "SkipNetwork", x: torch.Tensor, policy: Policy | None) -> RunDecisions:
    """The policy's decisions for one image (1, 3, H, W) on ``net`` (no gradients)."""
    policy = policy or FullPolicy()
    with torch.no_grad():
        tr = net.run(x, policy).traces()[0]
    return RunDecisions(policy=policy.config(), executed=tr.executed_mask, reasons=[b.reason for b in tr.blocks],
                        exit_block=tr.exit_block, predicted_index=tr.predicted_index,
                        predicted_label=tr.predicted_label, confidence=tr.confidence)
