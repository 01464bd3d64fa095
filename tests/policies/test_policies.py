"""Policies: the up-front plan (PlanPolicy) against the engine's row moves, batch sizes and FLOP accounting."""
from __future__ import annotations

import pytest
import torch

from skipviz import (FullPolicy, GatePolicy, PlanHead, PlanPolicy, Reason, StaticMaskPolicy, create_model, policy_for,
                     policy_from_config)
from skipviz.measure.runs import run_masked
from skipviz.policies import Plan

from conftest import varied_images


@pytest.fixture(scope="module")
def planned_net():
    """A random CIFAR ResNet-20 with a plan head whose decisions vary across varied inputs."""
    torch.manual_seed(0)
    net = create_model("cifar_resnet20", plan=True)
    with torch.no_grad():
        net.plan_head.fc2.weight.normal_(0.0, 0.5)
        net.plan_head.fc2.bias.zero_()
        x = varied_images(64, seed=3)
        logits = net.plan_head(net._stem(x))
        net.plan_head.fc2.bias -= logits.median(0).values  # about half of the inputs run each block
    return net.eval()


@torch.no_grad()
def test_plan_decides_every_gated_block_at_the_stem(planned_net):
    x = varied_images(16, seed=4)
    res = planned_net.run(x, PlanPolicy(0.5))
    probs = torch.sigmoid(planned_net.plan_head(planned_net._stem(x)))
    gated = planned_net.gated_blocks
    assert planned_net.plan_head.gated_blocks == gated
    assert torch.equal(res.executed[:, gated], probs >= 0.5)
    assert res.executed[:, [i for i in range(9) if i not in gated]].all()
    assert torch.allclose(res.scores[:, gated].float(), probs, atol=1e-6)
    assert 0 < int(res.executed[:, gated].sum()) < 16 * len(gated)  # mixed: rows were moved by the engine
    reason = res.traces()[0].blocks[gated[0]].reason
    assert "decided at the stem" in reason and reason.startswith("plan ")
    assert torch.allclose(res.logits, run_masked(planned_net, x, PlanPolicy(0.5)), atol=1e-4)


@torch.no_grad()
def test_plan_is_the_same_at_batch_one_and_in_batches(planned_net):
    x = varied_images(12, seed=5)
    batched = planned_net.run(x, PlanPolicy(0.4, {1: "skip", 4: "run", 7: 0.9}))
    for n in range(12):
        single = planned_net.run(x[n:n + 1], PlanPolicy(0.4, {1: "skip", 4: "run", 7: 0.9}))
        assert torch.equal(single.executed[0], batched.executed[n])
        assert torch.allclose(single.logits[0], batched.logits[n], atol=1e-5, rtol=1e-5)
    assert not batched.executed[:, 1].any() and batched.executed[:, 4].all()
    trace = batched.traces()[0]
    assert trace.blocks[1].reason == "forced skip by override"


@torch.no_grad()
def test_plan_flops_are_counted_once_per_input(planned_net):
    table = planned_net.flop_table()
    assert table.plan == 2 * (16 * 16 * 128 + 128 * len(planned_net.gated_blocks))  # two linear layers
    x = varied_images(4, seed=6)
    res = planned_net.run(x, PlanPolicy(1e-6))  # every block runs: the plan is the only extra
    assert res.executed.all()
    assert torch.equal(res.flops_executed(), torch.full((4,), table.full + table.plan))
    assert PlanPolicy(0.5).head_flops(table) == [table.plan] + [0] * 8
    assert PlanPolicy(0.0).head_flops(table) == [0] * 9  # threshold 0: the head is not evaluated
    assert PlanPolicy(0.0, {3: 0.5}).head_flops(table) == [table.plan] + [0] * 8


def _refuse(*args, **kwargs):
    raise AssertionError("a head was evaluated at threshold 0")


@torch.no_grad()
@pytest.mark.parametrize("n", [1, 4])
def test_at_threshold_zero_no_head_is_evaluated_and_every_block_runs(planned_net, n, monkeypatch):
    # a probability is never below 0: the decision is known without the head, which then costs no time and no
    # FLOPs (the card's "gates cannot close" default is the full network, not the full network plus its gates)
    net, x, table = planned_net, varied_images(n, seed=8), planned_net.flop_table()
    full = net.run(x, FullPolicy())
    for g in net.gated_blocks:
        monkeypatch.setattr(net.gate(g), "forward", _refuse)
        monkeypatch.setattr(net.gate(g), "probability_of_one", _refuse)
    monkeypatch.setattr(net.plan_head, "forward", _refuse)
    monkeypatch.setattr(net.plan_head, "probabilities_of_one", _refuse)
    for policy in (GatePolicy(0.0), PlanPolicy(0.0), GatePolicy(0.0, {1: "skip"}), PlanPolicy(0.0, {1: "skip"})):
        res = net.run(x, policy)
        forced = policy.overrides.get(1) == "skip"
        assert res.executed[:, [i for i in range(9) if not (forced and i == 1)]].all()
        assert torch.equal(res.logits, net.run(x, StaticMaskPolicy({1} if forced else set())).logits)
        assert torch.equal(res.flops_executed(), net.run(x, StaticMaskPolicy({1} if forced else set())).flops_executed())
        block = res.traces()[0].blocks[net.gated_blocks[-1]]
        assert block.score is None and block.executed and block.reason.startswith("threshold 0: ")
    assert torch.equal(net.run(x, GatePolicy(0.0)).logits, full.logits)
    assert GatePolicy(0.0).head_flops(table) == [0] * 9


