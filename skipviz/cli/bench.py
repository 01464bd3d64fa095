"""``skipviz bench``: the latency benchmark (full vs skipped vs masked of gate thresholds at each batch size,
per-block profile, gate cost, prediction error) behind ``benchmarks/bench_latency.py``, and its Markdown."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..data import cifar10_root, held_out_images, load_split, normalize
from ..engine.network import SkipNetwork
from ..measure.clock import _check_counts, device_info, resolve_device
from ..measure.predict import check_prediction
from ..measure.profile import gate_cost, profile_blocks
from ..measure.runs import time_policy
from ..models._registry import CIFAR_MODEL, create_model, list_models
from ..models.toy import random_gated_model
from ..policies.threshold import DECISION_SOURCES, policy_for
from .bench_common import _fmt, environment_markdown

__all__ = ["BenchConfig", "add_bench_arguments", "add_cli", "bench_inputs", "cmd_bench", "config_from_args",
           "load_bench_model", "results_markdown", "run_benchmark", "write_results"]


@dataclass
class BenchConfig:
    """Settings of one latency benchmark run."""

    model: str | None = None  # registered name; None: the default model if its weights exist, else random init
    policy: str = "gates"  # gates (GatePolicy) | plan (PlanPolicy: a plan head) | early_exit (probe heads)
    thresholds: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 256])
    batch1_images: int = 32  # single-image runs per timed call at batch 1 (different inputs, decisions)
    repeats: int = 15
    warmup: int = 3
    profile_repeats: int = 10
    device: str = "auto"
    threads: int | None = None
    inputs: str = "auto"  # auto | cifar10 | random
    seed: int = 0
    min_repeat_s: float = 0.02  # calls per repeat are calibrated so one repeat lasts this long (0: one call)

    @classmethod
    def quick(cls, **kw) -> "BenchConfig":
        base = dict(batch_sizes=[1, 4], batch1_images=2, repeats=2, warmup=1, profile_repeats=2, min_repeat_s=0.0)
        base.update(kw)
        return cls(**base)


def load_bench_model(cfg: BenchConfig) -> tuple[SkipNetwork, str]:
    """The benchmark's gated model and a label saying which (trained weights or RANDOM INIT)."""
    name = cfg.model
    if name is None:
        # the CIFAR model: the benchmark's inputs and batch sizes are CIFAR-sized (--model picks another)
        if CIFAR_MODEL in list_models(pretrained=True):
            return create_model(CIFAR_MODEL), f"{CIFAR_MODEL} (trained weights)"
        return random_gated_model("cifar_resnet20", cfg.seed), \
            "cifar_resnet20 (RANDOM INIT, randomised gates: no trained weights in data/)"
    if name.endswith(":random"):
        arch = name[: -len(":random")]
        return random_gated_model(arch, cfg.seed), f"{arch} (RANDOM INIT, randomised gates)"
    net = create_model(name)
    if not net.gated_blocks:
        raise ValueError(f"{name} has no gate heads: the latency benchmark times gate thresholds")
    return net, name + (" (trained weights)" if "." in name else " (random init)")


def bench_inputs(net: SkipNetwork, cfg: BenchConfig, n: int) -> tuple[torch.Tensor, str]:
    """(n, 3, H, W) normalised inputs: the first n CIFAR-10 test images for a CIFAR model, held-out photos
    (:func:`~skipviz.data.held_out_images`: Imagenette ``val/`` for an ImageNet model) for another, when they are
    on this machine; else random normal (on which an early exit never fires: its savings need real images)."""
    if cfg.inputs not in ("auto", "cifar10", "random"):
        raise ValueError(f"inputs must be auto, cifar10 or random, got {cfg.inputs!r}")
    root = cifar10_root() if cfg.inputs != "random" else None
    if cfg.inputs == "cifar10" and root is None:
        raise ValueError("inputs=cifar10 but the CIFAR-10 folder is not here (set SKIPVIZ_CIFAR10)")
    if root is not None and tuple(net.meta.input_size) == (3, 32, 32):
        ds = load_split(root, "test", progress=False)
        if len(ds) >= n:
            return normalize(ds.images[:n], net.meta.mean, net.meta.std), f"CIFAR-10 test images 0..{n - 1}"
    if cfg.inputs == "auto" and tuple(net.meta.input_size) != (3, 32, 32):
        try:
            return held_out_images(net.meta, n)
        except FileNotFoundError:
            pass
    g = torch.Generator().manual_seed(cfg.seed)
    return torch.randn(n, *net.meta.input_size, generator=g), "RANDOM normal tensors (no held-out images here)"


