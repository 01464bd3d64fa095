"""The saving's interval decides the words: a saving whose interval contains zero is never stated as a fact."""
from __future__ import annotations

import numpy as np
import pytest

from skipviz import GatePolicy
from skipviz.measure.saving import machine_busy, measure_saving, paired_saving, trust_note
from toys import FakeClock, tiny_net, varied_images


def test_clear_saving_is_stated_with_its_interval():
    rng = np.random.default_rng(0)
    full = 0.010 + rng.normal(0, 1e-4, 21)
    s = paired_saving(full, full - 0.004 + rng.normal(0, 1e-4, 21))
    assert s.measurable and 0.0035 < s.saving_s < 0.0045 and s.low_s > 0
    assert abs(float(s.label().split()[0]) - 4.0) < 0.3 and "saved" in s.label() and "95 % CI" in s.label()


def test_noise_around_zero_is_no_measurable_saving():
    rng = np.random.default_rng(1)
    full = 0.010 + rng.normal(0, 2e-3, 15)  # a noisy machine: spread far wider than any effect
    s = paired_saving(full, 0.010 + rng.normal(0, 2e-3, 15))
    assert not s.measurable and s.low_s < 0 < s.high_s
    assert s.label().startswith("no measurable saving (±") and "-" not in s.label()


def test_measurably_slower_is_said_so_not_as_a_negative_saving():
    s = paired_saving([1.0, 1.0, 1.0, 1.0], [1.2, 1.21, 1.19, 1.2])
    assert s.measurable and s.saving_s < 0
    assert "slower" in s.label(unit="ms") and "-" not in s.label().split("(")[0]


def test_mismatched_rounds_are_refused():
    with pytest.raises(ValueError):
        paired_saving([1.0, 2.0], [1.0])


def _noise():
    rng = np.random.default_rng(1)  # as above: a spread far wider than any effect
    return paired_saving(0.010 + rng.normal(0, 2e-3, 15), 0.010 + rng.normal(0, 2e-3, 15))


def test_headline_and_detail_never_state_a_negative_number():
    clear = paired_saving([2e-3] * 5, [1.2e-3, 1.21e-3, 1.19e-3, 1.2e-3, 1.2e-3], device="CPU (1 thread)")
    assert clear.headline() == "0.80 ms saved" and clear.detail().startswith("95 % CI 0.79-0.81 ms, 40 % of 2.00 ms")
    assert clear.saving_percent == pytest.approx(40.0)
    slower = paired_saving([1e-3] * 4, [1.2e-3, 1.21e-3, 1.19e-3, 1.2e-3])
    assert slower.headline() == "0.20 ms slower" and "-" not in slower.detail().split("CI")[0]
    noise = _noise()
    assert noise.headline() == "no measurable saving" and noise.detail().startswith("±")
    assert noise.label() == f"no measurable saving ({noise.detail()})"


def test_per_input_divides_by_the_batch():
    s = paired_saving([0.016] * 4, [0.008, 0.0081, 0.0079, 0.008], device="CPU (2 threads)", batch_size=16)
    p = s.per_input()
    assert p.saving_s == pytest.approx(s.saving_s / 16) and p.full_median_s == pytest.approx(0.001)
    assert p.low_s == pytest.approx(s.low_s / 16) and p.device == s.device
    assert s.describe() == "batch 16 on CPU (2 threads), 4 interleaved paired rounds"


def test_trust_note_names_a_busy_machine_and_a_spread_wider_than_the_effect(monkeypatch):
    clear = paired_saving([2e-3] * 5, [1.2e-3, 1.21e-3, 1.19e-3, 1.2e-3, 1.2e-3])
    assert trust_note(clear) is None
    FakeClock.quiet(monkeypatch)
    assert machine_busy() is None
    busy = paired_saving([2e-3] * 3, [1e-3] * 3, busy="the machine is busy (load 9.0 on 2 cores)")
    assert "busy (load 9.0 on 2 cores)" in trust_note(busy)
    noise = _noise()
    assert noise.noisy() and "wider than the effect" in trust_note(noise)
    assert "at 1 of 2 settings" in trust_note([clear, noise])
    # a sweep measured while busy says so once (the latest load), with how many timings it touched
    loads = [paired_saving([2e-3] * 3, [1e-3] * 3, busy=f"the machine is busy (load {v} on 2 cores)")
             for v in ("4.6", "4.7")]
    note = trust_note([*loads, clear])
    assert note.count("busy") == 1 and "busy (load 4.7 on 2 cores) during 2 of 3 timings" in note
    assert "during" not in trust_note(loads)
    assert trust_note([]) is None
    FakeClock.busy(monkeypatch, load=64.0)
    assert machine_busy().startswith("the machine is busy (load 64.0 on ")


def test_measure_saving_pairs_interleaved_rounds_of_the_real_engine(monkeypatch):
    """A fake clock with a clear 1 ms saving and small noise: the saving is found, with the device and batch."""
    net = tiny_net().eval()
    x = varied_images(4, seed=2)
    fake = FakeClock(full_s=3e-3, saving_s=1e-3, spread_s=2e-5, seed=1).install(monkeypatch)
    FakeClock.quiet(monkeypatch)
    s = measure_saving(net, x, GatePolicy(0.5), batch_size=2, rounds=9)
    assert fake.calls == 36  # 9 rounds, each of the two batches through full and skipped back to back
    assert s.rounds == 9 and s.batch_size == 2 and s.device.startswith("CPU")
    # each batch of 2 timed by itself (3 ms full, 1 ms saved): the times are per batch
    assert s.full_median_s == pytest.approx(3e-3, rel=0.02) and s.saving_s == pytest.approx(1e-3, rel=0.05)
    one = measure_saving(net, x, GatePolicy(0.5), rounds=9)  # one batch of 4: whole calls, interleaved
    assert fake.calls == 36 + 18 and one.batch_size == 4 and one.full_median_s == pytest.approx(3e-3, rel=0.02)
    assert s.measurable and s.headline().endswith("ms saved") and s.busy is None


def test_measure_saving_on_a_noisy_busy_machine_says_no_measurable_saving(monkeypatch):
    FakeClock(full_s=2e-3, saving_s=1e-4, spread_s=1e-3, seed=2).install(monkeypatch)
    FakeClock.busy(monkeypatch)
    s = measure_saving(tiny_net().eval(), varied_images(1, seed=3), GatePolicy(0.5), rounds=15)
    assert not s.measurable and s.label().startswith("no measurable saving (±")
    assert s.busy and "busy" in trust_note(s) and "wider than the effect" in trust_note(s)
