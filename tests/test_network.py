"""The skipping engine: exact equivalence with references, real skipping, FLOP accounting."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch.nn.utils.fusion import fuse_conv_bn_eval

from skipviz import DEFAULT_MODEL, EarlyExitPolicy, FullPolicy, GatePolicy, StaticMaskPolicy, create_model
from skipviz.models.torchvision_resnet import wrap_torchvision
from skipviz.engine.heads import GateHead, PlanHead
from skipviz.engine.network import SkipNetwork
from skipviz.engine.rows import _densest_window, gather_rows, misplaced_rows, scatter_rows_
from skipviz.engine.folding import conv_bn, inference_folding
from skipviz.engine.flops import card_flop_table, count_flops, count_network_flops

from conftest import varied_images


def reference_forward(net, x, skip=frozenset(), fold=True):
    """Hand-written CIFAR ResNet forward that omits the blocks in ``skip`` (written out, not the engine's code).
    ``fold``: each conv-BN pair as torch's own fused eval-mode convolution (``fuse_conv_bn_eval``), as the
    engine runs at inference; else the modules one after the other."""

    def conv_bn(h, conv, bn):
        return fuse_conv_bn_eval(conv, bn)(h) if fold else bn(conv(h))

    h = F.relu(conv_bn(x, net.stem[0], net.stem[1]))
    for i, b in enumerate(net.blocks):
        if i in skip:
            if b.downsample:  # option-A shortcut: subsample by 2, zero-pad the new channels
                h = h[:, :, ::2, ::2]
                extra = b.out_channels - b.in_channels
                h = torch.cat([h.new_zeros(h.shape[0], extra // 2, *h.shape[2:]), h,
                               h.new_zeros(h.shape[0], extra - extra // 2, *h.shape[2:])], 1)
            continue
        out = F.relu(conv_bn(h, b.conv1, b.bn1))
        out = conv_bn(out, b.conv2, b.bn2)
        sc = h
        if b.downsample:
            sc = h[:, :, ::2, ::2]
            extra = b.out_channels - b.in_channels
            sc = torch.cat([sc.new_zeros(sc.shape[0], extra // 2, *sc.shape[2:]), sc,
                            sc.new_zeros(sc.shape[0], extra - extra // 2, *sc.shape[2:])], 1)
        h = F.relu(out + sc)
    return net.head.fc(h.mean((2, 3)))


@torch.no_grad()
def test_full_policy_equals_plain_backbone_exactly(tiny_net, batch):
    res = tiny_net.run(batch, FullPolicy())
    assert torch.equal(res.logits, tiny_net(batch))
    assert torch.equal(res.logits, reference_forward(tiny_net, batch))
    assert res.executed.all()


def test_inference_folds_batchnorm_and_matches_the_module_path(tiny_net, batch):
    with torch.no_grad():
        folded = tiny_net(batch)
        skipped = tiny_net.run(batch, StaticMaskPolicy({1, 4})).logits
    with torch.enable_grad():  # autograd on (training, attributions): the conv and BN modules run as written
        modules = tiny_net(batch)
        assert modules.requires_grad
    assert torch.allclose(folded, modules.detach(), atol=1e-4, rtol=1e-5)
    assert torch.equal(folded, reference_forward(tiny_net, batch)) and not torch.equal(folded, modules)
    assert torch.allclose(skipped, reference_forward(tiny_net, batch, {1, 4}, fold=False), atol=1e-4, rtol=1e-5)
    conv_weight = tiny_net.stem[0].weight
    assert conv_weight.is_contiguous(memory_format=torch.channels_last)
    assert tiny_net.stem[0]._skipviz_folded.values[0].is_contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def test_inference_folding_can_be_switched_off_for_one_context(tiny_net, batch):
    with torch.enable_grad():
        modules = tiny_net(batch).detach()
        gate_modules = tiny_net.gate(0)(tiny_net._stem(batch)).detach()
    with inference_folding(False):
        assert torch.equal(tiny_net(batch), modules)  # the modules as written, autograd off
        assert torch.equal(tiny_net.gate(0)(tiny_net._stem(batch)), gate_modules)
        with inference_folding(True):
            assert torch.equal(tiny_net(batch), reference_forward(tiny_net, batch))
    assert torch.equal(tiny_net(batch), reference_forward(tiny_net, batch))  # restored on exit


def test_folded_weights_follow_every_change_of_the_modules():
    torch.manual_seed(0)
    conv, bn = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2.0)
        assert torch.allclose(conv_bn(x, conv, bn), bn(conv(x)), atol=1e-5)
        conv.weight.mul_(2.0)  # in place, e.g. load_state_dict
        assert torch.allclose(conv_bn(x, conv, bn), bn(conv(x)), atol=1e-5)
        bn.running_var.fill_(4.0)
        assert torch.allclose(conv_bn(x, conv, bn), bn(conv(x)), atol=1e-5)
        bn.bias = torch.nn.Parameter(torch.ones(4))  # replaced
        assert torch.allclose(conv_bn(x, conv, bn), bn(conv(x)), atol=1e-5)
        conv.double(), bn.double()  # cast
        out = conv_bn(x.double(), conv, bn)
        assert out.dtype == torch.float64 and torch.allclose(out, bn(conv(x.double())), atol=1e-10)
    bn.train()  # training mode: the batch's statistics, never a fold
    assert torch.equal(conv_bn(x.double(), conv, bn), bn(conv(x.double())))


@torch.no_grad()
def test_folded_weights_follow_rebuilt_parameters():
    # a freed tensor's id and memory can be reused by the next one of the same size, at version 0 again: the
    # cache holds its sources, so a replacement is always a different object and is folded afresh
    torch.manual_seed(0)
    conv, bn = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4).eval()
    gate = GateHead(4, hidden=3).eval()
    x = torch.randn(2, 3, 8, 8)
    for _ in range(20):
        del conv.weight, gate.fc1.weight  # freed first, as when a module is rebuilt
        conv.weight = torch.nn.Parameter(torch.randn(4, 3, 3, 3))
        bn.running_mean = torch.randn(4)
        assert torch.allclose(conv_bn(x, conv, bn), bn(conv(x)), atol=1e-5)
        gate.fc1.weight = torch.nn.Parameter(torch.randn(3, 4))
        h = conv(x)
        with inference_folding(False):
            expected = gate(h)
        assert torch.allclose(gate(h), expected, atol=1e-5)
    # a cast swaps a parameter's .data and keeps the object and its version counter; the new storage can land
    # where the freed one was
    for _ in range(50):
        conv.half()
        conv.float()
        assert torch.allclose(conv_bn(x, conv, bn), bn(conv(x)), atol=1e-5)


def test_plan_head_inference_path_equals_the_module_path():
    # at inference a channels-last pooled map is read through a view by fc1 with reordered columns
    torch.manual_seed(0)
    head = PlanHead(8, [1, 2, 4], grid=4, hidden=16).eval()
    h = torch.randn(3, 8, 16, 16).relu().contiguous(memory_format=torch.channels_last)
    with torch.enable_grad():  # the modules: pooled map flattened in (C, grid, grid) order
        expected = head(h).detach()
    with torch.no_grad():
        assert torch.allclose(head(h), expected, atol=1e-5)
        assert torch.allclose(head(h.contiguous()), expected, atol=1e-5)  # NCHW input: the flattening path
        probs = head.probabilities_of_one(h[:1])
        assert probs == pytest.approx(torch.sigmoid(expected[0]).tolist(), abs=1e-6)
        head.fc1.weight.add_(0.5)  # in place: the reordered copy follows
    with torch.enable_grad():
        changed = head(h).detach()
    with torch.no_grad():
        assert not torch.allclose(changed, expected) and torch.allclose(head(h), changed, atol=1e-5)


@pytest.mark.parametrize("size", [16, 18])  # the grid divides 16 (fixed-window pooling), not 18 (adaptive)
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_plan_head_batch_of_one_path_equals_the_module_path(size, layout):
    torch.manual_seed(1)
    head = PlanHead(8, [0, 2], grid=4, hidden=16).eval()
    h = torch.randn(1, 8, size, size).relu().contiguous(memory_format=layout)
    with torch.enable_grad():
        expected = torch.sigmoid(head(h)).detach()[0].tolist()
    with torch.no_grad():
        assert head.probabilities_of_one(h) == pytest.approx(expected, abs=1e-6)
        assert torch.allclose(torch.sigmoid(head(h))[0], torch.tensor(expected), atol=1e-6)


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


def test_gate_inference_paths_agree_with_the_module_path(tiny_net):
    feats = tiny_net.forward_intermediates(varied_images(5, seed=7), intermediates_only=True, include_stem=True)
    for i in tiny_net.gated_blocks:
        gate, h = tiny_net.gate(i), feats[i].detach()
        with torch.enable_grad():
            modules = torch.sigmoid(gate(h)).detach()  # fc1 - BN - ReLU - fc2, autograd on
        with torch.no_grad():
            folded = torch.sigmoid(gate(h))  # BN and the mean's 1/(H*W) folded into fc1
            host = [gate.probability_of_one(h[n:n + 1]) for n in range(5)]  # batch of one, finished on the host
        assert torch.allclose(folded, modules, atol=1e-6)
        assert all(isinstance(p, float) for p in host)
        assert torch.allclose(torch.tensor(host, dtype=torch.float32), modules, atol=1e-6)
        with torch.enable_grad():
            assert gate.probability_of_one(h[:1]) == float(torch.sigmoid(gate(h[:1])).detach())
    with pytest.raises(ValueError, match="batch of one"):
        tiny_net.gate(0).probability_of_one(feats[0][:2])


def test_row_gather_and_scatter_keep_the_layout_and_match_index_ops():
    torch.manual_seed(0)
    idx, src_rows = torch.tensor([4, 0, 3]), torch.randn(3, 5, 6, 7)
    for fmt in (torch.channels_last, torch.contiguous_format):
        t = torch.randn(6, 5, 6, 7).contiguous(memory_format=fmt)
        got = gather_rows(t, idx)
        assert torch.equal(got, t.index_select(0, idx)) and got.is_contiguous(memory_format=fmt)
        src = src_rows.contiguous(memory_format=fmt)
        expected = t.clone().index_copy_(0, idx, src)
        assert scatter_rows_(t, idx, src) is t and torch.equal(t, expected)
        assert torch.equal(scatter_rows_(t, idx, src_rows.contiguous()), expected)  # mixed layouts: values count
        window = t[1:4]  # a view in the middle of a batch
        assert torch.equal(gather_rows(window, torch.tensor([2, 0])), t[[3, 1]])
    strided = torch.randn(6, 5, 6, 14)[..., ::2]  # rows not dense: plain index ops
    assert torch.equal(gather_rows(strided, idx), strided.index_select(0, idx))
    leaf = torch.randn(6, 5, 6, 7, requires_grad=True)
    gather_rows(leaf.contiguous(memory_format=torch.channels_last), idx).sum().backward()
    assert torch.equal(leaf.grad.sum((1, 2, 3)), torch.tensor([210.0, 0, 0, 210, 210, 0]))


def test_misplaced_rows_replays_the_engines_swaps(tiny_net, monkeypatch):
    import skipviz.engine.network as network

    swapped, plan = [], network._swap_plan

    def logged(flags, k):
        start, dst, src = plan(flags, k)
        swapped.append(len(dst) // 2)
        return start, dst, src

    monkeypatch.setattr(network, "_swap_plan", logged)
    x = varied_images(24, seed=5)
    with torch.no_grad():
        executed = tiny_net.run(x, GatePolicy(0.5)).executed
    engine_swaps = list(swapped)  # the engine's own (the replay below plans through the same function)
    in_place = [not b.downsample for b in tiny_net.blocks]
    replay = misplaced_rows(executed.tolist(), in_place)
    mixed = [i for i in range(tiny_net.num_blocks) if in_place[i] and 0 < int(executed[:, i].sum()) < 24]
    assert mixed and sum(engine_swaps) > 0
    assert [replay[i] for i in mixed] == engine_swaps
    assert all(replay[i] == 0 for i in range(tiny_net.num_blocks) if i not in mixed)
    # by hand: rows 0 and 3 execute block 0 -> window [0, 2) holds row 1 (skips): one swap with row 3;
    # block 1 then sees samples (0, 3, 2, 1) in rows 0..3
    assert misplaced_rows([[1, 0], [0, 1], [0, 0], [1, 1]], [True, True]) == [1, 1]


def test_densest_window_is_the_first_window_with_the_most_executing_rows():
    F_, T_ = False, True
    assert _densest_window([F_, F_, T_, T_, F_, T_], 3) == 1
    assert _densest_window([T_, F_, T_, T_, F_], 2) == 2
    assert _densest_window([F_, T_, T_, F_, T_], 3) == 0  # ties: the first window
    assert _densest_window([F_, F_, T_], 1) == 2
    assert _densest_window([T_, T_], 2) == 0


@torch.no_grad()
def test_contiguous_executing_rows_run_in_place_without_moving(tiny_net):
    """Executing rows already contiguous (not at the front) are run where they are: no row is moved, the
    bypassed rows keep their input and the executing rows get the block's output."""
    block = next(b for b in tiny_net.blocks if not b.downsample)
    x = torch.relu(torch.randn(6, block.in_channels, 32, 32))
    execute = torch.tensor([False, False, True, True, True, False])
    h, rows = SkipNetwork._run_contiguous(block, x.clone(), execute, None)
    assert rows is None
    assert torch.equal(h[2:5], block(x[2:5])) and torch.equal(h[[0, 1, 5]], x[[0, 1, 5]])
    execute = torch.tensor([True, False, True, False, True, True])  # window [2, 6): row 3 swaps with row 0
    h, rows = SkipNetwork._run_contiguous(block, x.clone(), execute, None)
    assert rows.tolist() == [3, 1, 2, 0, 4, 5]
    assert torch.equal(h[2:], block(x[[2, 0, 4, 5]])) and torch.equal(h[:2], x[[3, 1]])


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


def test_shipped_card_flop_table_equals_a_fresh_count():
    import skipviz

    net = create_model(skipviz.DEFAULT_MODEL).eval()
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


@torch.no_grad()
def test_folds_follow_running_statistics_updated_by_a_training_forward():
    # a train-mode forward updates running_mean/var inside the kernel without bumping their version counters;
    # the BatchNorm's batch count (num_batches_tracked) does move, and the folds follow it
    torch.manual_seed(0)
    net = create_model("cifar_resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    net(x), net.run(x, GatePolicy(0.5))  # folds cached
    net.train()
    net(torch.randn(8, 3, 32, 32) * 5 + 3)
    net.eval()
    with inference_folding(False):
        expected, expected_scores = net(x), net.run(x, GatePolicy(0.5)).scores
    assert torch.allclose(net(x), expected, atol=1e-5)
    assert torch.allclose(net.run(x, GatePolicy(0.5)).scores.nan_to_num(), expected_scores.nan_to_num(), atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gates_do_not_overflow_and_flops_count(dtype):
    # a folded gate sums its map instead of averaging it: in half precision the sum of a large map overflows,
    # so it is taken in float32; the FLOP count runs in the network's dtype
    torch.manual_seed(0)
    net = create_model("cifar_resnet20").to(dtype).eval()
    x = torch.randn(2, 3, 256, 256, dtype=dtype)
    gate, h = net.gate(0), net._stem(x)
    folded = gate(h)
    with inference_folding(False):
        module = gate(h)
    assert folded.dtype == dtype and torch.isfinite(folded).all()
    assert torch.allclose(folded.float(), module.float(), atol=0.05)
    assert gate.probability_of_one(h[:1]) == pytest.approx(torch.sigmoid(module[0].double()).item(), abs=0.02)
    res = net.run(x, GatePolicy(0.5))
    assert torch.isfinite(res.scores[:, net.gated_blocks]).all()
    assert (res.flops_executed() > 0).all()


def test_forward_intermediates_refuses_early_exit_policies(tiny_net):
    with pytest.raises(ValueError, match="early-exit"):
        tiny_net.forward_intermediates(torch.zeros(1, 3, 32, 32), policy=EarlyExitPolicy(0.5))


def test_the_cards_flop_table_is_not_reused_for_a_plan_head_of_another_shape():
    net = create_model(DEFAULT_MODEL)
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


@torch.no_grad()
def test_gates_under_float16_autocast_take_the_module_path():
    # autocast would run the folded layers in float16 on the map's sums, which overflow
    torch.manual_seed(0)
    gate = GateHead(16).eval()
    h = torch.full((1, 16, 64, 64), 30.0)
    with torch.autocast("cpu", dtype=torch.float16):
        logits = gate(h)
        p = gate.probability_of_one(h)
    with inference_folding(False):
        expected = gate(h)
    assert torch.isfinite(logits).all() and torch.allclose(logits.float(), expected, atol=0.05)
    assert p == pytest.approx(torch.sigmoid(expected[0]).item(), abs=1e-3)


def test_the_flop_table_follows_replaced_probes_and_moved_gates():
    from skipviz.engine.heads import ProbeHead

    net = create_model("cifar_resnet20")
    before = net.flop_table()
    net.probes[0] = ProbeHead(16, 1000)
    assert net.flop_table().probes[0] == 2 * 16 * 1000 > before.probes[0]
    net.gates["3"] = net.gates.pop("0")  # the same gate object, now on block 3
    assert sorted(net.flop_table().gates) == net.gated_blocks
