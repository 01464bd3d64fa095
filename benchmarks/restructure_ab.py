"""Interleaved A/B of the engine before and after the package restructure (issue 15): same process type, same
inputs, same weights, batch 1 and 256, the gates and the plan policy.

Method: two worker processes, one importing the old package (a ``git worktree`` of the commit before the
restructure, put first on ``PYTHONPATH``), one the new; each loads the default model and the same inputs once.
The driver then runs ``--rounds`` rounds; in each round it asks both workers, one after the other (which goes
first alternates), to time every setting once: batch 1 = ``--batch1-images`` images run one by one (ms per
image), batch 256 = one batch (ms per batch), each timed over ``--calls`` back-to-back passes on the host clock.
While one worker times, the other waits on its pipe, so the two never compete for the CPU. The result per
setting is the median over rounds of the per-round ratio new / old (drifts of the machine cancel in a round)
with its quartiles, and each side's median time.

    python benchmarks/restructure_ab.py --old /tmp/skipviz_old --rounds 30
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORKER = r"""
import json, sys, time
import torch
import skipviz
from skipviz import CIFAR_MODEL, create_model, keep_heap_memory, policy_for
from skipviz.data import cifar10_root, load_split, normalize

threads, n1, calls = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
keep_heap_memory()
net = create_model(CIFAR_MODEL).eval()
root = cifar10_root()
if root is not None:
    x = normalize(load_split(root, "test", progress=False).images[:256], net.meta.mean, net.meta.std)
    inputs = "CIFAR-10 test images 0..255"
else:
    x = torch.randn(256, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    inputs = "random normal tensors (seed 0)"
policies = {"gates": policy_for(net, "gates"), "plan": policy_for(net, "plan")}
singles = [x[i:i + 1].contiguous() for i in range(n1)]

def batch1(policy):
    for xi in singles:
        net.run(xi, policy)

def batch256(policy):
    net.run(x, policy)

settings = {f"{kind} b{bs}": (fn, pol, per) for kind, pol in policies.items()
            for bs, fn, per in ((1, batch1, n1), (256, batch256, 1))}
with torch.inference_mode():
    for fn, pol, _ in settings.values():  # warm-up
        for _ in range(3):
            fn(pol)
print(json.dumps({"ready": skipviz.__file__, "inputs": inputs,
                  "policies": {k: p.config() for k, p in policies.items()}}), flush=True)
for line in sys.stdin:
    out = {}
    with torch.inference_mode():
        for name, (fn, pol, per) in settings.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn(pol)
            out[name] = (time.perf_counter() - t0) * 1e3 / (calls * per)
    print(json.dumps(out), flush=True)
"""


def start(package_root: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, dict]:
    env = dict(os.environ, PYTHONPATH=str(package_root), SKIPVIZ_DATA_DIR=str(ROOT / "data"),
               OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(args.threads), str(args.batch1_images), str(args.calls)],
                            cwd=package_root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    hello = json.loads(proc.stdout.readline())
    if not hello["ready"].startswith(str(package_root)):
        raise SystemExit(f"worker for {package_root} imported {hello['ready']}")
    return proc, hello


def ask(proc: subprocess.Popen) -> dict:
    proc.stdin.write("go\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def quartiles(v: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(v, n=4, method="inclusive")
    return q[0], statistics.median(v), q[2]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", required=True, help="checkout of the commit before the restructure")
    p.add_argument("--old-commit", default="")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--batch1-images", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--machine-note", default="")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    workers = {"old": start(Path(args.old).resolve(), args), "new": start(ROOT, args)}
    times: dict[str, dict[str, list[float]]] = {"old": {}, "new": {}}
    for r in range(args.rounds):
        for side in (("old", "new") if r % 2 == 0 else ("new", "old")):
            for name, ms in ask(workers[side][0]).items():
                times[side].setdefault(name, []).append(ms)
    for proc, _ in workers.values():
        proc.stdin.close()
        proc.wait(timeout=60)
    rows = []
    for name in times["old"]:
        old, new = times["old"][name], times["new"][name]
        ratios = [n / o for o, n in zip(old, new)]
        q25, med, q75 = quartiles(ratios)
        rows.append({"setting": name, "old_ms": statistics.median(old), "new_ms": statistics.median(new),
                     "ratio_new_over_old": med, "ratio_q25": q25, "ratio_q75": q75,
                     "old_times_ms": old, "new_times_ms": new})
    import torch

    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "")
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cpu": model,
              "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
              "threads": args.threads, "rounds": args.rounds, "calls_per_setting": args.calls,
              "batch1_images": args.batch1_images, "old": {"path": str(args.old), "commit": args.old_commit},
              "new": {"path": str(ROOT)}, "inputs": workers["new"][1]["inputs"],
              "policies": workers["new"][1]["policies"], "machine_note": args.machine_note,
              "load_average_end": os.getloadavg(), "rows": rows,
              "method": " ".join(__doc__.split("\n\n")[1].split()).removeprefix("Method: ")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "restructure_ab_cpu.json").write_text(json.dumps(report, indent=1))
    lines = ["# Restructure A/B (issue 15): engine speed before and after", "",
             f"{report['date']}; CPU {model} ({os.cpu_count()} cores); torch {torch.__version__}; "
             f"{args.threads} thread(s); {args.rounds} interleaved rounds; inputs: {report['inputs']}; default model "
             f"`cifar_resnet20.cifar10_gated`, card thresholds.", "",
             f"Old: `{args.old_commit or args.old}`; new: this tree.", "",
             "| setting | old ms | new ms | new / old (median of per-round ratios) | IQR of the ratio |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['old_ms']:.3f} | {r['new_ms']:.3f} | {r['ratio_new_over_old']:.3f} | "
                     f"{r['ratio_q25']:.3f}-{r['ratio_q75']:.3f} |")
    lines += ["", "Batch 1: ms per image (each image its own run); batch 256: ms per batch.", "",
              "Method: " + report["method"], "", "Machine: " + (args.machine_note or "n/a"), ""]
    (out / "restructure_ab_cpu.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
