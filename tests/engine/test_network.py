"""The skipping engine: exact equivalence with references, real skipping, traces, early exits, training forward."""
from __future__ import annotations

import pytest
import torch
import torchvision

from skipviz import EarlyExitPolicy, FullPolicy, GatePolicy, StaticMaskPolicy, create_model
from skipviz.models.torchvision_resnet import wrap_torchvision

from conftest import varied_images
from toys import reference_forward


@torch.no_grad()
def test_full_policy_equals_plain_backbone_exactly(tiny_net, batch):
    res = tiny_net.run(batch, FullPolicy())
    assert torch.equal(res.logits, tiny_net(batch))
    assert torch.equal(res.logits, reference_forward(tiny_net, batch))
    assert res.executed.all()


@torch.no_grad()
def test_full_policy_equals_torchvision_resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    for m in model.modules():  # non-trivial BN statistics, so that folding them is tested
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0.0, 0.1), m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 64, 64)
    nchw = model(x)
    net = wrap_torchvision(model, "resnet18", [str(i) for i in range(10)]).eval()
    # the wrapper shares torchvision's modules, lays them out channels-last (SkipNetwork.memory_format) and at
    # inference folds each BN into its convolution: equal to torchvision's own forward up to float rounding
    expected = model(x.contiguous(memory_format=torch.channels_last))
    logits = net.run(x, FullPolicy()).logits
    assert torch.equal(logits, net(x))
    assert torch.allclose(logits, expected, atol=1e-4, rtol=1e-4)
    assert torch.allclose(expected, nchw, atol=1e-5, rtol=1e-5)
    with torch.enable_grad():  # with autograd the wrapper runs torchvision's own modules: bit-exact
        assert torch.equal(net(x), model(x.contiguous(memory_format=torch.channels_last)))


@torch.no_grad()
def test_weights_and_activations_are_channels_last_whatever_the_input_layout(tiny_net, batch):
    convs = [m for m in tiny_net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    nchw, nhwc = batch.contiguous(), batch.contiguous(memory_format=torch.channels_last)
    feats = tiny_net.forward_intermediates(nchw, intermediates_only=True)
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in feats)
    policy = GatePolicy(0.5)
    assert torch.equal(tiny_net.run(nchw, policy).logits, tiny_net.run(nhwc, policy).logits)
    assert torch.equal(tiny_net(nchw), tiny_net(nhwc))


@torch.no_grad()
def test_static_mask_equals_reference_without_those_blocks(tiny_net, batch):
    for skip in ({1}, {1, 4, 8}, {3}, {0, 2, 6, 7}):
        res = tiny_net.run(batch, StaticMaskPolicy(skip))
        assert torch.allclose(res.logits, reference_forward(tiny_net, batch, frozenset(skip)), atol=1e-6)
        assert not res.executed[:, sorted(skip)].any()
        assert res.executed[:, [i for i in range(tiny_net.num_blocks) if i not in skip]].all()


