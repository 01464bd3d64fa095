"""EarlyExitPolicy as a decision source: per-block overrides, min_block, the card's options, its config."""
from __future__ import annotations

import pytest
import torch

from skipviz import create_model, policy_for, policy_from_config
from skipviz.dashboard import decision_sources
from skipviz.policies import DECISION_SOURCES, EarlyExitPolicy, make_policy

from conftest import varied_images


@torch.no_grad()
def test_min_block_keeps_early_probes_from_exiting(tiny_net, batch):
    res = tiny_net.run(batch, EarlyExitPolicy(0.0, min_block=3))  # everyone confident: all leave after block 3
    assert res.exit_block == [3] * len(batch)
    assert res.executed[:, :4].all() and not res.executed[:, 4:].any()
    h = tiny_net._stem(batch)
    for block in tiny_net.blocks[:4]:
        h = block(h)
    assert torch.allclose(res.logits, tiny_net.probe(3)(h), atol=1e-5)
    flops = EarlyExitPolicy(0.0, min_block=3).head_flops(tiny_net.flop_table())
    assert flops[:3] == [0, 0, 0] and flops[3] > 0 and flops[-1] == 0  # probes evaluated from block 3 on only


@torch.no_grad()
def test_overrides_force_a_skip_and_set_a_blocks_exit_threshold(tiny_net, batch):
    never = EarlyExitPolicy(1.0, {1: "skip", 4: 0.0})  # no exit anywhere but after block 4, block 1 bypassed
    res = tiny_net.run(batch, never)
    assert not res.executed[:, 1].any() and res.executed[:, [0, 2, 3, 4]].all()
    assert res.exit_block == [4] * len(batch) and not res.executed[:, 5:].any()
    tr = res.traces()[0]
    assert tr.blocks[1].reason == "forced skip by override" and "exit after this block" in tr.blocks[4].reason
    assert EarlyExitPolicy(1.0, {"4": "run"}).overrides == {4: "run"}
    with pytest.raises(ValueError, match="min_block"):
        EarlyExitPolicy(0.9, min_block=-1)


def test_config_round_trips_with_overrides_and_min_block():
    p = EarlyExitPolicy(0.8, {2: "skip", 5: 0.7}, min_block=4)
    config = p.config()
    assert config == {"name": "early_exit", "threshold": 0.8, "min_block": 4, "overrides": {"2": "skip", "5": 0.7}}
    back = policy_from_config(config)
    assert isinstance(back, EarlyExitPolicy) and back.config() == config
    old = policy_from_config({"name": "early_exit", "threshold": 0.9, "min_block": 2})  # audits written before
    assert old.min_block == 2 and old.overrides == {}


def test_exits_are_a_decision_source_read_from_the_card():
    net = create_model("cifar_resnet20")  # gates and probes, no plan head
    assert decision_sources(net) == ["gates", "early_exit"]
    assert decision_sources(create_model("cifar_resnet20", probes=False)) == ["gates"]
    src = DECISION_SOURCES["early_exit"]
    assert src.policy is EarlyExitPolicy and "leaves after a block" in src.rule
    net.meta.card = {}
    p = policy_for(net, "early_exit")
    assert isinstance(p, EarlyExitPolicy) and p.threshold == src.fallback_threshold == 0.95 and p.min_block == 0
    net.meta.card = {"early_exit": {"default_threshold": 0.88, "min_block": 6}}
    p = policy_for(net, "early_exit", overrides={2: "skip"})
    assert (p.threshold, p.min_block, p.overrides) == (0.88, 6, {2: "skip"})
    assert policy_for(net, "early_exit", 0.5).threshold == 0.5
    assert isinstance(make_policy(net, 0.7, {3: "auto"}, "early_exit"), EarlyExitPolicy)
    no_probes = create_model("cifar_resnet20", probes=False)
    with pytest.raises(ValueError, match="no probe heads"):
        policy_for(no_probes, "early_exit")
    assert make_policy(no_probes, 0.5, source="early_exit").name == "gates"  # the source it lacks: gates


def test_operating_points_of_the_exits_come_from_the_card():
    net = create_model("cifar_resnet20")
    net.meta.card = {"early_exit": {"default_threshold": 0.92, "min_block": 2},
                     "operating_points": {"early_exit": {"fast": {"threshold": 0.8, "min_block": 2},
                                                         "faithful": {"threshold": 0.92, "min_block": 2}}}}
    assert net.meta.operating_points("early_exit") == {"fast": 0.8, "faithful": 0.92}
    assert net.meta.source_options("early_exit") == {"min_block": 2}
    assert net.meta.source_options("gates") == {}
    x = varied_images(4, seed=2)
    with torch.no_grad():
        res = net.eval().run(x, policy_for(net, "early_exit", net.meta.operating_point("fast", "early_exit")))
    assert res.executed[:, :3].all()  # min_block 2: nobody leaves before block 2 has run


