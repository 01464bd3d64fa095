"""FLOP accounting: consistent totals, the card's table reused only for the same weights and shape."""
from __future__ import annotations

import pytest
import torch

from skipviz import CIFAR_MODEL, GatePolicy, StaticMaskPolicy, create_model
from skipviz.engine.heads import GateHead, PlanHead
from skipviz.engine.flops import card_flop_table, count_flops, count_network_flops



@torch.no_grad()
def test_flop_totals_are_consistent(tiny_net, batch):
    table = tiny_net.flop_table()
    assert table.full == count_flops(tiny_net, torch.zeros(1, 3, 32, 32))
    res = tiny_net.run(batch, GatePolicy(0.5))
    executed = res.flops_executed()
    for tr, f in zip(res.traces(), executed.tolist()):
        assert tr.flops_full - tr.flops_saved == tr.flops_executed == f
        assert sum(b.flops for b in tr.blocks) + table.stem + table.head == tr.flops_executed
        for b in tr.blocks:
            if not b.executed and not b.downsample:
                # a bypassed identity block costs nothing but its gate's evaluation
                assert b.flops == table.gates.get(b.index, 0)
    static = tiny_net.run(batch, StaticMaskPolicy({1, 2}))
    assert (static.flops_per_block()[:, [1, 2]] == 0).all()
    assert int(static.flops_executed()[0]) == table.full - table.blocks[1] - table.blocks[2]
    assert sum(table.gates.values()) <= 0.02 * table.full


def test_shipped_card_flop_table_equals_a_fresh_count():
    import skipviz

    net = create_model(skipviz.CIFAR_MODEL).eval()
    hw = tuple(net.meta.input_size[-2:])
    from_card = card_flop_table(net, hw)
    assert from_card is not None, "the shipped card must carry its FLOP table (skipviz.training.export.refresh_card_flops)"
    assert from_card == count_network_flops(net, hw) == net.flop_table()


def test_card_flop_table_is_ignored_unless_it_names_these_weights(tiny_net):
    table = tiny_net.flop_table()
    tiny_net.meta.weights_sha256 = "a" * 64
    try:
        tiny_net.meta.card = {"weights_sha256": "b" * 64, "flops": {"table": {**table.to_dict(), "stem": 1}}}
        assert card_flop_table(tiny_net, table.input_hw) is None  # another file's card
        tiny_net.meta.card["weights_sha256"] = "a" * 64
        assert card_flop_table(tiny_net, table.input_hw).stem == 1
        assert card_flop_table(tiny_net, (64, 64)) is None  # another input size
        tiny_net.meta.card["flops"]["table"]["blocks"] = [1]
        assert card_flop_table(tiny_net, table.input_hw) is None  # another network shape
    finally:
        tiny_net.meta.weights_sha256, tiny_net.meta.card = None, {}


def test_the_cards_flop_table_is_not_reused_for_a_plan_head_of_another_shape():
    net = create_model(CIFAR_MODEL)
    if net.plan_head is None or not (net.meta.card or {}).get("flops"):
        pytest.skip("the default model's weights (with a plan head) are not in data/")
    shipped = net.flop_table().plan
    net.plan_head = PlanHead(net.plan_head.fc1.in_features // 16, net.gated_blocks, grid=4, hidden=512).eval()
    assert net.flop_table().plan == 2 * (net.plan_head.fc1.in_features * 512 + 512 * len(net.gated_blocks))
    assert net.flop_table().plan != shipped


def test_the_flop_table_follows_a_replaced_gate_head():
    net = create_model("cifar_resnet20")
    before = net.flop_table().gates[0]
    net.gates["0"] = GateHead(16, hidden=64)
    assert net.flop_table().gates[0] == 2 * (16 * 64 + 64) > before


def test_the_flop_table_follows_replaced_probes_and_moved_gates():
    from skipviz.engine.heads import ProbeHead

    net = create_model("cifar_resnet20")
    before = net.flop_table()
    net.probes[0] = ProbeHead(16, 1000)
    assert net.flop_table().probes[0] == 2 * 16 * 1000 > before.probes[0]
    net.gates["3"] = net.gates.pop("0")  # the same gate object, now on block 3
    assert sorted(net.flop_table().gates) == net.gated_blocks
