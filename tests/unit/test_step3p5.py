"""StepFun Step-3.5: what the spec reads from its config (the Hub's keys and those transformers' Step3p7TextConfig
saves), the names the roles read, and the configs it refuses.

Token equivalence with transformers (1, 2 and 3 uneven FFN shards, a 1-token prompt and one longer than the
sliding window, chunked prefill, microbatches) and role-pruned loading run in test_engine_equivalence.py and
test_checkpoint_roles.py over every architecture of tests/checkpoints.py, this one included.
"""

from __future__ import annotations

import json

import pytest

from afd.errors import ConfigError
from afd.model_spec import ModelSpec
from afd.tensor_names import TensorNames
from tests.step3p5_reference import CONFIG, reference_config


def test_hub_config_spec(tiny_checkpoint):
    spec = ModelSpec.from_pretrained(tiny_checkpoint("step3p5"))
    assert spec.family == "step3p5" and spec.num_layers == 5  # the MTP layer's list entries dropped
    assert (spec.num_heads, spec.num_kv_heads, spec.sliding_num_heads) == (4, 2, 6)
    assert [spec.layer_num_heads(i) for i in range(5)] == [4, 6, 6, 4, 6]
    assert (spec.sliding_window, spec.sliding_layers) == (6, (1, 2, 4))
    assert spec.kv_entry_width == 2 * 2 * 16, "one cache entry width on every layer"
    assert spec.head_gate and spec.norm_offset and spec.qk_norm and not spec.qkv_bias and not spec.o_bias
    assert (spec.rope.theta, spec.rope.rotary_dim, spec.rope.rope_type) == (500000.0, 8, "llama3")
    assert spec.sliding_rope is not None
    assert (spec.sliding_rope.theta, spec.sliding_rope.rotary_dim, spec.sliding_rope.rope_type) == (
        10000.0,
        16,
        "default",
    )
    assert [layer.kind for layer in spec.layers] == ["dense", "dense", "moe", "moe", "moe"]
    assert [layer.mlp_swiglu_limit for layer in spec.layers] == [0.0, 0.1, 0.0, 0.1, 0.0]
    moe = spec.moe(4)
    assert moe is not None
    assert (moe.num_experts, moe.top_k, moe.intermediate_size, moe.shared_intermediate_size) == (8, 3, 24, 40)
    assert (moe.scoring, moe.correction_bias, moe.norm_topk_prob, moe.routed_scaling_factor) == (
        "sigmoid",
        True,
        True,
        2.5,
    )
    assert (moe.activation, moe.swiglu_limit) == ("limited_swiglu", 0.1)
    assert spec.moe(2).activation == "swiglu"  # type: ignore[union-attr]


def test_transformers_saved_config_gives_the_same_spec(tmp_path):
    """The keys Step3p7TextConfig writes (num_key_value_heads, n_routed_experts, mlp_layer_types,
    num_sliding_attention_heads, rope_parameters per layer type) describe the same model as the Hub's."""
    saved = reference_config(CONFIG).to_dict()
    saved["architectures"] = CONFIG["architectures"]
    for hub_only in ("attention_other_setting", "moe_layers_enum", "rope_theta", "partial_rotary_factors"):
        assert hub_only not in saved
    (tmp_path / "config.json").write_text(json.dumps(saved))
    from_saved = ModelSpec.from_pretrained(tmp_path)
    from_hub = ModelSpec.from_config(CONFIG)
    assert from_saved.layers == from_hub.layers
    for field in ("num_heads", "num_kv_heads", "sliding_num_heads", "sliding_window", "sliding_layers", "rope"):
        assert getattr(from_saved, field) == getattr(from_hub, field), field
    assert from_saved.sliding_rope == from_hub.sliding_rope
    assert from_saved.softmax_scale == pytest.approx(from_hub.softmax_scale)


def test_tensor_names_are_the_hubs():
    names = TensorNames(ModelSpec.from_config(CONFIG))
    assert names.router(2) == {
        "gate": "model.layers.2.moe.gate.weight",
        "correction_bias": "model.layers.2.moe.router_bias",
    }
    stacked = names.stacked_experts(2)
    assert stacked is not None and stacked.up == "model.layers.2.moe.up_proj.weight"
    assert names.stacked_experts(0) is None and names.fused_experts(2) is None
    assert names.shared_expert(2).down == "model.layers.2.share_expert.down_proj.weight"
    assert names.dense_mlp(0).gate == "model.layers.0.mlp.gate_proj.weight"
    assert names.attention(1)["g_proj"] == "model.layers.1.self_attn.g_proj.weight"
    with pytest.raises(ValueError, match="stacked_experts"):
        names.expert(2, 0)


def test_published_defaults():
    """Keys a config may leave out: MoE from layer 3 (transformers' default), full attention everywhere."""
    config = {
        k: v for k, v in CONFIG.items() if k not in ("moe_layers_enum", "layer_types", "num_nextn_predict_layers")
    }
    for key in ("rope_theta", "partial_rotary_factors", "swiglu_limits", "swiglu_limits_shared"):
        config[key] = CONFIG[key][:5]
    spec = ModelSpec.from_config(config)
    assert [layer.kind for layer in spec.layers] == ["dense", "dense", "dense", "moe", "moe"]
    assert not spec.sliding_layers and spec.sliding_rope is None and spec.sliding_num_heads == 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"attention_other_setting": {"num_attention_heads": 6, "num_attention_groups": 1}}, "num_attention_groups"),
        ({"attention_other_setting": {"num_attention_heads": 6, "head_dim": 32}}, "head_dim"),
        ({"layer_types": ["full_attention", "chunked_attention"] * 3}, "chunked_attention"),
        ({"layer_types": ["full_attention"] * 4}, "layer_types must list 5 layers"),
        ({"swiglu_limits": [0.0] * 3}, "swiglu_limits must list 5 layers"),
        ({"attention_bias": True}, "attention_bias"),
        ({"moe_layers_enum": "2,x"}, "moe_layers_enum"),
        ({"partial_rotary_factors": [0.0] * 6}, "partial_rotary_factor"),
    ],
)
def test_unsupported_configs_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ModelSpec.from_config(CONFIG | overrides)
