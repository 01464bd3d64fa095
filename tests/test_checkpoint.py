"""Weights files: safe loading only, clear errors for wrong or malicious files."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from skipviz import CheckpointError, create_model, load_state_dict


class Exploit:
    """Unpickling this would run code (it creates a marker file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(1), "payload": Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_state_dict(path)
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        create_model("cifar_resnet20", weights=path)


def test_roundtrip_safetensors_and_torch_file(tmp_path):
    torch.manual_seed(0)
    net = create_model("cifar_resnet20")
    x = torch.randn(2, 3, 32, 32)
    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(st))
    pt = tmp_path / "w.pt"
    torch.save({"state_dict": net.state_dict()}, pt)
    for path in (st, pt):
        other = create_model("cifar_resnet20", weights=path)
        assert torch.equal(other(x), net.eval()(x))
        assert other.meta.weights_sha256 and other.meta.weights_path == str(path)


def test_wrong_architecture_and_garbage_files(tmp_path):
    small = tmp_path / "r20.safetensors"
    save_file({k: v.contiguous() for k, v in create_model("cifar_resnet20").state_dict().items()}, str(small))
    with pytest.raises(CheckpointError, match="does not fit this model.*missing"):
        create_model("cifar_resnet32", weights=small)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x13\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_state_dict(garbage)
    text = tmp_path / "notes.pt"
    text.write_text("just text")
    with pytest.raises(CheckpointError, match="not a PyTorch weights file"):
        load_state_dict(text)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_state_dict(empty)
    with pytest.raises(CheckpointError, match="no such"):
        load_state_dict(tmp_path / "absent.safetensors")
    wrong_shape = tmp_path / "shape.safetensors"
    state = {k: v.contiguous() for k, v in create_model("cifar_resnet20").state_dict().items()}
    state["head.fc.weight"] = torch.zeros(3, 64)
    save_file(state, str(wrong_shape))
    with pytest.raises(CheckpointError, match="wrong shape"):
        create_model("cifar_resnet20", weights=wrong_shape)


def test_the_size_limit_holds_for_what_a_torch_zip_unpacks_to(tmp_path, monkeypatch):
    # torch.load accepts deflated members: a small file can unpack to a huge tensor
    import zipfile

    import skipviz._checkpoint as checkpoint_module

    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(1_000_000)}, plain)
    packed = tmp_path / "packed.pt"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    assert packed.stat().st_size < 100_000 < 4_000_000 < plain.stat().st_size
    monkeypatch.setattr(checkpoint_module, "MAX_CHECKPOINT_BYTES", 1_000_000)
    with pytest.raises(CheckpointError, match="unpack to"):
        load_state_dict(packed)
