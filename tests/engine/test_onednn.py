"""Fused oneDNN inference convolutions: the plain convolution's results, the packed weight cached and followed."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import skipviz.engine._onednn as onednn
from skipviz.engine._onednn import conv_act, fused_path_available, packed_weight

needs_onednn = pytest.mark.skipif(not fused_path_available(),
                                  reason="this PyTorch has no oneDNN convolution ops (or oneDNN is switched off)")


def _plain(x, conv, w, b, padding, act):
    y = F.conv2d(x, w, b, conv.stride, padding, conv.dilation, conv.groups)
    return act(y)


@pytest.mark.parametrize("cin,cout,k,stride,groups,padding", [
    (16, 24, 1, 1, 1, 0),     # pointwise
    (24, 24, 3, 1, 24, 1),    # depthwise
    (24, 24, 4, 2, 24, 1),    # the widened stride-2 depthwise kernel of TF "same" padding
    (3, 8, 3, 2, 1, 0),       # a dense stem on a padded input
])
@pytest.mark.parametrize("act", [nn.ReLU6(), nn.ReLU(), nn.Identity(), nn.SiLU()], ids=lambda a: type(a).__name__)
@pytest.mark.parametrize("batch,layout", [(1, torch.channels_last), (3, torch.channels_last),
                                          (2, torch.contiguous_format)])
def test_fused_convolution_equals_the_plain_one(cin, cout, k, stride, groups, padding, act, batch, layout):
    g = torch.Generator().manual_seed(cin + k)
    conv = nn.Conv2d(cin, cout, k, stride, padding, groups=groups)
    w, b = torch.randn(cout, cin // groups, k, k, generator=g), torch.randn(cout, generator=g)
    x = torch.randn(batch, cin, 15, 17, generator=g).contiguous(memory_format=layout)
    with torch.inference_mode():
        out = conv_act(x, conv, w, b, (padding, padding), act)
        ref = _plain(x, conv, w, b, (padding, padding), act)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert out.is_contiguous(memory_format=layout)  # the input's layout, as F.conv2d returns it
    if fused_path_available() and not isinstance(act, nn.SiLU):
        assert packed_weight(conv) is not None and packed_weight(conv).layout == torch._mkldnn
    else:  # an activation oneDNN is not given here runs the plain way
        assert packed_weight(conv) is None


@needs_onednn
def test_the_packed_weight_follows_a_new_weight_and_a_new_padding():
    conv = nn.Conv2d(8, 8, 3, groups=8)
    x = torch.randn(1, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    w1, w2, b = torch.randn(8, 1, 3, 3), torch.randn(8, 1, 3, 3), torch.zeros(8)
    with torch.inference_mode():
        first = conv_act(x, conv, w1, b, (1, 1), nn.Identity())
        packed = packed_weight(conv)
        assert conv_act(x, conv, w1, b, (1, 1), nn.Identity()) is not None and packed_weight(conv) is packed
        second = conv_act(x, conv, w2, b, (1, 1), nn.Identity())  # a new fold: packed again
        assert packed_weight(conv) is not packed
        assert torch.allclose(second, F.conv2d(x, w2, b, 1, 1, 1, 8), atol=1e-5)
        assert not torch.allclose(first, second)
        unpadded = conv_act(x, conv, w2, b, (0, 0), nn.Identity())
    assert unpadded.shape[-1] == 7 and torch.allclose(unpadded, F.conv2d(x, w2, b, 1, 0, 1, 8), atol=1e-5)


@needs_onednn
def test_copies_and_state_dicts_never_see_the_packed_weight():
    conv = nn.Conv2d(4, 4, 1)
    x = torch.randn(1, 4, 5, 5)
    with torch.inference_mode():
        conv_act(x, conv, conv.weight, conv.bias, (0, 0), nn.ReLU6())
    assert packed_weight(conv) is not None
    assert set(conv.state_dict()) == {"weight", "bias"}
    clone = copy.deepcopy(conv)  # an opaque oneDNN tensor cannot be deep-copied: it must not be in the module
    assert packed_weight(clone) is None


@pytest.mark.parametrize("case", ["autograd", "float64", "switched off", "flop counter", "oneDNN off", "autocast"])
def test_the_plain_path_runs_where_the_fused_one_does_not_apply(case, monkeypatch):
    conv = nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 6, 6)
    w, b = conv.weight.detach(), conv.bias.detach()
    if case == "float64":
        x, w, b = x.double(), w.double(), b.double()
    if case == "switched off":
        monkeypatch.setattr(onednn, "ENABLED", False)
    ref = F.conv2d(x, w, b, 1, 1).clamp(0, 6)
    counter = FlopCounterMode(display=False)
    with torch.set_grad_enabled(case == "autograd"):
        if case == "flop counter":
            with counter:
                out = conv_act(x, conv, w, b, (1, 1), nn.ReLU6())
            assert counter.get_total_flops() == 2 * 2 * 6 * 6 * 6 * 4 * 9  # the convolution was counted
        elif case == "oneDNN off":
            with torch.backends.mkldnn.flags(enabled=False):
                out = conv_act(x, conv, w, b, (1, 1), nn.ReLU6())
        elif case == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = conv_act(x, conv, w, b, (1, 1), nn.ReLU6())
            assert out.dtype == torch.bfloat16  # autocast's own convolution, in its dtype
            out = out.float()
        else:
            out = conv_act(x, conv, w, b, (1, 1), nn.ReLU6())
    assert packed_weight(conv) is None
    assert torch.allclose(out, ref.to(out.dtype), atol=5e-2 if case == "autocast" else 1e-6)


@needs_onednn
def test_a_convolution_onednn_refuses_runs_the_plain_way(monkeypatch):
    conv = nn.Conv2d(4, 4, 1)
    x = torch.randn(1, 4, 5, 5)

    calls = []

    def refuse(*args):
        calls.append(1)
        raise RuntimeError("mkldnn_convolution_pointwise: unsupported")

    monkeypatch.setattr(onednn, "_POINTWISE", refuse)
    with torch.inference_mode():
        out = conv_act(x, conv, conv.weight, conv.bias, (0, 0), nn.ReLU())
        assert torch.allclose(out, F.conv2d(x, conv.weight, conv.bias).relu(), atol=1e-6)
        assert packed_weight(conv) is None and len(calls) == 1
        again = conv_act(x, conv, conv.weight, conv.bias, (0, 0), nn.ReLU())
    assert len(calls) == 1 and torch.equal(again, out)  # remembered: later calls do not try again


@needs_onednn
def test_a_weight_changed_in_place_is_packed_again():
    conv = nn.Conv2d(4, 4, 1)
    x = torch.randn(1, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        conv_act(x, conv, conv.weight, conv.bias, (0, 0), nn.Identity())
        packed = packed_weight(conv)
        with torch.no_grad():
            conv.weight.mul_(2)  # load_state_dict copies in place the same way
        out = conv_act(x, conv, conv.weight, conv.bias, (0, 0), nn.Identity())
    assert packed_weight(conv) is not packed
    assert torch.allclose(out, F.conv2d(x, conv.weight, conv.bias), atol=1e-5)


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_string_paddings_take_the_plain_path(padding):
    conv = nn.Conv2d(4, 4, 3)
    x = torch.randn(1, 4, 6, 6)
    with torch.inference_mode():
        out = conv_act(x, conv, conv.weight, conv.bias, padding, nn.ReLU6())
        assert torch.equal(out, F.conv2d(x, conv.weight, conv.bias, 1, padding).clamp(0, 6))
    assert packed_weight(conv) is None


def test_the_shipped_family_takes_the_fused_path_and_keeps_its_results():
    from skipviz import FullPolicy, create_model
    from skipviz.models.efficientnet_lite import LiteStem

    net = create_model("efficientnet_lite0", backbone=None, num_classes=10, probes=False, plan=False).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        fused = net.run(x, FullPolicy()).logits
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(onednn, "ENABLED", False)
            plain = net.run(x, FullPolicy()).logits
    assert torch.allclose(fused, plain, atol=1e-4, rtol=1e-4)
    stem = next(m for m in net.modules() if isinstance(m, LiteStem))
    assert (packed_weight(stem.conv) is not None) == fused_path_available()
