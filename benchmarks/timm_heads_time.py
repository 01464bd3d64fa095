"""How long ``skipviz train --model timm:NAME`` takes on a 10-class ImageFolder of 1,000 images (issue 21's
target: under 15 minutes on the 2-core CPU), and whether the exported card opens as the dashboard opens it.

Method: the user's network is a small timm model (default ``resnet18``, 10 classes) saved as a safetensors file
with a seeded random init (timing does not depend on the weights' values). The folder is 100 images per class
from Imagenette's ``train/`` (``$SKIPVIZ_IMAGENETTE`` or ``../shared/datasets/imagenette``; symbolic links
under a temporary folder, nothing copied into the project). The command is run end to end through
``skipviz.cli.main`` exactly as a user types it (``train --model timm:NAME --weights W --data D
--classes-from-folders --export``: default epochs, threads and bf16 autocast), with an empty decode cache, and the
wall time of the whole command is what is reported, split into distillation and export from the run's log.
Then the exported heads file is opened with ``skipviz.dashboard.load_uploaded_weights`` (the Model page's
upload path) and run once. Writes ``benchmarks/results/timm_heads_time_cpu.{json,md}``.

    python benchmarks/timm_heads_time.py [--model resnet18] [--per-class 100]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from skipviz import GatePolicy, __version__ as skipviz_version  # noqa: E402
from skipviz.data import imagenette_root  # noqa: E402
from skipviz.measure.clock import cpu_name  # noqa: E402

TARGET_S = 15 * 60


def make_folder(src: Path, dest: Path, per_class: int) -> list[str]:
    """``dest/train/<class>/`` with ``per_class`` symbolic links per class of ``src/train``; returns the classes."""
    classes = sorted(p.name for p in (src / "train").iterdir() if p.is_dir())
    for c in classes:
        (dest / "train" / c).mkdir(parents=True)
        for f in sorted((src / "train" / c).iterdir())[:per_class]:
            (dest / "train" / c / f.name).symlink_to(f.resolve())
    return classes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet18", help="a timm model name (built with pretrained=False)")
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    src = imagenette_root()
    if src is None:
        print("Imagenette not found: set SKIPVIZ_IMAGENETTE to an ImageFolder root with train/ and val/")
        return 2
    import timm
    from safetensors.torch import save_file

    from skipviz import dashboard
    from skipviz.cli import main as skipviz_main

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        classes = make_folder(src, tmp / "folder", args.per_class)
        torch.manual_seed(0)
        model = timm.create_model(args.model, pretrained=False, num_classes=len(classes))
        weights = tmp / f"my_{args.model}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        os.environ["SKIPVIZ_CACHE"] = str(tmp / "cache")  # an empty decode cache: decoding is part of the time
        load_start = os.getloadavg()
        command = ["train", "--model", f"timm:{args.model}", "--weights", str(weights), "--data", str(tmp / "folder"),
                   "--classes-from-folders", "--out", str(tmp / "run"), "--export", "--dest", str(tmp / "export")]
        t0 = time.perf_counter()
        rc = skipviz_main(command)
        total_s = time.perf_counter() - t0
        if rc != 0:
            print(f"skipviz train returned {rc}")
            return rc
        log = [json.loads(line) for line in (tmp / "run" / "log.jsonl").read_text().splitlines()]
        config = json.loads((tmp / "run" / "config.json").read_text())
        heads = next((tmp / "export").glob("*.safetensors"))
        card = json.loads(heads.with_suffix(".json").read_text())
        t1 = time.perf_counter()
        lm = dashboard.load_uploaded_weights(f"timm:{args.model}", heads.read_bytes(), heads.name)
        from skipviz import load_image

        photo, _ = load_image(next((tmp / "folder" / "train" / classes[0]).iterdir()))
        with torch.no_grad():
            res = lm.net.run(lm.net.meta.preprocess(photo), GatePolicy(lm.net.meta.default_threshold()))
        open_s = time.perf_counter() - t1
        load_end = os.getloadavg()
    epochs_s = [round(e["seconds"], 1) for e in log]
    record = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_name(),
        "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "timm": timm.__version__, "skipviz": skipviz_version, "python": platform.python_version(),
        "model": f"timm:{args.model}", "images": args.per_class * len(classes), "classes": len(classes),
        "command": "skipviz " + " ".join(c if not c.startswith(tmp.as_posix()) else "<tmp>" for c in command),
        "epochs": config["epochs"], "batch_size": config["batch_size"], "bf16": config["autocast_bf16"],
        "total_s": total_s, "epoch_s": epochs_s, "target_s": TARGET_S, "met": total_s < TARGET_S,
        "opened_in_dashboard": lm.warning is None or "random" not in (lm.warning or ""),
        "dashboard_warning": lm.warning, "open_and_run_s": open_s, "blocks_executed": int(res.executed.sum()),
        "operating_points": {k: v.get("threshold") for k, v in card["operating_points"]["gates"].items()},
        "load_average_start": load_start, "load_average_end": load_end,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "timm_heads_time_cpu.json").write_text(json.dumps(record, indent=2, default=str))
    md = [f"# Heads for a user's timm network: `skipviz train --model timm:{args.model}` on "
          f"{record['images']:,} images",
          "", f"{record['date']}; CPU {record['cpu']} ({record['cores']} cores, {record['threads']} torch threads); "
          f"torch {record['torch']}, timm {record['timm']}; load average (1, 5, 15 min) "
          f"{', '.join(f'{v:.2f}' for v in load_start)} at the start, {', '.join(f'{v:.2f}' for v in load_end)} "
          "at the end.", "",
          "| model | images (classes) | epochs | batch | bf16 | whole command | target | met | card opens in the dashboard |",
          "|---|---:|---:|---:|---|---:|---:|---|---|",
          f"| timm:{args.model} | {record['images']:,} ({record['classes']}) | {record['epochs']} | "
          f"{record['batch_size']} | {record['bf16']} | {total_s / 60:.1f} min | {TARGET_S / 60:.0f} min | "
          f"{'yes' if record['met'] else 'no'} | {'yes' if record['opened_in_dashboard'] else 'no'} "
          f"({open_s:.1f} s to open and run once) |", "",
          f"Command: `{record['command']}`. Operating points found: {record['operating_points']}.", "",
          __doc__.split("\n\n")[1].replace("\n", " ")]
    (out / "timm_heads_time_cpu.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
