"""afd/planning: the catalog validates, the cost model reproduces hand-computed cases, the planner refuses
impossible inventories and ranks a hand-checkable case."""

from __future__ import annotations

import copy
import math
import re
from dataclasses import replace
from typing import Any

import pytest
import yaml

from afd.errors import ConfigError
from afd.model_spec import ModelSpec
from afd.planning.calibration import AttentionMeasurement, Calibration, FfnMeasurement, KindCalibration
from afd.planning.catalog import CATALOG_PATH, CatalogError, load_catalog, parse_catalog
from afd.planning.cost_model import CostModel, CpuQuota, Link, Mix, fit_efficiency, predict
from afd.planning.model_costs import LayerClass, ModelCosts, model_costs
from afd.planning.planner import PlanningError, PlanRequest, parse_inventory, parse_prices, plan

REQUIRED_KINDS = {"h100", "h200", "h800", "h20", "a100", "l40s", "l20", "mi300x", "ascend-910b", "gaudi3", "cpu"}

QWEN3_30B_A3B: dict[str, Any] = {  # the public config.json's sizes (Qwen/Qwen3-30B-A3B)
    "architectures": ["Qwen3MoeForCausalLM"],
    "hidden_size": 2048,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "moe_intermediate_size": 768,
    "intermediate_size": 6144,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "vocab_size": 151936,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 40960,
    "rope_theta": 1000000.0,
    "norm_topk_prob": True,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def _figure(value: float) -> dict[str, Any]:
    return {"value": value, "source": "test figure"}


def _kind(bandwidth_gb_s: float, tflops: float, memory_gb: float = 100.0, price: float = 1.0) -> dict[str, Any]:
    return {
        "name": "test kind",
        "device_class": "gpu",
        "bf16_dense_tflops": _figure(tflops),
        "memory_gb": _figure(memory_gb),
        "memory_bandwidth_gb_per_s": _figure(bandwidth_gb_s),
        "price_usd_per_hour": _figure(price),
    }


def _catalog(**kinds: dict[str, Any]) -> Any:
    return parse_catalog(
        {
            "kinds": kinds,
            "links": {
                "slow": {"bandwidth_gb_per_s": _figure(1), "latency_us": _figure(10)},
                "fast": {"bandwidth_gb_per_s": _figure(1e6), "latency_us": _figure(1e-9)},
            },
        }
    )


# One layer, round numbers: the arithmetic of every case below is written out in the test.
TOY = ModelCosts(
    hidden_size=1000,
    num_layers=1,
    layers=(
        LayerClass(
            count=1,
            attention_params=1_000_000,
            attention_flops_per_token=2e6,
            attention_flops_per_token_ctx=0.0,
            kv_bytes_per_token=1000,
            state_bytes_per_request=0,
            num_experts=4,
            top_k=2,
            expert_params=1_000_000,
            shared_params=0,
            expert_intermediate_size=100,
        ),
    ),
    head_params=0,
    embedding_params=0,
    weight_bytes=2.0,
)
# kind x: 1e12 B/s, 1e12 FLOP/s, 100 GB, 1 $/h
X = _kind(1000, 1)


# ---- catalog -----------------------------------------------------------------------------------------------
def test_shipped_catalog_validates_with_every_required_kind_and_a_source_per_figure():
    catalog = load_catalog()
    assert set(catalog.kinds) >= REQUIRED_KINDS
    for name, kind in catalog.kinds.items():
        for figure in (kind.bf16_dense_tflops, kind.memory_gb, kind.memory_bandwidth_gb_per_s, kind.price_usd_per_hour):
            assert figure.value > 0 and figure.source.strip(), name
        if kind.fp8_dense_tflops is not None:
            assert kind.fp8_dense_tflops.source.strip(), name
    assert {"100gbe", "200gbe", "400gbe", "nvlink", "pcie4", "pcie5", "loopback"} <= set(catalog.links)
    for link in catalog.links.values():
        assert link.bandwidth_gb_per_s.source.strip() and link.latency_us.source.strip()
    assert catalog.kind_of_device("NVIDIA H200") == "h200"  # not h20: the longest name wins
    assert catalog.kind_of_device("NVIDIA H20") == "h20"
    assert catalog.kind_of_device("cpu (8 threads)") == "cpu"


def _shipped() -> dict[str, Any]:
    return yaml.safe_load(CATALOG_PATH.read_text())


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["kinds"]["h100"]["memory_gb"].pop("source"), "kinds.h100.memory_gb.source: Field required"),
        (lambda d: d["kinds"]["h100"]["memory_gb"].update(source="  "), "kinds.h100.memory_gb.source"),
        (lambda d: d["kinds"]["l40s"]["memory_bandwidth_gb_per_s"].update(value=-1), "memory_bandwidth_gb_per_s.value"),
        (lambda d: d["kinds"]["h20"].update(memory_gib=_figure(96)), "kinds.h20.memory_gib: unknown field"),
        (lambda d: d["kinds"]["h20"].pop("bf16_dense_tflops"), "kinds.h20.bf16_dense_tflops: Field required"),
        (lambda d: d["links"]["400gbe"]["latency_us"].pop("source"), "links.400gbe.latency_us.source"),
    ],
)
def test_a_bad_catalog_entry_is_refused_with_its_field_named(mutate, expected):
    data = copy.deepcopy(_shipped())
    mutate(data)
    with pytest.raises(CatalogError) as error:
        parse_catalog(data)
    assert expected in str(error.value)


