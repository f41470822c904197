"""fp8 block-scaled checkpoints as DeepSeek-V3 / Qwen3 -FP8 publish them: read dequantised, refused when wrong.

The checkpoint is a random bf16 DeepSeek-V3 quantised in the test (tests/checkpoints.build_fp8_checkpoint) with
dimensions that leave partial 128 x 128 blocks; transformers runs on the same weights dequantised to fp32.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from afd.checkpoint import INDEX_FILE, CheckpointReader
from afd.errors import MissingTensorError, ShapeMismatchError
from afd.model_spec import ModelSpec
from afd.quantized_weights import SUPPORTED_QUANTIZATION, Fp8BlockScheme, UnsupportedQuantizationError
from afd.sampling_params import SamplingParams
from afd.tensor_names import TensorNames
from attn_nodes.config import EngineConfig
from attn_nodes.model import AttentionHalfModel
from benchmarks.load_memory import quantize_fp8_blocks, write_fp8_checkpoint
from ffn_nodes.shard import FfnShard
from tests.checkpoints import build_fp8_checkpoint, reference_greedy, reference_model
from tests.engines import inprocess_engine, uneven_placement

PROMPTS = [[7], [3, 14, 15, 92, 65], list(range(11, 30))]
NEW_TOKENS = 10
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
FP32 = EngineConfig(block_size=4, num_kv_blocks=64, dtype="float32")


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    return build_fp8_checkpoint(tmp_path_factory.mktemp("fp8_deepseek_v3"))


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out |= {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    return out


def _rewrite(source: Path, target: Path, drop: str | None = None, quantization: dict | None = None) -> Path:
    """A copy of checkpoint `source` without tensor `drop` and/or with another quantization_config."""
    shutil.copytree(source, target)
    if drop is not None:
        index = json.loads((target / INDEX_FILE).read_text())
        file = target / index["weight_map"].pop(drop)
        kept = {n: t for n, t in _tensors_of(file).items() if n != drop}
        save_file(kept, str(file), metadata={"format": "pt"})
        (target / INDEX_FILE).write_text(json.dumps(index))
    if quantization is not None:
        config = json.loads((target / "config.json").read_text())
        config["quantization_config"] = quantization
        (target / "config.json").write_text(json.dumps(config))
    return target


def _tensors_of(file: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(file), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118


def test_checkpoint_is_in_the_published_format(fp8_checkpoint):
    fp8, _ = fp8_checkpoint
    config = json.loads((fp8 / "config.json").read_text())
    assert config["quantization_config"] == {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }
    tensors = _tensors(fp8)
    assert len(set(json.loads((fp8 / INDEX_FILE).read_text())["weight_map"].values())) >= 2, "sharded"
    down = tensors["model.layers.1.mlp.experts.0.down_proj.weight"]  # [192, 160]: partial blocks both ways
    assert down.dtype == torch.float8_e4m3fn and tuple(down.shape) == (192, 160)
    scale = tensors["model.layers.1.mlp.experts.0.down_proj.weight_scale_inv"]
    assert scale.dtype == torch.float32 and tuple(scale.shape) == (2, 2)
    for unquantized in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight"):
        assert tensors[unquantized].dtype == torch.bfloat16 and unquantized + "_scale_inv" not in tensors


def test_dequantization_matches_transformers_on_whole_blocks():
    """On shapes transformers can dequantise (multiples of the block), ours and the test's quantiser agree with it."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize

    hf = SimpleNamespace(quantization_config=SimpleNamespace(weight_block_size=(128, 128), scale_fmt="float"))
    weight = torch.randn(256, 384) * 0.1
    expected = Fp8Quantize(hf).convert({"w.weight": weight})
    quantized, scale_inv = quantize_fp8_blocks(weight, (128, 128))
    assert torch.equal(quantized.view(torch.uint8), expected["w.weight"].view(torch.uint8))
    assert torch.equal(scale_inv, expected["w.weight_scale_inv"])
    reference = Fp8Dequantize(hf)._dequantize_one(quantized, scale_inv, torch.float32)

    class Part:  # a safetensors slice handle over an in-memory tensor
        def __init__(self, t: torch.Tensor, code: str) -> None:
            self.t, self.code = t, code

        def get_dtype(self) -> str:
            return self.code

        def get_shape(self) -> list[int]:
            return list(self.t.shape)

        def __getitem__(self, key):
            return self.t[key]

    ours = Fp8BlockScheme((128, 128)).dequantize("w.weight", Part(quantized, "F8_E4M3"), Part(scale_inv, "F32"), None)
    assert ours.dtype == torch.bfloat16, "the config dtype (bfloat16 by default) when the reader names none"
    ours = Fp8BlockScheme((128, 128)).dequantize(
        "w.weight", Part(quantized, "F8_E4M3"), Part(scale_inv, "F32"), torch.float32
    )
    assert torch.equal(ours, reference)


