"""skipviz.dashboard_models: loading a registered model (with a fallback that says why), uploaded weights (a
shipped file recognised by its hash), the model tables."""
from __future__ import annotations

import pytest
import torch

from skipviz import CheckpointError, dashboard

import test_dashboard

cat_x = test_dashboard.cat_x  # the fixture, shared


def test_load_model_falls_back_with_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPVIZ_DATA_DIR", str(tmp_path))
    lm = dashboard.load_model("cifar_resnet20.cifar10_gated")
    assert lm.warning and "missing" in lm.warning and "skipviz train" in lm.warning
    assert lm.net.meta.arch == "cifar_resnet20" and not lm.net.training
    assert lm.default_threshold == 0.5
    again = dashboard.load_model("cifar_resnet20.cifar10_gated")
    assert all(torch.equal(a, b) for a, b in zip(lm.net.state_dict().values(), again.net.state_dict().values()))


def test_uploaded_weights_round_trip_and_errors(tiny_net, cat_x, tmp_path):
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tiny_net.state_dict().items()})
    lm = dashboard.load_uploaded_weights("cifar_resnet20", data, "mine.safetensors")
    with torch.no_grad():
        assert torch.allclose(lm.net(cat_x), tiny_net(cat_x), atol=1e-6)
    assert lm.net.meta.weights_sha256 and lm.net.meta.weights_path == "mine.safetensors"
    with pytest.raises(CheckpointError):
        dashboard.load_uploaded_weights("cifar_resnet20", b"not a weights file at all", "bad.safetensors")
    with pytest.raises(CheckpointError, match="empty"):
        dashboard.load_uploaded_weights("cifar_resnet20", b"", "empty.pt")
    with pytest.raises(CheckpointError, match="expected"):
        dashboard.load_uploaded_weights("cifar_resnet20", b"abc", "weights.txt")
    with pytest.raises(CheckpointError):  # right format, wrong architecture
        dashboard.load_uploaded_weights("cifar_resnet32", data, "mine.safetensors")


def test_model_tables(tiny_net):
    card = dashboard.model_card_table(tiny_net)
    values = dict(zip(card["field"], card["value"]))
    assert values["FLOPs (full, one input)"] == f"{tiny_net.flop_table().full / 1e6:.2f} M"
    assert values["architecture"] == "cifar_resnet20"
    models = dashboard.models_table()
    assert "cifar_resnet20" in set(models["model"]) and "resnet18" in set(models["model"])
    # a family with two shipped weights files (published backbone + heads, fine-tuned copy) lists both
    lite = models[models["model"] == "efficientnet_lite0"]
    assert set(lite["pretrained"]) == {"efficientnet_lite0.imagenet_gated", "efficientnet_lite0.imagenet_tuned_gated"}


def test_damaged_default_weights_fall_back_with_a_warning_and_change_the_weights_state(tmp_path, monkeypatch):
    from skipviz import CIFAR_MODEL

    monkeypatch.setenv("SKIPVIZ_DATA_DIR", str(tmp_path))
    arch = CIFAR_MODEL.partition(".")[0]
    assert dashboard.weights_state(CIFAR_MODEL) == "missing" and dashboard.weights_state(arch) == ""
    name = f"{CIFAR_MODEL.replace('.', '_')}.safetensors"
    (tmp_path / name).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\"")  # a truncated safetensors header
    lm = dashboard.load_model(CIFAR_MODEL)
    assert lm.warning and "cannot be used" in lm.warning and lm.net.meta.arch == arch
    assert dashboard.weights_state(CIFAR_MODEL).startswith(str(tmp_path / name))


def test_shipped_weights_are_recognised_by_hash():
    from skipviz import CIFAR_MODEL, list_pretrained
    from skipviz.models.weights import sha256_file

    shipped = next(w for w in list_pretrained() if w.name == CIFAR_MODEL)
    if not shipped.available():
        pytest.skip("the shipped weights are not in data/")
    assert dashboard.shipped_weights_with_sha256(shipped.arch, sha256_file(shipped.path)) == CIFAR_MODEL
    assert dashboard.shipped_weights_with_sha256(shipped.arch, "0" * 64) is None
    assert dashboard.shipped_weights_with_sha256("cifar_resnet32", sha256_file(shipped.path)) is None
