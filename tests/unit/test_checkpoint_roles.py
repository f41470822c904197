"""Each role reads only its own tensors from the checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from afd.checkpoint import CheckpointReader
from afd.errors import MissingTensorError, ShapeMismatchError
from afd.model_spec import ModelSpec
from afd.tensor_names import TensorNames
from attn_nodes.model import AttentionHalfModel
from ffn_nodes.shard import FfnShard
from tests.checkpoints import ARCHITECTURES
from tests.engines import uneven_placement


def _all_tensors(directory):
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_roles_partition_the_checkpoint(arch, tiny_checkpoint):
    directory = tiny_checkpoint(arch)
    spec = ModelSpec.from_pretrained(directory)
    names = TensorNames(spec)

    attention_reader = CheckpointReader(directory)
    AttentionHalfModel.load(directory, 64, spec=spec, reader=attention_reader)
    assert attention_reader.tensors_read == set(names.attention_role())
    mlp_tensors = {
        n
        for n in _all_tensors(directory)
        if ".experts." in n
        or ".shared_expert." in n
        or ".shared_experts." in n
        or ".share_expert." in n  # Step-3.5's shared expert, and its stacked experts below
        or n.endswith(("moe.gate_proj.weight", "moe.up_proj.weight", "moe.down_proj.weight"))
        or n.endswith(("mlp.gate_proj.weight", "mlp.down_proj.weight"))
    }
    assert mlp_tensors and not attention_reader.tensors_read & mlp_tensors

    placement = uneven_placement(spec, 3)
    ffn_reads = []
    row_reads: list[dict[str, set[int]]] = []
    for index, node in enumerate(placement.nodes):
        reader = CheckpointReader(directory)
        FfnShard.load(directory, placement, node, spec=spec, reader=reader)
        assert not reader.tensors_read & attention_reader.tensors_read
        held = set(placement.experts[index])
        for name in reader.tensors_read:
            if name in reader.rows_read:  # a stacked tensor of all experts (gpt-oss, Step-3.5): only the held rows
                assert reader.rows_read[name] == held, f"{node} read rows {reader.rows_read[name]} of {name}"
            elif ".experts." in name:
                assert int(name.split(".experts.")[1].split(".")[0]) in held, f"{node} read foreign {name}"
        ffn_reads.append(reader.tensors_read)
        row_reads.append(reader.rows_read)

    # Together the roles read the whole checkpoint, and no expert is read twice.
    expert_reads = [n for reads in ffn_reads for n in reads if ".experts." in n and not any(n in r for r in row_reads)]
    assert len(expert_reads) == len(set(expert_reads))
    stacked = {name for rows in row_reads for name in rows}
    for name in stacked:
        rows = [row for node_rows in row_reads for row in node_rows.get(name, ())]
        assert sorted(rows) == list(range(spec.num_experts)), f"rows of {name} read {sorted(rows)}"
    assert (spec.family in ("gpt_oss", "step3p5")) == bool(stacked)
    assert attention_reader.tensors_read.union(*ffn_reads) == _all_tensors(directory)


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    directory = tiny_checkpoint("mixtral")
    tensors = {}
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        for name in f.keys():  # noqa: SIM118
            if "layers.1.block_sparse_moe.experts.3.w2" not in name:
                tensors[name] = f.get_tensor(name)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    spec = ModelSpec.from_pretrained(tmp_path)
    AttentionHalfModel.load(tmp_path, 64)  # the attention role does not need it
    with pytest.raises(MissingTensorError, match=r"model\.layers\.1\.block_sparse_moe\.experts\.3\.w2\.weight"):
        for node in uneven_placement(spec, 2).nodes:
            FfnShard.load(tmp_path, uneven_placement(spec, 2), node)


def test_shape_mismatch_is_reported(tiny_checkpoint, tmp_path):
    directory = tiny_checkpoint("qwen3_moe")
    config = json.loads((directory / "config.json").read_text())
    config["num_key_value_heads"] = 4  # the checkpoint's k_proj was written for 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(directory / "model.safetensors")
    with pytest.raises(ShapeMismatchError, match=r"k_proj\.weight.*\(32, 64\).*\(64, 64\)"):
        AttentionHalfModel.load(tmp_path, 64)


def test_sharded_index_checkpoint(tiny_checkpoint, tmp_path):
    directory = tiny_checkpoint("qwen2_moe")
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, members in halves.items():
        save_file({n: tensors[n] for n in members}, str(tmp_path / file))
        weight_map |= dict.fromkeys(members, file)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    reader = CheckpointReader(tmp_path)
    for name in names:
        torch.testing.assert_close(reader.get(name), tensors[name], rtol=0, atol=0)


def test_slices_read_only_the_requested_part(tiny_checkpoint):
    directory = tiny_checkpoint("llama")
    reader = CheckpointReader(directory)
    full = reader.get("model.layers.0.mlp.down_proj.weight")
    part = reader.get_slice("model.layers.0.mlp.down_proj.weight", 1, 10, 30, full_shape=(64, 96))
    torch.testing.assert_close(part, full[:, 10:30], rtol=0, atol=0)
    with pytest.raises(ShapeMismatchError, match="config implies"):
        reader.get_slice("model.layers.0.mlp.down_proj.weight", 1, 0, 5, full_shape=(64, 97))
