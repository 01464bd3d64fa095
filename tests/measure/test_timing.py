"""skipviz.timing: latency statistics, masked reference run, per-block profile and prediction, gate cost."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from skipviz import EarlyExitPolicy, FullPolicy, GatePolicy, StaticMaskPolicy, create_model
from skipviz.measure.predict import SWAP_FRACTION_ESTIMATE, check_prediction, predict_latency
from skipviz.cli.bench import BenchConfig, results_markdown
from skipviz.measure.profile import BlockProfile, decision_cost, gate_cost, profile_blocks
from skipviz.measure.clock import device_info, measure_interleaved, measure_latency, measure_per_input, resolve_device
from skipviz.measure.runs import run_masked, time_policy

FAST = dict(warmup=1, repeats=3, min_repeat_s=0.0)  # one call per repeat: keeps the suite fast


def test_measure_latency_stats_are_consistent():
    x = torch.randn(64, 64)
    st = measure_latency(lambda: x @ x, warmup=2, repeats=7, label="matmul", min_repeat_s=0.001)
    assert st.device_type == "cpu" and st.device == "cpu"
    assert st.method.startswith("torch.utils.benchmark")
    assert st.n == 7 and len(st.times_ms) == 7 and st.number >= 1
    assert 0 < st.min_ms <= st.q25_ms <= st.median_ms <= st.q75_ms
    assert st.iqr_ms == pytest.approx(st.q75_ms - st.q25_ms)
    assert st.threads == torch.get_num_threads()
    json.dumps(st.to_dict())


def test_measure_interleaved_orders_by_work():
    small, big = torch.randn(8, 8), torch.randn(256, 256)
    out = measure_interleaved({"small": lambda: small @ small, "big": lambda: big @ big @ big}, warmup=1, repeats=5,
                              min_repeat_s=0.002)
    assert set(out) == {"small", "big"}
    assert out["small"].number == out["big"].number  # same calls per repeat for a fair comparison
    assert out["big"].median_ms > out["small"].median_ms


def test_measure_per_input_pairs_variants_input_by_input():
    import time

    calls: list[tuple[str, int]] = []

    def variant(name: str, seconds: float):
        def call(i: int) -> None:
            calls.append((name, i))
            time.sleep(seconds * (1 + i))
        return call

    out = measure_per_input({"fast": variant("fast", 0.0005), "slow": variant("slow", 0.0015)}, n_inputs=3, rounds=4,
                            warmup=1)
    assert {k: v.shape for k, v in out.items()} == {"fast": (4, 3), "slow": (4, 3)}
    assert len(calls) == 2 * 3 * (4 + 1)  # every input through every variant, each round, warm-up round included
    # each input's variants back to back, and which goes first rotates
    assert all(calls[k][1] == calls[k + 1][1] for k in range(0, len(calls), 2))
    assert {calls[k][0] for k in range(0, len(calls), 2)} == {"fast", "slow"}
    assert (out["slow"] > out["fast"]).all() and (np.diff(out["slow"], axis=1) > 0).all()  # later inputs sleep longer
    with pytest.raises(ValueError, match="n_inputs"):
        measure_per_input({"x": lambda i: None}, n_inputs=0)
    with pytest.raises(ValueError, match="repeats"):
        measure_per_input({"x": lambda i: None}, n_inputs=1, rounds=0)


def test_bad_timing_arguments_give_clear_errors():
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(lambda: None, repeats=0)
    with pytest.raises(ValueError, match="warmup"):
        measure_latency(lambda: None, warmup=-1)
    with pytest.raises(TypeError, match="callable"):
        measure_interleaved({"x": 3})
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu:banana")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            resolve_device("cuda")
        assert resolve_device(None).type == "cpu"


def test_device_info_records_the_environment():
    info = device_info("cpu")
    d = info.to_dict()
    assert d["device_type"] == "cpu" and d["dtype"] == "float32" and d["threads"] >= 1
    assert d["torch_version"] == torch.__version__ and d["torchvision_version"] and d["python_version"]
    assert "T" in d["date"] and "cpu" in info.label


class _Counter:
    """Forward hooks counting calls and samples per block."""

    def __init__(self, net) -> None:
        self.calls = [0] * net.num_blocks
        self.samples = [0] * net.num_blocks
        self.handles = [b.register_forward_hook(self._hook(i)) for i, b in enumerate(net.blocks)]

    def _hook(self, i):
        def hook(module, args, out):
            self.calls[i] += 1
            self.samples[i] += args[0].shape[0]

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("policy", [GatePolicy(0.5), GatePolicy(0.3, {1: "skip", 4: 0.9}), StaticMaskPolicy({1, 5}),
                                    EarlyExitPolicy(0.2, min_block=2), FullPolicy()])
def test_masked_run_matches_skipping_run_but_computes_every_block(tiny_net, batch, policy):
    with torch.no_grad():
        skipped = tiny_net.run(batch, policy)
        counter = _Counter(tiny_net)
        try:
            masked = run_masked(tiny_net, batch, policy)
        finally:
            counter.close()
    assert torch.allclose(masked, skipped.logits, atol=1e-5, rtol=1e-4)
    n = batch.shape[0]
    assert counter.calls == [1] * tiny_net.num_blocks and counter.samples == [n] * tiny_net.num_blocks
    if not isinstance(policy, FullPolicy):
        assert int(skipped.executed.sum()) < n * tiny_net.num_blocks  # the skipping run really saved blocks


def test_masked_run_at_batch_one_uses_host_decisions(tiny_net, batch):
    for i in range(3):
        x = batch[i: i + 1]
        with torch.no_grad():
            r = tiny_net.run(x, GatePolicy(0.5))
            assert torch.allclose(run_masked(tiny_net, x, GatePolicy(0.5)), r.logits, atol=1e-5, rtol=1e-4)


def test_batch_one_decisions_equal_batched_decisions(tiny_net, batch):
    """The host-side batch-1 comparison in GatePolicy.decide decides exactly as the batched tensor one."""
    for t in (0.3, 0.5, 0.7):
        with torch.no_grad():
            batched = tiny_net.run(batch, GatePolicy(t)).executed
            single = torch.cat([tiny_net.run(batch[i: i + 1], GatePolicy(t)).executed for i in range(len(batch))])
        assert torch.equal(batched, single)


def test_gate_fast_path_equals_module_path_and_tracks_changes(tiny_net, batch):
    gate = tiny_net.gate(1)
    h = torch.relu(torch.randn(5, 16, 32, 32))
    with torch.no_grad():
        fast = gate(h)
    with torch.enable_grad():
        slow = gate(h).detach()  # grad mode: the plain module path
    assert torch.allclose(fast, slow, atol=1e-5)
    with torch.no_grad():
        saved = gate.bn.running_mean.clone()
        gate.bn.running_mean.add_(0.7)  # in-place change: the folded cache must notice
        changed = gate(h)
        with torch.enable_grad():
            expected = gate(h).detach()
        gate.bn.running_mean.copy_(saved)
        back = gate(h)
    assert torch.allclose(changed, expected, atol=1e-5) and not torch.allclose(changed, fast, atol=1e-3)
    assert torch.allclose(back, fast, atol=1e-6)


def test_time_policy_reports_full_skipped_masked(tiny_net, batch):
    x = batch[:4]
    tm = time_policy(tiny_net, x, GatePolicy(0.5), batch_size=2, **FAST)
    assert tm.batch_size == 2 and tm.num_batches == 2
    assert tm.full_ms > 0 and tm.skipped_ms > 0 and tm.masked_ms > 0
    assert tm.full_stats.batches_per_call == 2 and tm.full_stats.per_batch_ms == pytest.approx(tm.full_ms)
    assert 0 < tm.flops_saved_fraction < 1 and tm.blocks_executed_mean < tm.blocks_total
    assert tm.efficiency == pytest.approx(tm.time_saved_fraction / tm.flops_saved_fraction)
    rounds = zip(tm.full_stats.times_ms, tm.skipped_stats.times_ms)  # the r-th repeats ran in the same round
    per_round = [(1 - s / f) / tm.flops_saved_fraction for f, s in rounds]
    assert len(per_round) == tm.full_stats.n and tm.paired_efficiencies == pytest.approx(per_round)
    assert tm.paired_efficiency == pytest.approx(float(np.median(per_round)))
    q25, q75 = tm.paired_efficiency_quartiles
    assert q25 <= tm.paired_efficiency <= q75
    assert tm.max_abs_logit_diff_masked < 1e-4
    assert tm.info.device_type == "cpu"
    d = tm.to_dict()
    json.dumps(d)
    assert d["policy"] == {"name": "gates", "threshold": 0.5, "overrides": {}}
    with pytest.raises(ValueError, match="divide"):
        time_policy(tiny_net, batch[:3], GatePolicy(0.5), batch_size=2, **FAST)
    with pytest.raises(ValueError, match="expected images"):
        time_policy(tiny_net, torch.randn(2, 32, 32), GatePolicy(0.5), **FAST)


def _synthetic_profile() -> BlockProfile:
    return BlockProfile(model="m", batch_size=4, input_hw=(32, 32), names=["a", "b", "c"],
                        downsample=[False, True, False], gated=[True, False, True], stem_ms=1.0,
                        block_ms=[10.0, 20.0, 30.0], bypass_ms=[0.1, 2.0, 0.1], gate_ms=[0.5, 0.0, 0.5],
                        mix_ms=[1.0, 1.0, 1.0], head_ms=2.0, engine_ms=0.25, full_ms=63.0, full_run_ms=63.25,
                        info=device_info("cpu"))


def test_predict_latency_model_is_exact_on_a_known_profile():
    p = _synthetic_profile()
    base = 1.0 + 2.0 + 0.25 + 0.5 + 0.5  # stem, head, engine, two gates
    assert predict_latency(p, [True, True, True]) == pytest.approx(base + 60.0)
    assert predict_latency(p, [False, False, False]) == pytest.approx(base + 0.1 + 2.0 + 0.1)
    assert predict_latency(p, 1.0) == pytest.approx(base + 60.0)  # scalar: fraction of gated blocks
    assert predict_latency(p, 0.0) == pytest.approx(base + 0.1 + 20.0 + 0.1)  # ungated block 1 always runs
    # half the batch runs block 0: half its time plus the gather/scatter
    assert predict_latency(p, [0.5, 1.0, 1.0]) == pytest.approx(base + 5.0 + 1.0 + 50.0)
    mask = torch.tensor([[True, True, False], [False, True, False]])
    assert predict_latency(p, mask) == pytest.approx(predict_latency(p, [0.5, 1.0, 0.0]))
    assert predict_latency(p, [1, 1, 1], gates_evaluated=[0, 0, 0]) == pytest.approx(base - 1.0 + 60.0)
    for bad in (1.5, [1, 1], torch.ones(2, 4, dtype=torch.bool), [0.2, 2.0, 0.0]):
        with pytest.raises(ValueError):
            predict_latency(p, bad)


def test_predict_latency_counts_the_rows_an_identity_block_swaps():
    p = BlockProfile(**{**_synthetic_profile().__dict__, "swap_ms": [0.25, 0.0, 0.25]})
    base = 1.0 + 2.0 + 0.25 + 0.5 + 0.5 + 20.0  # stem, head, engine, two gates, block 1 (always runs)
    # samples 0 and 3 of 4 run block 0: the window [0, 2) holds sample 1, swapped with sample 3 (m = 1)
    mask = torch.tensor([[True, True, True], [False, True, True], [False, True, True], [True, True, True]])
    assert predict_latency(p, mask) == pytest.approx(base + 0.5 * 10.0 + 1 * 0.25 + 30.0)
    contiguous = torch.tensor([[True, True, True], [True, True, True], [False, True, True], [False, True, True]])
    assert predict_latency(p, contiguous) == pytest.approx(base + 0.5 * 10.0 + 30.0)  # nothing moves
    # fractions only: m estimated as SWAP_FRACTION_ESTIMATE * min(k, N - k) of the profile's batch of 4
    assert predict_latency(p, [0.5, 1.0, 1.0]) == pytest.approx(base + 5.0 + SWAP_FRACTION_ESTIMATE * 2 * 0.25
                                                               + 30.0)


def test_block_scale_stretches_block_times_to_the_measured_forward():
    p = BlockProfile(**{**_synthetic_profile().__dict__, "block_scale": 1.5, "block_half_ms": [4.0, 8.0, 12.0]})
    base = 1.0 + 2.0 + 0.25 + 0.5 + 0.5
    assert predict_latency(p, [True, True, True]) == pytest.approx(base + 1.5 * 60.0)
    assert p.block_rows_ms(0, 0.5) == pytest.approx(1.5 * 4.0)  # the half-batch time, scaled
    assert p.block_rows_ms(0, 0.25) == pytest.approx(1.5 * 2.0)  # linear below half
    assert p.block_rows_ms(0, 0.75) == pytest.approx(1.5 * 7.0)  # between half and full


def test_profile_blocks_and_prediction_are_positive_and_monotone(tiny_net, batch):
    prof = profile_blocks(tiny_net, batch_size=2, x=batch[:2], warmup=1, repeats=2, min_repeat_s=0.0)
    L = tiny_net.num_blocks
    assert prof.num_blocks == L and prof.batch_size == 2 and prof.info.device_type == "cpu"
    assert prof.stem_ms > 0 and prof.head_ms > 0 and prof.full_ms > 0 and prof.engine_ms >= 0
    assert all(v > 0 for v in prof.block_ms) and all(v > 0 for v in prof.bypass_ms)
    assert [g > 0 for g in prof.gate_ms] == [tiny_net.gate(i) is not None for i in range(L)]
    assert all(prof.block_ms[i] > prof.bypass_ms[i] for i in range(L))
    assert prof.probe_ms >= 0.0 and math.isfinite(prof.probe_ms)  # tiny_net has probes: its checks are timed
    no_probes = create_model("cifar_resnet20", probes=False).eval()
    assert profile_blocks(no_probes, 1, warmup=1, repeats=2, min_repeat_s=0.0).probe_ms == 0.0
    json.dumps(prof.to_dict())
    assert list(prof.to_dataframe()["part"])[0] == "stem"
    # executing more blocks never predicts less time
    gated = tiny_net.gated_blocks
    preds = []
    for k in range(len(gated) + 1):
        mask = [True] * L
        for i in gated[k:]:
            mask[i] = False
        preds.append(predict_latency(prof, mask))
    assert all(p > 0 for p in preds)
    assert preds == sorted(preds) and preds[-1] > preds[0]
    fracs = [predict_latency(prof, f) for f in (0.0, 0.25, 0.5, 1.0)]
    assert fracs[0] < fracs[-1] and all(f > 0 for f in fracs)
    check = check_prediction(prof, tiny_net, batch[:4], GatePolicy(0.5), warmup=1, repeats=2, min_repeat_s=0.0)
    assert check.predicted_ms > 0 and check.measured_ms > 0 and math.isfinite(check.relative_error)
    with pytest.raises(ValueError, match="multiple"):
        check_prediction(prof, tiny_net, batch[:3], GatePolicy(0.5))
    with pytest.raises(ValueError, match="batch_size"):
        profile_blocks(tiny_net, batch_size=0)


def test_exit_check_cost_is_a_paired_share_of_the_full_run(tiny_net, batch):
    cost = decision_cost(tiny_net, batch[:4], rounds=3)
    assert cost.source == "early_exit" and cost.checks == tiny_net.num_blocks - 1
    assert cost.rounds == 3 and cost.batch_size == 1
    assert cost.full_ms > 0 and cost.check_ms >= 0 and cost.fraction == cost.check_ms / cost.full_ms
    assert cost.device.startswith("CPU") and cost.device_name == device_info("cpu").device_name
    assert json.dumps(cost.to_dict())
    with pytest.raises(ValueError, match="no probe heads"):
        decision_cost(create_model("cifar_resnet20", probes=False), batch[:2], rounds=2)


def test_gate_and_plan_decisions_are_timed_as_made_inside_runs_that_skip_nothing(tiny_net, batch, monkeypatch):
    planned = create_model("cifar_resnet20", plan=True).eval()
    called = {"gates": 0, "plan": 0}
    for g in planned.gated_blocks:
        real = planned.gate(g).probability_of_one
        monkeypatch.setattr(planned.gate(g), "probability_of_one",
                            lambda h, real=real: called.__setitem__("gates", called["gates"] + 1) or real(h))
    real_plan = planned.plan_head.probabilities_of_one
    monkeypatch.setattr(planned.plan_head, "probabilities_of_one",
                        lambda h: called.__setitem__("plan", called["plan"] + 1) or real_plan(h))
    gates = decision_cost(planned, batch[:2], "gates", rounds=2)
    plan = decision_cost(planned, batch[:2], "plan", rounds=2)
    assert (gates.source, gates.checks, plan.source, plan.checks) == ("gates", len(planned.gated_blocks), "plan", 1)
    assert called["gates"] > 0 and called["plan"] > 0  # every decision really made (batch of one: the host path)
    assert gates.check_ms >= 0 and plan.check_ms >= 0 and gates.full_ms > 0
    from skipviz.measure.profile import _GatesOnly, _PlanOnly
    x = batch[:3]
    with torch.no_grad():
        for policy in (_GatesOnly(), _PlanOnly()):
            res = planned.run(x, policy)
            assert res.executed.all() and torch.equal(res.logits, planned(x))
    for source in ("gates", "plan"):  # in batches: the rows' decisions stay tensors, as a real decision's
        assert decision_cost(planned, batch[:4], source, rounds=2, batch_size=2).batch_size == 2
    with pytest.raises(ValueError, match="no plan head"):
        decision_cost(tiny_net, batch[:2], "plan", rounds=2)
    with pytest.raises(ValueError, match="unknown decision source"):
        decision_cost(tiny_net, batch[:2], "kl", rounds=2)


def test_gate_heads_cost_under_two_percent_of_flops(tiny_net):
    prof = _synthetic_profile()
    cost = gate_cost(tiny_net, BlockProfile(**{**prof.__dict__, "input_hw": (32, 32)}))
    assert cost.gates == len(tiny_net.gated_blocks)
    assert 0 < cost.flops_fraction <= 0.02
    assert cost.flops_full == tiny_net.flop_table().full
    planned_net = create_model("cifar_resnet20", plan=True)
    plan = gate_cost(planned_net, BlockProfile(**{**prof.__dict__, "input_hw": (32, 32), "plan_ms": 0.05}),
                     planned=True)  # the plan head's cost instead, for PlanPolicy
    assert plan.gates == "plan head" and plan.gate_flops == planned_net.flop_table((32, 32)).plan > 0
    assert plan.latency_fraction == 0.05 / prof.full_ms and 0 < plan.flops_fraction <= 0.02


def test_results_markdown_and_bench_config():
    q = BenchConfig.quick()
    assert q.min_repeat_s == 0.0 and len(q.thresholds) >= 3
    report = {"model": "m", "inputs": "random", "notes": "n", "environment": device_info("cpu").to_dict(),
              "rows": [{"batch_size": 1, "threshold": 0.5, "blocks_executed_mean": 6.0, "blocks_total": 9,
                        "flops_saved_fraction": 0.3, "full_ms": 2.0, "skipped_ms": 1.4, "masked_ms": 2.2,
                        "time_saved_fraction": 0.3, "efficiency": 1.0, "masked_time_saved_fraction": -0.1,
                        "predicted_ms": 1.5, "prediction_relative_error": 0.07}],
              "gate_cost": [{"batch_size": 1, "gates": 7, "flops_fraction": 0.0001, "latency_fraction": 0.04}]}
    md = results_markdown(report)
    assert "| 1 | 0.50 | 6.00/9 | 30.0% | 2.000 | 1.400 | 2.200 | 30.0% | 1.00 |" in md
    assert "cpu" in md


def test_bench_subcommand_is_registered():
    from skipviz.cli import build_parser

    args = build_parser().parse_args(["bench", "--quick", "--thresholds", "0.2,0.4,0.6", "--batch-sizes", "1,2"])
    assert args.command == "bench" and args.thresholds == [0.2, 0.4, 0.6] and args.batch_sizes == [1, 2]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--batch-sizes", "one"])


def test_check_prediction_counts_the_plan_head_only_when_it_ran(batch):
    import dataclasses

    from skipviz import PlanPolicy

    torch.manual_seed(0)
    net = create_model("cifar_resnet20", plan=True).eval()
    prof = profile_blocks(net, batch_size=2, x=batch[:2], warmup=1, repeats=2, min_repeat_s=0.0)
    prof = dataclasses.replace(prof, plan_ms=1000.0)  # unmistakable if counted
    forced = PlanPolicy(0.5, {i: "run" for i in net.gated_blocks})  # every gated block forced: no plan head
    check = check_prediction(prof, net, batch[:2], forced, warmup=1, repeats=1, min_repeat_s=0.0)
    assert check.predicted_ms == pytest.approx(check.full_predicted_ms)
    check = check_prediction(prof, net, batch[:2], PlanPolicy(0.5), warmup=1, repeats=1, min_repeat_s=0.0)
    assert check.predicted_ms > 1000.0


def test_profile_blocks_feeds_a_half_precision_network_half_inputs():
    net = create_model("cifar_resnet20").to(torch.bfloat16).eval()
    prof = profile_blocks(net, batch_size=2, warmup=1, repeats=1, min_repeat_s=0.0)  # float32 default input
    assert prof.full_ms > 0 and prof.info.dtype == "bfloat16"