def test_unknown_kind_and_link_list_what_the_catalog_has():
    catalog = load_catalog()
    with pytest.raises(CatalogError, match=r"unknown hardware kind 'b200'.*h100"):
        catalog.kind("b200")
    with pytest.raises(CatalogError, match=r"unknown link '800gbe'.*400gbe"):
        catalog.link("800gbe")


# ---- model costs --------------------------------------------------------------------------------------------
def test_model_costs_of_qwen3_30b_a3b_by_hand():
    costs = model_costs(ModelSpec.from_config(QWEN3_30B_A3B))
    # experts: 48 layers * 128 experts * 3 * 2048 * 768 params * 2 bytes
    assert costs.ffn_weight_bytes == 48 * 128 * 3 * 2048 * 768 * 2
    # attention per layer: q,o 2 * 2048 * 32 * 128, k,v 2 * 2048 * 4 * 128, gate 2048 * 128; + embeddings and head
    per_layer = 2 * 2048 * 32 * 128 + 2 * 2048 * 4 * 128 + 2048 * 128
    assert costs.attention_weight_bytes == (48 * per_layer + 2 * 151936 * 2048) * 2
    assert costs.kv_bytes_per_token == 48 * 2 * 4 * 128 * 2  # K and V, 4 kv heads of 128, bf16
    assert [layer.count for layer in costs.layers] == [48]


# ---- cost model: hand-computed cases --------------------------------------------------------------------------
def _model(catalog: Any = None, calibration: Calibration | None = None) -> CostModel:
    return CostModel(TOY, catalog or _catalog(x=X), calibration)


def _mix(**overrides: Any) -> Mix:
    base = Mix("x", 1, "x", 2, microbatches=1, batch_per_attention_node=10, context_len=100, link="slow")
    return replace(base, **overrides)


