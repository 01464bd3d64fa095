"""Row movement: gathers and scatters in the batch's layout, the swap that makes executing rows contiguous."""
from __future__ import annotations

import torch

from skipviz import GatePolicy
from skipviz.engine.network import SkipNetwork
from skipviz.engine.rows import _densest_window, gather_rows, misplaced_rows, scatter_rows_

from conftest import varied_images


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
