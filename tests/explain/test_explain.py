"""Captum explanations: block importance, full vs skipped attribution maps, bypassed blocks, thread safety."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from skipviz import EarlyExitPolicy, FullPolicy, GatePolicy, StaticMaskPolicy
from skipviz.policies.simple import FrozenPolicy
from skipviz.explain import attribution_maps, block_importance, compare_maps, executed_block_gradients, explain, replica


@pytest.fixture()
def image():
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.fixture()
def skipping():
    return StaticMaskPolicy({1, 4, 7})


def test_block_importance_shapes_and_decisions(tiny_net, image, skipping):
    imp = block_importance(tiny_net, image, skipping)
    assert imp.importance.shape == (9,) and imp.share.shape == (9,)
    assert np.isfinite(imp.importance).all() and imp.share.sum() == pytest.approx(1.0)
    assert imp.executed == [i not in {1, 4, 7} for i in range(9)]
    assert imp.skipped == [1, 4, 7] and 0 <= imp.skipped_share <= 1
    assert isinstance(imp.skipped_were_low_impact, bool)
    with torch.no_grad():
        assert imp.target == int(tiny_net(image).argmax(1))
    df = imp.to_dataframe()
    assert len(df) == 9 and sorted(df["rank"]) == list(range(1, 10))
    assert df.loc[1, "reason"] == "static mask"
    full = block_importance(tiny_net, image)  # default policy: full, nothing bypassed
    assert all(full.executed) and full.skipped_were_low_impact is None
    assert np.allclose(full.importance, imp.importance)  # importance is on the full network either way


def test_taylor_importance_is_first_order_skip_effect(tiny_net, image):
    """Taylor importance ~ change of the target logit when the one block is replaced by its bypass."""
    imp = block_importance(tiny_net, image, target=2)
    with torch.no_grad():
        base = tiny_net(image)[0, 2]
        for i in (2, 5, 8):
            skipped = tiny_net.run(image, StaticMaskPolicy({i})).logits[0, 2]
            assert np.sign(imp.importance[i]) == np.sign(float(base - skipped)) or abs(float(base - skipped)) < 1e-3


@pytest.mark.parametrize("method", ["grad_x_act", "conductance"])
def test_other_importance_methods(tiny_net, image, method):
    imp = block_importance(tiny_net, image, GatePolicy(0.5), method=method, n_steps=4)
    assert imp.importance.shape == (9,) and np.isfinite(imp.importance).all()


def test_explain_maps_and_comparison(tiny_net, image, skipping):
    ex = explain(tiny_net, image, skipping, ig_steps=8)
    for m in ("gradcam", "integrated_gradients"):
        for run in ("full", "skipped"):
            a = ex.maps[m][run]
            assert a.shape == (32, 32) and np.isfinite(a).all() and (a >= 0).all()
        c = ex.comparisons[m]
        assert -1 <= c.spearman <= 1 and 0 <= c.topk_overlap <= 1
    assert ex.image.shape == (32, 32, 3) and 0 <= ex.image.min() and ex.image.max() <= 1
    assert ex.skipped.executed == [i not in {1, 4, 7} for i in range(9)]
    assert ex.importance is not None and ex.importance.executed == ex.skipped.executed
    assert set(ex.summary()["method"]) == {"gradcam", "integrated_gradients"}
    assert ex.seconds["total"] > 0
    # same policy as full: identical maps
    same = explain(tiny_net, image, FullPolicy(), methods=("gradcam",), importance=None)
    assert same.comparisons["gradcam"].spearman == pytest.approx(1.0)
    assert same.comparisons["gradcam"].topk_overlap == pytest.approx(1.0)


def test_last_block_bypassed_and_early_exit_do_not_crash(tiny_net, image):
    full, skipped, cmp = attribution_maps(tiny_net, image, StaticMaskPolicy({7, 8}), method="gradcam")
    assert full.shape == skipped.shape == (32, 32)
    ex = explain(tiny_net, image, EarlyExitPolicy(0.0), ig_steps=4)  # exits after block 0: later blocks never run
    assert ex.skipped.exit_block == 0 and ex.skipped.executed == [True] + [False] * 8
    assert "probe 0" in ex.layers["gradcam"]
    assert np.isfinite(ex.maps["gradcam"]["skipped"]).all()


def test_bypassed_blocks_have_no_activation(tiny_net, image, skipping):
    df = executed_block_gradients(tiny_net, image, skipping)
    assert list(df["status"]) == ["bypassed" if i in {1, 4, 7} else "executed" for i in range(9)]
    assert df.loc[[1, 4, 7], "grad_x_act"].isna().all() and df.loc[[0, 2, 8], "grad_x_act"].notna().all()
    exited = executed_block_gradients(tiny_net, image, EarlyExitPolicy(0.0))
    assert exited.loc[0, "status"] == "executed" and (exited.loc[1:, "status"] == "bypassed (early exit)").all()
    everything = executed_block_gradients(tiny_net, image, StaticMaskPolicy(range(9)))
    assert everything["grad_x_act"].isna().all()


def test_frozen_policy_replays_decisions(tiny_net, batch):
    pol = GatePolicy(0.5)
    with torch.no_grad():
        res = tiny_net.run(batch[:1], pol)
        frozen = tiny_net.run(batch[:1], FrozenPolicy(res.executed[0].tolist()))
    assert torch.allclose(res.logits, frozen.logits, atol=1e-5)


def test_compare_maps():
    a = np.arange(16.0).reshape(4, 4)
    assert compare_maps(a, a).spearman == pytest.approx(1.0)
    assert compare_maps(a, -a).spearman == pytest.approx(-1.0)
    assert compare_maps(a, -a, top_k=0.25).topk_overlap == 0.0
    assert compare_maps(np.zeros((4, 4)), np.zeros((4, 4))).spearman == 1.0
    assert compare_maps(np.zeros((4, 4)), a).spearman == 0.0
    with pytest.raises(ValueError, match="size"):
        compare_maps(a, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="top_k"):
        compare_maps(a, a, top_k=0)


def test_bad_input(tiny_net, batch, skipping):
    with pytest.raises(ValueError, match="one image at a time"):
        explain(tiny_net, batch, skipping)
    with pytest.raises(ValueError, match="unknown"):
        explain(tiny_net, batch[:1], skipping, methods=("lime",))
    with pytest.raises(ValueError, match="out of range"):
        block_importance(tiny_net, batch[:1], target=10)
    with pytest.raises(ValueError, match="unknown importance"):
        block_importance(tiny_net, batch[:1], method="shap")


def test_thread_safe_two_users(tiny_net, batch, skipping):
    """Two threads explaining different images at once give the same results as one after the other, and a
    plain run on the shared model meanwhile is unaffected (no Captum hooks on the original)."""
    images = [batch[i: i + 1] for i in (0, 1)]
    policy = GatePolicy(0.5)
    expected = [explain(tiny_net, im, policy, ig_steps=4) for im in images]
    results: dict[int, object] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def work(k: int) -> None:
        try:
            barrier.wait()
            results[k] = explain(tiny_net, images[k], policy, ig_steps=4)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    barrier.wait()
    with torch.no_grad():
        plain = [tiny_net.run(batch, skipping).logits for _ in range(3)]
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for j, exp in enumerate(expected):
        got = results[j]
        for m in exp.maps:
            for run in ("full", "skipped"):
                np.testing.assert_allclose(got.maps[m][run], exp.maps[m][run], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got.importance.importance, exp.importance.importance, rtol=1e-4, atol=1e-6)
    assert all(torch.equal(p, plain[0]) for p in plain)
    assert not any(m._forward_hooks for m in tiny_net.modules())
    model, _ = replica(tiny_net)
    assert model is not tiny_net and replica(tiny_net)[0] is model  # cached
