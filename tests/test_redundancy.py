"""Inter-layer KL divergence and the KL-redundancy policy, on the tiny random network (no data, no weights)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from skipviz import policy_from_config
from skipviz.policies.kl import KLRedundancyPolicy, beta_quantile_threshold
from skipviz.redundancy import (adjacent, block_io_divergence, block_log_distributions, dataset_redundancy,
                                kl_matrix, pairwise_divergence, spatial_log_distribution)
from skipviz.engine.trace import Reason


@pytest.mark.parametrize("method", ["spatial", "prediction"])
def test_kl_matrix_shape_zero_diagonal_nonnegative(tiny_net, batch, method):
    m = kl_matrix(tiny_net, batch, method=method)
    n_blocks = tiny_net.num_blocks
    assert m.shape == (batch.shape[0], n_blocks, n_blocks)
    assert torch.isfinite(m).all()
    assert (m >= 0).all()
    assert torch.equal(torch.diagonal(m, dim1=1, dim2=2), torch.zeros(batch.shape[0], n_blocks))
    assert m.sum() > 0  # blocks really differ
    assert not torch.allclose(m, m.transpose(1, 2))  # KL is asymmetric


def test_kl_matches_textbook_definition(tiny_net, batch):
    logp = block_log_distributions(tiny_net, batch[:2], "prediction")
    m = pairwise_divergence(logp, "kl")
    p, q = logp[1, 2].exp(), logp[1, 5].exp()
    assert m[1, 2, 5].item() == pytest.approx(float((p * (p.log() - q.log())).sum()), rel=1e-4, abs=1e-7)


def test_js_symmetric_and_bounded(tiny_net, batch):
    js = kl_matrix(tiny_net, batch, divergence="js")
    assert torch.allclose(js, js.transpose(1, 2), atol=1e-6)
    assert (js >= 0).all() and (js <= np.log(2) + 1e-6).all()


def test_zero_activations_give_finite_uniform_distribution():
    feat = torch.zeros(2, 16, 8, 8)
    logp = spatial_log_distribution(feat, (4, 4))
    assert torch.isfinite(logp).all()
    assert torch.allclose(logp.exp(), torch.full((2, 16), 1 / 16))
    mixed = torch.stack([logp[0], spatial_log_distribution(torch.rand(1, 16, 8, 8), (4, 4))[0]])[None]
    m = pairwise_divergence(mixed, "kl")
    assert torch.isfinite(m).all() and (m >= 0).all()
    one_hot = torch.zeros(1, 4, 8, 8)
    one_hot[0, :, 0, 0] = 1.0  # almost all mass in one cell: the others clamp to eps, no -inf
    lp = spatial_log_distribution(one_hot, (8, 8))
    assert torch.isfinite(lp).all()
    assert torch.isfinite(pairwise_divergence(torch.stack([lp[0], logp[0, :16].repeat(4)])[None], "js")).all()


def test_zero_input_network_no_nan(tiny_net):
    x = torch.zeros(2, 3, 32, 32)
    for method in ("spatial", "prediction"):
        for div in ("kl", "js"):
            assert torch.isfinite(kl_matrix(tiny_net, x, method=method, divergence=div)).all()


def test_spatial_works_without_probes(batch):
    from skipviz import create_model

    net = create_model("cifar_resnet20", probes=False, gates=False)  # like a torchvision backbone: no heads
    assert kl_matrix(net, batch[:2]).shape == (2, 9, 9)
    with pytest.raises(ValueError, match="probe heads"):
        kl_matrix(net, batch[:2], method="prediction")


def test_bad_inputs_have_clear_errors(tiny_net, batch):
    with pytest.raises(ValueError, match="unknown KL method"):
        kl_matrix(tiny_net, batch, method="cosine")
    with pytest.raises(ValueError, match="unknown divergence"):
        kl_matrix(tiny_net, batch, divergence="hellinger")
    with pytest.raises(ValueError, match="NaN"):
        kl_matrix(tiny_net, torch.full((1, 3, 32, 32), float("nan")))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        kl_matrix(tiny_net, torch.zeros(1, 1, 32, 32))


def test_custom_grid_and_upsampling(tiny_net, batch):
    logp = block_log_distributions(tiny_net, batch[:2], "spatial", grid=(16, 16))  # 8x8 blocks interpolate up
    assert logp.shape == (2, 9, 256)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(2, 9), atol=1e-5)


def test_dataset_redundancy(tiny_net, batch):
    stats = dataset_redundancy(tiny_net, batch, batch_size=3)
    assert stats.n == 8 and stats.mean_matrix.shape == (9, 9)
    per_input = kl_matrix(tiny_net, batch)
    assert np.allclose(stats.mean_matrix, per_input.double().mean(0).numpy(), atol=1e-6)
    assert len(stats.adjacent) == 8
    assert list(stats.adjacent.columns) == ["from", "to", "pair", "mean", "p10", "p50", "p90"]
    assert (stats.adjacent["p10"] <= stats.adjacent["p90"]).all()
    assert np.allclose(stats.adjacent["mean"], adjacent(per_input).double().mean(0).numpy(), atol=1e-6)
    assert len(stats.io) == 9 and stats.matrix_frame().shape == (9, 9)
    uint8 = (torch.rand(4, 3, 32, 32) * 255).to(torch.uint8)
    from skipviz.data import TensorDataset

    ds = TensorDataset(uint8, torch.zeros(4, dtype=torch.long), ["a"], [f"{i}.png" for i in range(4)], "r", "x")
    assert dataset_redundancy(tiny_net, ds).n == 4


def test_block_io_divergence(tiny_net, batch):
    io = block_io_divergence(tiny_net, batch)
    assert io.shape == (8, 9) and torch.isfinite(io).all() and (io >= 0).all()
    io_pred = block_io_divergence(tiny_net, batch, method="prediction")
    assert io_pred.shape == (8, 9) and torch.isfinite(io_pred).all()


# ------------------------------------------------------------------------------------------------ policy
DOWN = [False, False, False, True, False, False, True, False, False]
SCORES = [0.010, 0.002, 0.004, 0.050, 0.006, 0.020, 0.040, 0.012, 0.030]


def test_policy_skips_more_with_larger_quantile():
    skipped = [len(KLRedundancyPolicy(SCORES, DOWN, q=q).skip) for q in (0.0, 0.2, 0.5, 0.8, 1.0)]
    assert skipped[0] == 0
    assert skipped == sorted(skipped) and skipped[-1] == 7  # every identity block at q=1, never downsampling
    pol = KLRedundancyPolicy(SCORES, DOWN, q=0.3)
    assert pol.beta.fit == "beta" and 0 < pol.beta.threshold < 1
    # the lowest-scoring blocks go first
    assert 1 in pol.skip and all(SCORES[i] <= min(SCORES[j] for j in range(9) if j not in pol.skip and not DOWN[j])
                                 for i in pol.skip)
    assert not {3, 6} & pol.skip
    assert {3, 6} <= KLRedundancyPolicy(SCORES, DOWN, q=1.0, skip_downsample=True).skip


def test_policy_reason_text_in_trace(tiny_net, batch):
    pol = KLRedundancyPolicy(SCORES, DOWN, q=0.3)
    res = tiny_net.run(batch[:2], pol)
    trace = res.traces()[0]
    assert trace.policy == "kl_redundancy"
    for b in trace.blocks:
        assert b.executed == (b.index not in pol.skip)
        assert b.score == pytest.approx(SCORES[b.index])
    skipped = trace.blocks[1]
    assert skipped.reason == "KL 0.002 below q=0.30 quantile"
    assert trace.blocks[3].reason == "KL 0.050: downsampling block always runs"
    assert trace.blocks[5].reason == "KL 0.020 not below q=0.30 quantile"
    assert pol.reason_text(Reason.KL_SKIP, 1.2e-5, None, 1) == "KL 1.20e-05 below q=0.30 quantile"
    assert (res.executed[:, list(pol.skip)] == 0).all()
    assert (res.flops_executed() < res.flops_full()).all()


def test_from_config_round_trip():
    pol = KLRedundancyPolicy(SCORES, DOWN, q=0.4, method="prediction", block_names=[f"b{i}" for i in range(9)],
                             n_calibration=64)
    cfg = json.loads(json.dumps(pol.config()))
    back = policy_from_config(cfg)
    assert isinstance(back, KLRedundancyPolicy)
    assert back.config() == pol.config() and back.skip == pol.skip
    cfg["skip"] = [0]
    with pytest.warns(RuntimeWarning, match="stored"):
        assert policy_from_config(cfg).skip == frozenset({0})
    with pytest.raises(ValueError, match="lacks"):
        KLRedundancyPolicy.from_config({"name": "kl_redundancy", "q": 0.3})


def test_policy_degenerate_and_invalid():
    flat = KLRedundancyPolicy([0.01] * 9, DOWN, q=0.9)
    assert flat.beta.fit == "degenerate" and not flat.skip
    assert "alike" in flat.reason_text(Reason.KL_RUN, 0.01, None, 0)
    two = KLRedundancyPolicy([0.1, 0.5, 0.9], [True, False, False], q=0.5)  # 2 candidates: empirical quantile
    assert two.beta.fit == "empirical" and two.skip == frozenset({1})
    none = KLRedundancyPolicy([0.1], [True], q=1.0)
    assert none.beta.fit == "none" and not none.skip
    assert beta_quantile_threshold([], 0.5).fit == "none"
    with pytest.raises(ValueError, match="quantile"):
        KLRedundancyPolicy(SCORES, DOWN, q=1.5)
    with pytest.raises(ValueError, match="one score per block"):
        KLRedundancyPolicy(SCORES, DOWN[:3])
    with pytest.raises(ValueError, match="finite"):
        KLRedundancyPolicy([float("nan")] * 9, DOWN)


def test_calibrate_on_network(tiny_net, batch):
    pol = KLRedundancyPolicy.calibrate(tiny_net, batch, q=0.5, batch_size=4)
    assert pol.n_calibration == 8 and len(pol.scores) == 9 and pol.grid == (8, 8)
    assert np.allclose(pol.scores, block_io_divergence(tiny_net, batch).double().mean(0).numpy(), atol=1e-6)
    assert pol.skip and not {3, 6} & pol.skip
    assert pol.with_q(0.0).skip == frozenset() and pol.with_q(0.0).scores == pol.scores
    df = pol.to_dataframe()
    assert list(df["skipped"]) == [i in pol.skip for i in range(9)]
    with pytest.raises(ValueError, match="calibrated for 3 blocks"):
        tiny_net.run(batch[:1], KLRedundancyPolicy([0.1, 0.2, 0.3], [False] * 3))


def test_available_methods_follow_the_probe_heads(tiny_net):
    from skipviz import create_model
    from skipviz.redundancy import available_methods

    assert available_methods(tiny_net) == ["spatial", "prediction"]
    assert available_methods(create_model("cifar_resnet20", probes=False)) == ["spatial"]