def test_cost_model_one_microbatch_by_hand():
    p = _model().predict(_mix())
    # attention: per token (100 ctx * 1000 B) / 1e12 + 2e6 FLOP / 1e12 = 2.1e-6 s; 10 tokens -> 21 us;
    #   weights 1e6 * 2 B / 1e12 = 2 us; T_a = 23 us
    # FFN: pairs per node = 1 * 10 * 2 / 2 = 10, 2 experts held; 10 * 2 * 1e6 / 1e12 = 20 us;
    #   weights 2 * 1e6 * 2 / 1e12 = 4 us (10 pairs >= 2 experts: all read); T_f = 24 us
    # link: fanout 2 * (1 - 0.5^2) = 1.5 nodes; 10 * 1.5 * 1000 * 2 B = 30 kB one way at 1 GB/s = 30 us,
    #   FFN end 1 * 30 kB / 2 = 15 kB; T_c = 2 * 30 + 2 * 10 us latency = 80 us
    # m = 1: layer = max(23, 24, 30, 23 + 80 + 24 = 127) = 127 us, the round trip, longest part the link
    assert p.attention_us == pytest.approx(23)
    assert p.ffn_us == pytest.approx(24)
    assert p.link_us == pytest.approx(80)
    assert p.tpot_ms == pytest.approx(0.127)
    assert p.exposed == "link-bound"
    assert p.decode_tok_s == pytest.approx(10 / 127e-6)  # 78,740 tok/s
    assert p.tok_s_per_accelerator == pytest.approx(10 / 127e-6 / 3)
    assert p.cost_usd_per_hour == pytest.approx(3.0)
    assert p.tokens_per_usd == pytest.approx(10 / 127e-6 * 3600 / 3)
    assert p.usd_per_mtok == pytest.approx(3 / (10 / 127e-6 * 3600) * 1e6)
    assert p.megascale_microbatches == math.ceil(2 * (1 + 80 / 24))  # 9
    assert not p.ffn_hidden  # 24 > 23
    # KV: 100 GB * 0.9 - 2 MB of attention weights = 89.998 GB; / 1000 B per token; / 100 tokens per request
    assert p.kv_capacity_tokens == 89_998_000
    assert p.max_batch_by_kv == 899_980
    assert p.fits and p.problems == ()
    assert "roofline" in p.basis["attention"]


def test_cost_model_two_microbatches_by_hand():
    p = _model().predict(_mix(microbatches=2))
    # 5 tokens per microbatch: T_a = 5 * 2.1 + 2 = 12.5 us; T_f = 5 * 2 + 4 = 14 us (5 pairs, 2 experts);
    # link 15 kB at 1 GB/s = 15 us one way, T_c = 30 + 20 = 50 us
    # layer = max(2 * 12.5, 2 * 14, 2 * 15, 12.5 + 50 + 14 = 76.5) = 76.5 us
    assert (p.attention_us, p.ffn_us, p.link_us) == pytest.approx((12.5, 14, 50))
    assert p.tpot_ms == pytest.approx(0.0765)
    assert p.exposed == "link-bound"


def test_cost_model_narrow_dispatch_wire_by_hand():
    # fp8 out (1 + 4 / 1000 bytes per element, the per-token scale), bf16 back: the out leg is 10 * 1.5 * 1000 *
    # 1.004 B = 15.06 kB = 15.06 us, the way back 30 us as before; T_c = 15.06 + 30 + 2 * 10 = 65.06 us
    p = _model().predict(_mix(dispatch_activation_bytes=1.004))
    assert p.link_us == pytest.approx(65.06)
    assert p.tpot_ms == pytest.approx((23 + 65.06 + 24) / 1e3)
    # m = 2 on that wire: each leg half as long (7.53 and 15 us); the link-bound term is the longer leg
    p2 = _model().predict(_mix(dispatch_activation_bytes=1.004, microbatches=2))
    assert p2.link_us == pytest.approx(7.53 + 15 + 20)
    assert p2.tpot_ms == pytest.approx((12.5 + 42.53 + 14) / 1e3)


def test_cost_model_full_pipeline_is_ffn_bound_by_hand():
    p = _model().predict(_mix(microbatches=2, link="fast"))
    # a free link: layer = max(2 * 12.5, 2 * 14, ~0, 12.5 + ~0 + 14 = 26.5) = 28 us: the FFN pool shows
    assert p.tpot_ms == pytest.approx(0.028, rel=1e-6)
    assert p.exposed == "ffn-bound"
    no_overlap = _model().predict(_mix(microbatches=2, link="fast", overlap=False))
    assert no_overlap.tpot_ms == pytest.approx(2 * (12.5 + 14) / 1e3, rel=1e-5)  # shared hardware: m * (T_a + T_f)
    assert no_overlap.exposed == "ffn-bound"  # 14 > 12.5 of the shared cores


def test_shared_cores_still_overlap_the_link_by_hand():
    # m = 2 on the slow link, pools on the same cores: compute 2 * (12.5 + 14) = 53 us, link occupancy 2 * 15 = 30,
    # one microbatch's round trip 12.5 + 50 + 14 = 76.5 us: the round trip shows (the link overlaps the compute)
    p = _model().predict(_mix(microbatches=2, overlap=False))
    assert p.tpot_ms == pytest.approx(0.0765)
    assert p.exposed == "link-bound"
    # m = 1: nothing to overlap, T_a + T_c + T_f as with separate hardware
    assert _model().predict(_mix(overlap=False)).tpot_ms == pytest.approx(0.127)


