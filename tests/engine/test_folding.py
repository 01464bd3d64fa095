"""Inference folding: BatchNorm folded into convolutions (and gate heads), following every change of the modules."""
from __future__ import annotations

import torch

from skipviz import GatePolicy, StaticMaskPolicy, create_model
from skipviz.engine.heads import GateHead
from skipviz.engine.folding import conv_bn, inference_folding

from toys import reference_forward


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
