"""``skipviz audit``: run, store, reproduce a sample, write report.html/.json/.csv."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from ..audit.archive import ArchiveError, collect_inputs
from ..audit.report import write_report
from ..audit.reproduce import reproduce_sample
from ..audit.run import audit_items
from ..audit.store import AuditStore, StoreError
from ._common import add_policy_argument, model_and_policy

__all__ = ["add_cli", "cmd_audit"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def cmd_audit(args: argparse.Namespace) -> int:
    """``skipviz audit``: run, store, reproduce a sample, write report.html/.json/.csv."""
    out = Path(args.out)
    if out.suffix.lower() not in (".html", ".htm"):
        print(f"error: --out must name an .html file, got {out}", file=sys.stderr)
        return 2
    db = Path(args.db) if args.db else out.parent / "audit.sqlite"
    loaded = model_and_policy(args)
    if loaded is None:
        return 2
    net, policy = loaded
    try:
        items = collect_inputs(args.paths, labels_from_folders=args.labels_from_folders)
        bar = tqdm(total=len(items), unit="img", desc="audit", disable=args.quiet)
        state = {"done": 0}

        def progress(fraction: float, text: str) -> None:
            done = round(fraction * len(items))
            bar.update(done - state["done"])
            state["done"] = done

        with AuditStore(db) as store:
            run = audit_items(items, net, policy, store, batch_size=args.batch_size, progress=progress,
                              extra_config={"paths": list(args.paths),
                                            "labels_from_folders": args.labels_from_folders})
            bar.close()
            repro = reproduce_sample(run, net, k=args.reproduce, store=store)
        paths = write_report(run, out, reproducibility=repro)
    except (ArchiveError, StoreError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tp = run.throughput()
    agree = [r.agree for r in run.ok_records]
    print(f"run {run.run_id}: {len(run.ok_records)} audited, {len(run.failed_records)} failed; agreement with the "
          f"full network {sum(agree)}/{len(agree)}; database {db}")
    if tp["skip_images_per_s"]:
        print(f"throughput: {tp['skip_images_per_s']:.1f} img/s skipped, {tp['skip_with_shadow_images_per_s']:.1f} "
              f"img/s with the shadow run, {tp['full_images_per_s']:.1f} img/s full")
    if repro:
        print(f"reproduced {sum(r.reproduced for r in repro)}/{len(repro)} sampled records")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 1 if any(not r.reproduced for r in repro) else 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``skipviz audit`` to the ``skipviz`` command."""
    a = subparsers.add_parser("audit", help="audit skipping on a folder, file list or zip; write an HTML report")
    a.add_argument("paths", nargs="+", help="image files, folders (recursive) and .zip archives")
    a.add_argument("--model", default=None, help="registered name (default: the embedded default model)")
    a.add_argument("--weights", default=None, help="a .safetensors or weights-only torch file")
    a.add_argument("--threshold", type=float, default=None,
                   help="decision threshold (default: the card's threshold for the chosen --policy)")
    add_policy_argument(a)
    a.add_argument("--labels-from-folders", action="store_true",
                   help="the parent folder name is the true class (ImageFolder layout)")
    a.add_argument("--out", required=True, help="report.html (report.json and report.csv are written beside it)")
    a.add_argument("--db", default=None, help="SQLite audit database (default: audit.sqlite beside the report)")
    a.add_argument("--batch-size", type=_positive_int, default=None,
                   help="images per batch and per transaction (default: up to 256, by the model's activation size)")
    a.add_argument("--reproduce", type=int, default=8, help="re-run this many stored records (0: none)")
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.set_defaults(func=cmd_audit)