@torch.no_grad()
def test_a_block_threshold_of_zero_spares_only_that_blocks_head(planned_net):
    net, x = planned_net, varied_images(4, seed=9)
    zero, other = net.gated_blocks[0], net.gated_blocks[1]
    res = net.run(x, GatePolicy(0.5, {zero: 0.0}))
    assert res.executed[:, zero].all() and res.scores[:, zero].isnan().all()
    assert not res.scores[:, other].isnan().any()
    table = net.flop_table()
    assert GatePolicy(0.5, {zero: 0.0}).head_flops(table)[zero] == 0
    assert GatePolicy(0.5, {zero: 0.0}).head_flops(table)[other] == table.gates[other]
    plan = net.run(x, PlanPolicy(0.5, {zero: 0.0}))
    assert plan.executed[:, zero].all() and plan.scores[:, zero].isnan().all()
    assert plan.traces()[0].blocks[zero].reason.startswith("threshold 0: ")


@torch.no_grad()
def test_plan_policy_needs_a_plan_head_and_round_trips(planned_net):
    plain = create_model("cifar_resnet20")
    with pytest.raises(ValueError, match="no plan head"):
        plain.run(varied_images(2, seed=1), PlanPolicy(0.5))
    with pytest.raises(TypeError, match="every block at once"):
        PlanPolicy(0.5).decide(planned_net, 0, torch.zeros(1, 16, 32, 32))
    policy = PlanPolicy(0.3, {2: "run", 5: 0.7})
    again = policy_from_config(policy.config())
    assert isinstance(again, PlanPolicy) and again.config() == policy.config() == {
        "name": "plan", "threshold": 0.3, "overrides": {"2": "run", "5": 0.7}}
    with pytest.raises(ValueError, match="gates=True"):
        create_model("cifar_resnet20", gates=False, plan=True)


@torch.no_grad()
def test_plan_head_batch_of_one_fast_path_matches_the_module(planned_net):
    h = planned_net._stem(varied_images(1, seed=8))
    head: PlanHead = planned_net.plan_head
    fast = head.probabilities_of_one(h)
    assert len(fast) == len(planned_net.gated_blocks)
    assert torch.allclose(torch.tensor(fast, dtype=torch.float32), torch.sigmoid(head(h))[0], atol=1e-6)
    with pytest.raises(ValueError, match="batch of one"):
        head.probabilities_of_one(torch.cat([h, h]))


@torch.no_grad()
def test_full_policy_has_no_plan(planned_net):
    assert FullPolicy().plan(planned_net, torch.zeros(1)) is None
    assert int(Reason.PLAN_RUN) != int(Reason.PLAN_SKIP)


@torch.no_grad()
def test_plan_obeys_forced_overrides_on_ungated_blocks_too(planned_net):
    x = varied_images(6, seed=9)
    res = planned_net.run(x, PlanPolicy(0.5, {3: "skip", 0: "run"}))  # block 3 downsamples and has no gate
    assert not res.executed[:, 3].any() and res.executed[:, 0].all()
    assert res.traces()[0].blocks[3].reason == "forced skip by override"


def test_assigning_a_plan_head_later_updates_the_flop_table():
    net = create_model("cifar_resnet20")
    assert net.flop_table().plan == 0
    net.plan_head = PlanHead(16, net.gated_blocks, grid=2, hidden=8)
    assert net.flop_table().plan == 2 * (16 * 4 * 8 + 8 * len(net.gated_blocks))


def test_an_audit_under_the_plan_reproduces_bit_for_bit(planned_net, tmp_path):
    from PIL import Image

    from skipviz.audit import reproduce_many, run_audit

    paths = []
    for i in range(5):
        p = tmp_path / f"{i}.png"
        Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(p)
        paths.append(p)
    run = run_audit(paths, planned_net, PlanPolicy(0.5), db=tmp_path / "a.sqlite", batch_size=4)
    assert run.policy["name"] == "plan" and len(run.ok_records) == 5
    assert any("decided at the stem" in b["reason"] for r in run.ok_records for b in r.trace["blocks"])
    results = reproduce_many(tmp_path / "a.sqlite", [r.record_id for r in run.ok_records], net=planned_net)
    assert all(r.reproduced for r in results), [r.message for r in results]


