"""What several commands share: loading the model, the ``--policy`` option."""
from __future__ import annotations

import argparse
import sys

from .._checkpoint import CheckpointError
from ..models._registry import DEFAULT_MODEL, create_model
from ..policies.base import Policy
from ..policies.threshold import DECISION_SOURCES, offered_sources, policy_for

__all__ = ["add_policy_argument", "load_model", "model_and_policy"]


def load_model(name: str, weights: str | None):
    """The registered model ``name``, with the weights file ``weights`` when given."""
    return create_model(name, weights=weights) if weights else create_model(name)


def model_and_policy(args: argparse.Namespace) -> tuple | None:
    """``(net, policy)`` that the ``--model``, ``--weights``, ``--policy`` and ``--threshold`` options name, or
    ``None`` (the error printed) when they cannot be loaded."""
    try:
        net = load_model(args.model or DEFAULT_MODEL, args.weights)
        source = args.policy or net.meta.default_source(offered_sources(net))
        threshold = args.threshold
        point = getattr(args, "operating_point", None)
        if point is not None:
            if threshold is not None:
                raise ValueError("give either --threshold or --operating-point, not both")
            threshold = net.meta.operating_point(point, source)
        policy: Policy = policy_for(net, source, threshold)
    except (CheckpointError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    return net, policy


def add_policy_argument(parser: argparse.ArgumentParser) -> None:
    """``--policy gates|plan|early_exit`` and ``--operating-point fast|faithful`` (skipviz predict, audit)."""
    parser.add_argument("--policy", default=None, choices=sorted(DECISION_SOURCES),
                        help="decisions from the per-block gates, the plan head at the stem, or early exits on the "
                             "probe heads (default: the source the model card recommends, else gates); --threshold "
                             "is that source's threshold")
    parser.add_argument("--operating-point", default=None, choices=["fast", "faithful"],
                        help="a threshold the model card names: fast (largest FLOPs cut within its accuracy bound) "
                             "or faithful (largest cut keeping >= 99%% agreement with the full network); "
                             "default: the card's default threshold for the source (the gates' fast point; the "
                             "exits' faithful point)")