def test_shared_cores_let_the_nodes_compute_at_once_as_far_as_they_go_by_hand():
    # m = 2 on the free link, 1 attention node (T_a 12.5 us) and 2 FFN nodes (T_f 14 us each) on shared cores:
    # their compute per layer is 2 * (1 * 12.5 + 2 * 14) = 81 us of CPU time
    fast = dict(microbatches=2, link="fast", overlap=False)
    assert _model().predict(_mix(**fast, shared_cores=3.0)).tpot_ms == pytest.approx(0.028, rel=1e-5)  # 81 / 3 = 27
    on_two = _model().predict(_mix(**fast, shared_cores=2.0))
    assert on_two.tpot_ms == pytest.approx(0.0405, rel=1e-5)  # 81 / 2 = 40.5 > 2 * 14 = 28: the cores are full
    assert on_two.exposed == "ffn-bound"  # the FFN nodes take 56 of the 81 us
    # a node's threads all count busy while it computes: 2 threads on attention, 2 * (25 + 28) / 2 = 53 us
    threaded = _model().predict(_mix(**fast, shared_cores=2.0, attention_quota=CpuQuota(4.0, threads=2)))
    assert threaded.tpot_ms == pytest.approx(0.053, rel=1e-5)
    assert threaded.exposed == "ffn-bound"  # the FFN nodes' 28 us against the attention node's 25 per microbatch
    with pytest.raises(ConfigError, match="shared_cores must be > 0"):
        _mix(shared_cores=0.0)


def test_cost_model_reads_only_the_experts_a_small_batch_touches():
    p = _model().predict(_mix(batch_per_attention_node=1, link="fast"))
    # 1 pair per FFN node, 2 experts held: 1 expert read = 2 us; compute 1 * 2e6 / 1e12 = 2 us -> T_f = 4 us
    assert p.ffn_us == pytest.approx(4, rel=1e-6)


def test_measured_kind_scales_its_roofline_and_carries_over_to_an_unmeasured_kind():
    # attention measured at batch 8, context 128: roofline 8 * (128 * 1000 / 1e12 + 2e6 / 1e12) = 17.024 us
    # + 2 us of weights = 19.024 us; measured twice that (4.756 us per token * 8) -> efficiency 2
    measured = Calibration(
        kinds={"x": KindCalibration(attention=(AttentionMeasurement(us_per_token=4.756, batch=8, context_len=128),))}
    )
    # kind y: half x's bandwidth and FLOP/s, nothing measured; its roofline is twice x's
    catalog = _catalog(x=X, y=_kind(500, 0.5))
    model = _model(catalog, measured)
    assert model.predict(_mix()).attention_us == pytest.approx(2 * 23)
    scaled = model.predict(_mix(attention_kind="y"))
    assert scaled.attention_us == pytest.approx(2 * 2 * 23)
    assert "scaled from x" in scaled.basis["attention"]
    assert "roofline" in scaled.basis["ffn"]  # nothing measured on FFN nodes of any kind
    # a per-role measurement of this mix wins over the kind's
    own = model.predict(_mix(attention_measured=(AttentionMeasurement(us_per_token=19.024 / 8 * 3),)))
    assert own.attention_us == pytest.approx(3 * 23)


def test_ffn_calibration_by_hand():
    # the FFN node times 16 tokens through one expert: roofline 16 * 2e6 / 1e12 = 32 us + 2 MB / 1e12 = 2 us;
    # measured 68 us (4.25 us per pair) -> efficiency 2, so T_f = 2 * 24 us
    measured = Calibration(kinds={"x": KindCalibration(ffn=(FfnMeasurement(us_per_token_expert=4.25, tokens=16),))})
    assert _model(calibration=measured).predict(_mix()).ffn_us == pytest.approx(48)


