"""Measured trend for issue 16: the gated ResNet-56's agreement-against-FLOPs curve after 3 more epochs with a 4x
stronger distillation (KL) term, against the 10-epoch checkpoint it resumed from.

The 10-epoch training state (`checkpoints/cifar_resnet56_gated/last.pt`) was copied to a run folder and resumed
with ``FinetuneConfig(epochs=13, kl_weight=4.0)`` (the cosine schedule over 13 epochs: the last three at lr
0.0025 -> 0), bf16 autocast, 2 threads at nice 19 (most of the time paused while other work was timed). This
script evaluates both checkpoints with per-block gates at several thresholds on the validation split carved from
`train/` and on `test/`: accuracy, agreement with the network's own full run, FLOPs saved. The resumed run's
training state is committed in `checkpoints/cifar_resnet56_gated_kl4/` (weights-only loadable; its config's
``out_dir`` points there, so ``finetune`` with that config and more epochs continues it).

    python benchmarks/cifar_kl_trend.py CHECKPOINT_A CHECKPOINT_B
"""
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from skipviz import FullPolicy, GatePolicy  # noqa: E402
from skipviz.evaluate import evaluate_policy  # noqa: E402
from skipviz.training.finetune import FinetuneConfig, init_network  # noqa: E402
from skipviz.training.joint import load_data  # noqa: E402

torch.set_num_threads(2)
cfg = FinetuneConfig(**json.load(open(ROOT / "checkpoints/cifar_resnet56_gated/config.json")))
_, val, test = load_data(cfg)
out = {}
paths = sys.argv[1:] or [str(ROOT / "checkpoints/cifar_resnet56_gated/last.pt"), str(ROOT / "checkpoints/cifar_resnet56_gated_kl4/last.pt")]
for name, path in zip(("A", "B"), paths):
    net, _ = init_network(cfg, ROOT / "runs" / "kl_trend_init")
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])
    net.eval()
    for split, data in (("val", val), ("test", test)):
        full = evaluate_policy(net, data, FullPolicy())
        rows = []
        for t in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5):
            g = evaluate_policy(net, data, GatePolicy(t))
            rows.append((t, round(100 * g.accuracy, 2), round(100 * g.agreement(full), 2), round(100 * g.flops_saved_fraction, 1)))
        print(name, split, "full", round(100 * full.accuracy, 2), rows, flush=True)
        out[f"{name} {split}"] = {"full": full.accuracy, "rows": rows}
print(json.dumps(out))
