"""Data loading: the seeded train/validation split and the validation subset a model card records."""
from __future__ import annotations

import os

import numpy as np
import pytest

from skipviz import CIFAR_MODEL, create_model, list_models
from skipviz.evaluate import calibration
from skipviz.data import cifar10_root, load_validation_subset, train_val_split


def test_train_val_split_is_seeded_sorted_and_disjoint():
    tr, val = train_val_split(100, 20, seed=3)
    again_tr, again_val = train_val_split(100, 20, seed=3)
    assert np.array_equal(val, again_val) and np.array_equal(tr, again_tr)
    assert len(val) == 20 and len(tr) == 80 and not set(tr) & set(val) and set(tr) | set(val) == set(range(100))
    assert list(val) == sorted(val) and not np.array_equal(val, train_val_split(100, 20, seed=4)[1])


@pytest.fixture(scope="module")
def cifar_and_card():
    root = cifar10_root()
    if root is None:
        pytest.skip("CIFAR-10 is not on this machine ($SKIPVIZ_CIFAR10 or ../shared/datasets/cifar10)")
    if CIFAR_MODEL not in list_models(pretrained=True):
        pytest.skip("the default model's weights and card are not in data/")
    net = create_model(CIFAR_MODEL)
    return root, net, net.meta.card["dataset"]["validation"]


def test_the_validation_subset_is_drawn_from_the_cards_split(cifar_and_card):
    from torchvision.datasets import ImageFolder

    root, net, validation = cifar_and_card
    sub = load_validation_subset(root, validation, n=12, seed=0)
    assert sub is not None and len(sub) == 12 and tuple(sub.images.shape) == (12, 3, 32, 32)
    train = ImageFolder(str(root / "train"))
    rel = [os.path.relpath(path, train.root) for path, _ in train.samples]
    _, val_idx = train_val_split(len(rel), validation["n"], validation["seed"])
    val_files = {rel[i] for i in val_idx}
    assert set(sub.files) <= val_files  # never a training image, never a test image
    assert sub.labels.tolist() == [train.class_to_idx[f.split("/")[0]] for f in sub.files]
    assert load_validation_subset(root, {**validation, "files_sha256": "0" * 64}, n=4) is None  # another split
    calib = calibration.load_calibration(net, 12)
    assert calib.source.startswith("CIFAR-10 validation subset") and calib.labelled
    assert np.array_equal(calib.images.numpy(), sub.images.numpy())


def test_calibration_says_why_it_falls_back_to_test_images(cifar_and_card):
    import copy
    import dataclasses

    root, net, validation = cifar_and_card
    card = copy.deepcopy(net.meta.card)
    card["dataset"]["validation"]["files_sha256"] = "0" * 64  # a split this machine's train/ does not give
    net.meta = dataclasses.replace(net.meta, card=card)
    calib = calibration.load_calibration(net, 8)
    assert calib.source.startswith("CIFAR-10 test subset") and "cannot be rebuilt" in calib.source
    del card["dataset"]["validation"]
    assert "records no validation split" in calibration.load_calibration(net, 8).source


def test_held_out_files_spread_over_the_split_or_say_where_to_point(monkeypatch, tmp_path):
    from skipviz.data import held_out_files

    if cifar10_root() is None:
        pytest.skip("CIFAR-10 is not on this machine (../shared/datasets/cifar10 or $SKIPVIZ_CIFAR10)")
    files, what = held_out_files(10, 20)
    assert len(files) == 20 and all("test" in f.parts for f in files)
    assert len({f.parent.name for f in files}) == 10 and "every" in what  # every class is in
    monkeypatch.setenv("SKIPVIZ_IMAGENETTE", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="SKIPVIZ_IMAGENETTE"):
        held_out_files(1000, 4)
