"""A copy of a MoE checkpoint whose gate sends (nearly) every token to one of a few hot experts.

Real traffic loads experts unevenly; the random test and built-in checkpoints load them evenly. This
rewrites each MoE layer's router rows of the hot experts as pairs `+s·v`, `-s·v` of one random unit
direction `v` (a new one per pair and layer): for every token one of the two scores `s·|v·h|` and the
other its negative, so one expert of each pair is chosen by almost every token, while the rest of the
model is untouched. With one pair per two of the gate's top-k slots (the default), about half of all
token-expert pairs go to the hot experts, all of them in the first FFN node's share of a balanced
placement. Measured in-process with 2 FFN shards (4 prompts, 16 greedy tokens): the tiny test qwen3_moe
(top-2, hot 0,1) puts 50% of pairs on the hot experts, max/mean node load 1.36; the built-in model
(top-4, hot 0-3, strength 20) 46%, max/mean 1.26 (hot 0,1 alone: 23%, 1.08).
What hot-expert replication is measured and tested with (`afd bench serve` on a cluster of this
checkpoint, tests/checkpoints.build_skewed_checkpoint).
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


def default_hot_experts(spec: ModelSpec) -> list[int]:
    """The first experts, one pair per two top-k slots (0,1 for top-2, 0-3 for top-4): each token then
    takes one expert of every pair, about half of its slots, and a balanced placement puts them all on
    the first FFN node."""
    top_k = max((layer.moe.top_k for layer in spec.layers if layer.moe is not None), default=2)
    return list(range(min(2 * max(1, top_k // 2), spec.num_experts - spec.num_experts % 2)))


def write_skewed_checkpoint(
    source: Path,
    target: Path,
    hot_experts: Sequence[int] | None = None,
    strength: float = 20.0,
    seed: int = 0,
) -> Path:
    """Copy `source` (an HF checkpoint directory) to `target` with the gate skewed towards `hot_experts`
    (an even number of distinct experts, taken in pairs; None: `default_hot_experts`); `strength` scales the
    hot rows (the router logit of a hot expert is about `strength * |v·h|` for a unit `v`, against ~1 for
    the others on the built-in model). Returns `target`."""
    spec = ModelSpec.from_pretrained(source)
    hot = list(hot_experts) if hot_experts is not None else default_hot_experts(spec)
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


def main(argv: Sequence[str] | None = None) -> Path:
    """`python -m benchmarks.skewed_checkpoint OUT [--source DIR] [--hot 0,1,2,3] [--strength S]`: write the
    skewed copy (of the built-in model by default) for `afd up --model OUT --expert-replication on|off`
    and `afd bench serve`."""
    import argparse

    from afd.builtin_model import builtin_model_dir

    parser = argparse.ArgumentParser(prog="python -m benchmarks.skewed_checkpoint", description=__doc__)
    parser.add_argument("out", type=Path, help="directory to write (created)")
    parser.add_argument("--source", type=Path, default=None, help="checkpoint to copy (default: the built-in model)")
    parser.add_argument("--hot", default=None, help="hot experts, comma-separated, an even count (default: top-k)")
    parser.add_argument("--strength", type=float, default=20.0, help="scale of the hot router rows")
    args = parser.parse_args(argv)
    hot = [int(e) for e in args.hot.split(",") if e.strip()] if args.hot else None
    written = write_skewed_checkpoint(args.source or builtin_model_dir(), args.out, hot, args.strength)
    print(written)
    return written


if __name__ == "__main__":
    main()