@torch.no_grad()
@pytest.mark.parametrize("policy", [PlanPolicy(0.5), PlanPolicy(0.5, {0: "skip", 3: "skip"}), PlanPolicy(0.0)])
def test_a_batch_of_one_under_a_plan_takes_the_bool_path_with_the_same_result(planned_net, policy, monkeypatch):
    # one bool per block: run() loops over the blocks like the plain forward and builds its records from the
    # plan afterwards; the result must equal the general per-block loop's
    x = varied_images(1, seed=11)
    plan = policy.plan(planned_net, planned_net._stem(x))
    assert plan.uniform() and all(r.rows is None for r in plan.records())
    fast = planned_net.run(x, policy)
    monkeypatch.setattr(Plan, "uniform", lambda self: False)
    general = planned_net.run(x, policy)
    assert torch.equal(fast.logits, general.logits)
    assert torch.equal(fast.executed, general.executed)
    assert fast.traces() == general.traces()
    assert torch.equal(fast.flops_executed(), general.flops_executed())
    batched = PlanPolicy(0.5).plan(planned_net, planned_net._stem(varied_images(3, seed=11)))
    assert not batched.uniform()


def test_plan_layout_follows_the_head_and_edits_of_the_policy(planned_net):
    # the per-head layout (forced blocks, the head's columns and thresholds) is rebuilt per batch: a new head,
    # a changed threshold or changed overrides are seen
    net, gated = planned_net, planned_net.plan_head.gated_blocks
    h = net._stem(varied_images(1, seed=6))
    policy = PlanPolicy(0.0)
    with torch.no_grad():
        assert all(policy.plan(net, h).execute)
        policy.threshold = 1.0  # a sigmoid below 1 everywhere: every gated block skips
        assert [not e for e in policy.plan(net, h).execute] == [i in gated for i in range(net.num_blocks)]
        policy.overrides[gated[0]] = "run"
        assert policy.plan(net, h).execute[gated[0]] is True
        other = PlanHead(net.plan_head.fc1.in_features // net.plan_head.grid ** 2, gated[:2])
        net.plan_head, saved = other.eval(), net.plan_head
        try:
            plan = policy.plan(net, h)  # the new head decides only its 2 blocks
            assert plan.evaluated[gated[1]] and not plan.evaluated[gated[2]] and plan.execute[gated[2]] is True
        finally:
            net.plan_head = saved


def test_policy_for_reads_each_sources_threshold_from_the_card():
    import skipviz

    net = create_model(skipviz.CIFAR_MODEL)
    card = net.meta.card
    assert policy_for(net).config()["threshold"] == card["default_policy"]["threshold"]
    plan = policy_for(net, "plan")
    assert plan.name == "plan" and plan.threshold == card["plan"]["default_threshold"]
    assert policy_for(net, "plan", 0.7).threshold == 0.7
    assert policy_for(net, "gates", 0.3, {2: "skip"}).config() == {"name": "gates", "threshold": 0.3,
                                                                  "overrides": {"2": "skip"}}


def test_policy_for_refuses_what_the_network_cannot_do():
    plain = create_model("cifar_resnet20")  # gate heads, no plan head
    with pytest.raises(ValueError, match="no plan head"):
        policy_for(plain, "plan")
    with pytest.raises(ValueError, match="unknown policy"):
        policy_for(plain, "oracle")
    assert isinstance(policy_for(create_model("cifar_resnet20", gates=False)), FullPolicy)


@torch.no_grad()
def test_a_batch_of_one_under_a_plan_runs_under_autocast(planned_net):
    # the batch-of-one plan head reads autocast-dtype features with float32 weights: it takes the GEMM path
    x = varied_images(2, seed=12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        one, both = planned_net.run(x[:1], PlanPolicy(0.5)), planned_net.run(x, PlanPolicy(0.5))
    assert one.scores[0, planned_net.gated_blocks].tolist() == pytest.approx(
        both.scores[0, planned_net.gated_blocks].tolist(), abs=0.02)


def test_policy_for_a_plan_head_on_a_network_without_gate_heads():
    net = create_model("cifar_resnet20", gates=False)
    net.plan_head = PlanHead(16, [0, 1, 2], grid=2, hidden=8).eval()
    assert isinstance(policy_for(net, "plan", 0.5), PlanPolicy)  # the plan decides blocks 0-2
    assert isinstance(policy_for(net, "gates", 0.5), FullPolicy)  # no gate decides anything
