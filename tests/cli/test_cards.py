"""``skipviz reprice-card`` and ``skipviz card-exits`` (:mod:`skipviz.cli.cards`): what they refuse, before
anything is timed or written. What they compute: tests/training/test_decision_points.py."""
from __future__ import annotations

import hashlib

import pytest

from skipviz.cli import main
from skipviz.models._registry import list_pretrained


def _card_digest(name: str) -> str:
    card = next(w for w in list_pretrained() if w.name == name).card_path
    return hashlib.sha256(card.read_bytes()).hexdigest()


@pytest.mark.parametrize("argv, message", [
    (["card-exits", "--model", "efficientnet_lite0.imagenet_gated"], "its card has exit points"),
    (["card-exits", "--model", "cifar_resnet56.cifar10_gated"], "its card has exit points"),
])
def test_a_card_the_command_does_not_apply_to_is_refused_and_left_as_it_was(argv, message):
    before = _card_digest(argv[2])
    with pytest.raises(SystemExit, match=message):
        main(argv)
    assert _card_digest(argv[2]) == before


@pytest.mark.parametrize("command", ["reprice-card", "card-exits"])
def test_an_unknown_model_is_named_with_the_shipped_ones(command):
    with pytest.raises(SystemExit, match="no_such.model: not a shipped model with a card here .*cifar_resnet56"):
        main([command, "--model", "no_such.model"])
