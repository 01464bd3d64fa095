"""The CIFAR ResNet family (skipviz/models/cifar_resnet.py): the inference fast paths equal the modules."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from skipviz.models.cifar_resnet import CifarBasicBlock, CifarStem, PoolClassifier


def _randomise_bn(module: torch.nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0.0, 0.2), m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.normal_(0.0, 0.2)


def test_inference_block_forward_equals_the_out_of_place_module_path():
    torch.manual_seed(0)
    for c_in, c_out, stride in ((8, 8, 1), (8, 16, 2), (4, 12, 2), (4, 9, 2)):  # (4, 9): uneven zero padding
        block = CifarBasicBlock(c_in, c_out, stride).eval()
        _randomise_bn(block)
        x = torch.randn(3, c_in, 8, 8).relu().contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            fast = block(x)  # in place on the residual's output; the shortcut added only where it is non-zero
            reference = F.relu(block.residual(x) + block.shortcut(x))
        assert torch.equal(fast, reference), (c_in, c_out, stride)
        assert fast.shape == (3, c_out, 8 // stride, 8 // stride)
        with torch.enable_grad():  # autograd: out of place, differentiable
            xg = x.clone().requires_grad_()
            out = block(xg)
            out.sum().backward()
        assert xg.grad is not None and torch.allclose(out.detach(), reference, atol=1e-5)


def test_inference_stem_and_head_equal_their_modules():
    torch.manual_seed(0)
    stem, head = CifarStem(8).eval(), PoolClassifier(8, 5).eval()
    _randomise_bn(stem)
    x = torch.randn(2, 3, 8, 8)
    with torch.enable_grad():
        stem_modules = stem[2](stem[1](stem[0](x))).detach()
        head_modules = head.fc(stem_modules.mean((2, 3))).detach()
    with torch.no_grad():
        h = stem(x)
        assert torch.allclose(h, stem_modules, atol=1e-5) and bool((h >= 0).all())
        assert torch.equal(head(h), F.linear(h.mean((2, 3)), head.fc.weight, head.fc.bias))
        assert torch.allclose(head(stem_modules), head_modules, atol=1e-6)
