"""config.json parsing for every supported architecture, and clear errors for the rest."""

from __future__ import annotations

import json

import pytest

from afd.errors import ConfigError, UnsupportedArchitectureError
from afd.model_spec import SUPPORTED_ARCHITECTURES, ModelSpec
from tests.checkpoints import ARCHITECTURES


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_test_checkpoint_parses(arch, tiny_checkpoint):
    spec = ModelSpec.from_pretrained(tiny_checkpoint(arch))
    assert spec.architecture in SUPPORTED_ARCHITECTURES
    assert len(spec.layers) == spec.num_layers


def test_moe_details_are_read(tiny_checkpoint):
    qwen3 = ModelSpec.from_pretrained(tiny_checkpoint("qwen3_moe"))
    assert [layer.kind for layer in qwen3.layers] == ["moe", "dense", "moe"]  # mlp_only_layers=[1]
    assert qwen3.rope.rope_type == "yarn" and qwen3.qk_norm
    qwen2 = ModelSpec.from_pretrained(tiny_checkpoint("qwen2_moe"))
    moe = qwen2.moe(0)
    assert moe is not None and moe.shared_gate and moe.shared_intermediate_size == 48 and qwen2.qkv_bias
    v3 = ModelSpec.from_pretrained(tiny_checkpoint("deepseek_v3"))
    moe = v3.moe(1)
    assert v3.layers[0].kind == "dense" and moe is not None
    assert (moe.scoring, moe.group_limit, moe.correction_bias, moe.routed_scaling_factor) == (
        "sigmoid",
        "group_top2_sum",
        True,
        2.5,
    )
    assert v3.mla is not None and v3.mla.q_lora_rank == 24 and v3.kv_entry_width == 16 + 8
    v2 = ModelSpec.from_pretrained(tiny_checkpoint("deepseek_v2"))
    assert v2.moe(1).group_limit == "group_max" and v2.mla.q_lora_rank is None  # type: ignore[union-attr]
    llama = ModelSpec.from_pretrained(tiny_checkpoint("llama"))
    assert not llama.is_moe and llama.tie_word_embeddings and llama.rope.rope_type == "llama3"


def test_hub_style_rope_scaling_is_read():
    config = _llama_config(rope_theta=1e6, rope_scaling={"type": "linear", "factor": 4.0})
    spec = ModelSpec.from_config(config)
    assert (spec.rope.theta, spec.rope.rope_type, spec.rope.factor) == (1e6, "linear", 4.0)


def test_unknown_architecture_lists_the_supported_ones():
    with pytest.raises(UnsupportedArchitectureError) as info:
        ModelSpec.from_config({"architectures": ["GPT2LMHeadModel"]})
    message = str(info.value)
    assert "GPT2LMHeadModel" in message
    assert all(name in message for name in SUPPORTED_ARCHITECTURES)


def test_missing_architecture_is_unsupported():
    with pytest.raises(UnsupportedArchitectureError, match="None"):
        ModelSpec.from_config({"hidden_size": 8})


def test_missing_key_is_named():
    config = _llama_config()
    del config["num_hidden_layers"]
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        ModelSpec.from_config(config)


def test_unsupported_rope_type_is_named():
    with pytest.raises(ConfigError, match="longrope"):
        ModelSpec.from_config(_llama_config(rope_scaling={"rope_type": "longrope", "factor": 2.0}))


def test_heads_must_divide():
    with pytest.raises(ConfigError, match="not divisible"):
        ModelSpec.from_config(_llama_config(num_key_value_heads=3))


def test_bad_json_is_a_config_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelSpec.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"no config\.json"):
        ModelSpec.from_pretrained(tmp_path / "missing")


def _llama_config(**overrides):
    config = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 32,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    config.update(overrides)
    return json.loads(json.dumps(config))
