"""``skipviz import-weights``: a public CIFAR ResNet checkpoint (akamaster/pytorch_resnet_cifar10 layout) as
SkipViz weights plus model card (:func:`skipviz.models.cifar_import.import_cifar_resnet`)."""
from __future__ import annotations

import argparse
import sys

from .._checkpoint import CheckpointError
from ..models.cifar_import import import_cifar_resnet

__all__ = ["add_cli", "cmd_import_weights"]


def cmd_import_weights(args: argparse.Namespace) -> int:
    try:
        path, card = import_cifar_resnet(args.path, args.out)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    src = card["source"]
    print(f"wrote {path} and {path.with_suffix('.json').name}: {card['arch']} from {src['file']} "
          f"(sha256 {src['sha256'][:12]}..., best_prec1 {src['best_prec1']} stored in the file); load it with "
          f"create_model({card['arch']!r}, weights={str(path)!r})")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``skipviz import-weights`` to the ``skipviz`` command."""
    p = sub.add_parser("import-weights", help="import a public CIFAR ResNet checkpoint (resnet20/32/44/56 .th, "
                                              "akamaster/pytorch_resnet_cifar10) as SkipViz weights + model card")
    p.add_argument("path", help="the .th checkpoint (read with torch.load(weights_only=True))")
    p.add_argument("--out", default=None, help="the .safetensors file to write, or a folder "
                                               "(default: ./cifar_resnet<depth>_akamaster.safetensors)")
    p.set_defaults(func=cmd_import_weights)
