"""The gate and plan heads: their inference paths equal the module path."""
from __future__ import annotations

import copy

import pytest
import torch

from skipviz import GatePolicy, create_model
from skipviz.engine.heads import GateHead, PlanHead
from skipviz.engine.folding import inference_folding

from conftest import varied_images


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


def test_probe_inference_path_agrees_with_the_module_path_and_follows_weight_changes(tiny_net):
    feats = tiny_net.forward_intermediates(varied_images(5, seed=3), intermediates_only=True)
    for i in (0, 4, 8):
        probe, h = tiny_net.probe(i), feats[i].detach()
        with torch.enable_grad():
            module = probe(h).detach()  # nn.Linear on the mean, autograd on
        with torch.no_grad():
            folded = probe(h)  # the mean's 1/(H*W) folded into a transposed weight
            with inference_folding(False):
                assert torch.equal(probe(h), module)
            assert torch.allclose(folded, module, atol=1e-5)
            assert torch.allclose(probe(h[:1]), module[:1], atol=1e-5)  # a batch of one, the same cached fold
            probe.fc.weight.mul_(2.0)  # an in-place change (as load_state_dict makes) invalidates the fold
            assert torch.allclose(probe(h), probe.fc(h.mean((2, 3))), atol=1e-5)
            probe.fc.weight.div_(2.0)
    half = copy.deepcopy(tiny_net.probe(2)).half()  # a copy: the fixture's network is shared
    with torch.no_grad():
        out = half(feats[2].detach().half() * 30)  # a large map: its sums are taken in float32
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_probe_confidence_of_one_is_the_top_softmax_probability(tiny_net):
    probe = tiny_net.probe(2)
    h = torch.randn(1, probe.fc.in_features, 6, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, top = probe.confidence_of_one(h)
        assert torch.allclose(logits, probe(h)) and isinstance(top, float)
        assert top == pytest.approx(float(torch.softmax(probe(h), 1).max()), abs=1e-7)
        with pytest.raises(ValueError, match="batch of one"):
            probe.confidence_of_one(torch.cat([h, h]))
