"""``skipviz predict``: classify images and show every block's decision."""
from __future__ import annotations

import argparse
import sys

import pandas as pd
import torch

from .._imageio import ImageLoadError, load_image
from ..policies.words import describe_policy
from ._common import add_policy_argument, model_and_policy

__all__ = ["add_cli", "cmd_predict"]


def cmd_predict(args: argparse.Namespace) -> int:
    loaded = model_and_policy(args)
    if loaded is None:
        return 2
    net, policy = loaded
    status = 0
    for path in args.images:
        try:
            image, info = load_image(path)
        except ImageLoadError as e:
            print(f"{path}: error: {e}", file=sys.stderr)
            status = 1
            continue
        with torch.no_grad():
            trace = net.run(net.meta.preprocess(image), policy).traces()[0]
        print(f"\n{path}  ({info.width}x{info.height} {info.format}, sha256 {info.sha256[:12]})")
        print(f"model {net.meta.display_name}, policy: {describe_policy(policy)}")
        print(f"prediction: {trace.predicted_label} ({trace.confidence:.1%})")
        score = "probe" if policy.name == "early_exit" else "gate"  # what a block's score is (score_label)
        table = pd.DataFrame([{"block": b.name, "executed": "yes" if b.executed else "no",
                               score: "" if b.score is None else f"{b.score:.3f}", "reason": b.reason,
                               "MFLOPs": b.flops / 1e6} for b in trace.blocks])
        print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
        print(f"blocks run {trace.blocks_executed}/{trace.blocks_total}; FLOPs {trace.flops_executed / 1e6:.2f}M of "
              f"{trace.flops_full / 1e6:.2f}M full: {trace.flops_saved_fraction:.1%} saved")
    return status


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``skipviz predict`` to the ``skipviz`` command."""
    p = sub.add_parser("predict", help="classify images and show every block's decision")
    p.add_argument("images", nargs="+")
    p.add_argument("--model", default=None, help="registered name (default: the embedded default model)")
    p.add_argument("--weights", default=None, help="a .safetensors or weights-only torch file")
    p.add_argument("--threshold", type=float, default=None,
                   help="decision threshold (default: the card's threshold for the chosen --policy)")
    add_policy_argument(p)
    p.set_defaults(func=cmd_predict)
