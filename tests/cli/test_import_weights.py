"""`skipviz import-weights`: a public-layout CIFAR ResNet checkpoint becomes SkipViz weights + card; bad files
are one clear error line."""
from __future__ import annotations

import json

import torch

from skipviz import create_model
from skipviz.cli import main


def _akamaster_checkpoint(path):
    """A random cifar_resnet20 backbone saved as the public checkpoints are (``module.`` keys, legacy format)."""
    torch.manual_seed(0)
    sd = {}
    for k, v in create_model("cifar_resnet20", gates=False, probes=False).state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        k = (k.replace("stem.0.", "conv1.").replace("stem.1.", "bn1.").replace("head.fc.", "linear."))
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            k = f"layer{int(i) // 3 + 1}.{int(i) % 3}.{rest}"
        sd[f"module.{k}"] = v.contiguous()
    torch.save({"best_prec1": 91.0, "state_dict": sd}, path, _use_new_zipfile_serialization=False)


def test_import_weights_writes_weights_and_card(tmp_path, capsys):
    src = tmp_path / "resnet20-x.th"
    _akamaster_checkpoint(src)
    out = tmp_path / "r20.safetensors"
    assert main(["import-weights", str(src), "--out", str(out)]) == 0
    assert "cifar_resnet20 from resnet20-x.th" in capsys.readouterr().out
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["source"]["best_prec1"] == 91.0 and card["model_kwargs"]["gates"] is False
    net = create_model("cifar_resnet20", weights=out)
    assert net.meta.std == (0.229, 0.224, 0.225)


def test_import_weights_refuses_other_files(tmp_path, capsys):
    bad = tmp_path / "resnet18.pth"
    torch.save({"fc.weight": torch.zeros(10, 512), "conv1.weight": torch.zeros(64, 3, 7, 7)}, bad)
    assert main(["import-weights", str(bad), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "not a CIFAR ResNet" in err
    assert not list(tmp_path.glob("*.safetensors"))