def _check_config(cfg: BenchConfig) -> None:
    """``ValueError`` for settings the benchmark cannot run."""
    if not cfg.thresholds or any(not 0.0 <= float(t) <= 1.0 for t in cfg.thresholds):
        raise ValueError(f"thresholds must be a non-empty list in [0, 1], got {cfg.thresholds}")
    if not cfg.batch_sizes or any(int(b) < 1 for b in cfg.batch_sizes):
        raise ValueError(f"batch sizes must be >= 1, got {cfg.batch_sizes}")
    if cfg.batch1_images < 1:
        raise ValueError("batch1_images must be >= 1")
    _check_counts(cfg.warmup, cfg.repeats)
    if cfg.policy not in DECISION_SOURCES:
        raise ValueError(f"policy must be one of {sorted(DECISION_SOURCES)}, got {cfg.policy!r}")


def run_benchmark(cfg: BenchConfig, log: Callable[[str], None] | None = None) -> dict:
    """Full / skipped / masked latency of gate thresholds at each batch size, gate cost, prediction error.

    Returns a JSON-ready dict: ``environment``, ``settings``, ``model``, ``inputs``, ``rows`` (one per
    batch size x threshold, see :class:`PolicyTiming`), ``gate_cost`` and ``prediction`` per batch size.
    """
    log = log or (lambda s: None)
    _check_config(cfg)
    dev = resolve_device(cfg.device)
    net, model_label = load_bench_model(cfg)
    net = net.to(dev).eval()
    policy_for(net, cfg.policy)  # a plan on a network without a plan head fails here, before any timing
    n_inputs = max(max(cfg.batch_sizes), cfg.batch1_images)
    x_all, inputs_label = bench_inputs(net, cfg, n_inputs)
    log(f"model: {model_label}; inputs: {inputs_label}; device: {dev}")
    rows, gate_costs, profiles = [], [], []
    for bs in cfg.batch_sizes:
        x = x_all[: cfg.batch1_images] if bs == 1 else x_all[:bs]
        prof = profile_blocks(net, bs, dev, x=x_all[:bs], warmup=cfg.warmup, repeats=cfg.profile_repeats,
                              threads=cfg.threads, min_repeat_s=cfg.min_repeat_s / 2)
        profiles.append(prof.to_dict())
        gate_costs.append(gate_cost(net, prof, planned=cfg.policy == "plan").to_dict())
        for t in cfg.thresholds:
            pol = policy_for(net, cfg.policy, float(t))
            tm = time_policy(net, x, pol, batch_size=bs, warmup=cfg.warmup, repeats=cfg.repeats, device=dev,
                             threads=cfg.threads, min_repeat_s=cfg.min_repeat_s)
            check = check_prediction(prof, net, x, pol, warmup=cfg.warmup, repeats=max(2, cfg.repeats // 2),
                                     threads=cfg.threads, min_repeat_s=cfg.min_repeat_s)
            row = tm.to_dict()
            free_saved = check.decision_free_time_saved_fraction
            row.update(threshold=float(t), predicted_ms=check.predicted_ms,
                       prediction_measured_ms=check.measured_ms, prediction_relative_error=check.relative_error,
                       decision_free_time_saved_fraction=free_saved,
                       decision_free_efficiency=(free_saved / tm.flops_saved_fraction
                                                 if tm.flops_saved_fraction > 0 else None))
            rows.append(row)
            eff = "n/a" if tm.efficiency is None else f"{tm.efficiency:.2f}"
            log(f"batch {bs:4d} threshold {t:.2f}: full {tm.full_ms:.2f} ms, skipped {tm.skipped_ms:.2f} ms, "
                f"masked {tm.masked_ms:.2f} ms, FLOPs saved {tm.flops_saved_fraction:.1%}, time saved "
                f"{tm.time_saved_fraction:.1%}, efficiency {eff}, predicted {check.predicted_ms:.2f} ms "
                f"({check.relative_error:+.1%})")
    env = device_info(dev, next(net.parameters()).dtype, cfg.threads)
    return {"environment": env.to_dict(), "settings": asdict(cfg), "model": model_label, "policy": cfg.policy,
            "weights_sha256": net.meta.weights_sha256, "inputs": inputs_label, "rows": rows,
            "gate_cost": gate_costs, "profiles": profiles,
            "notes": "latencies are ms per batch (medians over repeats, interleaved full/skipped/masked); batch 1 "
                     f"is averaged over {cfg.batch1_images} different images; efficiency = time saved fraction / "
                     "FLOPs saved fraction (gate FLOPs counted as spent), from the medians over the run; paired "
                     "efficiency = the median (and quartiles) of the same ratio per interleaved round, full and "
                     "skipped back to back, so drifts of the machine's speed cancel; masked = every block computed and "
                     "mixed by the gate, as published SkipNet/ConvNet-AIG code; ceiling: free decisions = the "
                     "share of the full run's time the bypassed blocks account for, and the efficiency it allows, "
                     "from the per-block profile (the same decisions at no decision cost)"}


def results_markdown(report: dict) -> str:
    """The benchmark's Markdown table (one row per batch size x threshold) plus gate cost and environment."""
    policy = DECISION_SOURCES[report.get("policy", "gates")].title
    lines = [f"# Latency benchmark: {report['model']}, {policy}", "", environment_markdown(report["environment"]),
             f"Inputs: {report['inputs']}.", "",
             "| batch | threshold | blocks run | FLOPs saved | full ms | skipped ms | masked ms | time saved "
             "| efficiency | paired efficiency (IQR) | masked time saved | predicted ms (err) "
             "| ceiling: free decisions |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        q = r.get("paired_efficiency_quartiles")
        paired = _fmt(r.get("paired_efficiency"), ".2f") + (f" ({q[0]:.2f}-{q[1]:.2f})" if q else "")
        lines.append(
            f"| {r['batch_size']} | {r['threshold']:.2f} | {r['blocks_executed_mean']:.2f}/{r['blocks_total']} | "
            f"{r['flops_saved_fraction']:.1%} | {r['full_ms']:.3f} | {r['skipped_ms']:.3f} | "
            f"{_fmt(r['masked_ms'], '.3f')} | {r['time_saved_fraction']:.1%} | {_fmt(r['efficiency'], '.2f')} | "
            f"{paired} | "
            f"{_fmt(r['masked_time_saved_fraction'], '.1%')} | {r['predicted_ms']:.3f} "
            f"({r['prediction_relative_error']:+.1%}) | {_fmt(r.get('decision_free_time_saved_fraction'), '.1%')} "
            f"saved, {_fmt(r.get('decision_free_efficiency'), '.2f')} |")
    if report.get("settings", {}).get("policy") == "early_exit":  # gate heads play no part; the probes run inside
        lines += ["", "The exit probes' own time is inside the skipped run and in the prediction (each check at the "
                      "profile's in-run probe_ms), not in the free-decision ceiling."]
    else:
        lines += ["", "Decision heads (gate heads, all evaluated, or the plan head), share of the full network:", "",
                  "| batch | gates | FLOPs share | latency share |", "|---:|---:|---:|---:|"]
        for g in report["gate_cost"]:
            lines.append(f"| {g['batch_size']} | {g['gates']} | {g['flops_fraction']:.2%} | "
                         f"{g['latency_fraction']:.2%} |")
    lines += ["", report["notes"] + ".", ""]
    return "\n".join(lines)


def write_results(report: dict, out_dir: str | Path, stem: str | None = None,
                  markdown: Callable[[dict], str] | None = None) -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` (``markdown(report)``, default :func:`results_markdown`) under
    ``out_dir``; ``stem`` defaults to ``latency_<device>``. Returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or f"latency_{report['environment']['device_type']}"
    jp, mp = out / f"{stem}.json", out / f"{stem}.md"
    jp.write_text(json.dumps(report, indent=1, default=str))
    mp.write_text((markdown or results_markdown)(report))
    return jp, mp


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared by ``benchmarks/bench_latency.py`` and ``skipviz bench``)."""
    p.add_argument("--model", default=None, help="registered model name, or ARCH:random for random-init gates "
                                                 "(default: the default model if its weights exist, else random)")
    p.add_argument("--policy", default="gates", choices=sorted(DECISION_SOURCES),
                   help="gates: per-block gates; plan: the plan head (writes latency_plan_<device>); early_exit: "
                        "exits on the probe heads after the card's exit blocks (writes latency_early_exit_<device>; "
                        "the latency prediction charges each exit check the profile's probe_ms)")
    p.add_argument("--thresholds", type=_float_list, default=None, help="comma-separated thresholds of the source")
    p.add_argument("--batch-sizes", type=_int_list, default=None, help="comma-separated batch sizes (default 1,256)")
    p.add_argument("--batch1-images", type=int, default=None, help="images timed one by one at batch 1")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default torch's)")
    p.add_argument("--inputs", default="auto", choices=["auto", "cifar10", "random"])
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test")
    p.add_argument("--out", default="benchmarks/results", help="folder for latency_<device>.json/.md")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    base = BenchConfig.quick() if args.quick else BenchConfig()
    for name in ("model", "thresholds", "batch_sizes", "batch1_images", "repeats", "warmup", "threads"):
        v = getattr(args, name)
        if v is not None:
            setattr(base, name, v)
    base.device, base.inputs, base.policy = args.device, args.inputs, args.policy
    return base


def cmd_bench(args: argparse.Namespace) -> int:
    """``skipviz bench``: run the latency benchmark, print progress and the table, write the results."""
    try:
        cfg = config_from_args(args)
        report = run_benchmark(cfg, log=lambda s: print(s, flush=True))
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stem = f"latency{'' if cfg.policy == 'gates' else '_' + cfg.policy}_{report['environment']['device_type']}"
    if cfg.threads:  # an explicit thread count is a configuration of its own: kept beside the default's
        stem += f"_{cfg.threads}thread"
    jp, mp = write_results(report, args.out, stem)
    print(results_markdown(report))
    print(f"wrote {jp} and {mp}")
    return 0


def add_cli(subparsers) -> None:
    """Add ``skipviz bench`` to the ``skipviz`` command."""
    p = subparsers.add_parser("bench", help="measure full vs skipped vs masked latency (benchmarks/results)")
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)
