"""A copy of a MoE checkpoint whose gate sends (nearly) every token to one of a few hot experts.

Real traffic loads experts unevenly; the random test and built-in checkpoints load them evenly. This
rewrites each MoE layer's router rows of the hot experts as pairs `+s·v`, `-s·v` of one random unit
direction `v` (a new one per pair and layer): for every token one of the two scores `s·|v·h|` and the
other its negative, so one expert of each pair is chosen by almost every token, while the rest of the
model is untouched. What hot-expert replication is measured and tested with (`afd bench serve` on a
cluster of this checkpoint, tests/checkpoints.build_skewed_checkpoint).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from afd.errors import ConfigError
from afd.model_spec import ModelSpec
from afd.tensor_names import TensorNames

DEFAULT_HOT_EXPERTS = (0, 1)
"""Experts made hot by default: a pair, both in the first FFN node's share of a balanced placement."""


def write_skewed_checkpoint(
    source: Path,
    target: Path,
    hot_experts: Sequence[int] = DEFAULT_HOT_EXPERTS,
    strength: float = 6.0,
    seed: int = 0,
) -> Path:
    """Copy `source` (an HF checkpoint directory) to `target` with the gate skewed towards `hot_experts`
    (an even number of distinct experts, taken in pairs); `strength` scales the hot rows (the router logit
    of a hot expert is about `strength * |v·h|`, against ~0.1 for the others on the test models).
    Returns `target`."""
    spec = ModelSpec.from_pretrained(source)
    hot = list(hot_experts)
    if not hot or len(hot) % 2 or len(set(hot)) != len(hot):
        raise ConfigError(f"hot experts come in pairs of distinct ids, got {hot}")
    if not all(0 <= e < spec.num_experts for e in hot):
        raise ConfigError(f"hot experts {hot} out of range [0, {spec.num_experts})")
    names = TensorNames(spec)
    gates = {names.router(layer)["gate"]: layer for layer in range(spec.num_layers) if spec.moe(layer) is not None}
    if not gates:
        raise ConfigError(f"{source} has no MoE layer to skew")
    target.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    found = 0
    for path in sorted(source.iterdir()):
        if path.suffix != ".safetensors":
            if path.is_file():
                shutil.copy(path, target / path.name)
            continue
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        for name in sorted(set(tensors) & set(gates)):
            weight = tensors[name].clone()
            for a, b in zip(hot[0::2], hot[1::2], strict=True):
                v = torch.randn(weight.shape[1], generator=generator)
                v = strength * v / v.norm()
                weight[a] = v.to(weight.dtype)
                weight[b] = (-v).to(weight.dtype)
            tensors[name] = weight
            found += 1
        save_file(tensors, str(target / path.name), metadata=metadata)
    if found != len(gates):
        raise ConfigError(f"found {found} of the {len(gates)} router weights of {source}")
    return target