@torch.no_grad()
def test_batched_mixed_decisions_equal_single_sample_runs(tiny_net):
    x = varied_images(16, seed=3)
    policy = GatePolicy(0.5)
    batched = tiny_net.run(x, policy)
    executed = batched.executed
    mixed = [i for i in range(tiny_net.num_blocks) if 0 < int(executed[:, i].sum()) < len(x)]
    assert mixed, "the fixture's gates must give mixed decisions within the batch"
    for n in range(len(x)):
        single = tiny_net.run(x[n: n + 1], policy)
        assert torch.equal(single.executed[0], executed[n])
        assert torch.allclose(single.logits[0], batched.logits[n], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_inplace_block_forward_matches_forward_bit_for_bit(tiny_net):
    torch.manual_seed(1)
    model = torchvision.models.resnet50(weights=None, num_classes=10).eval()
    tv_net = wrap_torchvision(model, "resnet50", [str(i) for i in range(10)]).eval()
    for net, shape in ((tiny_net, (5, 16, 32, 32)), (tv_net, (2, 256, 16, 16))):
        block = next(b for b in net.blocks if not b.downsample)
        x = torch.relu(torch.randn(*shape))
        expected = block(x)
        assert torch.equal(block.forward_(x.clone()), expected)
        big = torch.cat([x, x])  # a view of a larger batch is updated in place, the rest left alone
        block.forward_(big[: shape[0]])
        assert torch.equal(big[: shape[0]], expected) and torch.equal(big[shape[0]:], x)


def test_inference_run_matches_the_autograd_path(tiny_net):
    """The in-place contiguous-window path (no autograd) and the gather/scatter path (autograd on) agree on
    every sample."""
    x = varied_images(16, seed=5)
    policy = GatePolicy(0.5)
    with torch.no_grad():
        fast = tiny_net.run(x, policy)
        masked = [i for i in range(tiny_net.num_blocks) if 0 < int(fast.executed[:, i].sum()) < len(x)]
        assert masked, "the fixture's gates must give mixed decisions within the batch"
    slow = tiny_net.run(x, policy)
    assert torch.equal(fast.executed, slow.executed)
    assert torch.allclose(fast.logits, slow.logits.detach(), atol=1e-5, rtol=1e-5)
    assert torch.allclose(fast.scores.nan_to_num(), slow.scores.nan_to_num(), atol=1e-6)


class CallCounter:
    """Samples each block's residual branch (its two convolutions) processed: the block's compute, however it
    was invoked (``forward``, or ``forward_`` in place on a window of the batch), folded or not."""

    def __init__(self, net):
        self.samples = [0] * net.num_blocks
        self.blocks = list(net.blocks)
        for i, b in enumerate(self.blocks):
            b.residual = self._counting(i, b.residual)  # an instance attribute shadowing the method

    def _counting(self, i, residual):
        def counted(x):
            self.samples[i] += x.shape[0]
            return residual(x)
        return counted

    def close(self):
        for b in self.blocks:
            del b.residual


@torch.no_grad()
def test_bypassed_block_forward_is_never_called(tiny_net):
    for n in (1, 12):
        x = varied_images(n, seed=10 + n)
        counter = CallCounter(tiny_net)
        try:
            res = tiny_net.run(x, GatePolicy(0.5))
        finally:
            counter.close()
        assert counter.samples == res.executed.sum(0).tolist()
    counter = CallCounter(tiny_net)
    try:
        tiny_net.run(torch.randn(4, 3, 32, 32), StaticMaskPolicy({0, 1, 2}))
    finally:
        counter.close()
    assert counter.samples[:3] == [0, 0, 0] and counter.samples[3:] == [4] * 6


@torch.no_grad()
def test_traces_explain_each_decision(tiny_net, batch):
    policy = GatePolicy(0.5, overrides={0: "skip", 1: "run", 2: 0.9})
    tr = tiny_net.run(batch, policy).traces()[0]
    assert tr.blocks[0].reason == "forced skip by override" and not tr.blocks[0].executed
    assert tr.blocks[1].reason == "forced run by override" and tr.blocks[1].executed
    b2 = tr.blocks[2]
    assert b2.threshold == 0.9 and "(block threshold)" in b2.reason
    assert b2.executed == (b2.score >= 0.9)
    assert tr.blocks[3].reason == "no gate on this block: always runs" and tr.blocks[3].downsample
    for b in tr.blocks[4:]:
        if b.index in tiny_net.gated_blocks:
            assert b.reason == (f"gate {b.score:.2f} >= 0.50" if b.executed else f"gate {b.score:.2f} < 0.50")


@torch.no_grad()
def test_early_exit_stops_computing_and_uses_probe(tiny_net, batch):
    res = tiny_net.run(batch, EarlyExitPolicy(0.0))  # everyone is "confident" after the first block
    assert res.exit_block == [0] * len(batch)
    assert res.executed[:, 0].all() and not res.executed[:, 1:].any()
    h = tiny_net.blocks[0](tiny_net.stem(batch))
    assert torch.allclose(res.logits, tiny_net.probe(0)(h), atol=1e-6)
    tr = res.traces()[0]
    assert tr.blocks[1].reason == "bypassed: early exit after block 0"
    assert "exit after this block" in tr.blocks[0].reason
    never = tiny_net.run(batch, EarlyExitPolicy(1.0))
    assert torch.allclose(never.logits, tiny_net(batch), atol=1e-6)


@torch.no_grad()
def test_forward_intermediates_returns_every_block_output(tiny_net, batch):
    logits, feats = tiny_net.forward_intermediates(batch)
    assert torch.equal(logits, tiny_net(batch))
    assert len(feats) == tiny_net.num_blocks
    assert [f.shape[1] for f in feats] == tiny_net.block_channels()
    assert feats[-1].shape == (len(batch), 64, 8, 8)
    only = tiny_net.forward_intermediates(batch, indices=[0, -1], intermediates_only=True, include_stem=True)
    assert len(only) == 3 and only[0].shape == (len(batch), 16, 32, 32)
    assert torch.equal(only[2], feats[-1])
    _, skipped = tiny_net.forward_intermediates(batch, policy=StaticMaskPolicy({1}))
    assert torch.equal(skipped[1], skipped[0])  # a bypassed identity block passes its input on


def test_gradients_flow_through_the_skipped_run(tiny_net, batch):
    x = batch.clone().requires_grad_(True)
    res = tiny_net.run(x, GatePolicy(0.5))
    res.logits.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_forward_train_mixes_blocks_and_reports_gate_probabilities():
    torch.manual_seed(0)
    net = create_model("cifar_resnet20").train()
    x = torch.randn(4, 3, 32, 32)
    logits, probs, probes = net.forward_train(x)
    assert logits.shape == (4, 10) and probs.shape == (4, len(net.gated_blocks)) and len(probes) == net.num_blocks
    (logits.sum() + probs.sum() + probes[0].sum()).backward()
    assert net.gate(0).fc2.weight.grad is not None and net.gate(0).fc2.weight.grad.abs().sum() > 0
    assert net.probe(0).fc.weight.grad is not None and net.probe(0).fc.weight.grad.abs().sum() > 0
    # probe heads see detached features: their loss alone leaves the backbone untouched
    net.zero_grad()
    _, _, probes = net.forward_train(x)
    sum(p.sum() for p in probes).backward()
    assert net.stem[0].weight.grad is None or net.stem[0].weight.grad.abs().sum() == 0


def test_forward_train_gates_learn_from_the_output_over_a_backbone_in_eval_mode(tiny_net):
    """Distillation keeps the backbone in eval mode (frozen BatchNorm statistics) and only the heads in train
    mode: the output's loss must still reach the gates (sampled, straight-through), not the rate loss alone."""
    net = tiny_net
    net.eval()
    net.gates.train()
    logits, probs, _ = net.forward_train(varied_images(16, seed=1), hard=True)
    logits.logsumexp(1).sum().backward()  # the output alone, no term on the gate probabilities
    grads = [p.grad for p in net.gates.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    # heads in eval mode: deterministic hard gates, no noise (two runs agree)
    net.gates.eval()
    x = varied_images(8, seed=2)
    with torch.no_grad():
        a, b = net.forward_train(x)[0], net.forward_train(x)[0]
    torch.testing.assert_close(a, b)


def test_forward_intermediates_refuses_early_exit_policies(tiny_net):
    with pytest.raises(ValueError, match="early-exit"):
        tiny_net.forward_intermediates(torch.zeros(1, 3, 32, 32), policy=EarlyExitPolicy(0.5))
