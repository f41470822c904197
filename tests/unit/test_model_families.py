"""Qwen2 dense, GLM-4.5 and gpt-oss: what the spec reads from their configs (as saved by transformers and as
published on the Hub), the sliding-window mask, and `afd bench engine` accepting every supported family and
an fp8 checkpoint.

Token equivalence with transformers and role-pruned loading for these families run in
test_engine_equivalence.py and test_checkpoint_roles.py, over every architecture of tests/checkpoints.py.
"""

from __future__ import annotations

import json

import pytest

from afd.errors import ConfigError
from afd.model_spec import ModelSpec
from afd.sampling_params import SamplingParams
from attn_nodes.attention_metadata import AttentionMetadata, SequenceChunk
from attn_nodes.config import EngineConfig
from tests.checkpoints import ARCHITECTURES


def test_qwen2_dense_spec(tiny_checkpoint):
    spec = ModelSpec.from_pretrained(tiny_checkpoint("qwen2"))
    assert spec.family == "qwen2" and not spec.is_moe and spec.qkv_bias and not spec.o_bias
    assert [layer.dense_intermediate_size for layer in spec.layers] == [96, 96]
    assert (spec.sliding_window, spec.sliding_layers) == (6, (1,))
    assert [spec.attention_window(i) for i in range(2)] == [None, 6]


def test_glm4_moe_spec(tiny_checkpoint):
    spec = ModelSpec.from_pretrained(tiny_checkpoint("glm4_moe"))
    assert [layer.kind for layer in spec.layers] == ["dense", "moe", "moe"]
    assert spec.rope.rotary_dim == 8 and spec.head_dim == 16  # partial_rotary_factor 0.5
    assert spec.qk_norm and spec.qkv_bias and not spec.o_bias and not spec.sliding_layers
    moe = spec.moe(1)
    assert moe is not None
    assert (moe.scoring, moe.group_limit, moe.n_group, moe.topk_group, moe.correction_bias) == (
        "sigmoid",
        "group_top2_sum",
        4,
        2,
        True,
    )
    assert (moe.norm_topk_prob, moe.routed_scaling_factor, moe.shared_intermediate_size) == (True, 2.5, 24)


def test_gpt_oss_spec(tiny_checkpoint):
    spec = ModelSpec.from_pretrained(tiny_checkpoint("gpt_oss"))
    assert spec.attention_sinks and spec.qkv_bias and spec.o_bias
    assert (spec.sliding_window, spec.sliding_layers) == (6, (0, 2))
    assert spec.rope.rope_type == "yarn" and not spec.rope.truncate
    moe = spec.moe(0)
    assert moe is not None
    assert (moe.scoring, moe.router_bias, moe.activation, moe.swiglu_limit, moe.swiglu_alpha) == (
        "topk_softmax",
        True,
        "clamped_swiglu",
        0.1,
        1.702,
    )


