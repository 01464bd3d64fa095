"""The ``skipviz`` command, one module per command: ``predict``, ``train`` / ``train-plan``, ``reprice-card`` /
``card-exits`` (:mod:`skipviz.cli.cards`), ``audit``,
``import-weights`` and ``bench`` (the latency benchmark; :mod:`skipviz.cli.bench_common` holds what the
benchmark scripts share)."""
from __future__ import annotations

import argparse
import sys

from .._allocator import keep_heap_memory
from . import audit, bench, cards, import_weights, predict, train

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skipviz", description="Layer-skipping networks: run, inspect, audit.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (predict, train, cards, audit, import_weights, bench):
        command.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_heap_memory()  # activations are not page-faulted in again on every batch (skipviz._allocator)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
