"""``skipviz audit``: run, store, reproduce a sample, write report.html/.json/.csv."""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from pathlib import Path

from tqdm import tqdm

from ..audit.archive import collect_inputs
from ..audit.report import write_report
from ..audit.reproduce import reproduce_sample
from ..audit.run import LATENCY_ROUNDS, audit_items
from ..audit.shadow import SHADOW_NOT_CHECKED, SHADOW_REUSED, ShadowPlan
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


def _shadow_fraction(text: str) -> str:
    try:
        ShadowPlan.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM ends the audit as Ctrl-C does: the run is stored as ``interrupted`` (resumable), not left
    ``running``. (A kill -9 cannot be caught; the next process that opens the database marks that run.)"""
    def handler(signum, frame):  # noqa: ARG001
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. called from a test runner's worker): leave it as it is
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_audit(args: argparse.Namespace) -> int:
    """``skipviz audit``: run, store, reproduce a sample, write report.html/.json/.csv."""
    out = Path(args.out)
    if out.suffix.lower() not in (".html", ".htm"):
        print(f"error: --out must name an .html file, got {out}", file=sys.stderr)
        return 2
    missing = [p for p in args.paths if not Path(p).exists() and not Path(p).is_symlink()]
    if missing:  # a mistyped path: nothing is audited or written
        print(f"error: {missing[0]}: no such file or folder", file=sys.stderr)
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
            if "already recorded" in text:
                bar.set_postfix_str(text.split("(", 1)[1].rstrip(")"))
            done = round(fraction * len(items))
            bar.update(done - state["done"])
            state["done"] = done

        with _sigterm_interrupts(), AuditStore(db) as store:
            run = audit_items(items, net, policy, store, batch_size=args.batch_size, progress=progress,
                              resume=args.resume, latency_rounds=args.latency_rounds,
                              shadow=ShadowPlan.parse(args.shadow, reuse=not args.no_reuse),
                              extra_config={"paths": [str(Path(p).resolve()) for p in args.paths],
                                            "labels_from_folders": args.labels_from_folders})
            bar.close()
            repro = reproduce_sample(run, net, k=args.reproduce, store=store)
        paths = write_report(run, out, reproducibility=repro)
    except (StoreError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tp = run.throughput()
    agree = [r.agree for r in run.ok_records if r.agree is not None]
    unchecked = sum(r.shadow == SHADOW_NOT_CHECKED for r in run.ok_records)
    reused = sum(r.shadow == SHADOW_REUSED for r in run.ok_records)
    if args.resume:
        print(f"resumed run {run.run_id}: {run.resumed} inputs were already recorded" if run.resumed else
              f"--resume: no earlier run of this model, weights and policy over these inputs in {db}; new run")
    print(f"run {run.run_id}: {len(run.ok_records)} audited, {len(run.failed_records)} failed, "
          f"{len(run.skipped_records)} skipped (not images); agreement with the full network "
          f"{sum(agree)}/{len(agree)}" + (f" checked ({unchecked} not checked)" if unchecked else "")
          + (f", {reused} from kept full-network outputs" if reused else "") + f"; database {db}")
    if tp["end_to_end_images_per_s"]:
        print(f"throughput: {tp['end_to_end_images_per_s']:.1f} img/s end to end over {tp['images']} images")
    if run.latency:
        print(f"latency (paired, {run.latency['rounds']} rounds on {run.latency['sample_size']} of its inputs, "
              f"model time only): {run.latency['label']}")
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
    a.add_argument("--resume", action="store_true",
                   help="continue the interrupted run of the same model, weights, policy and paths in --db, "
                        "skipping the inputs it already recorded (every input appears once)")
    a.add_argument("--latency-rounds", type=int, default=LATENCY_ROUNDS,
                   help="paired rounds timing the full and the skipped run on a sample of the inputs after the "
                        f"audit (default {LATENCY_ROUNDS}; 0: not measured)")
    a.add_argument("--shadow", type=_shadow_fraction, default="all",
                   help="which inputs also run through the full network to check whether skipping changed the "
                        "answer: 'all' (default) or a fraction/percentage (e.g. 0.1 or 10%%), chosen by each "
                        "input's SHA-256; the others are recorded as not checked")
    a.add_argument("--no-reuse", action="store_true",
                   help="always run the full network, never reuse its output kept in --db for the same model, "
                        "weights, device and input bytes")
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.set_defaults(func=cmd_audit)
