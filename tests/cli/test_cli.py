"""`skipviz predict`: prediction, per-block table, compute saved; clear errors for bad files."""
from __future__ import annotations

import torch
from PIL import Image
from safetensors.torch import save_file

from skipviz import create_model
from skipviz.cli import main


def test_predict_prints_decisions_and_savings(tmp_path, capsys):
    torch.manual_seed(0)
    weights = tmp_path / "r20.safetensors"
    save_file({k: v.contiguous() for k, v in create_model("cifar_resnet20").state_dict().items()}, str(weights))
    img = tmp_path / "cat.png"
    Image.new("RGB", (100, 80), (200, 120, 40)).save(img)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not really a jpeg")
    code = main(["predict", str(img), str(bad), "--model", "cifar_resnet20", "--weights", str(weights),
                 "--threshold", "0.99"])
    out, err = capsys.readouterr()
    assert code == 1  # one input failed, the other was still classified
    assert "prediction:" in out and "stage3.block2" in out and "gate" in out
    assert "FLOPs saved" not in err and "saved" in out and "blocks run" in out
    assert "bad.jpg: error:" in err and "not a recognised image" in err


def test_predict_with_a_malicious_weights_file_fails_cleanly(tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    torch.save({"x": print}, evil)
    img = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(img)
    assert main(["predict", str(img), "--model", "cifar_resnet20", "--weights", str(evil)]) == 2
    assert "error:" in capsys.readouterr().err


def test_predict_with_the_plan_policy(tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.new("RGB", (40, 40), (30, 90, 200)).save(img)
    assert main(["predict", str(img), "--policy", "plan"]) == 0  # the shipped default model has a plan head
    out = capsys.readouterr().out  # at its card's default, 0: no plan point pays for the head on that model
    assert "policy: plan, threshold 0.00" in out and "its head is not evaluated" in out and "0.0% saved" in out
    assert main(["predict", str(img), "--policy", "plan", "--threshold", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "policy: plan, threshold 0.50" in out and "decided at the stem" in out
    weights = tmp_path / "r20.safetensors"
    save_file({k: v.contiguous() for k, v in create_model("cifar_resnet20").state_dict().items()}, str(weights))
    assert main(["predict", str(img), "--model", "cifar_resnet20", "--weights", str(weights), "--policy", "plan"]) == 2
    assert "no plan head" in capsys.readouterr().err


def test_predict_under_early_exits_and_the_cards_default_source(tmp_path, capsys, monkeypatch):
    from skipviz.models.weights import ModelMeta

    img = tmp_path / "a.png"
    Image.new("RGB", (40, 40), (30, 90, 200)).save(img)
    assert main(["predict", str(img), "--model", "cifar_resnet20", "--policy", "early_exit", "--threshold", "0"]) == 0
    out = capsys.readouterr().out
    assert "policy: early exit, threshold 0.00" in out and "probe" in out and "exit after this block" in out
    # no --policy: the card's default source, when the network has its heads
    real = ModelMeta.default_source
    monkeypatch.setattr(ModelMeta, "default_source", lambda self, offered=None: "early_exit")
    assert main(["predict", str(img), "--model", "cifar_resnet20"]) == 0
    assert "policy: early exit, threshold 0.95" in capsys.readouterr().out  # no card: the exits' fallback
    monkeypatch.setattr(ModelMeta, "default_source", real)
    assert main(["predict", str(img), "--model", "cifar_resnet20"]) == 0
    assert "policy: gates" in capsys.readouterr().out