def test_two_measurements_fit_both_terms():
    # measured = 3 * variable + 1.5 * fixed at two batches; the fit recovers both
    points = [(v, f, 3 * v + 1.5 * f) for v, f in ((17.0, 2.0), (136.0, 2.0))]
    fit = fit_efficiency(points, "test")
    assert (fit.variable, fit.fixed) == pytest.approx((3, 1.5))
    single = fit_efficiency(points[:1], "test")
    assert single.variable == single.fixed == pytest.approx((3 * 17 + 3) / 19)


def test_kv_and_expert_memory_problems_are_reported():
    small = _catalog(x=X, tiny=_kind(1000, 1, memory_gb=0.005))  # 4.5 MB usable
    model = _model(small)
    p = model.predict(_mix(ffn_kind="tiny", ffn_count=1))  # 8 MB of experts on one 4.5 MB node
    assert not p.fits and "FFN weights" in p.problems[0]
    p = model.predict(_mix(attention_kind="tiny", batch_per_attention_node=100))
    # (4.5 MB - 2 MB) / (100 * 1000 B) = 25 requests fit, not 100
    assert p.max_batch_by_kv == 25 and "KV" in p.problems[0]


def test_predict_function_and_mix_validation():
    spec = ModelSpec.from_config(QWEN3_30B_A3B)
    p = predict(spec, Mix("h20", 2, "l40s", 4, microbatches=2, batch_per_attention_node=64, link="400gbe"))
    assert p.decode_tok_s > 0 and p.exposed in ("attention-bound", "ffn-bound", "link-bound")
    with pytest.raises(ValueError, match="microbatches must be >= 1"):
        Mix("h20", 1, "l40s", 1, microbatches=0, batch_per_attention_node=1)
    with pytest.raises(ValueError, match="bandwidth"):
        Link("bad", 0, 1)


# ---- planner --------------------------------------------------------------------------------------------------
def test_inventory_and_price_parsing():
    assert parse_inventory("h20:16, l40s:32") == {"h20": 16, "l40s": 32}
    assert parse_prices("h20=1.2,l40s=0.9") == {"h20": 1.2, "l40s": 0.9}
    for bad in ("h20", "h20:0", "h20:x", ""):
        with pytest.raises(PlanningError, match="hardware"):
            parse_inventory(bad)
    with pytest.raises(PlanningError, match="--price item 'h20'"):
        parse_prices("h20")


def test_planner_refuses_when_the_experts_fit_nowhere():
    model = CostModel(ModelSpec.from_config(QWEN3_30B_A3B))
    # 58.0 GB of experts; one L40S holds 43.2 GB usable, one L20 too
    with pytest.raises(PlanningError) as error:
        plan(model, PlanRequest({"l40s": 1, "l20": 1}, slo_tpot_ms=50))
    message = str(error.value)
    assert "not enough memory for the experts" in message and "58.0 GB" in message and "1 x l40s: 43 GB" in message


def test_planner_refuses_when_one_requests_kv_fits_nowhere():
    model = CostModel(ModelSpec.from_config(QWEN3_30B_A3B))
    # 98,304 B of KV per token: 2,000,000 tokens need 196.6 GB, more than any H200 (126.9 GB usable)
    with pytest.raises(PlanningError, match=r"not enough memory for the KV of one request.*2000000 tokens"):
        plan(model, PlanRequest({"h200": 4}, slo_tpot_ms=50, context_len=2_000_000))


def test_planner_refuses_one_kind_too_small_for_both_roles():
    model = CostModel(ModelSpec.from_config(QWEN3_30B_A3B))
    with pytest.raises(PlanningError, match="cannot hold both roles"):
        plan(model, PlanRequest({"l40s": 2}, slo_tpot_ms=50))  # 1 attention + 1 L40S for 58 GB of experts


def test_planner_says_when_no_candidate_meets_the_slo():
    with pytest.raises(PlanningError, match=re.escape("no deployment of this inventory meets TPOT <= 0.001 ms")):
        plan(_model(), PlanRequest({"x": 4}, slo_tpot_ms=0.001, context_len=100, link="slow"))


