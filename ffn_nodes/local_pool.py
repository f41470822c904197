"""An FFN pool inside the current process: N shards behind the in-process transport.

What `afd generate`, the engine benchmark and the tests use instead of FFN node processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from afd.checkpoint import CheckpointReader
from afd.devices import parse_device
from afd.dtypes import resolve_dtype
from afd.model_spec import ModelSpec
from afd.placement import ExpertPlacement
from afd.transport import InProcessTransport
from ffn_nodes.shard import FfnShard


def local_ffn_pool(
    model_dir: str | Path,
    num_shards: int,
    dtype: str = "auto",
    weights: Sequence[float] | None = None,
    device: str = "cpu",
    attention_device: str | None = None,
) -> tuple[ExpertPlacement, InProcessTransport]:
    """Placement over shards "ffn-0".."ffn-{N-1}" (in proportion to `weights`) and a transport to them; the
    shards hold their weights on `device` ("cpu", "cuda", "cuda:1", ...; refused when not present). The
    transport hands the partial sums back on `attention_device` (the attention half's, e.g. cuda beside CPU
    shards), or where the shards computed them when None."""
    spec = ModelSpec.from_pretrained(model_dir)
    placement = ExpertPlacement.balanced(spec.num_experts, [f"ffn-{i}" for i in range(num_shards)], weights)
    reader = CheckpointReader(model_dir, dtype=resolve_dtype(dtype, spec.dtype), device=parse_device(device))
    shards = {node: FfnShard.load(model_dir, placement, node, spec=spec, reader=reader) for node in placement.nodes}
    back = None if attention_device is None else parse_device(attention_device)
    return placement, InProcessTransport(shards, device=back)