def test_every_weight_and_slice_dequantizes_exactly(fp8_checkpoint):
    fp8, dequantized = fp8_checkpoint
    expected = _tensors(dequantized)
    reader = CheckpointReader(fp8, dtype=torch.float32)
    for name, tensor in expected.items():
        assert torch.equal(reader.get(name, tuple(tensor.shape)), tensor), name
    # Slices that start and end inside a block, along either dimension.
    down = "model.layers.0.mlp.down_proj.weight"  # [192, 288]
    gate = "model.layers.0.mlp.gate_proj.weight"  # [288, 192]
    for start, end in ((0, 96), (96, 288), (100, 260), (130, 131)):
        part = reader.get_slice(down, 1, start, end, full_shape=(192, 288))
        assert torch.equal(part, expected[down][:, start:end]), (start, end)
        part = reader.get_slice(gate, 0, start, end, full_shape=(288, 192))
        assert torch.equal(part, expected[gate][start:end]), (start, end)
    assert CheckpointReader(fp8, dtype=torch.bfloat16).get(down).dtype == torch.bfloat16


def test_scales_in_another_shard_than_their_weights(fp8_checkpoint, tmp_path):
    """The reader keeps one shard open; a weight whose scale lives in another shard still reads exactly."""
    fp8, dequantized = fp8_checkpoint
    tensors = _tensors(fp8)
    groups = {
        "weights.safetensors": {n: t for n, t in tensors.items() if not n.endswith("_scale_inv")},
        "scales.safetensors": {n: t for n, t in tensors.items() if n.endswith("_scale_inv")},
    }
    split = tmp_path / "split"
    split.mkdir()
    for file, members in groups.items():
        save_file(members, str(split / file), metadata={"format": "pt"})
    weight_map = {n: file for file, members in groups.items() for n in members}
    (split / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(fp8 / "config.json", split / "config.json")
    reader = CheckpointReader(split, dtype=torch.float32)
    for name, tensor in _tensors(dequantized).items():
        assert torch.equal(reader.get(name), tensor), name
        if tensor.ndim == 2:
            assert torch.equal(reader.get_slice(name, 0, 1, tensor.shape[0]), tensor[1:]), name


@pytest.mark.parametrize("num_shards", [1, 2])
def test_greedy_tokens_match_transformers_on_the_dequantized_weights(num_shards, fp8_checkpoint):
    fp8, dequantized = fp8_checkpoint
    model = reference_model(dequantized)
    expected = [reference_greedy(model, p, NEW_TOKENS) for p in PROMPTS]
    assert inprocess_engine(fp8, num_shards, FP32).generate(PROMPTS, GREEDY) == expected


def test_roles_read_only_their_tensors_and_scales(fp8_checkpoint):
    fp8, _ = fp8_checkpoint
    spec = ModelSpec.from_pretrained(fp8)
    every = set(json.loads((fp8 / INDEX_FILE).read_text())["weight_map"])
    attention = CheckpointReader(fp8)
    AttentionHalfModel.load(fp8, 64, spec=spec, reader=attention)
    names = set(TensorNames(spec).attention_role())
    assert attention.tensors_read == names | {n + "_scale_inv" for n in names if n + "_scale_inv" in every}
    assert not {n for n in attention.tensors_read if "experts." in n or (".mlp." in n and "mlp.gate." not in n)}
    assert "model.layers.0.self_attn.kv_b_proj.weight_scale_inv" in attention.tensors_read

    placement = uneven_placement(spec, 2)
    reads = []
    for index, node in enumerate(placement.nodes):
        reader = CheckpointReader(fp8)
        FfnShard.load(fp8, placement, node, spec=spec, reader=reader)
        assert not reader.tensors_read & attention.tensors_read
        assert not {n for n in reader.tensors_read if ".self_attn." in n}
        for name in reader.tensors_read:
            if ".experts." in name and "shared_experts" not in name:
                assert int(name.split(".experts.")[1].split(".")[0]) in set(placement.experts[index]), name
        reads.append(reader.tensors_read)
    assert attention.tensors_read.union(*reads) == every, "weights and scales, each read by its owner"


def test_missing_scale_is_refused_with_its_name(fp8_checkpoint, tmp_path):
    fp8, _ = fp8_checkpoint
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    broken = _rewrite(fp8, tmp_path / "broken", drop=name + "_scale_inv")
    with pytest.raises(MissingTensorError, match=rf"{name}.*{name}_scale_inv"):
        inprocess_engine(broken, 2, FP32)
    attention_name = "model.layers.2.self_attn.o_proj.weight"
    broken = _rewrite(fp8, tmp_path / "broken_attn", drop=attention_name + "_scale_inv")
    with pytest.raises(MissingTensorError, match=attention_name):
        AttentionHalfModel.load(broken, 64)


def test_block_size_that_does_not_match_the_scales_is_refused(fp8_checkpoint, tmp_path):
    fp8, _ = fp8_checkpoint
    config = json.loads((fp8 / "config.json").read_text())["quantization_config"]
    wrong = _rewrite(fp8, tmp_path / "wrong", quantization=config | {"weight_block_size": [64, 64]})
    with pytest.raises(ShapeMismatchError, match=r"scale tensor 'model\..*weight_scale_inv'.*\[64, 64\]"):
        inprocess_engine(wrong, 1, FP32)


def test_scales_written_with_another_block_are_refused(fp8_checkpoint, tmp_path):
    """The other way round: scales quantised per 64 x 64 block, config.json saying 128 x 128."""
    _, dequantized = fp8_checkpoint
    written = write_fp8_checkpoint(dequantized, tmp_path / "b64", block=(64, 64))
    config = json.loads((written / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [128, 128]
    (written / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ShapeMismatchError,
        match=r"scale tensor 'model\.layers\.0\.self_attn\.o_proj\.weight_scale_inv' has shape \(3, 1\)",
    ):
        AttentionHalfModel.load(written, 64)
    # Declared truthfully, 64 x 64 blocks are read as well.
    config["quantization_config"]["weight_block_size"] = [64, 64]
    (written / "config.json").write_text(json.dumps(config))
    assert CheckpointReader(written).get("model.layers.0.self_attn.q_a_proj.weight").shape == (136, 192)


@pytest.mark.parametrize(
    "quantization",
    [
        {"quant_method": "gptq", "bits": 4, "group_size": 128},
        {"quant_method": "awq", "bits": 4, "version": "gemm"},
        {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]},
        {"quant_method": "bitsandbytes", "load_in_4bit": True},
        {"quant_method": "compressed-tensors", "format": "float-quantized"},
        {"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]},
        {"quant_method": "fp8", "activation_scheme": "dynamic"},  # per-tensor fp8 without blocks
    ],
    ids=["gptq", "awq", "mxfp4", "bitsandbytes", "compressed-tensors", "fp8-e5m2", "fp8-per-tensor"],
)
def test_other_quantization_formats_are_refused_by_name(quantization, fp8_checkpoint, tmp_path):
    fp8, _ = fp8_checkpoint
    other = _rewrite(fp8, tmp_path / "other", quantization=quantization)
    named = quantization.get("fmt", quantization["quant_method"])
    with pytest.raises(UnsupportedQuantizationError, match=named) as refused:
        inprocess_engine(other, 1, FP32)
    assert SUPPORTED_QUANTIZATION in str(refused.value)


def test_fp8_tensors_without_a_quantization_config_are_refused(fp8_checkpoint, tmp_path):
    fp8, _ = fp8_checkpoint
    bare = _rewrite(fp8, tmp_path / "bare")
    config = json.loads((bare / "config.json").read_text())
    del config["quantization_config"]
    (bare / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedQuantizationError, match=r"'model\.layers\.0\.self_attn\.o_proj\.weight'"):
        AttentionHalfModel.load(bare, 64)


def test_load_memory_benchmark_reports_each_role(fp8_checkpoint):
    """`afd bench load-memory` measures a role in its own process (figures on a tiny model are noise)."""
    from benchmarks.load_memory import run

    fp8, _ = fp8_checkpoint
    (row,) = run(fp8, ["ffn-1"], 2, "bfloat16", timeout_s=120)
    assert row.role == "ffn-1" and row.peak_load_mib > 0 and 0 < row.weights_mib < row.bound_mib