def test_planner_ranks_a_hand_checkable_case():
    # fast: twice slow's bandwidth and FLOP/s at the same price; a free link; the batch is capped at 8, so every
    # candidate runs at b = 8. For the same counts and m, every time of fast on both roles is half of slow's on
    # both, and a mix of the two sits in between (one side halved): fast on both roles must rank first (4 of
    # each allow the same counts for every pair of kinds), slow on both below the best mix
    catalog = _catalog(fast=_kind(2000, 2), slow=_kind(1000, 1))
    model = CostModel(TOY, catalog)
    request = PlanRequest({"fast": 4, "slow": 4}, slo_tpot_ms=1000, context_len=100, link="fast", max_batch=8)
    result = plan(model, request)
    order = [(c.prediction.mix.attention_kind, c.prediction.mix.ffn_kind) for c in result.candidates]
    assert order[0] == ("fast", "fast")
    first_of = {pair: order.index(pair) for pair in set(order)}
    assert first_of[("slow", "slow")] > min(first_of[("fast", "slow")], first_of[("slow", "fast")])
    best = result.best
    mix = best.prediction.mix
    assert best.replicas == 4 // (mix.attention_count + mix.ffn_count)
    slow = next(
        c.prediction
        for c in result.candidates
        if c.prediction.mix == replace(mix, attention_kind="slow", ffn_kind="slow")
    )
    assert slow.tpot_ms == pytest.approx(2 * best.prediction.tpot_ms, rel=1e-6)
    assert slow.tokens_per_usd == pytest.approx(best.prediction.tokens_per_usd / 2, rel=1e-6)
    assert result.rules["chosen_regime"] in ("both", "megascale-infer", "fastafd", "neither")
    assert "MegaScale-Infer" in str(result.rules["why"]) and "FastAFD" in str(result.rules["why"])


def test_planner_refuses_when_no_split_holds_both_roles():
    # TOY: 8 MB of experts, 2 MB of attention weights. b (5.4 MB usable) holds the experts only two at a time,
    # and both b's are needed for them; c (1.8 MB usable) holds neither role. So no split works, though each
    # role alone finds a kind: attention b + FFN 2 x b would take 3 b's.
    catalog = _catalog(b=_kind(1000, 1, memory_gb=0.006), c=_kind(1000, 1, memory_gb=0.002))
    with pytest.raises(PlanningError, match="no split of it into an attention pool"):
        plan(CostModel(TOY, catalog), PlanRequest({"b": 2, "c": 1}, slo_tpot_ms=1000, context_len=100, link="fast"))


def test_a_mix_with_its_own_calibration_is_fitted_to_it():
    measured = Calibration(
        kinds={"x": KindCalibration(attention=(AttentionMeasurement(us_per_token=4.756, batch=8, context_len=128),))}
    )
    # the CostModel has no measurements; the mix's own double the attention roofline (see the case above)
    assert _model().predict(_mix(calibration=measured)).attention_us == pytest.approx(2 * 23)


def test_calibration_file_is_read_and_validated(tmp_path):
    from afd.errors import ConfigError
    from afd.planning.calibration import load_calibration

    path = tmp_path / "calibration.yaml"
    path.write_text(
        "version: 1\n"
        "kinds:\n"
        "  x:\n"
        "    attention: [{us_per_token: 4.756, batch: 8, context_len: 128}]\n"
        "    ffn: [{us_per_token_expert: 4.25}]\n"
        "links:\n"
        "  lab: {bandwidth_gb_per_s: 1, latency_us: 10}\n"
    )
    calibration = load_calibration(path, load_catalog().kind_of_device)
    assert calibration.kinds["x"].ffn[0].tokens == 16  # what ffn_nodes/node.py times by default
    model = _model(calibration=calibration)
    p = model.predict(_mix(link="lab"))
    assert (p.attention_us, p.ffn_us) == pytest.approx((2 * 23, 2 * 24))  # both efficiencies 2 (cases above)
    assert p.link_us == pytest.approx(80)  # the measured link "lab" = the catalog's "slow"
    path.write_text("kinds:\n  x:\n    attention: [{us_per_tok: 1}]\n")
    with pytest.raises(ConfigError, match=r"kinds\.x\.attention\.0\.us_per_tok: unknown field"):
        load_calibration(path, load_catalog().kind_of_device)
