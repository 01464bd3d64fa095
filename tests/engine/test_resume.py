"""The full network's output resumed from a skipped run (:mod:`skipviz.engine.resume`)."""
from __future__ import annotations

import torch

from skipviz.engine.resume import full_logits
from skipviz.policies import EarlyExitPolicy, FullPolicy, GatePolicy


def _exits_policy(net, x) -> EarlyExitPolicy:
    """Exits after blocks 2 and 5 at thresholds that let some of ``x`` leave at each and keep others in."""
    with torch.no_grad():
        feats = net.forward_intermediates(x, intermediates_only=True)
        conf = {i: torch.softmax(net.probe(i)(feats[i]), 1).amax(1) for i in (2, 5)}
    return EarlyExitPolicy(1.0, {2: float(conf[2].quantile(0.7)), 5: float(conf[5].quantile(0.5))}, min_block=99)


def _counting_stem(net):
    calls = []
    stem = net._stem
    net._stem = lambda x: (calls.append(x.shape[0]), stem(x))[1]
    return calls


def test_exited_inputs_resume_from_their_exit_state_and_match_the_full_network(tiny_net, batch):
    net = tiny_net.eval()
    policy = _exits_policy(net, batch)
    with torch.no_grad():
        res = net.run(batch, policy, keep_exit_states=True)
        exits = res.exit_block
        assert {2, 5} <= set(exits) and None in exits  # inputs leave at both exits, others stay
        want = net(batch)
        calls = _counting_stem(net)
        got = full_logits(net, batch, res)
    assert calls == []  # nobody started again from the image
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    stayed = [r for r, e in enumerate(exits) if e is None]
    assert torch.equal(got[stayed], res.logits[stayed])  # those that ran every block already had the output


def test_a_batch_of_one_resumes_bit_for_bit(tiny_net, batch):
    net = tiny_net.eval()
    policy = _exits_policy(net, batch)
    with torch.no_grad():
        for r in range(batch.shape[0]):
            x = batch[r: r + 1]
            res = net.run(x, policy, keep_exit_states=True)
            assert torch.equal(full_logits(net, x, res), net(x))


def test_rows_keep_their_order_and_inputs_without_kept_states_start_from_the_image(tiny_net, batch):
    net = tiny_net.eval()
    policy = _exits_policy(net, batch)
    with torch.no_grad():
        want = net(batch)
        rows = [5, 0, 3]
        kept = net.run(batch, policy, keep_exit_states=True)
        torch.testing.assert_close(full_logits(net, batch, kept, rows), want[rows], rtol=1e-4, atol=1e-5)
        assert full_logits(net, batch, kept, []).shape == (0, want.shape[1])
        bare = net.run(batch, policy)  # no states kept: exited inputs run again from the stem
        assert bare.exit_states is None
        calls = _counting_stem(net)
        torch.testing.assert_close(full_logits(net, batch, bare), want, rtol=1e-4, atol=1e-5)
    left = sum(e is not None for e in bare.exit_block)
    assert calls == [left]


def test_gates_reuse_inputs_that_ran_every_block_and_rerun_the_others(tiny_net, batch):
    net = tiny_net.eval()
    with torch.no_grad():
        res = net.run(batch, GatePolicy(0.5, {i: "run" for i in range(2, 9)}))  # gates decide blocks 0-1 only
        ran_all = res.executed.all(1)
        assert ran_all.any() and not ran_all.all()  # some inputs bypassed a block, some ran them all
        calls = _counting_stem(net)
        got = full_logits(net, batch, res)
        torch.testing.assert_close(got, net(batch), rtol=1e-4, atol=1e-5)
        assert calls[0] == int((~ran_all).sum())
        full = net.run(batch, FullPolicy())
        calls.clear()
        assert torch.equal(full_logits(net, batch, full), full.logits) and calls == []
