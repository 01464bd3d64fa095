"""FLOP accounting: the per-part table of a network (``FlopTable``), counted once by ``FlopCounterMode`` or
read back from the model card that recorded it for the same weights."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch.utils.flop_counter import FlopCounterMode

if TYPE_CHECKING:  # pragma: no cover
    from .network import SkipNetwork

__all__ = ["FlopTable", "card_flop_table", "count_flops", "count_network_flops"]


@dataclass(frozen=True)
class FlopTable:
    """FLOPs (``FlopCounterMode`` counts, 2 per multiply-add) of each part for ONE input of a given size."""

    input_hw: tuple[int, int]
    stem: int
    blocks: list[int]
    bypass: list[int]
    head: int
    gates: dict[int, int] = field(default_factory=dict)
    probes: list[int] = field(default_factory=list)
    plan: int = 0  # the plan head, once per input (0: none)

    @property
    def full(self) -> int:
        """The full network: stem + every block + classifier head (no gates, no probes)."""
        return self.stem + sum(self.blocks) + self.head

    def to_dict(self) -> dict:
        """JSON-ready (gate keys as strings), for a model card."""
        return {"input_hw": list(self.input_hw), "stem": self.stem, "blocks": list(self.blocks),
                "bypass": list(self.bypass), "head": self.head, "gates": {str(k): v for k, v in self.gates.items()},
                "probes": list(self.probes), "plan": self.plan}

    @classmethod
    def from_dict(cls, d: dict) -> "FlopTable":
        return cls(input_hw=(int(d["input_hw"][0]), int(d["input_hw"][1])), stem=int(d["stem"]),
                   blocks=[int(v) for v in d["blocks"]], bypass=[int(v) for v in d["bypass"]], head=int(d["head"]),
                   gates={int(k): int(v) for k, v in d["gates"].items()}, probes=[int(v) for v in d["probes"]],
                   plan=int(d.get("plan", 0)))


def count_flops(fn, *args) -> int:
    """FLOPs of ``fn(*args)`` by ``torch.utils.flop_counter.FlopCounterMode``."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return int(counter.get_total_flops())


def card_flop_table(net: "SkipNetwork", hw: tuple[int, int]) -> FlopTable | None:
    """The table the model card recorded when these exact weights were exported (counted by the same
    ``FlopCounterMode`` code), or ``None``. Used only when the card names these weights' SHA-256 and its
    table has this network's shape; it spares the first prediction the ~2 s import that
    ``FlopCounterMode`` triggers (torch._dynamo). A test holds the shipped card equal to a fresh count."""
    raw = net.meta.card_flop_table()
    if not raw:
        return None
    try:
        table = FlopTable.from_dict(raw)
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    probes = net.probes is not None and len(net.probes) or 0
    if (table.input_hw != hw or len(table.blocks) != len(net.blocks) or len(table.bypass) != len(net.blocks)
            or sorted(table.gates) != net.gated_blocks or len(table.probes) != probes
            or (table.plan > 0) != (net.plan_head is not None)):
        return None
    if net.plan_head is not None:  # the card's plan cost holds only for a head of the card's shape
        head, shape = net.plan_head, net.meta.card_plan_head()
        if (shape.get("grid") != head.grid or shape.get("hidden") != head.fc1.out_features
                or list(shape.get("gated_blocks") or []) != head.gated_blocks):
            return None
    return table


def count_network_flops(net: "SkipNetwork", hw: tuple[int, int]) -> FlopTable:
    """Count every part of ``net`` for one (3, *hw) input: stem, each block and its bypass, gates, probes, the
    plan head and the classifier head (eval mode, no autograd; the training mode is restored)."""
    was_training = net.training
    net.eval()
    try:
        p = next(net.parameters())
        x = torch.zeros(1, 3, *hw, device=p.device, dtype=p.dtype)
        with torch.no_grad():
            stem_flops = count_flops(net.stem, x)
            h = net._stem(x)
            plan = count_flops(net.plan_head, h) if net.plan_head is not None else 0
            blocks, bypass, gates, probes = [], [], {}, []
            for i, block in enumerate(net.blocks):
                g = net.gate(i)
                if g is not None:
                    gates[i] = count_flops(g, h)
                blocks.append(count_flops(block, h))
                bypass.append(count_flops(block.bypass, h) if block.bypassable else 0)
                h = block(h)
                p = net.probe(i)
                if p is not None:
                    probes.append(count_flops(p, h))
            head = count_flops(net.head, h)
    finally:
        net.train(was_training)
    return FlopTable(input_hw=hw, stem=stem_flops, blocks=blocks, bypass=bypass, head=head, gates=gates,
                     probes=probes, plan=plan)
