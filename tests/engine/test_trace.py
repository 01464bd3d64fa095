"""Traces as plain data: ``SampleTrace.to_dict`` gives what ``dataclasses.asdict`` gives (plus the saving), as new
containers, and ``from_dict`` reads it back."""
from __future__ import annotations

import dataclasses
import json

from skipviz import GatePolicy
from skipviz.engine.trace import SampleTrace


def test_to_dict_is_asdict_plus_the_saving_and_round_trips(tiny_net, batch):
    traces = tiny_net.run(batch, GatePolicy(0.5)).traces()
    for tr in traces:
        d = tr.to_dict()
        expected = dataclasses.asdict(tr)
        expected.update(flops_saved=tr.flops_saved, flops_saved_fraction=tr.flops_saved_fraction)
        assert d == expected
        assert json.loads(json.dumps(d)) == d
        assert SampleTrace.from_dict(d) == tr


def test_to_dict_containers_are_new(tiny_net, batch):
    tr = tiny_net.run(batch[:1], GatePolicy(0.5)).traces()[0]
    d = tr.to_dict()
    d["blocks"][0]["executed"] = not d["blocks"][0]["executed"]
    d["logits"][0] += 1.0
    d["policy_config"]["threshold"] = 0.99
    assert tr.to_dict() == {**dataclasses.asdict(tr), "flops_saved": tr.flops_saved,
                            "flops_saved_fraction": tr.flops_saved_fraction}
    assert tr.policy_config["threshold"] == 0.5


def test_trace_dicts_are_the_traces_to_dict_key_for_key(tiny_net, batch):
    from skipviz import EarlyExitPolicy, FullPolicy

    for policy in (GatePolicy(0.5), FullPolicy(), EarlyExitPolicy(0.3)):
        res = tiny_net.run(batch, policy)
        dicts = res.trace_dicts()
        assert len(dicts) == batch.shape[0]
        for d, tr in zip(dicts, res.traces()):
            # the same JSON text: same keys in the same order, same values (an audit stores these)
            assert json.dumps(d) == json.dumps(tr.to_dict())
            assert list(d["blocks"][0]) == [f.name for f in dataclasses.fields(tr.blocks[0])]
        assert dicts[0]["policy_config"] is not dicts[1]["policy_config"]  # new containers per sample