@torch.no_grad()
def test_a_blocks_threshold_is_shown_only_where_an_exit_is_checked(tiny_net, batch):
    last = tiny_net.num_blocks - 1
    p = EarlyExitPolicy(1.0, {4: "run", 1: 0.0}, min_block=3)  # a float override opens an exit before min_block
    assert [p.exits_possible_after(tiny_net, i) for i in range(tiny_net.num_blocks)] == \
        [False, True, False] + [True] * (last - 3) + [False]
    res = tiny_net.run(batch[:2], p)
    assert res.exit_block == [1, 1]  # everyone leaves after block 1 (threshold 0.0 there)
    tr = res.traces()[0]
    assert tr.blocks[0].threshold is None and tr.blocks[1].threshold == 0.0
    flops = p.head_flops(tiny_net.flop_table())
    assert flops[0] == 0 and flops[1] > 0 and flops[2] == 0 and flops[last] == 0
    never = tiny_net.run(batch[:1], EarlyExitPolicy(1.0, {4: "run"}, min_block=3)).traces()[0]
    assert never.blocks[4].threshold == 1.0 and never.blocks[4].reason == "forced run by override"
    assert never.blocks[2].threshold is None and never.blocks[last].threshold is None
    assert never.blocks[last].reason == "runs: no exit after this block"


@torch.no_grad()
def test_exits_are_checked_only_after_the_listed_blocks(tiny_net, batch):
    p = EarlyExitPolicy(0.0, blocks=[2, 5], min_block=0)  # blocks win over min_block
    assert [i for i in range(tiny_net.num_blocks) if p.exits_possible_after(tiny_net, i)] == [2, 5]
    res = tiny_net.run(batch, p)
    assert res.exit_block == [2] * len(batch)  # everyone confident: all leave at the first listed block
    flops = p.head_flops(tiny_net.flop_table())
    assert [i for i, f in enumerate(flops) if f > 0] == [2, 5]
    assert EarlyExitPolicy(1.0, {1: 0.0}, blocks=[5]).exits_possible_after(tiny_net, 1)  # a float override too
    config = EarlyExitPolicy(0.8, blocks=[5, 2]).config()
    assert config["blocks"] == [2, 5] and policy_from_config(config).config() == config
    assert "blocks" not in EarlyExitPolicy(0.8).config()  # as audits wrote it before
    with pytest.raises(ValueError, match="exit blocks"):
        EarlyExitPolicy(0.9, blocks=[-1])


@torch.no_grad()
def test_a_batch_of_one_decides_its_exit_on_the_host_as_the_batch_does(tiny_net, batch):
    from skipviz.measure.runs import run_masked

    confidences = tiny_net.run(batch, EarlyExitPolicy(1.0, blocks=[2, 4])).scores[:, [2, 4]]
    t = float(confidences.flatten().median())  # some inputs leave, some stay
    policy = EarlyExitPolicy(t, blocks=[2, 4])
    together = tiny_net.run(batch, policy)
    assert {-1 if b is None else b for b in together.exit_block} > {-1}
    ex = policy.exit_after(tiny_net, 2, tiny_net.blocks[2](tiny_net.blocks[1](tiny_net.blocks[0](
        tiny_net._stem(batch[:1])))))
    assert ex[0].__class__ is bool and ex[2].__class__ is float  # decided on the host, no tensors
    for i in range(len(batch)):
        alone = tiny_net.run(batch[i: i + 1], policy)
        assert alone.exit_block == [together.exit_block[i]]
        assert torch.allclose(alone.logits, together.logits[i: i + 1], atol=1e-5)
        assert torch.allclose(alone.scores, together.scores[i: i + 1], atol=1e-5, equal_nan=True)
        for key in ("executed", "reason", "evaluated", "exit_now"):
            assert torch.equal(alone._densify()[key], together._densify()[key][i: i + 1])
        assert torch.allclose(run_masked(tiny_net, batch[i: i + 1], policy), alone.logits, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_threshold_one_rounding_step_from_a_confidence_decides_alone_as_in_a_batch(batch, dtype):
    import toys

    net = toys.tiny_net().to(dtype)
    x = batch.to(dtype)
    with torch.no_grad():
        conf = net.run(x, EarlyExitPolicy(1.0, blocks=[2])).scores[:, 2]
        # a threshold that only rounds to the first input's confidence in the network's dtype
        t = float(conf[0]) + float(torch.finfo(dtype).eps) * float(conf[0]) / 4
        assert t > float(conf[0]) and float(torch.tensor(t, dtype=dtype)) == float(conf[0])
        policy = EarlyExitPolicy(t, blocks=[2])
        together = net.run(x, policy).exit_block[0]
        alone = net.run(x[:1], policy).exit_block[0]
        # a batch that narrows to that input alone: a more confident one leaves after block 1 first
        first = net.run(x, EarlyExitPolicy(1.0, blocks=[1])).scores[:, 1]
        other = int(first.argmax())
        assert first[other] > first[0]
        mid = (float(first[0]) + float(first[other])) / 2
        narrowed = net.run(x[[0, other]], EarlyExitPolicy(t, {1: mid}, blocks=[1, 2]))
    assert together == alone == 2
    assert narrowed.exit_block == [2, 1]


def test_the_cards_exit_blocks_reach_the_policy_and_its_words():
    from skipviz.policies.words import describe_policy

    net = create_model("cifar_resnet20")
    net.meta.card = {"early_exit": {"default_threshold": 0.9, "blocks": [3, 6]},
                     "operating_points": {"early_exit": {"fast": {"threshold": 0.8, "blocks": [3, 6]}}}}
    p = policy_for(net, "early_exit")
    assert p.blocks == {3, 6} and p.threshold == 0.9
    assert describe_policy(p) == "early exit, threshold 0.90, exits after blocks 3, 6"
    assert describe_policy({"name": "early_exit", "threshold": 0.9, "min_block": 6}) == \
        "early exit, threshold 0.90, from block 6"
    assert describe_policy(EarlyExitPolicy(0.9, blocks=[4])) == "early exit, threshold 0.90, exits after block 4"
