"""The cost model's CPU-pool terms used by `afd bench mix`: a CFS quota bounds a node's step from below, and
measured per-call costs add to T_a and T_f. Hand-computed on test_planning's one-layer toy model."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from afd.errors import ConfigError
from afd.planning import CpuQuota, Mix
from afd.planning.cost_model import CostModel
from tests.unit.test_planning import TOY, X, _catalog


def _predict(**overrides: Any):
    base = Mix("x", 1, "x", 2, microbatches=1, batch_per_attention_node=10, context_len=100, link="slow")
    return CostModel(TOY, _catalog(x=X)).predict(replace(base, **overrides))


def test_no_quota_and_no_call_costs_keep_the_hand_computed_step():
    # test_planning: T_a = 23 us, T_f = 24 us, T_c = 80 us, one microbatch: 23 + 80 + 24 = 127 us
    p = _predict()
    assert p.tpot_ms == pytest.approx(0.127)
    assert p.exposed == "link-bound"


def test_an_attention_quota_below_its_compute_share_bounds_the_step():
    # 23 us of compute per step at 0.1 core: 230 us of wall time per step > the 127 us chain
    p = _predict(attention_quota=CpuQuota(cores=0.1, threads=1))
    assert p.tpot_ms == pytest.approx(0.230)
    assert p.exposed == "attention-bound"
    assert "CPU quota of 0.1 cores" in p.basis["attention"]
    # two spinning threads at 0.5 core: 23 * 2 / 0.5 = 92 us < 127 us: the chain stands
    assert _predict(attention_quota=CpuQuota(cores=0.5, threads=2)).tpot_ms == pytest.approx(0.127)


def test_the_tighter_of_two_quotas_is_what_the_step_waits_on():
    # FFN: 24 us per step at 0.1 core = 240 us; attention 230 us; the step is 240 us, FFN-bound
    p = _predict(attention_quota=CpuQuota(0.1), ffn_quota=CpuQuota(0.1))
    assert p.tpot_ms == pytest.approx(0.240)
    assert p.exposed == "ffn-bound"
    assert p.decode_tok_s == pytest.approx(10 / 240e-6)


def test_two_microbatches_count_both_in_the_quota():
    # m = 2: T_a = 12.5 us per microbatch, 25 us of compute per step; at 0.1 core 250 us > the 76.5 us chain
    assert _predict(microbatches=2, attention_quota=CpuQuota(0.1)).tpot_ms == pytest.approx(0.250)


def test_call_costs_add_to_each_side_and_count_under_the_quota():
    p = _predict(attention_call_us=7.0, ffn_call_us=6.0)
    assert (p.attention_us, p.ffn_us) == pytest.approx((30.0, 30.0))
    assert p.tpot_ms == pytest.approx((30 + 80 + 30) / 1e3)
    # (23 + 7) us per step at 0.1 core: 300 us
    assert _predict(attention_call_us=7.0, attention_quota=CpuQuota(0.1)).tpot_ms == pytest.approx(0.300)


def test_the_ffn_kernel_scale_multiplies_the_kernels_not_the_call_cost():
    # T_f = 24 us of kernels: at 0.25 x, 6 us, plus the 6 us call: 12 us; at 0 the call alone
    assert _predict(ffn_call_us=6.0, ffn_kernel_scale=0.25).ffn_us == pytest.approx(12.0)
    assert _predict(ffn_call_us=6.0, ffn_kernel_scale=0.0).ffn_us == pytest.approx(6.0)
    assert _predict(ffn_kernel_scale=1.0).ffn_us == pytest.approx(24.0)


def test_background_cores_come_off_the_quota_and_the_shared_cores():
    # 23 us of attention compute per step at 0.1 core less 0.05 of background: 23 / 0.05 = 460 us
    p = _predict(attention_quota=CpuQuota(0.1), attention_background_cores=0.05)
    assert p.tpot_ms == pytest.approx(0.460)
    assert p.fits
    # FFN quota 0.1 with 0.02 background: 24 / 0.08 = 300 us
    assert _predict(ffn_quota=CpuQuota(0.1), ffn_background_cores=0.02).tpot_ms == pytest.approx(0.300)
    # without a quota it changes nothing on its own: the chain is wall time, the background runs beside it
    assert _predict(attention_background_cores=0.3).tpot_ms == pytest.approx(0.127)
    # shared cores, no overlap (pools take turns on 0.1 core): 1 x 23 + 2 x 24 = 71 us of CPU per layer over the
    # 0.1 core less 1 x 0.02 + 2 x 0.01 of background = 0.06: 1183.3 us; without background 710 us
    shared = {"overlap": False, "shared_cores": 0.1}
    assert _predict(**shared).tpot_ms == pytest.approx(0.710)
    p = _predict(**shared, attention_background_cores=0.02, ffn_background_cores=0.01)
    assert p.tpot_ms == pytest.approx(0.071 / 0.06)


def test_background_that_leaves_no_compute_is_a_problem_not_a_division_by_zero():
    p = _predict(attention_quota=CpuQuota(0.1), attention_background_cores=0.2)
    assert not p.fits
    assert "background threads take 0.20 of the 0.1 cores of an attention node's CPU quota" in p.problems[0]
    assert p.tpot_ms == pytest.approx(0.023 / 0.01)  # predicted at a tenth of the quota
    with pytest.raises(ConfigError, match="background_cores must be >= 0"):
        Mix("x", 1, "x", 1, 1, 1, ffn_background_cores=-0.1)


def test_bad_quota_and_call_costs_are_refused():
    with pytest.raises(ConfigError, match="cores > 0"):
        CpuQuota(cores=0.0)
    with pytest.raises(ConfigError, match="threads >= 1"):
        CpuQuota(cores=1.0, threads=0)
    with pytest.raises(ConfigError, match="attention_call_us"):
        Mix("x", 1, "x", 1, 1, 1, attention_call_us=-1.0)
    with pytest.raises(ConfigError, match="ffn_kernel_scale must be >= 0"):
        Mix("x", 1, "x", 1, 1, 1, ffn_kernel_scale=-0.5)