def _hub_config(arch: str, **overrides):
    config = {
        "architectures": [arch],
        "vocab_size": 32,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    return config | overrides


def test_hub_glm45_air_config():
    """GLM-4.5-Air's published config: partial_rotary_factor at the top level, no q/k norm, no layer_types."""
    config = _hub_config(
        "Glm4MoeForCausalLM",
        head_dim=16,
        partial_rotary_factor=0.5,
        rope_theta=1000000,
        use_qk_norm=False,
        attention_bias=True,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
    )
    spec = ModelSpec.from_config(config)
    assert spec.rope.rotary_dim == 8 and spec.rope.theta == 1e6 and not spec.qk_norm
    assert [layer.kind for layer in spec.layers] == ["dense", "moe", "moe", "moe"]
    # The config class defaults to half-rotary when the key is missing altogether.
    del config["partial_rotary_factor"]
    assert ModelSpec.from_config(config).rope.rotary_dim == 8


def test_hub_gpt_oss_config_without_layer_types_alternates():
    config = _hub_config(
        "GptOssForCausalLM", head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=128
    )
    spec = ModelSpec.from_config(config)
    assert spec.sliding_layers == (0, 2) and spec.sliding_window == 128
    assert spec.moe(3) is not None and spec.moe(3).swiglu_limit == 7.0  # type: ignore[union-attr]


def test_hub_qwen25_config_has_no_sliding_layers():
    """Qwen2.5 / QwQ publish sliding_window with use_sliding_window false: every layer attends fully."""
    config = _hub_config("Qwen2ForCausalLM", use_sliding_window=False, sliding_window=131072, max_window_layers=2)
    assert ModelSpec.from_config(config).sliding_layers == ()
    config["use_sliding_window"] = True
    spec = ModelSpec.from_config(config)
    assert spec.sliding_layers == (2, 3) and spec.sliding_window == 131072


def test_bad_layer_types_are_named():
    config = _hub_config("GptOssForCausalLM", num_local_experts=4, num_experts_per_tok=2, sliding_window=8)
    with pytest.raises(ConfigError, match="chunked_attention"):
        ModelSpec.from_config(config | {"layer_types": ["chunked_attention"] * 4})
    with pytest.raises(ConfigError, match="must list 4 layers"):
        ModelSpec.from_config(config | {"layer_types": ["full_attention"]})
    with pytest.raises(ConfigError, match="partial_rotary_factor"):
        ModelSpec.from_config(_hub_config("Glm4MoeForCausalLM", partial_rotary_factor=1.5))


@pytest.mark.parametrize("decode", [False, True])
def test_window_mask_hides_keys_outside_the_window(decode):
    """Two sequences (one a prefill chunk that starts mid-context) against explicit per-position rules."""
    chunks = (
        [SequenceChunk([0, 1, 2], 9, 1), SequenceChunk([3, 4], 5, 1)]
        if decode
        else [SequenceChunk([0, 1, 2], 3, 5), SequenceChunk([3, 4], 0, 2)]
    )
    meta = AttentionMetadata.build(chunks, block_size=4)
    window = 3
    mask = meta.window_mask(window)
    assert mask.shape == (2, 1, meta.max_query_len, meta.context_slots.shape[1])
    for seq, chunk in enumerate(chunks):
        for row in range(meta.max_query_len):
            query = chunk.start + row if row < chunk.num_tokens else 0  # padding rows sit at position 0
            expected = [query - window < key <= query for key in range(mask.shape[-1])]
            assert mask[seq, 0, row].tolist() == expected
    assert meta.window_mask(window) is mask, "built once per step, shared by the sliding layers"


@pytest.fixture(scope="module")
def fp8_deepseek_v3(tmp_path_factory):
    from tests.checkpoints import build_fp8_checkpoint

    return build_fp8_checkpoint(tmp_path_factory.mktemp("fp8_deepseek_v3"))[0]


def _run_bench_engine(directory, monkeypatch, capsys):
    """`afd bench engine --checkpoint DIR --batch 1 --batch 2` (bandwidth probes stubbed: they read a GiB), through
    the command so that the printed JSON lines and table are exercised too; the JSON lines."""
    from benchmarks import engine

    monkeypatch.setattr(engine, "read_bandwidth_gbs", lambda **_: 10.0)
    monkeypatch.setattr(engine, "copy_bandwidth_gbs", lambda **_: 10.0)
    engine.command(
        batch=[1, 2], prompt_len=8, new_tokens=2, ffn_shards=3, checkpoint=directory, repeats=1, json_output=False
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [line["batch"] for line in lines] == [1, 2] and all(line["ffn_shards"] == 3 for line in lines)
    assert all(line["bytes_per_decode_step"] > 0 and line["engine_tok_s"] > 0 for line in lines)
    return lines


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_bench_engine_accepts_the_family(arch, tiny_checkpoint, monkeypatch, capsys):
    """Every architecture of tests/checkpoints.py, Step-3.5 included (transformers has no causal LM for it: the
    benchmark's reference is benchmarks/references.py's), runs against transformers."""
    lines = _run_bench_engine(tiny_checkpoint(arch), monkeypatch, capsys)
    assert all(line["reference_tok_s"] > 0 and "transformers_skipped" not in line for line in lines)


def test_bench_engine_accepts_an_fp8_checkpoint(fp8_deepseek_v3, monkeypatch, capsys):
    """An fp8 block-scaled checkpoint: the engine runs; the transformers column is skipped with a one-line reason
    in the JSON and the output instead of crashing."""
    lines = _run_bench_engine(fp8_deepseek_v3, monkeypatch, capsys)
    assert all(line["reference_tok_s"] is None and line["ratio"] is None for line in lines)
    reason = lines[0]["transformers_skipped"]
    assert "fp8" in reason and "\n" not in reason


@pytest.mark.parametrize("family", ["glm4_moe", "minimax", "qwen3_moe"])
def test_midsize_checkpoint_writer_at_tiny_size(family, tmp_path):
    """benchmarks.midsize_checkpoints writes, through the code the mid-size benchmark checkpoints take, a tiny bf16
    checkpoint with the family's features that the engine serves token-identical to transformers; a second call
    reuses it, another seed rewrites it."""
    import torch

    from benchmarks import midsize_checkpoints
    from tests.checkpoints import reference_greedy, reference_model
    from tests.engines import inprocess_engine

    out = midsize_checkpoints.write_checkpoint(family, tmp_path / family, "tiny")
    spec = ModelSpec.from_pretrained(out)
    assert (spec.hidden_size, spec.num_layers, spec.num_experts) == (64, 8, 8)
    if family == "glm4_moe":
        assert spec.layers[0].kind == "dense" and spec.moe(1).shared_intermediate_size > 0  # type: ignore[union-attr]
        assert spec.moe(1).correction_bias and spec.rope.rotary_dim == 8  # type: ignore[union-attr]
    if family == "minimax":
        assert spec.linear_attention is not None and spec.linear_attention.layers == tuple(range(7))
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118
    # GLM keeps its router correction bias in float32, as GLM-4.5 publishes it.
    assert {d for name, d in dtypes.items() if not name.endswith("e_score_correction_bias")} == {"BF16"}

    prompts = [[5], list(range(3, 14))]  # 11 tokens: MiniMax's 4-token lightning blocks, the last one partial
    engine = inprocess_engine(out, 3, EngineConfig(block_size=4, num_kv_blocks=64, dtype="float32"))
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    reference = reference_model(out)
    assert reference.dtype == torch.float32
    assert engine.generate(prompts, params) == [reference_greedy(reference, p, 6) for p in prompts]

    written = (out / "model.safetensors").stat().st_mtime_ns
    assert midsize_checkpoints.write_checkpoint(family, out, "tiny") == out
    assert (out / "model.safetensors").stat().st_mtime_ns == written, "the same checkpoint is reused"
    midsize_checkpoints.write_checkpoint(family, out, "tiny", seed=8)
    assert json.loads((out / midsize_checkpoints.MARKER).read_text())["seed"] == 8


def test_midsize_shape_is_the_bench_configs():
    """The mid size is benchmarks/engine.py's bench_config(), so the families' rows compare with Qwen3-MoE's."""
    from benchmarks import midsize_checkpoints
    from benchmarks.engine import bench_config

    _, qwen = midsize_checkpoints.family_config("qwen3_moe", midsize_checkpoints.SIZES["mid"])
    assert {k: v for k, v in bench_config().items() if k in qwen} == qwen
    for family in midsize_checkpoints.FAMILIES:
        _, kwargs = midsize_checkpoints.family_config(family, midsize_checkpoints.SIZES["mid"])
        assert (kwargs["hidden_size"], kwargs["num_hidden_layers"], kwargs["vocab_size"]) == (1024, 8, 32000)
        assert kwargs["num_experts_per_tok"] == 4
